"""A two-node Slurm cluster on this machine for the tests: ``munged``, ``slurmctld`` and two ``slurmd``.

Why private daemons in a temp dir instead of the system's: the tests must not depend on (or disturb) a
site configuration, and every daemon they start must be stopped by them.  Everything lives under one
directory: the munge key and socket, ``slurm.conf``, state and spool dirs, logs.  Clients find it through
``SLURM_CONF``, which ``LocalSlurm.env`` carries.

No cgroups (``proctrack/linuxproc``, ``task/none``): containers and CI runners rarely allow them.  No GRES:
this host has no GPU, and the CPU smoke configs need none (``submit`` only asks for ``--gres`` when a
config needs GPUs).  No slurmdbd either: finished jobs are read back with ``squeue --states=all`` while
``MinJobAge`` keeps them in the controller.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "srun")


def missing_binaries() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None and not Path(f"/usr/sbin/{name}").exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    """RealMemory a little under the machine's, or slurmd refuses to register the node."""
    return int(psutil.virtual_memory().total / 2**20 * 0.9)


@dataclass
class LocalSlurm:
    """Two Slurm nodes (``moe1``, ``moe2``), each one slurmd (``slurmd -N``) on this host with its own port
    and spool dir, one CPU each: enough for two one-node jobs at once and for one two-node job."""

    root: Path
    partition: str = "debug"
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    nodes: tuple[str, ...] = ("moe1", "moe2")
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def write_config(self) -> None:
        for sub in ("state", "spool", "munge", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        memory = _memory_mb() // len(self.nodes)
        nodes = "\n".join(
            f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs=1 RealMemory={memory} State=UNKNOWN"
            for name in self.nodes
        )
        for name in self.nodes:
            (self.root / "spool" / name).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"""\
ClusterName=pytestmoe
SlurmctldHost={self.host}
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.root / "munge" / "munge.socket"}
CredType=cred/munge
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}/%n
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root}/slurmd-%n.pid
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
OverTimeLimit=0
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName={self.partition} Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        )
        # slurmd reads cgroup.conf even with no cgroup plugin in some builds; an empty one is harmless.
        (self.root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        env = {**os.environ, **self.env}
        munge = self.root / "munge"
        self._spawn([_binary("munged"), "-F", "--force", f"--socket={munge / 'munge.socket'}",
                     f"--key-file={munge / 'munge.key'}", f"--log-file={self.root / 'log' / 'munged.log'}",
                     f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}"], env)
        self._wait(lambda: (munge / "munge.socket").exists(), timeout_s, "munged socket")
        self._spawn([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)], env)
        for name in self.nodes:
            self._spawn([_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)], env, name=f"slurmd-{name}")
        self._wait(self._nodes_idle, timeout_s, "nodes idle in sinfo")

    def _spawn(self, argv: list[str], env: dict[str, str], name: str | None = None) -> None:
        log = open(self.root / "log" / f"{name or Path(argv[0]).name}.out", "ab")
        self.procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def _nodes_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env={**os.environ, **self.env},
                             capture_output=True, text=True, check=False).stdout
        return out.split().count("idle") == len(self.nodes)

    def _wait(self, done, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: no {what} ({'a daemon exited' if dead else 'timed out'}); logs:\n{self.logs()}")
            time.sleep(0.3)

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def squeue_ids(self) -> list[str]:
        """Jobs still pending or running (what must be empty after a cancel)."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env={**os.environ, **self.env},
                             capture_output=True, text=True, check=True).stdout
        return out.split()

    def stop(self) -> None:
        """Cancel every job, then stop the daemons (SIGTERM, then SIGKILL) in reverse order."""
        if self.procs:
            subprocess.run(["scancel", "--full", "--user", "root"], env={**os.environ, **self.env},
                           capture_output=True, check=False, timeout=30)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


@pytest.fixture(scope="session")
def local_slurm(tmp_path_factory):
    """A running one-node cluster for the session; skipped without Slurm and root, failed under CI=true."""
    missing = missing_binaries()
    reason = (f"Slurm is not installed (missing {', '.join(missing)}; scripts/setup.sh installs slurm-wlm and munge as root)"
              if missing else None)
    if reason is None and os.geteuid() != 0:
        reason = "the local Slurm cluster runs its daemons as root (SlurmUser=root)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
