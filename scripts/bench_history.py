"""Printed figures (not a timed test): the morning report over 90 nights × 100 configs, and the cost of
recording one config's rows at the end of its test. Goals: report < 2 s, one config < 50 ms.

    python scripts/bench_history.py [--url sqlite:///PATH | postgresql://...] [--nights 90] [--configs 100]

Without ``--url`` it fills a fresh SQLite file in a temporary directory. Filling is bulk-inserted and not
part of the figures.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from pytest_moe.history.html import collect, render
from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import HistoryStore, RunInfo, results, utcnow
from pytest_moe.configs import HistorySettings


def entry(model: str, cfg: str, thr: float, failed: bool) -> dict:
    if failed:
        return {"model": model, "config": cfg, "engine": "sglang", "status": "failed", "error_type": "OOM", "error_message": "OOM"}
    return {
        "model": model, "config": cfg, "engine": "sglang", "engine_version": "0.5.23", "gpu_name": "NVIDIA H200", "gpu_count": 8,
        "server_command": f"python -m sglang.launch_server --model-path org/{model} --tp 8", "repro_command": f"pytest test/nightly --moe-config {model}::{cfg}",
        "status": "success", "batch_size": 1,
        "checks": {
            "benchmark": {"status": "passed", "rows": [
                {"batch_size": b, "latency_s": 7.5 / thr * 70, "ttft_s": 0.25, "input_throughput_tok_per_s": 15900.0 * b,
                 "output_throughput_tok_per_s": thr * b ** 0.8, "itl_ms": 1000 / thr} for b in (1, 8)]},
            "accuracy": {"status": "passed", "score": 0.8, "n": 200, "lower_bound": 0.75, "floor": 0.7, "per_question_file": "q.jsonl"},
        },
    }


def fill(store: HistoryStore, nights: int, configs: int) -> None:
    rnd = random.Random(0)
    start = utcnow() - timedelta(days=nights)
    keys = [(f"Model-{i // 10}", f"TP{2 ** (i % 4)}_cfg{i % 10}") for i in range(configs)]
    for n in range(nights):
        run = RunInfo(run_id=f"night-{n:03d}", started_at=start + timedelta(days=n), host="h200-runner")
        store.ensure_run(run)
        batch = []
        for model, cfg in keys:
            e = entry(model, cfg, 70 * rnd.uniform(0.97, 1.03), rnd.random() < 0.03)
            prov = provenance(f"{model}::{cfg}", e)
            for r in entry_rows(e):
                batch.append({**prov.__dict__, "run_id": run.run_id, "check_name": r.check, "metric": r.metric,
                              "batch_size": r.batch_size, "value": r.value, "status": r.status.value,
                              "error_type": r.error_type, "recorded_at": run.started_at})
        with store.engine.begin() as conn:
            conn.execute(results.insert(), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url")
    parser.add_argument("--nights", type=int, default=90)
    parser.add_argument("--configs", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore(args.url or f"sqlite:///{Path(tmp) / 'bench.sqlite'}")
        t = time.perf_counter()
        fill(store, args.nights, args.configs)
        print(f"filled {args.nights} nights × {args.configs} configs in {time.perf_counter() - t:.1f} s ({store.display_url})")
        settings = HistorySettings()
        timings, cpu = [], []
        for _ in range(3):
            t, c = time.perf_counter(), time.process_time()
            data = collect(store, None, settings)
            page = render(data)
            (Path(tmp) / "report.html").write_text(page)
            timings.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        # CPU time next to wall time: on a shared machine the wall clock also counts other people's work.
        print(f"report: {len(data.rows)} rows, {len(page) / 1e6:.1f} MB HTML, wall best {min(timings):.2f} s "
              f"median {statistics.median(timings):.2f} s, CPU best {min(cpu):.2f} s (goal < 2 s); load {os.getloadavg()[0]:.1f}")
        run = RunInfo(run_id="bench-record", started_at=utcnow())
        e = entry("Model-0", "TP1_cfg0", 70.0, False)
        costs = []
        for i in range(50):
            t = time.perf_counter()
            store.record(run, provenance(f"Bench::TP1_c{i}", e), entry_rows(e))
            costs.append((time.perf_counter() - t) * 1000)
        print(f"record one config ({len(entry_rows(e))} rows, one transaction): median {statistics.median(costs):.1f} ms, "
              f"max {max(costs):.1f} ms over {len(costs)} configs (goal < 50 ms)")
        store.dispose()


if __name__ == "__main__":
    main()
