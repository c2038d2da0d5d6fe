"""Printed benchmark of the harness itself, on real vLLM CPU servers (no timed asserts anywhere).

Figures:
  1. harness overhead per config, excluding engine boot and the benchmark: launch preparation, readiness
     detection lag (our detection vs. the true ready moment, found by a 10 ms side poller), teardown of the
     whole server tree, results entry + write, and the per-run matrix load;
  2. time from a server's death to the test's failure: the launcher SIGKILLed while it loads, and the
     engine core SIGKILLed while it loads (the API server must notice, then the harness).

Run: ``.venv/bin/python scripts/bench_harness.py`` (about 2-3 minutes on 2 cores).
"""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import psutil
import requests

from pytest_moe.checks import CHECKS
from pytest_moe.matrix import load_matrix
from pytest_moe.results import ResultsStore
from pytest_moe.runner import CellRun, RunOptions
from pytest_moe.server import ServerError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "tiny-qwen3-moe::TP1_auto"


def _cell(tmp: Path) -> CellRun:
    cfg = load_matrix(ROOT / "test/nightly/smoke_matrix.yaml").by_id()[CONFIG]
    opts = RunOptions(matrix_path="test/nightly/smoke_matrix.yaml", results_dir=tmp, cooldown_s=0.0)
    return CellRun(cfg, opts, lease=None, progress=lambda line: None)


def overhead(tmp: Path) -> None:
    t0 = time.perf_counter()
    load_matrix(ROOT / "model_matrix.yaml")
    matrix_ms = (time.perf_counter() - t0) * 1000

    cell = _cell(tmp)
    true_ready: list[float] = []
    stop_poll = threading.Event()

    def poll() -> None:
        while not stop_poll.is_set():
            server = cell.server
            if server is not None:
                try:
                    if requests.get(server.base_url + "/health", timeout=0.5).status_code == 200:
                        true_ready.append(time.perf_counter())
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.01)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    t_start = time.perf_counter()
    server = cell.start_server()
    t_ready = time.perf_counter()
    stop_poll.set()
    prep = server.ready_after_s is not None and (t_ready - t_start) - server.ready_after_s
    lag = t_ready - true_ready[0] if true_ready else float("nan")
    t_b = time.perf_counter()
    cell.run_check(CHECKS["benchmark"])
    bench_s = time.perf_counter() - t_b
    t_e = time.perf_counter()
    cell.record(ResultsStore(tmp))
    record_s = time.perf_counter() - t_e
    teardown = server.stop()
    total = prep + lag + teardown.seconds + record_s + matrix_ms / 1000
    print(f"[overhead] {CONFIG}: boot {server.ready_after_s:.1f} s and benchmark {bench_s:.2f} s excluded")
    print(f"[overhead] launch preparation (model path, argv, Popen, janitor): {prep * 1000:.0f} ms")
    print(f"[overhead] readiness detection lag after the server was really ready: {lag * 1000:.0f} ms")
    print(f"[overhead] teardown of {len(teardown.pids)} processes (SIGTERM -> all gone): {teardown.seconds * 1000:.0f} ms"
          f" (escalated to SIGKILL: {teardown.escalated_to_sigkill})")
    print(f"[overhead] results entry + locked atomic write: {record_s * 1000:.1f} ms")
    print(f"[overhead] load + validate the 32-config seed matrix: {matrix_ms:.1f} ms")
    print(f"[overhead] TOTAL harness overhead per config: {total:.2f} s")


def death(tmp: Path, victim: str) -> None:
    """SIGKILL the launcher (victim='launcher') or the engine core ('engine') once the model is loading."""
    cell = _cell(tmp)
    killed_at: list[float] = []

    def killer() -> None:
        while cell.server is None or cell.server.proc is None:
            time.sleep(0.05)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            leader = psutil.Process(cell.server.proc.pid)
            targets = [leader] if victim == "launcher" else [
                p for p in leader.children(recursive=True) if "EngineCore" in p.name()
            ]
            if targets and "Starting to load model" in cell.log_path.read_text(errors="replace"):
                killed_at.append(time.perf_counter())
                os.kill(targets[0].pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    threading.Thread(target=killer, daemon=True).start()
    try:
        cell.start_server()
    except ServerError as exc:
        failed_at = time.perf_counter()
        noticed = cell.server.noticed_exit_at - (time.monotonic() - time.perf_counter()) if cell.server.noticed_exit_at else None
        first = str(exc).splitlines()[0]
        print(f"[death] {victim} SIGKILLed while loading: launcher exit noticed after "
              f"{(noticed - killed_at[0]) * 1000:.0f} ms; test failed after {(failed_at - killed_at[0]) * 1000:.0f} ms "
              f"(incl. teardown of {len(cell.server.teardown.pids)} leftover processes): {first[:100]}")
        return
    raise SystemExit(f"[death] {victim}: the server became ready although it was killed")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        overhead(Path(tmp) / "overhead")
        death(Path(tmp) / "launcher", "launcher")
        death(Path(tmp) / "engine", "engine")


if __name__ == "__main__":
    main()
