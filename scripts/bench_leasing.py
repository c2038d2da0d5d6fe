"""Makespan of GPU leasing on a declared 8-GPU node, with a simulated engine of known start and run times.

Eight worker processes (as `pytest -n 8` with `--maxschedchunk 1` would have) take configs one at a
time from a shared list in a given order, lease the GPUs each needs through the real GpuLeaser,
"serve" for the config's start + run time, and release.  Printed: the makespan, the lower bound
max(total GPU-seconds / 8, longest config) and their ratio, for the planned order (largest GPU count
first, then longest) and, for contrast, the order the matrix lists them in.

    python3 scripts/bench_leasing.py [--scale-to SECONDS] [--workers N]
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import tempfile
import time
from dataclasses import dataclass

from pytest_moe.gpus import GpuLeaser, lease_overlaps, read_lease_log

NODE_GPUS = 8


@dataclass(frozen=True)
class SimConfig:
    """One matrix entry and what its server costs, in real seconds before scaling."""

    id: str
    gpus: int
    start_s: float
    run_s: float

    @property
    def seconds(self) -> float:
        return self.start_s + self.run_s


def matrix() -> list[SimConfig]:
    """The seed's shape: TP1/TP2/TP8 for two small models, TP4/TP8 for three mid ones, TP8 for one big one, x2 backends.

    Times are plausible for H200 nightly runs (load, CUDA-graph capture, benchmark); a larger TP
    loads faster per GPU and serves faster, and vLLM is given a slower start than SGLang.
    """
    shapes = {
        "small-a": {1: (60, 240), 2: (70, 150), 8: (90, 90)},
        "small-b": {1: (80, 300), 2: (90, 180), 8: (110, 110)},
        "mid-a": {4: (150, 240), 8: (180, 180)},
        "mid-b": {4: (170, 260), 8: (200, 190)},
        "mid-c": {4: (200, 300), 8: (230, 210)},
        "big": {8: (600, 300)},
    }
    configs = []
    for model, by_tp in shapes.items():
        for backend, slower_start in (("sglang", 1.0), ("vllm", 1.2)):
            for tp, (start, run) in by_tp.items():
                configs.append(SimConfig(f"{model}-{backend}-tp{tp}", tp, start * slower_start, run))
    return configs


def planned(configs: list[SimConfig]) -> list[SimConfig]:
    """Largest GPU count first, then longest: what the plugin hands to xdist."""
    return sorted(configs, key=lambda c: (-c.gpus, -c.seconds))


def lower_bound(configs: list[SimConfig]) -> float:
    return max(sum(c.gpus * c.seconds for c in configs) / NODE_GPUS, max(c.seconds for c in configs))


def list_schedule(order: list[SimConfig]) -> float:
    """Makespan, in real seconds, of starting configs strictly in `order` as GPUs free up, with no leasing overhead."""
    free, now, running = NODE_GPUS, 0.0, []  # running: heap of (end, gpus)
    for config in order:
        while free < config.gpus:
            end, gpus = heapq.heappop(running)
            now, free = max(now, end), free + gpus
        heapq.heappush(running, (now + config.seconds, config.gpus))
        free -= config.gpus
    return max(end for end, _ in running)


def _worker(lock_dir: str, order: list[SimConfig], scale: float, cursor, spans) -> None:
    leaser = GpuLeaser(lock_dir, gpu_indices=range(NODE_GPUS), poll_s=0.01)
    while True:
        with cursor.get_lock():
            n = cursor.value
            cursor.value += 1
        if n >= len(order):
            return
        config = order[n]
        with leaser.acquire(config.gpus, config_id=config.id):
            began = time.time()
            time.sleep(config.seconds * scale)  # the simulated engine: start, then benchmark
            spans.put((config.id, began, time.time()))


def run(order: list[SimConfig], scale: float, workers: int) -> tuple[float, int]:
    """Makespan in scaled seconds, and the number of overlaps found in the lease log."""
    ctx = multiprocessing.get_context("fork")
    cursor, spans = ctx.Value("i", 0), ctx.Queue()
    with tempfile.TemporaryDirectory() as lock_dir:
        start = time.time()
        procs = [ctx.Process(target=_worker, args=(lock_dir, order, scale, cursor, spans)) for _ in range(workers)]
        for p in procs:
            p.start()
        results = [spans.get() for _ in order]
        for p in procs:
            p.join()
        makespan = max(end for _, _, end in results) - start
        overlaps = lease_overlaps(read_lease_log(f"{lock_dir}/leases.jsonl"))
    return makespan, len(overlaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale-to", type=float, default=12.0,
                        help="seconds the lower bound is scaled to (the whole script takes about 2.5x this)")
    parser.add_argument("--workers", type=int, default=NODE_GPUS)
    args = parser.parse_args()

    configs = matrix()
    bound = lower_bound(configs)
    scale = args.scale_to / bound
    by_tp = {tp: sum(c.gpus == tp for c in configs) for tp in (1, 2, 4, 8)}
    print(f"matrix: {len(configs)} configs ({', '.join(f'{n}xTP{tp}' for tp, n in by_tp.items())}) "
          f"on a declared {NODE_GPUS}-GPU node, {args.workers} workers")
    print(f"total {sum(c.gpus * c.seconds for c in configs):.0f} GPU-s, longest config "
          f"{max(c.seconds for c in configs):.0f} s, lower bound {bound:.0f} s "
          f"(real seconds; run scaled by {scale:.4f})")
    for name, order in (("planned (largest first)", planned(configs)), ("as listed", configs)):
        makespan, overlaps = run(order, scale, args.workers)
        print(f"{name:24s} makespan {makespan:6.2f} s  bound {args.scale_to:6.2f} s  "
              f"ratio {makespan / args.scale_to:.3f}  (same order with zero leasing overhead: "
              f"{list_schedule(order) / bound:.3f})  overlapping leases {overlaps}")


if __name__ == "__main__":
    main()
