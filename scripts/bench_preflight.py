"""Time seed 000's whole matrix through inspect_model + preflight.check and print the figure.

Why: preflight runs before every launch and over whole matrices (plan tables, CI fan-out), so it
must stay far below a second; this prints the number instead of asserting a guess.
Usage: python3 scripts/bench_preflight.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pytest_moe.models import inspect_model
from pytest_moe.preflight import LaunchPlan, check, flags_of, gpu_spec

CONFIGS = Path(__file__).resolve().parents[1] / "test" / "plugin" / "data" / "configs"
PLAN_KEYS = ("tp", "ep", "quantization", "moe_backend", "mem_fraction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=100, help="timed passes over the matrix")
    args = parser.parse_args()
    seed = json.loads((CONFIGS / "seed000_matrix.json").read_text(encoding="utf-8"))
    gpu = gpu_spec(seed["gpu"], seed["gpus"])
    entries = seed["matrix"]

    def one_pass() -> list[tuple[str, str, list[str]]]:
        out = []
        for entry in entries:
            plan = LaunchPlan(engine=seed["engine"], trust_remote_code=True,
                              **{k: entry[k] for k in PLAN_KEYS if k in entry})
            problems = check(inspect_model(CONFIGS / entry["model"]), plan, gpu)
            out.append((entry["model"], flags_of(plan), [p.rule_id for p in problems]))
        return out

    cold_start = time.perf_counter()
    results = one_pass()  # first pass also parses the YAML tables
    cold = time.perf_counter() - cold_start
    start = time.perf_counter()
    for _ in range(args.repeat):
        one_pass()
    warm = (time.perf_counter() - start) / args.repeat

    for model, flags, rule_ids in results:
        print(f"{model:42s} {flags:80s} {', '.join(rule_ids) or 'passes'}")
    print(f"\nseed 000 matrix: {len(entries)} configs on {gpu.count}x {gpu.name}, inspect + check")
    print(f"first pass (YAML load included): {cold * 1e3:.2f} ms")
    print(f"warm pass, mean of {args.repeat}: {warm * 1e3:.2f} ms total, "
          f"{warm / len(entries) * 1e6:.0f} us per config")


if __name__ == "__main__":
    main()
