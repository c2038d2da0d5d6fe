"""GPU discovery, GPU memory release after teardown, and GPU leasing across pytest-xdist workers.

Discovery
    NVML (``pynvml`` from nvidia-ml-py) is the source of truth because it enumerates GPUs without
    initialising CUDA in the test process (a CUDA context would itself hold GPU memory and pin the
    device for the whole run).  ``CUDA_VISIBLE_DEVICES`` narrows the list with CUDA's own rules
    (indices or UUID prefixes; the list ends at the first entry that names no GPU, so ``""`` and
    ``"-1"`` mean none).  ``PYTEST_MOE_GPUS`` uses the same syntax and *replaces*
    ``CUDA_VISIBLE_DEVICES``: it pins every worker to the given GPUs for a one-GPU repro.
    Indices are physical (NVML / PCI bus order); a lease hands them to the server together with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA means the same GPUs by the same numbers.

Memory release
    After a server is torn down the driver may still be freeing its memory; launching the next
    server at once is how nightly suites OOM (sglang #39545, vllm #37230).  We poll NVML until none
    of the server's pids is listed on its GPUs *and* used memory is back within a tolerance of the
    pre-launch baseline, bounded by a timeout, and warn with the figures when the bound is missed.
    Without NVML there is nothing to measure and the wait is skipped (``None``).

Leasing
    Every xdist worker is a separate process, so the only shared state is a directory of files:

    ``gpu-<index>.lock``
        One ``flock`` per GPU, held for the lease's lifetime.  The kernel drops a flock when the
        last descriptor of its open file goes away, so the lease of a crashed (even SIGKILLed)
        worker is reclaimed with no cleanup step and no stale-pid guessing.
    ``arbiter.lock``
        A short-held flock that serialises lease *decisions*, so a multi-GPU lease is taken
        all-or-nothing and two waiters never split a node between them (no hold-and-wait, hence
        no deadlock).
    ``state.json``
        The waiting queue and the current holders, read and written only under the arbiter.
        Each waiter also holds ``waiter-<ticket>.lock``; an entry whose lock is free belongs to
        a dead process and is dropped.
    ``leases.jsonl``
        One JSON line per acquire / release / reclaim (time, pid, lease, indices, config), written
        under the arbiter, so the file order is the true order and :func:`lease_overlaps` can
        prove that no two leases ever shared a GPU.

    Ordering and starvation: waiters are served largest request first, FIFO among equal sizes.
    In every round (whenever state.json changes, and at least every ``recheck_s`` because a crash
    writes nothing) a waiter replays the allocation of the free GPUs in that order; a waiter that
    cannot be satisfied *reserves* the free GPUs it could use, so smaller requests behind it can
    only take GPUs outside its pool.  A TP8 waiting for a full node therefore gets every GPU that
    frees up and starts as soon as the configs already running end: TP1 configs cannot keep
    grabbing freed GPUs ahead of it.  When the work itself is ordered largest first (the plugin
    sorts items by GPU count, then by expected time), GPU counts are powers of two dividing the
    node, so the free GPUs are always a multiple of the head's need and reservations never leave
    a GPU idle; the only idle time is the tail of the run.  Not using the library ``filelock``:
    the whole design rests on "a lease dies with its holder", which must be the kernel's flock,
    while filelock 4 by default falls back to a soft lock that survives its holder where flock is
    missing, and the keyword that refuses this (``fallback_to_soft=False``) is rejected by the
    filelock 3.x that our dependency range admits.  The arbiter also blocks in flock() itself
    rather than in filelock's sleep-and-retry loop.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

PIN_ENV = "PYTEST_MOE_GPUS"
LEASE_DIR_ENV = "PYTEST_MOE_LEASE_DIR"
UNKNOWN_NAME = "unknown"
_MIB = 1 << 20


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as discovered; fields NVML could not tell are None."""

    index: int
    name: str
    memory_total_bytes: int | None
    compute_capability: tuple[int, int] | None
    uuid: str | None
    # The CUDA_VISIBLE_DEVICES token for this GPU where its physical index is unknown (named by
    # UUID on a host without NVML); None means str(index).
    cuda_token: str | None = None

    @property
    def cuda_id(self) -> str:
        """What selects this GPU in a child's CUDA_VISIBLE_DEVICES."""
        return self.cuda_token or str(self.index)


@functools.cache
def _nvml() -> ModuleType | None:
    """pynvml, initialised once per process, or None where it is missing or finds no driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _text(value: str | bytes) -> str:
    # Older pynvml releases return bytes.
    return value.decode() if isinstance(value, bytes) else value


def _nvml_gpus(nvml: Any) -> list[GpuInfo]:
    gpus = []
    for index in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        gpus.append(
            GpuInfo(
                index=index,
                name=_text(nvml.nvmlDeviceGetName(handle)),
                memory_total_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                compute_capability=tuple(nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            )
        )
    return gpus


def _select(spec: str, known: list[GpuInfo] | None) -> list[GpuInfo]:
    """Apply a CUDA_VISIBLE_DEVICES-style list to the known GPUs (None: no NVML to check against).

    Like CUDA, the list ends at the first entry that names no GPU; repeated entries count once.
    """
    chosen: list[GpuInfo] = []
    for position, token in enumerate(t.strip() for t in spec.split(",")):
        if token.isdigit():
            index = int(token)
            if known is None:
                match = GpuInfo(index, UNKNOWN_NAME, None, None, None)
            else:
                match = next((g for g in known if g.index == index), None)
        elif token.startswith(("GPU-", "MIG-")):
            if known is None:
                match = GpuInfo(position, UNKNOWN_NAME, None, None, token, cuda_token=token)
            else:
                hits = [g for g in known if g.uuid and g.uuid.startswith(token)]
                match = hits[0] if len(hits) == 1 else None
        else:
            match = None
        if match is None:
            break
        if match not in chosen:
            chosen.append(match)
    return chosen


def _selection_env() -> tuple[str, str] | None:
    """The variable that restricts the GPUs, and its value; the pin wins over CUDA_VISIBLE_DEVICES."""
    pin = os.environ.get(PIN_ENV, "").strip()
    if pin:
        return PIN_ENV, pin
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return "CUDA_VISIBLE_DEVICES", os.environ["CUDA_VISIBLE_DEVICES"]
    return None


def discover_gpus() -> list[GpuInfo]:
    """The GPUs this run may use, by physical index, without initialising CUDA."""
    nvml = _nvml()
    known = _nvml_gpus(nvml) if nvml is not None else None
    selection = _selection_env()
    if selection is None:
        return known or []
    return _select(selection[1], known)


def gpu_source() -> str:
    """Where discover_gpus took its answer from, for skip reasons and reports."""
    selection = _selection_env()
    if selection is not None:
        return f"{selection[0]}={selection[1]!r}"
    return "NVML" if _nvml() is not None else "no NVML and no CUDA_VISIBLE_DEVICES"


def shortfall_reason(needed: int, gpus: Sequence[GpuInfo]) -> str | None:
    """The skip reason for a config needing `needed` GPUs on this host, or None when it fits."""
    if needed <= len(gpus):
        return None
    return f"needs {needed} GPUs, found {len(gpus)} ({gpu_source()})"


def memory_snapshot(indices: Iterable[int]) -> dict[int, int] | None:
    """Used bytes per GPU as NVML reports them; None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    return {
        i: int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(i)).used)
        for i in indices
    }


def _gpu_pids(nvml: Any, indices: Iterable[int]) -> set[int]:
    pids: set[int] = set()
    for i in indices:
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            pids.update(p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        except nvml.NVMLError:
            pass  # listing unsupported here: the memory figures alone decide
    return pids


class GpuMemoryNotReleasedWarning(UserWarning):
    """A torn-down server's GPU memory was not back to its baseline within the bound."""


@dataclass(frozen=True)
class MemoryRelease:
    """The outcome of one wait for GPU memory after a teardown."""

    waited_s: float
    released: bool
    leftover_pids: list[int]
    used_bytes: dict[int, int]
    baseline_bytes: dict[int, int]
    tolerance_bytes: int = 1 << 30

    def describe(self) -> str:
        """One line with the figures, for logs and warnings."""
        head = (
            f"GPU memory released after {self.waited_s:.2f} s"
            if self.released
            else f"GPU memory not released after {self.waited_s:.2f} s"
        )
        parts = [head]
        if self.leftover_pids:
            parts.append(f"pids {', '.join(map(str, self.leftover_pids))} still on the GPUs")
        for i, used in sorted(self.used_bytes.items()):
            base = self.baseline_bytes.get(i)
            against = (
                f" (baseline {base // _MIB} MiB, tolerance {self.tolerance_bytes // _MIB} MiB)"
                if base is not None
                else ""
            )
            parts.append(f"GPU {i} used {used // _MIB} MiB{against}")
        return "; ".join(parts)


def wait_for_memory_release(
    indices: Iterable[int],
    pids: set[int],
    baseline: dict[int, int] | None,
    timeout_s: float = 120,
    tolerance_bytes: int = 1 << 30,
    poll_s: float = 0.2,
) -> MemoryRelease | None:
    """Wait until NVML lists none of `pids` on `indices` and used memory is within tolerance of `baseline`.

    Returns None (skipped) without NVML.  A baseline of None checks the pids alone.  On timeout it
    warns with GpuMemoryNotReleasedWarning and returns released=False rather than raising: the
    next config decides whether it can still run, and the figures are what an operator needs.
    """
    nvml = _nvml()
    if nvml is None:
        return None
    indices = list(indices)
    start = time.monotonic()
    while True:
        leftover = sorted(_gpu_pids(nvml, indices) & pids)
        used = memory_snapshot(indices) or {}
        back = baseline is None or all(
            used[i] <= baseline.get(i, used[i]) + tolerance_bytes for i in indices
        )
        released = not leftover and back
        waited = time.monotonic() - start
        if released or waited >= timeout_s:
            break
        time.sleep(poll_s)
    result = MemoryRelease(waited, released, leftover, used, dict(baseline or {}), tolerance_bytes)
    if not released:
        warnings.warn(result.describe(), GpuMemoryNotReleasedWarning, stacklevel=2)
    return result


def default_lease_dir() -> Path:
    """PYTEST_MOE_LEASE_DIR, else one directory per user and host.

    Host-wide rather than per pytest run, so that two runs on one runner (a nightly and a
    developer's repro) cannot share a GPU either.
    """
    configured = os.environ.get(LEASE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"pytest-moe-gpu-leases-{os.getuid()}"


def _open_lock(path: Path) -> int:
    # O_CLOEXEC (Python's default): a server started with Popen holds the lease only when it is
    # handed the descriptor on purpose (GpuLease.lock_fds).
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    # LOCK_UN acts on the open file, so it also frees the lease where a child still has a copy.
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _pick(free: Sequence[int], count: int) -> list[int]:
    """`count` of the free GPUs, preferring an aligned block (0-3, 4-7, ...) to keep the node unfragmented."""
    ordered = sorted(free)
    for start in ordered:
        block = list(range(start, start + count))
        if start % count == 0 and set(block) <= set(ordered):
            return block
    return ordered[:count]


class GpuLease:
    """GPUs held by this process until release(); a context manager."""

    def __init__(
        self,
        leaser: GpuLeaser | None,
        lease_id: int,
        gpus: Sequence[GpuInfo],
        fds: Sequence[int],
        config_id: str,
        waited_s: float,
    ) -> None:
        self._leaser = leaser
        self.lease_id = lease_id
        self.gpus = tuple(gpus)
        self._fds = tuple(fds)
        self.config_id = config_id
        self.waited_s = waited_s
        self.released = False

    @property
    def indices(self) -> tuple[int, ...]:
        return tuple(g.index for g in self.gpus)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(g.cuda_id for g in self.gpus)

    @property
    def lock_fds(self) -> tuple[int, ...]:
        """Pass these to Popen(pass_fds=...) to make the lease outlive a crashed worker while its server runs."""
        return self._fds

    def env(self) -> dict[str, str]:
        """Environment for the server: its GPUs, numbered as NVML numbers them."""
        return {"CUDA_VISIBLE_DEVICES": self.cuda_visible_devices, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}

    def release(self) -> None:
        if not self.released and self._leaser is not None:
            self._leaser._release(self)
        self.released = True

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"GpuLease(id={self.lease_id}, gpus={self.cuda_visible_devices!r}, config={self.config_id!r})"


class GpuLeaser:
    """Leases GPUs to configs through lock files in `lock_dir`, shared by every process on the host.

    `gpus` defaults to discover_gpus(); `gpu_indices` declares a pool of GPUs that need not exist
    (benchmarks and tests of the scheduling itself).
    """

    def __init__(
        self,
        lock_dir: Path | str | None = None,
        gpus: Sequence[GpuInfo] | None = None,
        *,
        gpu_indices: Iterable[int] | None = None,
        poll_s: float = 0.05,
        recheck_s: float = 1.0,
        log_path: Path | str | None = None,
    ) -> None:
        self.lock_dir = Path(lock_dir) if lock_dir is not None else default_lease_dir()
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        if gpu_indices is not None:
            gpus = [GpuInfo(i, "declared", None, None, None) for i in gpu_indices]
        self.gpus: tuple[GpuInfo, ...] = tuple(gpus if gpus is not None else discover_gpus())
        self.poll_s = poll_s
        # A crash writes nothing, so a full round runs at least this often even when state.json
        # has not changed: it bounds how late a dead holder's or waiter's GPUs are noticed.
        self.recheck_s = recheck_s
        self.log_path = Path(log_path) if log_path is not None else self.lock_dir / "leases.jsonl"
        self._state_path = self.lock_dir / "state.json"

    # -- shared state, always under the arbiter ------------------------------------------------

    @contextmanager
    def _arbiter(self) -> Iterator[None]:
        fd = _open_lock(self.lock_dir / "arbiter.lock")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            _unlock(fd)

    def _read_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self._state_path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        state.setdefault("next_ticket", 1)
        state.setdefault("waiters", [])
        state.setdefault("holders", {})
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._state_path)  # a crash mid-write leaves the old state, not half a file

    def _log(self, event: str, pid: int, lease_id: int, indices: Sequence[int], config_id: str) -> None:
        line = {"t": time.time(), "event": event, "pid": pid, "lease": lease_id,
                "indices": list(indices), "config": config_id}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def _waiter_path(self, ticket: int) -> Path:
        return self.lock_dir / f"waiter-{ticket}.lock"

    def _drop_dead_waiters(self, state: dict[str, Any], own_ticket: int) -> None:
        alive = []
        for waiter in state["waiters"]:
            if waiter["ticket"] != own_ticket:
                try:
                    fd = os.open(self._waiter_path(waiter["ticket"]), os.O_RDWR)
                except FileNotFoundError:
                    continue
                dead = _try_lock(fd)
                os.close(fd)
                if dead:
                    self._waiter_path(waiter["ticket"]).unlink(missing_ok=True)
                    continue
            alive.append(waiter)
        state["waiters"] = alive

    # -- leasing -------------------------------------------------------------------------------

    def acquire(self, count: int, timeout_s: float | None = None, config_id: str = "") -> GpuLease:
        """Block until `count` GPUs are leased to this process; TimeoutError after `timeout_s`."""
        pool = [g.index for g in self.gpus]
        if count == 0:
            return GpuLease(None, 0, [], [], config_id, 0.0)
        if count > len(pool):
            raise ValueError(
                f"{config_id or 'this config'} needs {count} GPUs but the lease pool has "
                f"{len(pool)} ({','.join(map(str, pool)) or 'none'})"
            )
        start = time.monotonic()
        with self._arbiter():
            state = self._read_state()
            ticket = state["next_ticket"]
            state["next_ticket"] = ticket + 1
            waiter_fd = _open_lock(self._waiter_path(ticket))
            _try_lock(waiter_fd)  # a fresh ticket's file: nobody else holds it
            entry = {"ticket": ticket, "count": count, "pool": pool, "pid": os.getpid(), "config": config_id}
            state["waiters"].append(entry)
            self._write_state(state)
        try:
            mark, last_round = None, -float("inf")
            while True:
                # Polls are a stat() until state.json changes: 8 waiters stay off the CPU the
                # configs need, and still react within poll_s.
                if self._state_mark() != mark or time.monotonic() - last_round >= self.recheck_s:
                    fds, mark = self._try_take(entry)
                    last_round = time.monotonic()
                    if fds is not None:
                        gpus = [g for g in self.gpus if g.index in fds]
                        return GpuLease(self, ticket, gpus, [fds[g.index] for g in gpus], config_id,
                                        time.monotonic() - start)
                if timeout_s is not None and time.monotonic() - start >= timeout_s:
                    raise TimeoutError(
                        f"{config_id or 'a config'} waited {timeout_s:g} s for {count} of GPUs "
                        f"{','.join(map(str, pool))} and they did not become free"
                    )
                time.sleep(self.poll_s)
        finally:
            self._leave_queue(ticket, waiter_fd)

    def _leave_queue(self, ticket: int, waiter_fd: int) -> None:
        with self._arbiter():
            state = self._read_state()
            state["waiters"] = [w for w in state["waiters"] if w["ticket"] != ticket]
            self._write_state(state)
            self._waiter_path(ticket).unlink(missing_ok=True)
            _unlock(waiter_fd)

    def _state_mark(self) -> tuple[int, int, int] | None:
        """Changes whenever state.json is rewritten (os.replace gives it a new inode)."""
        try:
            st = os.stat(self._state_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _try_take(self, entry: dict[str, Any]) -> tuple[dict[int, int] | None, tuple[int, int, int] | None]:
        """One scheduling round under the arbiter: this waiter's GPU -> lock fd (None: wait), and the state's mark."""
        ticket = entry["ticket"]
        with self._arbiter():
            state = self._read_state()
            queued = list(state["waiters"])
            self._drop_dead_waiters(state, ticket)
            if all(w["ticket"] != ticket for w in state["waiters"]):
                state["waiters"].append(entry)  # the state file was lost or reset under us
            waiters = sorted(state["waiters"], key=lambda w: (-w["count"], w["ticket"]))
            probe = {i for w in waiters for i in w["pool"]}
            held: dict[int, int] = {}
            for i in sorted(probe):
                fd = _open_lock(self.lock_dir / f"gpu-{i}.lock")
                if _try_lock(fd):
                    held[i] = fd
                else:
                    os.close(fd)
            free = set(held)
            mine: list[int] | None = None
            for waiter in waiters:
                usable = free & set(waiter["pool"])
                if len(usable) >= waiter["count"]:
                    taken = _pick(sorted(usable), waiter["count"])
                    if waiter["ticket"] == ticket:
                        mine = taken
                        break
                    free -= set(taken)
                else:
                    if waiter["ticket"] == ticket:
                        break
                    free -= usable  # reserved for the larger or older waiter ahead
            for i, fd in held.items():
                if mine is None or i not in mine:
                    _unlock(fd)
            if mine is None:
                if state["waiters"] != queued:
                    self._write_state(state)
                return None, self._state_mark()
            self._record_take(state, ticket, mine, entry["config"])
            return {i: held[i] for i in mine}, None

    def _record_take(self, state: dict[str, Any], ticket: int, indices: list[int], config_id: str) -> None:
        holders: dict[str, Any] = state["holders"]
        # A holder entry on a GPU we just locked is a lease whose process died without release.
        stale = {holders[str(i)]["lease"]: holders[str(i)] for i in indices if str(i) in holders}
        for lease_id, holder in stale.items():
            self._log("reclaim", holder["pid"], lease_id, holder["indices"], holder["config"])
            for i in holder["indices"]:
                holders.pop(str(i), None)
        pid = os.getpid()
        for i in indices:
            holders[str(i)] = {"lease": ticket, "pid": pid, "indices": indices, "config": config_id}
        self._log("acquire", pid, ticket, indices, config_id)
        self._write_state(state)

    def _release(self, lease: GpuLease) -> None:
        # Logged before the locks open, under the arbiter: the log never shows a release after the
        # next holder's acquire.
        with self._arbiter():
            state = self._read_state()
            for i in lease.indices:
                if state["holders"].get(str(i), {}).get("lease") == lease.lease_id:
                    del state["holders"][str(i)]
            self._write_state(state)
            self._log("release", os.getpid(), lease.lease_id, lease.indices, lease.config_id)
            for fd in lease.lock_fds:
                _unlock(fd)


def read_lease_log(path: Path | str) -> list[dict[str, Any]]:
    """The events of a lease log, in the order they happened."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def lease_overlaps(events: Sequence[dict[str, Any]]) -> list[str]:
    """Every time a GPU was acquired while another lease held it; empty means the leases never overlapped."""
    holder: dict[int, dict[str, Any]] = {}
    problems = []
    for event in events:
        for i in event["indices"]:
            if event["event"] == "acquire":
                if i in holder:
                    prev = holder[i]
                    problems.append(
                        f"GPU {i}: lease {event['lease']} (pid {event['pid']}, {event['config']}) acquired "
                        f"while lease {prev['lease']} (pid {prev['pid']}, {prev['config']}) held it"
                    )
                holder[i] = event
            elif holder.get(i, {}).get("lease") == event["lease"]:
                del holder[i]
    return problems
