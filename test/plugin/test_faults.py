"""Teardown under faults, with real vLLM CPU server trees (API server, engine core, workers).

Each case runs the nightly suite on a one-config matrix in a subprocess (its own session, so signals
reach only it), injects one fault, and then checks what a nightly operator cares about: no process of
the server tree remains, its port is free, both results files are valid JSON, the earlier entries are
still there, and the config is recorded with the right ``error_type``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from fakes.standin import interruptible

ROOT = Path(__file__).resolve().parents[2]
EARLIER = {"Earlier::TP1_auto": {"model": "Earlier", "config": "TP1_auto", "latency_s": 1.0}}


@dataclass
class FaultRun:
    returncode: int
    output: str
    results: Path
    log: Path

    @property
    def failures(self) -> dict:
        return json.loads((self.results / "failure_results.json").read_text())

    @property
    def successes(self) -> dict:
        return json.loads((self.results / "success_results.json").read_text())


def _matrix(model: str, timeout_s: float, output_len: int) -> str:
    return f"""\
defaults:
  engine: vllm-cpu
  timeout_s: {timeout_s}
  args: [--max-model-len, "8192", --dtype, bfloat16]
  bench: {{batch_size: 1, input_len: 4096, output_len: {output_len}, warmup: 1}}
models:
  {model}:
    path: tiny:tiny-qwen3-moe
    tp: [1]
"""


def _tree_of(marker: str) -> list[psutil.Process]:
    """The launcher whose command line carries ``marker`` and all its descendants."""
    for proc in psutil.process_iter(["cmdline"]):
        if marker in " ".join(proc.info["cmdline"] or []) and "vllm.entrypoints" in " ".join(proc.info["cmdline"] or []):
            try:
                return [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                return []
    return []


def _wait_for(predicate, timeout_s: float = 240.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout_s} s")


def _run(tmp_path: Path, model: str, *, inject=None, extra=(), timeout_s: float = 300, output_len: int = 64) -> FaultRun:
    results = tmp_path / "results"
    results.mkdir()
    (results / "success_results.json").write_text(json.dumps(EARLIER))
    (tmp_path / "matrix.yaml").write_text(_matrix(model, timeout_s, output_len))
    # Serving faults only: the kernel check (no server) is tested in test_kernels.py.
    argv = [sys.executable, "-m", "pytest", "test/nightly", "-m", "not kernel", "--moe-matrix", str(tmp_path / "matrix.yaml"),
            "--moe-results-dir", str(results), "--moe-cooldown", "0", "--moe-grace", "5", "-p", "no:cacheprovider", *extra]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=interruptible)
    log = results / "logs" / f"{model}_TP1_auto.log"
    context = {"pytest": proc, "log": log, "marker": f"pytest-moe/{model}_TP1_auto/"}
    injector = threading.Thread(target=inject, args=(context,), daemon=True) if inject else None
    if injector:
        injector.start()
    output, _ = proc.communicate(timeout=600)
    if injector:
        injector.join(5)
    return FaultRun(proc.returncode, output, results, log)


def _log_has(context, text: str):
    return lambda: context["log"].exists() and text in context["log"].read_text(errors="replace")


def _assert_clean(run: FaultRun, marker: str, within_s: float = 0.0) -> None:
    """No process of the tree (after ``within_s`` for the janitor's cases), the port free, valid results files,
    earlier entries kept."""
    deadline = time.monotonic() + within_s
    while _tree_of(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _tree_of(marker) == [], f"server processes outlived the run:\n{run.output[-2000:]}"
    # A zombie holds no memory and no port; reaping it is its (re)parent's job, not the harness's.  Only this user's:
    # another account's vLLM (a mutation run's) is neither ours nor left by this run.
    assert not [p for p in psutil.process_iter(["name", "status", "uids"])
                if (p.info["name"] or "").startswith("VLLM::") and p.info["status"] != psutil.STATUS_ZOMBIE
                and p.info["uids"].real == os.getuid()]
    port = int(re.search(r"--port (\d+)", run.log.read_text(errors="replace")).group(1))
    with socket.socket() as sock:  # as a new server binds: SO_REUSEADDR, so only a listener blocks it
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
    assert run.successes["Earlier::TP1_auto"]["latency_s"] == 1.0
    assert isinstance(run.failures, dict)


def test_crash_during_startup(tmp_path):
    def segfault_worker(ctx):
        _wait_for(_log_has(ctx, "Starting to load model"))
        worker = _wait_for(lambda: [p for p in _tree_of(ctx["marker"]) if "Worker" in p.name()])
        os.kill(worker[0].pid, signal.SIGSEGV)  # what a crashing kernel does to a worker

    run = _run(tmp_path, "fault-startup", inject=segfault_worker)
    assert run.returncode == 1
    failure = run.failures["fault-startup::TP1_auto"]
    assert failure["error_type"] == "Crash", failure["error_message"]
    assert "exited with code" in run.output
    _assert_clean(run, "pytest-moe/fault-startup_TP1_auto/")


def test_server_that_never_becomes_ready_hits_the_launch_timeout(tmp_path):
    def freeze_api_server(ctx):
        _wait_for(_log_has(ctx, "Starting to load model"))
        os.kill(_wait_for(lambda: _tree_of(ctx["marker"]))[0].pid, signal.SIGSTOP)

    run = _run(tmp_path, "fault-sigstop", inject=freeze_api_server, timeout_s=40)
    assert run.returncode == 1
    failure = run.failures["fault-sigstop::TP1_auto"]
    assert failure["error_type"] == "Timeout"
    assert "Server failed to start within the timeout period (40 s)" in run.output
    _assert_clean(run, "pytest-moe/fault-sigstop_TP1_auto/")


@pytest.mark.parametrize("method", ["signal", "thread"])
def test_pytest_timeout_during_the_benchmark(tmp_path, method):
    """A server that hangs mid-benchmark: once it is up, its engine processes are SIGSTOPped, so the warm-up
    request hangs until pytest-timeout's 3 s fire whatever the CPU (a fast CI machine once ran the whole benchmark
    inside 3 s).  /health and /v1/models, the readiness probes, are the API server's alone.  The later checks must
    not wait on the hung server (the accuracy check's request threads once held the run for 600 s each)."""
    model = f"fault-timeout-{method}"

    def freeze_engine(ctx):
        _wait_for(_log_has(ctx, "Application startup complete"))
        engine = _wait_for(lambda: _tree_of(ctx["marker"])[1:])
        for proc in engine:
            proc.send_signal(signal.SIGSTOP)

    run = _run(tmp_path, model, inject=freeze_engine, output_len=3500,  # 7 s here: time for the injector to act
               extra=("--timeout", "3", "-o", "timeout_func_only=true", "--timeout-method", method))
    assert run.returncode != 0, run.output[-3000:]
    failure = run.failures[f"{model}::TP1_auto"]
    assert failure["error_type"] == "Timeout"
    assert "Timeout" in failure["error_message"]
    if method == "thread":
        assert "pytest-timeout, thread method" in failure["error_message"]  # written by the backstop before os._exit
    else:  # the later checks did not wait on the frozen server: it was stopped, and each failed at once saying why
        assert re.findall(r"ERROR at setup of test_moe\[\S+-(\w+)\]", run.output) == ["accuracy", "agreement"]
        assert f"ServerError: not run: the benchmark check timed out on the server of {model}::TP1_auto, which was then " \
            "stopped" in run.output  # in each section, and in the summary lines too where pytest sees CI set
    _assert_clean(run, f"pytest-moe/{model}_TP1_auto/")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupting_pytest_tears_down_and_records(tmp_path, sig):
    model = f"fault-{sig.name.lower()}"

    def interrupt(ctx):
        _wait_for(_log_has(ctx, "Starting to load model"))
        ctx["pytest"].send_signal(sig)

    run = _run(tmp_path, model, inject=interrupt)
    assert run.returncode == pytest.ExitCode.INTERRUPTED
    failure = run.failures[f"{model}::TP1_auto"]
    assert failure["error_type"] == "ServerError" and "interrupted" in failure["error_message"]
    _assert_clean(run, f"pytest-moe/{model}_TP1_auto/")


def test_sigkilled_xdist_worker(tmp_path):
    def kill_worker(ctx):
        _wait_for(_log_has(ctx, "Starting to load model"))
        launcher = _wait_for(lambda: _tree_of(ctx["marker"]))[0]
        launcher.parent().kill()  # the xdist worker that started the server: no teardown runs there

    run = _run(tmp_path, "fault-xdist", inject=kill_worker, extra=("-n", "1"))
    assert run.returncode == 1
    assert "crashed" in run.output
    failure = run.failures["fault-xdist::TP1_auto"]
    assert failure["error_type"] == "Crash" and "worker crashed" in failure["error_message"]
    _assert_clean(run, "pytest-moe/fault-xdist_TP1_auto/", within_s=30)  # the janitor's job
