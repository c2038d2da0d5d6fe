"""A server spanning several nodes: one member per node, readiness on the head, one fate for all.

Why members are separate launches rather than one ``srun --ntasks-per-node=1`` step: each member needs
its own ``--node-rank``, and one ``srun --nodes=1 --ntasks=1 --relative=R`` per member gives every member
its own process to watch, log and stop; the same code then runs the members as plain local processes
(two "nodes" on one host) where there is no Slurm allocation, which is how the CPU tests exercise it.

What the member processes share with a one-node ``Server``: the log per config (member 0's; member R
logs to ``<log>.node<R>.log``), the janitor per process, the readiness probe (head only: engines serve
HTTP on node rank 0).  What is added: a member that exits on any node — before or after readiness —
fails the config within a poll (the watcher writes which member died into the head's log and stops the
whole server, so the benchmark's next request fails at once instead of waiting for a collective timeout).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pytest_moe.report import shell_line
from pytest_moe.server import Server, Teardown, free_port, kill_tree

#: How often the watcher looks at the members after readiness.
_WATCH_S = 0.2


def nodes_offered(option: int | None) -> int:
    """Nodes a server may span: ``--moe-nodes``, else the Slurm allocation's node count, else 1."""
    if option:
        return option
    return int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)


def allocation_hosts() -> list[str] | None:
    """Host names of this Slurm allocation in node order, or None outside one (members run locally)."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist or shutil.which("scontrol") is None:
        return None
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return out.stdout.split()


def node_address(name: str) -> str:
    """The address other nodes reach Slurm node ``name`` at (its ``NodeAddr``; usually the name itself)."""
    out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True, check=False).stdout
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match[1] if match else name


@dataclass
class Member:
    rank: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    janitor: subprocess.Popen | None = None


class MultiNodeServer(Server):
    """``Server`` whose ``proc`` is the head member; the other members are watched and stopped with it."""

    def __init__(self, engine, cfg, *, hosts: list[str] | None, **kwargs):
        #: None: every member is a local process; else member R runs on ``hosts[R]`` through ``srun``.
        self.hosts = hosts
        self.head = node_address(hosts[0]) if hosts else cfg.host
        self.dist_port = free_port(cfg.host)
        self.members: list[Member] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        super().__init__(engine, cfg, **kwargs)

    def _argv(self) -> list[str]:
        return self.member_argv(0)

    def member_argv(self, rank: int) -> list[str]:
        argv = super()._argv()
        argv = self.engine.member_launch(rank) + argv[len(self.engine.member_launch(0)):]
        argv += self.engine.multinode_args(self.cfg.nodes, rank, self.head, self.dist_port)
        if self.hosts is None:
            return argv
        # --overlap: the step shares the CPUs of the batch step that runs pytest; --kill-on-bad-exit: a
        # member dying takes its step down, which the watcher sees as this srun exiting.
        return ["srun", "--nodes=1", "--ntasks=1", f"--relative={rank}", "--overlap", "--kill-on-bad-exit=1", *argv]

    def member_log(self, rank: int) -> Path:
        return self.log_path if rank == 0 else self.log_path.with_name(f"{self.log_path.stem}.node{rank}{self.log_path.suffix}")

    def start(self) -> None:
        """Start every member (head first), each in its own session with its own janitor and log."""
        env = {**os.environ, **self.launch_env}
        for rank in range(self.cfg.nodes):
            member = Member(rank, self.member_argv(rank), self.member_log(rank))
            member.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(member.log_path, "ab") as log:
                log.write(f"$ {shell_line(member.argv, self.launch_env)}\n".encode())
                log.flush()
                member.proc = subprocess.Popen(
                    member.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=env, start_new_session=True, pass_fds=self.pass_fds,
                )
            # Known at once: if a later launch fails, ``stop`` (from ``__enter__``) must still reach this one.
            self.members.append(member)
            self.proc = self.members[0].proc
            member.janitor = subprocess.Popen(
                [sys.executable, "-m", "pytest_moe.janitor", str(os.getpid()), str(member.proc.pid), str(self.grace_s)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )

    def exited(self) -> tuple[str, int, Path] | None:
        for member in self.members:
            code = member.proc.poll()
            if code is not None:
                return f"Server member {member.rank} of {self.cfg.nodes} (node rank {member.rank})", code, member.log_path
        return None

    def wait_ready(self) -> float:
        waited = super().wait_ready()
        self._watcher = threading.Thread(target=self._watch, name=f"pytest-moe members {self.cfg.id}", daemon=True)
        self._watcher.start()
        return waited

    def _watch(self) -> None:
        """After readiness: the first member to exit is noted in the head's log and brings the server down."""
        while not self._stopping.wait(_WATCH_S):
            exited = self.exited()
            if exited is None:
                continue
            who, code, log_path = exited
            with open(self.log_path, "a", encoding="utf-8") as log:
                log.write(f"[pytest-moe] {who} exited with code {code} while serving; its log: {log_path}\n")
            self.progress(f"[pytest-moe] {self.cfg.id}: {who} exited with code {code}; stopping every member")
            self._kill_members()
            return

    def _kill(self) -> Teardown:
        self._stopping.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        return self._kill_members()

    def _kill_members(self) -> Teardown:
        """Every member's tree at once (each gets the full grace period), then their janitors."""
        with ThreadPoolExecutor(max_workers=max(len(self.members), 1)) as pool:
            results = list(pool.map(lambda m: kill_tree(m.proc.pid, self.grace_s), self.members))
        for member in self.members:
            member.proc.wait()
            if member.janitor is not None:
                member.janitor.kill()
                member.janitor.wait()
        return Teardown(
            escalated_to_sigkill=any(r.escalated_to_sigkill for r in results),
            pids=[pid for r in results for pid in r.pids],
            survivors=[pid for r in results for pid in r.survivors],
        )
