"""One engine server's life: launch, wait for readiness, always tear down.

Why this shape (lessons from vLLM #37230, SGLang #31645/#39545, perf-eval #56):
* the server runs in its own session, so the whole tree (API server, engine core, TP workers) is one
  process group that ``killpg`` reaches even after children are reparented;
* readiness polls the process too, so a server that dies during a 2000 s load is reported within a
  second with the tail of its log — including one that exits 0;
* readiness also checks the model name we gave it, so a leftover server on the same port is never
  mistaken for ours;
* a failure inside ``__enter__`` still tears down (the #37230 leak), and a separate janitor process
  kills the group if pytest itself dies without running teardown (pytest-timeout's ``thread`` method
  calls ``os._exit``; a SIGKILLed xdist worker runs nothing).

Engines are reached only through ``pytest_moe.engines.Engine``: nothing here knows an engine by name.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pytest_moe.engines import Engine
from pytest_moe.errors import read_log_tail
from pytest_moe.configs import ServerConfig
from pytest_moe.redact import redact, redact_file, register_secrets, secret_values_of
from pytest_moe.report import shell_line

Progress = Callable[[str], None]

#: How often the process is polled while waiting; bounds the time to notice a dead server.
_POLL_S = 0.2
#: How often the readiness endpoint is probed (a refused connection costs microseconds).
_PROBE_S = 0.5
#: Lines of log shown when a server dies.
_TAIL_LINES = 30


class ServerError(RuntimeError):
    """The server could not be brought up; carries what a reader needs to see why."""

    def __init__(self, message: str, *, log_path: Path, log_tail: str, timed_out: bool = False):
        super().__init__(redact(f"{message}\n--- last lines of {log_path} ---\n{log_tail}"))
        self.log_path = log_path
        self.log_tail = log_tail
        self.timed_out = timed_out


@dataclass
class Teardown:
    """What stopping the server took, for the results and the printed benchmark."""

    seconds: float = 0.0
    escalated_to_sigkill: bool = False
    pids: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free right now (a bind clash at start is retried by the caller)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """Last ``lines`` lines of a log without reading a multi-GB file into memory ("" before it exists)."""
    try:
        return "\n".join(read_log_tail(path, max_bytes=256 * 1024).splitlines()[-lines:])
    except OSError:
        return ""


class Server:
    """Context manager around one engine server, in the spirit of vLLM's ``RemoteOpenAIServer``."""

    def __init__(
        self,
        engine: Engine,
        cfg: ServerConfig,
        *,
        model_path: str,
        served_name: str,
        log_path: Path,
        timeout_s: float,
        profile_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        progress: Progress = lambda line: None,
        progress_interval_s: float = 30.0,
        grace_s: float = 10.0,
        after_stop: Callable[[Server], None] = lambda server: None,
    ):
        self.engine = engine
        self.cfg = cfg
        self.model_path = model_path
        self.served_name = served_name
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.profile_dir = profile_dir
        self.extra_env = extra_env or {}
        #: The GPU lease's lock fds: inherited by the server, so a server outliving a crashed worker keeps its GPUs leased.
        self.pass_fds = pass_fds
        self.progress = progress
        self.progress_interval_s = progress_interval_s
        self.grace_s = grace_s
        self.after_stop = after_stop
        self.port = free_port(cfg.host)
        self.argv = self._argv()
        self.proc: subprocess.Popen | None = None
        self._janitor: subprocess.Popen | None = None
        self.teardown: Teardown | None = None
        self.ready_after_s: float | None = None
        #: ``time.monotonic()`` when the wait noticed the process had exited (for the printed benchmark).
        self.noticed_exit_at: float | None = None

    @property
    def launch_env(self) -> dict[str, str]:
        """Variables set for the server on top of the caller's environment (part of its command line)."""
        return {**self.engine.environment(self.cfg, self.profile_dir), **self.extra_env}

    @property
    def base_url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def _argv(self) -> list[str]:
        return self.engine.command(
            self.cfg, self.model_path, host=self.cfg.host, port=self.port,
            served_name=self.served_name, profile_dir=self.profile_dir,
        )

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> Server:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        """Launch the engine in a new session, its output going to one log file per config."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        register_secrets(secret_values_of(self.argv, self.launch_env))
        env = {**os.environ, **self.launch_env}
        with open(self.log_path, "ab") as log:
            log.write(f"$ {shell_line(self.argv, self.launch_env)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, pass_fds=self.pass_fds,
            )
        self._janitor = subprocess.Popen(
            [sys.executable, "-m", "pytest_moe.janitor", str(os.getpid()), str(self.proc.pid), str(self.grace_s)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def wait_ready(self) -> float:
        """Block until the server is ready, it dies, or ``timeout_s`` passes; return seconds waited."""
        assert self.proc is not None
        started = time.monotonic()
        next_probe = started
        next_progress = started + self.progress_interval_s
        while True:
            now = time.monotonic()
            exited = self.exited()
            if exited is not None:
                who, code, log_path = exited
                self.noticed_exit_at = now
                raise ServerError(
                    f"{who} for {self.cfg.id} exited with code {code} after {now - started:.1f} s, before it was ready",
                    log_path=log_path, log_tail=tail(log_path),
                )
            if now - started > self.timeout_s:
                raise ServerError(
                    f"TimeoutError: Server failed to start within the timeout period ({self.timeout_s:g} s) for {self.cfg.id}",
                    log_path=self.log_path, log_tail=tail(self.log_path), timed_out=True,
                )
            if now >= next_probe:
                if self.engine.is_ready(self.base_url, self.served_name):
                    self.ready_after_s = time.monotonic() - started
                    return self.ready_after_s
                next_probe = time.monotonic() + _PROBE_S
            if now >= next_progress:
                recent = tail(self.log_path, 200)
                last = recent.strip().rsplit("\n", 1)[-1][:200]
                self.progress(redact(
                    f"[pytest-moe] {self.cfg.id}: waiting for readiness, {now - started:.0f} s elapsed "
                    f"({self.engine.phase(recent)}); last log line: {last}"
                ))
                next_progress = now + self.progress_interval_s
            time.sleep(_POLL_S)

    def exited(self) -> tuple[str, int, Path] | None:
        """``(who, exit code, its log)`` of a server process that has exited, or None while all run."""
        code = self.proc.poll() if self.proc is not None else None
        return None if code is None else ("Server process", code, self.log_path)

    def alive(self) -> bool:
        return self.proc is not None and self.exited() is None

    def stop(self) -> Teardown:
        """Terminate the whole tree: SIGTERM, grace period, SIGKILL, wait until every process is gone.

        The log is then rewritten redacted (it is uploaded as an artifact and holds whatever the engine
        printed, including the secrets we passed it).  Idempotent; then ``gc.collect()`` and the ``after_stop`` hook (GPU memory wait, cool-down).
        """
        if self.teardown is not None or self.proc is None:
            return self.teardown or Teardown()
        t0 = time.monotonic()
        self.teardown = self._kill()
        redact_file(self.log_path)
        gc.collect()
        self.after_stop(self)
        self.teardown.seconds = time.monotonic() - t0
        return self.teardown

    def _kill(self) -> Teardown:
        """Stop the tree and its janitor (a multi-node server stops every member's)."""
        result = kill_tree(self.proc.pid, self.grace_s)
        self.proc.wait()
        if self._janitor is not None:
            self._janitor.kill()
            self._janitor.wait()
        return result


def kill_tree(leader: int, grace_s: float) -> Teardown:
    """Stop the process group led by ``leader`` plus any descendant that left it; wait until all are gone."""
    members = _members(leader)
    result = Teardown(pids=[p.pid for p in members])
    _signal_group(leader, signal.SIGTERM)
    _signal_group(leader, signal.SIGCONT)  # a SIGSTOPped server must run to act on SIGTERM
    for proc in members:
        _quietly(proc.terminate)
    _, alive = psutil.wait_procs(members, timeout=grace_s)
    stragglers = alive + [p for p in _members(leader) if p not in members]
    if stragglers:
        result.escalated_to_sigkill = True
        _signal_group(leader, signal.SIGKILL)
        for proc in stragglers:
            _quietly(proc.kill)
        _, alive = psutil.wait_procs(stragglers, timeout=10)
    result.survivors = [p.pid for p in alive] + [p.pid for p in _members(leader) if p.is_running()]
    return result


def _members(leader: int) -> list[psutil.Process]:
    """The leader, its descendants, and anything else still in its process group."""
    found: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(leader)
        for proc in [root, *root.children(recursive=True)]:
            found[proc.pid] = proc
    except psutil.Error:
        pass
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == leader and proc.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(proc.pid, proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return [p for p in found.values() if _is_live(p)]


def _is_live(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _quietly(action: Callable[[], None]) -> None:
    try:
        action()
    except psutil.Error:
        pass
