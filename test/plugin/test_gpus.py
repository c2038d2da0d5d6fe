"""pytest_moe.gpus on a machine without GPUs: discovery rules against a fake NVML, the memory wait,
and leasing between real processes (mutual exclusion, reclaim after SIGKILL, no starvation)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_moe import gpus
from pytest_moe.gpus import (
    GpuLeaser,
    GpuMemoryNotReleasedWarning,
    discover_gpus,
    lease_overlaps,
    memory_snapshot,
    read_lease_log,
    shortfall_reason,
    wait_for_memory_release,
)

GIB = 1 << 30
MP = multiprocessing.get_context("fork")


class FakeNvmlError(Exception):
    pass


@dataclass
class FakeNvml:
    """Just the pynvml calls gpus.py makes; `tick` runs on every memory read to move time forward."""

    uuids: list[str]
    used: dict[int, int] = field(default_factory=dict)
    procs: dict[int, list[int]] = field(default_factory=dict)
    tick: Callable[[FakeNvml], None] = lambda nvml: None
    NVMLError: type[Exception] = FakeNvmlError

    def nvmlDeviceGetCount(self) -> int:
        return len(self.uuids)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return self._handle(i)

    def _handle(self, h: object) -> int:
        """Like NVML, a call with anything but a handle it gave out fails."""
        if not isinstance(h, int) or not 0 <= h < len(self.uuids):
            raise FakeNvmlError(f"invalid handle {h!r}")
        return h

    def nvmlDeviceGetName(self, h: int) -> bytes:
        self._handle(h)
        return b"NVIDIA H200"  # old pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        self.tick(self)
        return SimpleNamespace(total=141 * GIB, used=self.used.get(self._handle(h), GIB // 2))

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        self._handle(h)
        return (9, 0)

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.uuids[self._handle(h)]

    def nvmlDeviceGetComputeRunningProcesses(self, h: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(pid=p, usedGpuMemory=GIB) for p in self.procs.get(h, [])]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(gpus.PIN_ENV, raising=False)
    return monkeypatch


def use_nvml(monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml | None) -> None:
    monkeypatch.setattr(gpus, "_nvml", lambda: nvml)


FOUR = FakeNvml(uuids=["GPU-aaaa-0", "GPU-bbbb-1", "GPU-bbcc-2", "GPU-dddd-3"])


# -- discovery ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("2,0", [2, 0]),
        (" 3 , 1 ", [3, 1]),
        ("GPU-bbbb", [1]),  # a unique UUID prefix
        ("GPU-bb", []),  # ambiguous prefix names no GPU, so the list ends there
        ("1,7,2", [1]),  # like CUDA: the list ends at the first invalid entry
        ("1,1,2", [1, 2]),
        ("", []),
        ("-1", []),
        ("0,-1,2", [0]),
    ],
)
def test_cuda_visible_devices_with_nvml(env: pytest.MonkeyPatch, visible: str | None, expected: list[int]) -> None:
    use_nvml(env, FOUR)
    if visible is not None:
        env.setenv("CUDA_VISIBLE_DEVICES", visible)
    found = discover_gpus()
    assert [g.index for g in found] == expected
    if found:
        assert found[0].name == "NVIDIA H200"
        assert found[0].compute_capability == (9, 0)
        assert found[0].memory_total_bytes == 141 * GIB


def test_without_nvml(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, None)
    assert discover_gpus() == []
    assert memory_snapshot([0]) is None
    assert wait_for_memory_release([0], {123}, None) is None
    env.setenv("CUDA_VISIBLE_DEVICES", "0,3")
    found = discover_gpus()
    assert [(g.index, g.name, g.memory_total_bytes) for g in found] == [(0, "unknown", None), (3, "unknown", None)]
    # A GPU named by UUID keeps that name for the server: without NVML its index is unknown.
    env.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,MIG-bbbb")
    assert [(g.cuda_id, g.uuid) for g in discover_gpus()] == [("GPU-aaaa", "GPU-aaaa"), ("MIG-bbbb", "MIG-bbbb")]
    assert [g.index for g in discover_gpus()] == [0, 1]  # numbered by their place in the list, as CUDA numbers them


def test_pin_replaces_cuda_visible_devices(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, FOUR)
    env.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    env.setenv(gpus.PIN_ENV, "3")
    found = discover_gpus()
    assert [g.index for g in found] == [3]
    assert shortfall_reason(8, found) == "needs 8 GPUs, found 1 (PYTEST_MOE_GPUS='3')"
    assert shortfall_reason(1, found) is None
    assert shortfall_reason(0, []) is None  # CPU-engine configs need no GPU


def test_shortfall_names_its_source(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, None)
    assert shortfall_reason(2, []) == "needs 2 GPUs, found 0 (no NVML and no CUDA_VISIBLE_DEVICES)"
    use_nvml(env, FOUR)
    assert shortfall_reason(8, discover_gpus()) == "needs 8 GPUs, found 4 (NVML)"


# -- memory release ----------------------------------------------------------------------------

def draining(reads_until_pid_gone: int, reads_until_memory_back: int) -> FakeNvml:
    """A server on GPUs 0 and 1 whose pid vanishes, then whose memory returns, after so many reads."""
    reads = 0

    def tick(nvml: FakeNvml) -> None:
        nonlocal reads
        reads += 1
        if reads >= reads_until_pid_gone:
            nvml.procs = {}
        if reads >= reads_until_memory_back:
            nvml.used = {0: GIB // 2, 1: GIB // 2}

    return FakeNvml(uuids=["GPU-0", "GPU-1"], used={0: 60 * GIB, 1: 60 * GIB},
                    procs={0: [4242, 999], 1: [4243]}, tick=tick)


def test_wait_until_pids_gone_and_memory_back(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, draining(reads_until_pid_gone=4, reads_until_memory_back=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = wait_for_memory_release([0, 1], {4242, 4243}, {0: GIB // 2, 1: GIB // 2}, timeout_s=5, poll_s=0.01)
    assert result is not None and result.released
    assert result.leftover_pids == []
    assert result.used_bytes == {0: GIB // 2, 1: GIB // 2}
    assert result.waited_s >= 0.03  # at least the polls it slept between reads (no upper bound: a loaded host)
    assert result.describe().startswith("GPU memory released after")


def test_a_gpu_missing_from_the_baseline_is_judged_by_its_pids_alone(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, draining(reads_until_pid_gone=3, reads_until_memory_back=10**9))
    result = wait_for_memory_release([0, 1], {4242, 4243}, {0: 60 * GIB}, timeout_s=5, poll_s=0.01)
    assert result is not None and result.released  # GPU 0 is back to its baseline; GPU 1 had none taken


def test_pids_alone_without_baseline(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, draining(reads_until_pid_gone=3, reads_until_memory_back=10**9))
    result = wait_for_memory_release([0, 1], {4242, 4243}, None, timeout_s=5, poll_s=0.01)
    assert result is not None and result.released and result.used_bytes[0] == 60 * GIB


def test_timeout_warns_with_figures(env: pytest.MonkeyPatch) -> None:
    use_nvml(env, draining(reads_until_pid_gone=10**9, reads_until_memory_back=10**9))
    with pytest.warns(GpuMemoryNotReleasedWarning) as caught:
        result = wait_for_memory_release([0, 1], {4242, 4243}, {0: GIB // 2, 1: GIB // 2},
                                         timeout_s=0.1, poll_s=0.02)
    assert result is not None and not result.released
    assert result.leftover_pids == [4242, 4243]  # pid 999 is not ours
    assert result.waited_s >= 0.1  # it waited out its timeout (no upper bound: a loaded host)
    assert str(caught[0].message) == result.describe()
    assert "not released after 0.1" in result.describe()
    assert "pids 4242, 4243 still on the GPUs" in result.describe()
    assert "GPU 0 used 61440 MiB (baseline 512 MiB, tolerance 1024 MiB)" in result.describe()


# -- leasing between processes -----------------------------------------------------------------
# Every child is a daemon started through the ``spawn`` fixture, which kills and joins it whatever the
# test did: one failing assertion must not leave a 30 s holder behind (it once hung the run 15 minutes).
# Order between processes comes from what they record (state.json's queue, the lease log), never a sleep.


@pytest.fixture
def spawn():
    started: list[multiprocessing.Process] = []

    def start(target: Callable[..., None], *args: object) -> multiprocessing.Process:
        proc = MP.Process(target=target, args=args, daemon=True)
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(5)


def _queued(lock_dir: Path, config_id: str) -> None:
    """Wait until a waiter for ``config_id`` is in the leaser's queue (state.json, written under its lock)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            state = json.loads((lock_dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if any(w.get("config") == config_id for w in state.get("waiters", [])):
            return
        time.sleep(0.002)
    raise AssertionError(f"{config_id} never queued for a lease in {lock_dir}")


def _churn(lock_dir: str, pool: int, count: int, rounds: int, seed: int) -> None:
    """Lease `count` GPUs `rounds` times; mkdir per GPU is an independent check that nobody else is on it."""
    leaser = GpuLeaser(lock_dir, gpu_indices=range(pool), poll_s=0.002)
    for r in range(rounds):
        with leaser.acquire(count, config_id=f"w{seed}-{r}") as lease:
            for i in lease.indices:
                os.mkdir(Path(lock_dir) / f"busy-{i}")  # FileExistsError if two leases share GPU i
            time.sleep(0.002 * (1 + (seed + r) % 3))
            for i in lease.indices:
                os.rmdir(Path(lock_dir) / f"busy-{i}")


def test_leases_never_share_a_gpu(tmp_path: Path, spawn) -> None:
    procs = [spawn(_churn, str(tmp_path), 3, 1 + n % 2, 15, n) for n in range(6)]
    deadline = time.monotonic() + 30
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    assert [p.exitcode for p in procs] == [0] * 6
    events = read_lease_log(tmp_path / "leases.jsonl")
    assert sum(e["event"] == "acquire" for e in events) == 6 * 15
    assert sum(e["event"] == "release" for e in events) == 6 * 15
    assert lease_overlaps(events) == []


def test_overlap_check_catches_a_shared_gpu() -> None:
    events = [
        {"event": "acquire", "lease": 1, "pid": 10, "indices": [0, 1], "config": "a"},
        {"event": "acquire", "lease": 2, "pid": 11, "indices": [1], "config": "b"},
        {"event": "release", "lease": 1, "pid": 10, "indices": [0, 1], "config": "a"},
        {"event": "acquire", "lease": 3, "pid": 12, "indices": [0], "config": "c"},
    ]
    assert lease_overlaps(events) == ["GPU 1: lease 2 (pid 11, b) acquired while lease 1 (pid 10, a) held it"]


def test_lease_basics(tmp_path: Path) -> None:
    leaser = GpuLeaser(tmp_path, gpu_indices=range(8))
    with leaser.acquire(2, config_id="tp2") as a, leaser.acquire(4) as b:
        assert a.indices == (0, 1)  # aligned blocks keep the node unfragmented
        assert b.indices == (4, 5, 6, 7)
        assert b.cuda_visible_devices == "4,5,6,7"
        assert a.env() == {"CUDA_VISIBLE_DEVICES": "0,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        with pytest.raises(TimeoutError, match="waited 0.05 s for 4 of GPUs 0,1,2,3,4,5,6,7"):
            leaser.acquire(4, timeout_s=0.05)
    assert leaser.acquire(0).indices == ()  # CPU engines lease nothing
    with pytest.raises(ValueError, match="big needs 16 GPUs but the lease pool has 8"):
        leaser.acquire(16, config_id="big")


def test_a_served_waiter_leaves_the_queue_and_its_files(tmp_path: Path) -> None:
    """Once its GPUs are leased (or it gives up), a waiter is out of the shared queue: a stale entry would hold
    GPUs back from larger requests that queue after it."""
    leaser = GpuLeaser(tmp_path / "leases" / "node0", gpu_indices=range(2))  # folders made as needed
    with leaser.acquire(2, config_id="all") as held:
        with pytest.raises(TimeoutError):
            leaser.acquire(1, timeout_s=0.05, config_id="late")
        state = json.loads((leaser.lock_dir / "state.json").read_text())
        assert state["waiters"] == [] and not list(leaser.lock_dir.glob("waiter-*.lock"))
    assert held.released
    first = leaser.acquire(2)
    with pytest.raises(TimeoutError, match=r"^a config waited 0.05 s for 1 of GPUs 0,1 and they did not become free$"):
        leaser.acquire(1, timeout_s=0.05)  # no config id given
    threading.Timer(0.3, first.release).start()  # started before the wait: the lease cannot come sooner
    with leaser.acquire(2, timeout_s=30) as second:
        assert 0.25 <= second.waited_s < 30  # the timer started a moment before the wait; 30 s would have raised
    with pytest.raises(ValueError, match=r"^c needs 1 GPUs but the lease pool has 0 \(none\)$"):
        GpuLeaser(tmp_path, gpus=[]).acquire(1, config_id="c")


def test_a_dead_waiter_dropped_by_two_processes_at_once_is_no_error(tmp_path: Path, monkeypatch) -> None:
    """Every waiter prunes the queue's dead entries; two that find the same dead one both remove its file, and the
    second must not fail on the file the first already removed."""
    leaser = GpuLeaser(tmp_path, gpu_indices=range(1))
    leaser._waiter_path(7).touch()

    def lock_and_lose_the_race(fd: int) -> bool:
        leaser._waiter_path(7).unlink()  # the other pruner, between our open and our unlink
        return True

    monkeypatch.setattr(gpus, "_try_lock", lock_and_lose_the_race)
    state = {"waiters": [{"ticket": 7}, {"ticket": 8}]}
    leaser._drop_dead_waiters(state, own_ticket=8)
    assert state["waiters"] == [{"ticket": 8}] and not leaser._waiter_path(7).exists()


def test_a_release_frees_only_its_own_gpus_and_logs_its_lease(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "leases-elsewhere.jsonl"
    log.parent.mkdir()
    leaser = GpuLeaser(tmp_path, gpu_indices=range(4), log_path=log)
    with leaser.acquire(2, config_id="b") as b:
        a = leaser.acquire(2, config_id="a")
        a.release()
        holders = json.loads((tmp_path / "state.json").read_text())["holders"]
        assert sorted(int(i) for i in holders) == list(b.indices)  # b's GPUs stay held, a's are free
        with leaser.acquire(2, config_id="c", timeout_s=5) as c:
            assert c.indices == a.indices
    releases = [(e["lease"], e["indices"], e["config"]) for e in read_lease_log(log) if e["event"] == "release"]
    assert releases == [(a.lease_id, list(a.indices), "a"), (c.lease_id, list(c.indices), "c"),
                        (b.lease_id, list(b.indices), "b")]
    assert len({a.lease_id, b.lease_id, c.lease_id}) == 3


def _hold(lock_dir: str, pool: int, count: int, ready: "multiprocessing.synchronize.Event", child: bool) -> None:
    lease = GpuLeaser(lock_dir, gpu_indices=range(pool)).acquire(count, config_id="victim")
    if child:  # a "server" that inherits the lease, like Popen(pass_fds=lease.lock_fds)
        server = subprocess.Popen(["sleep", "30"], pass_fds=lease.lock_fds, start_new_session=True)
        (Path(lock_dir) / "server.pid").write_text(str(server.pid))
    ready.set()
    time.sleep(30)


def _start_holder(spawn, lock_dir: Path, pool: int, count: int, child: bool = False) -> multiprocessing.Process:
    ready = MP.Event()
    proc = spawn(_hold, str(lock_dir), pool, count, ready, child)
    assert ready.wait(10)
    return proc


def test_sigkilled_holder_is_reclaimed(tmp_path: Path, spawn) -> None:
    holder = _start_holder(spawn, tmp_path, 2, 2)
    leaser = GpuLeaser(tmp_path, gpu_indices=range(2), poll_s=0.01, recheck_s=0.1)
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(leaser.acquire(2, timeout_s=20, config_id="next")), daemon=True)
    waiter.start()
    _queued(tmp_path, "next")  # waiting behind the holder: a crash writes nothing, a full round must notice it
    os.kill(holder.pid, signal.SIGKILL)
    waiter.join(30)
    assert got and got[0].indices == (0, 1)
    got[0].release()
    holder.join()
    events = read_lease_log(tmp_path / "leases.jsonl")
    assert [(e["event"], e["config"]) for e in events] == [
        ("acquire", "victim"), ("reclaim", "victim"), ("acquire", "next"), ("release", "next")]
    assert events[1]["pid"] == holder.pid
    assert lease_overlaps(events) == []


def test_lease_passed_to_a_server_outlives_its_worker(tmp_path: Path, spawn) -> None:
    holder = _start_holder(spawn, tmp_path, 1, 1, child=True)
    server_pid = int((tmp_path / "server.pid").read_text())
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
        leaser = GpuLeaser(tmp_path, gpu_indices=range(1))
        with pytest.raises(TimeoutError):  # the orphaned "server" still holds GPU 0
            leaser.acquire(1, timeout_s=0.1)
        os.kill(server_pid, signal.SIGKILL)
        with leaser.acquire(1, timeout_s=5):
            pass
    finally:
        try:
            os.kill(server_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _hog(lock_dir: str, stop: "multiprocessing.synchronize.Event") -> None:
    leaser = GpuLeaser(lock_dir, gpu_indices=range(4), poll_s=0.002)
    while not stop.is_set():
        with leaser.acquire(1, config_id="tp1"):
            time.sleep(0.03)


def test_full_node_request_is_not_starved(tmp_path: Path, spawn) -> None:
    """Four TP1 loops keep every GPU busy, releasing one at a time; a TP4 must still get the node.

    Not starved means: once the TP4 is queued, no TP1 takes a GPU before it (the lease log is written
    under the leaser's lock, so its order is the order things happened).
    """
    stop = MP.Event()
    for _ in range(4):
        spawn(_hog, str(tmp_path), stop)
    log = tmp_path / "leases.jsonl"
    while len({e["pid"] for e in (read_lease_log(log) if log.exists() else []) if e["event"] == "acquire"}) < 4:
        time.sleep(0.005)  # until every hog has held a GPU once
    got: list = []
    tp4 = threading.Thread(target=lambda: got.append(
        GpuLeaser(tmp_path, gpu_indices=range(4), poll_s=0.002).acquire(4, timeout_s=30, config_id="tp4")), daemon=True)
    try:
        tp4.start()
        _queued(tmp_path, "tp4")
        seen = len(read_lease_log(log))
        tp4.join(40)
        assert got, "the TP4 never got the node"
        got[0].release()
    finally:
        stop.set()
    after = read_lease_log(log)[seen:]
    until_tp4 = after[: next(i for i, e in enumerate(after) if e["config"] == "tp4")]
    assert [e for e in until_tp4 if e["event"] == "acquire"] == []


def _lease_once(lock_dir: str, count: int, config_id: str) -> None:
    with GpuLeaser(lock_dir, gpu_indices=range(2), poll_s=0.005).acquire(count, config_id=config_id):
        time.sleep(0.05)


def test_larger_request_goes_first(tmp_path: Path, spawn) -> None:
    """A TP2 that arrives after a waiting TP1 still gets the next GPUs: a node-sized need is never starved."""
    leaser = GpuLeaser(tmp_path, gpu_indices=range(2), poll_s=0.005)
    first, second = leaser.acquire(1), leaser.acquire(1)
    tp1 = spawn(_lease_once, str(tmp_path), 1, "tp1")
    _queued(tmp_path, "tp1")
    tp2 = spawn(_lease_once, str(tmp_path), 2, "tp2")
    _queued(tmp_path, "tp2")
    first.release()
    # GPU 0 is free now, but reserved for the TP2: a newcomer is refused (and the queued TP1 gets polls in).
    with pytest.raises(TimeoutError):
        leaser.acquire(1, timeout_s=0.2, config_id="late")
    second.release()
    tp1.join(10)
    tp2.join(10)
    order = [e["config"] for e in read_lease_log(tmp_path / "leases.jsonl") if e["event"] == "acquire"]
    assert order == ["", "", "tp2", "tp1"]


def test_dead_waiter_releases_its_reservation(tmp_path: Path, spawn) -> None:
    leaser = GpuLeaser(tmp_path, gpu_indices=range(2), poll_s=0.005)
    with leaser.acquire(1) as first:
        waiter = spawn(_lease_once, str(tmp_path), 2, "tp2")
        _queued(tmp_path, "tp2")
        # The waiting TP2 reserves the free GPU: a TP1 may not jump the queue.
        with pytest.raises(TimeoutError):
            leaser.acquire(1, timeout_s=0.1)
        os.kill(waiter.pid, signal.SIGKILL)
        waiter.join()
        with leaser.acquire(1, timeout_s=5) as second:
            assert {first.indices, second.indices} == {(0,), (1,)}
