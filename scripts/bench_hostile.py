"""Run the generated hostile-input suite and print how many cases ran and the worst time and memory.

Why a script: the contract promises bounded time and memory, but the suite must not assert timers
(they flake on a loaded 2-core machine); this prints the figures for the closing note instead.
Each entry point call (matrix load, config.json inspection, CLI command, results write) is timed and
its peak Python allocation measured with tracemalloc.
Usage: python scripts/bench_hostile.py
"""

from __future__ import annotations

import functools
import resource
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "test" / "plugin"))

import test_hostile  # noqa: E402  (the suite itself, so the figures are for exactly its cases)

from pytest_moe.results import ResultsStore  # noqa: E402

stats: dict[str, list[tuple[float, int, str]]] = defaultdict(list)


def measured(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - t0
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            stats[name].append((elapsed, peak, repr(args)[:100]))
    return wrapper


def _named_attacks() -> None:
    """The issue's unbounded cases, at full size: a 9**9 alias bomb and a 50 MB matrix."""
    import tempfile

    from pytest_moe.matrix import MatrixError, load_matrix

    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    with tempfile.TemporaryDirectory() as tmp:
        files = {"bomb": Path(tmp) / "bomb.yaml", "50MB": Path(tmp) / "big.yaml"}
        files["bomb"].write_text("\n".join(bomb) + "\nmodels: {}\n")
        files["50MB"].write_bytes(b"# " + b"x" * (50 << 20) + b"\n")
        for name, path in files.items():
            try:
                measured(f"named attack: {name}", load_matrix)(path)
            except MatrixError:
                pass
    for name, rows in stats.items():
        if name.startswith("named"):
            print(f"{name:32s} time {rows[0][0] * 1000:8.1f} ms  peak allocation {rows[0][1] / 2**20:7.1f} MiB")


def main() -> None:
    test_hostile.load_matrix = measured("matrix (load_matrix)", test_hostile.load_matrix)
    test_hostile.inspect_model = measured("config.json (inspect_model)", test_hostile.inspect_model)
    test_hostile.cli.main = measured("CLI (cli.main)", test_hostile.cli.main)
    for method in ("record_success", "record_failure"):
        setattr(ResultsStore, method, measured("results (record_*)", getattr(ResultsStore, method)))
    tests = [getattr(test_hostile, n) for n in dir(test_hostile) if n.startswith("test_generated_")]
    for test in tests:
        test()
    _named_attacks()
    total = sum(len(v) for k, v in stats.items() if not k.startswith("named"))
    print(f"generated cases (entry point calls): {total}")
    for name, rows in sorted(stats.items()):
        if name.startswith("named"):
            continue
        worst_t = max(rows, key=lambda r: r[0])
        worst_m = max(rows, key=lambda r: r[1])
        print(f"{name:32s} cases={len(rows):4d}  worst time {worst_t[0] * 1000:8.1f} ms  "
              f"worst peak allocation {worst_m[1] / 2**20:7.1f} MiB")
        print(f"{'':32s} slowest: {worst_t[2]}")
    print(f"process max RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
