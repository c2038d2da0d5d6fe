"""Proof on real GPUs: memory release after a teardown, and leases that never share a GPU.

Run on a machine with NVIDIA GPUs, torch and nvidia-ml-py:

    PYTHONPATH=. python3 scripts/gpu_proof.py memory   # one GPU is enough
    PYTHONPATH=. python3 scripts/gpu_proof.py leasing  # needs two or more GPUs

memory: a real CUDA process tree (a parent and a child, both holding memory, in their own session,
like a server and its scheduler) is SIGKILLed by process group; wait_for_memory_release must see
its pids leave NVML and the memory return before the "next launch" starts, which then allocates the
same amount.  Then the timeout path: a holder that is not killed must produce the warning figures.

leasing: worker processes lease 1 or 2 GPUs in a mixed order and start a real CUDA process with
the lease's environment.  The process checks, through torch and NVML, that CUDA shows it exactly
the leased physical GPUs and that no other process of ours is on them; afterwards the lease log
and the processes' own on-GPU intervals are both checked for overlap.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

from pytest_moe.gpus import (
    GpuLeaser,
    discover_gpus,
    lease_overlaps,
    memory_snapshot,
    read_lease_log,
    wait_for_memory_release,
)

GIB = 1 << 30

# A server stand-in: holds `gib` GiB on GPU 0 and starts a child holding `child_gib` more (a
# scheduler), then prints "ready <pids>" and sleeps until killed.
HOLDER = r"""
import os, subprocess, sys, time, torch
gib, child_gib = float(sys.argv[1]), float(sys.argv[2])
x = torch.empty(int(gib * (1 << 30)), dtype=torch.uint8, device="cuda"); x.fill_(1)
pids = [os.getpid()]
if child_gib:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[3], str(child_gib), "0", ""],
                             stdout=subprocess.PIPE, text=True)
    pids += [int(p) for p in child.stdout.readline().split()[1:]]
torch.cuda.synchronize()
print("ready", *pids, flush=True)
time.sleep(3600)
"""

# Started by a lease holder with the lease's environment: which physical GPUs does CUDA show?
PROBE = r"""
import json, os, sys, time, torch, pynvml
expected = json.loads(sys.argv[1])   # physical index -> NVML UUID
pynvml.nvmlInit()
n = torch.cuda.device_count()
xs = [torch.empty(2 << 30, dtype=torch.uint8, device=f"cuda:{d}").fill_(1) for d in range(n)]
torch.cuda.synchronize()
t_on = time.time()
def norm(u): return str(u).lower().removeprefix("gpu-")
seen = [norm(torch.cuda.get_device_properties(d).uuid) for d in range(n)]
where, others = [], []
for i in range(pynvml.nvmlDeviceGetCount()):
    h = pynvml.nvmlDeviceGetHandleByIndex(i)
    pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
    if os.getpid() in pids:
        where.append(i)
        others += sorted(pids - {os.getpid()})
time.sleep(float(sys.argv[2]))
print(json.dumps({"pid": os.getpid(), "cuda_uuids_match": seen == [norm(u) for u in expected.values()],
                  "nvml_gpus": where, "expected": [int(i) for i in expected], "other_pids": others,
                  "t_on": t_on, "t_off": time.time()}))
"""


def _start_holder(gib: float, child_gib: float) -> tuple[subprocess.Popen[str], set[int]]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(gib), str(child_gib), HOLDER],
                            stdout=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    line = proc.stdout.readline().split()
    assert line and line[0] == "ready", f"holder did not start: {line}"
    return proc, {int(p) for p in line[1:]}


def _mib(snapshot: dict[int, int] | None) -> str:
    return ", ".join(f"GPU {i} {b >> 20} MiB" for i, b in sorted((snapshot or {}).items()))


def prove_memory(gib: float = 20, child_gib: float = 8) -> None:
    gpus = discover_gpus()
    print(f"GPUs: {[(g.index, g.name, (g.memory_total_bytes or 0) >> 20) for g in gpus]}")
    baseline = memory_snapshot([0])
    print(f"baseline before launch: {_mib(baseline)}")

    proc, pids = _start_holder(gib, child_gib)
    print(f"server tree up: pids {sorted(pids)}, used {_mib(memory_snapshot([0]))}")
    os.killpg(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    print(f"SIGKILLed the process group; at once: used {_mib(memory_snapshot([0]))}")
    result = wait_for_memory_release([0], pids, baseline, timeout_s=60, poll_s=0.01)
    assert result is not None and result.released, result
    print(f"wait_for_memory_release: {result.describe()}  "
          f"({time.monotonic() - killed:.3f} s after the kill)")
    proc.wait()

    launched = time.monotonic()
    nxt, next_pids = _start_holder(gib, child_gib)
    print(f"next launch started {launched - killed:.2f} s after the kill, after the release check; "
          f"it holds {gib + child_gib:g} GiB: used {_mib(memory_snapshot([0]))}")

    print("timeout path: the same wait while the server is still alive (2 s bound)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stuck = wait_for_memory_release([0], next_pids, baseline, timeout_s=2, poll_s=0.2)
    assert stuck is not None and not stuck.released
    print(f"warning: {caught[0].category.__name__}: {caught[0].message}")
    os.killpg(nxt.pid, signal.SIGTERM)
    after = wait_for_memory_release([0], next_pids, baseline, timeout_s=60, poll_s=0.01)
    print(f"after SIGTERM of the second tree: {after.describe() if after else 'no NVML'}")
    nxt.wait()


def _lease_worker(lock_dir: str, items: list[tuple[str, int]], cursor, results) -> None:
    leaser = GpuLeaser(lock_dir, poll_s=0.02)
    uuids = {g.index: g.uuid for g in leaser.gpus}
    while True:
        with cursor.get_lock():
            n = cursor.value
            cursor.value += 1
        if n >= len(items):
            return
        config_id, count = items[n]
        with leaser.acquire(count, config_id=config_id) as lease:
            baseline = memory_snapshot(lease.indices)
            expected = {i: uuids[i] for i in lease.indices}
            out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(expected), "0.5"],
                                 env={**os.environ, **lease.env()}, capture_output=True, text=True)
            probe = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}
            release = wait_for_memory_release(lease.indices, {probe.get("pid", -1)}, baseline, timeout_s=60)
            results.put({"config": config_id, "lease": lease.cuda_visible_devices, **probe,
                         "release_s": release.waited_s if release else None})


def _interval_overlaps(probes: list[dict]) -> list[str]:
    """Pairs of probe processes that were on one physical GPU at the same time, by their own clocks."""
    problems = []
    for a in probes:
        for b in probes:
            shared = set(a["nvml_gpus"]) & set(b["nvml_gpus"])
            if a["pid"] < b["pid"] and shared and a["t_on"] < b["t_off"] and b["t_on"] < a["t_off"]:
                problems.append(f"{a['config']} and {b['config']} both on GPU {sorted(shared)}")
    return problems


def prove_leasing(workers: int = 4) -> None:
    gpus = discover_gpus()
    print(f"GPUs: {[(g.index, g.name, g.uuid) for g in gpus]}")
    if len(gpus) < 2:
        print(f"leasing proof needs 2 GPUs, found {len(gpus)}: skipped")
        return
    counts = [1, 1, 2, 1, 2, 1, 1, 2, 1, 1, 2, 1]  # mixed on purpose: the TP2s must not starve
    items = [(f"cfg{n:02d}-tp{c}", c) for n, c in enumerate(counts)]
    ctx = multiprocessing.get_context("spawn")
    cursor, results = ctx.Value("i", 0), ctx.Queue()
    with tempfile.TemporaryDirectory() as lock_dir:
        start = time.time()
        procs = [ctx.Process(target=_lease_worker, args=(lock_dir, items, cursor, results)) for _ in range(workers)]
        for p in procs:
            p.start()
        probes = [results.get(timeout=300) for _ in items]
        for p in procs:
            p.join()
        events = read_lease_log(f"{lock_dir}/leases.jsonl")
    print(f"{len(items)} configs, {workers} workers, {time.time() - start:.1f} s")
    print("lease log (t relative to start):")
    for e in events:
        print(f"  {e['t'] - start:7.3f}  {e['event']:8s} lease {e['lease']:2d}  pid {e['pid']}  "
              f"GPUs {e['indices']}  {e['config']}")
    print("probe processes:")
    for p in sorted(probes, key=lambda p: p.get("t_on", 0)):
        if "error" in p:
            print(f"  {p['config']}: FAILED {p['error']}")
            continue
        print(f"  {p['config']}: CUDA_VISIBLE_DEVICES={p['lease']}  on GPUs {p['nvml_gpus']} by NVML "
              f"(expected {p['expected']})  torch UUIDs match: {p['cuda_uuids_match']}  "
              f"other pids there: {p['other_pids']}  on {p['t_on'] - start:.2f}..{p['t_off'] - start:.2f} s  "
              f"memory back {p['release_s']:.2f} s after exit")
    ok = [p for p in probes if "error" not in p]
    placed = all(p["nvml_gpus"] == p["expected"] and p["cuda_uuids_match"] and not p["other_pids"] for p in ok)
    log_overlaps = lease_overlaps(events)
    gpu_overlaps = _interval_overlaps(ok)
    print(f"check: {len(ok)}/{len(items)} probes ran; every probe on exactly its leased GPUs, alone: {placed}")
    print(f"check: overlaps in the lease log: {log_overlaps or 'none'}")
    print(f"check: overlaps of probes' on-GPU intervals on one GPU: {gpu_overlaps or 'none'}")
    if len(ok) != len(items) or not placed or log_overlaps or gpu_overlaps:
        sys.exit(1)


if __name__ == "__main__":
    steps = {"memory": prove_memory, "leasing": prove_leasing}
    for step in sys.argv[1:] or list(steps):
        print(f"== {step} ==", flush=True)
        steps[step]()
