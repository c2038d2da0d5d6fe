"""``python -m pytest_moe submit``: every selected config as one Slurm job, followed to the end.

Why ``sbatch``/``squeue``/``scancel`` directly and not ``submitit``: a job here is a shell command
(``pytest --moe-config ID``), not a pickled Python callable, and submitit follows jobs with ``sacct``,
which needs ``slurmdbd``; many clusters (and the one-node test cluster) run without accounting.
``squeue --states=all`` reports finished jobs for ``MinJobAge`` (300 s by default), far longer than one
poll, so it is all the submitter needs.

What the submitter adds to plain ``sbatch`` loops: one job per config asking for exactly its resources
(``--nodes``, ``--gres=gpu:<per node>`` only when it needs GPUs, a time limit from its launch timeout
plus a run allowance), a progress line, ``scancel`` of every job on Ctrl-C or SIGTERM, and a failure entry
for each job that Slurm itself ended (time limit, node failure, pre-emption): pytest inside such a job
was killed before it could say why, so the submitter writes the cause it can see into the shared
``failure_results.json``, keeping what the job had recorded (server command, log path).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from pytest_moe.configs import ServerConfig
from pytest_moe.engines import forget_tables
from pytest_moe.plugins import options
from pytest_moe.results import DEFAULT_RESULTS_DIR, ResultsStore
from pytest_moe.runner import safe_name


class SlurmError(RuntimeError):
    """A Slurm command failed; the message names the command and what it printed."""


class JobState(str, Enum):
    """The Slurm job states the submitter acts on (``squeue --states=all``, ``%T``)."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    COMPLETING = "COMPLETING"
    SUSPENDED = "SUSPENDED"
    REQUEUED = "REQUEUED"
    RESIZING = "RESIZING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    DEADLINE = "DEADLINE"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    #: Not a Slurm state: the job was never seen by ``squeue`` (it aged out before the first poll).
    UNKNOWN = "UNKNOWN"

    @property
    def finished(self) -> bool:
        return self not in _ACTIVE


_ACTIVE = {JobState.PENDING, JobState.CONFIGURING, JobState.RUNNING, JobState.COMPLETING, JobState.SUSPENDED,
           JobState.REQUEUED, JobState.RESIZING}

#: Error type recorded when Slurm ended the job: what a reader should look into.
SLURM_ERROR_TYPES: dict[JobState, str] = {
    JobState.TIMEOUT: "Timeout",
    JobState.DEADLINE: "Timeout",
    JobState.OUT_OF_MEMORY: "OOM",
    JobState.NODE_FAIL: "Crash",
    JobState.BOOT_FAIL: "Crash",
    JobState.PREEMPTED: "ServerError",
    JobState.CANCELLED: "ServerError",
}


@dataclass(frozen=True)
class SubmitOptions:
    partition: str
    account: str | None = None
    #: Seconds of run time granted on top of the config's launch timeout (benchmark, checks, teardown).
    run_allowance_s: float = 1800.0
    #: Explicit time limit in minutes for every job (overrides the derived one).
    time_minutes: int | None = None
    poll_s: float = 10.0
    progress_interval_s: float = 60.0
    extra_sbatch: tuple[str, ...] = ()


@dataclass
class Job:
    cfg: ServerConfig
    job_id: str
    output: Path
    state: JobState = JobState.PENDING
    reason: str = ""
    outcome: str = ""


@dataclass
class Submission:
    """The configs of one ``submit`` and their jobs; ``run`` follows them and records what Slurm ended."""

    configs: list[ServerConfig]
    pytest_args: list[str]
    results_dir: Path
    opts: SubmitOptions
    write: Callable[[str], None] = lambda line: print(line, flush=True)
    jobs: list[Job] = field(default_factory=list)
    started_at: str = ""

    # -- submitting --------------------------------------------------------------------------------
    def time_limit_minutes(self, cfg: ServerConfig, timeout_override_s: float | None) -> int:
        """Launch timeout + run allowance, rounded up to Slurm's unit (minutes)."""
        if self.opts.time_minutes:
            return self.opts.time_minutes
        return max(1, math.ceil(((timeout_override_s or cfg.timeout_s) + self.opts.run_allowance_s) / 60))

    def sbatch_argv(self, cfg: ServerConfig, output: Path, timeout_override_s: float | None) -> list[str]:
        argv = ["sbatch", "--parsable", f"--job-name=moe:{cfg.id}", f"--partition={self.opts.partition}",
                f"--nodes={cfg.nodes}", "--ntasks-per-node=1", f"--time={self.time_limit_minutes(cfg, timeout_override_s)}",
                f"--output={output}", f"--chdir={os.getcwd()}", "--export=ALL"]
        if self.opts.account:
            argv.append(f"--account={self.opts.account}")
        if cfg.gpus_per_node:
            argv.append(f"--gres=gpu:{cfg.gpus_per_node}")
        job = [sys.executable, "-m", "pytest", *self.pytest_args, "--moe-config", cfg.id,
               "--moe-results-dir", str(self.results_dir)]
        return [*argv, *self.opts.extra_sbatch, "--wrap", "exec " + shlex.join(job)]

    def submit(self, timeout_override_s: float | None) -> None:
        self.started_at = datetime.now().isoformat(timespec="seconds")
        out_dir = self.results_dir / "slurm"
        out_dir.mkdir(parents=True, exist_ok=True)
        for cfg in self.configs:
            output = out_dir / f"{safe_name(cfg.id)}-%j.out"
            job_id = _run(self.sbatch_argv(cfg, output, timeout_override_s)).strip().split(";")[0]
            self.jobs.append(Job(cfg, job_id, Path(str(output).replace("%j", job_id))))
            self.write(f"[pytest-moe submit] {cfg.id}: job {job_id}")

    # -- following ---------------------------------------------------------------------------------
    def poll(self) -> None:
        active = [job for job in self.jobs if not job.state.finished]
        if not active:
            return
        seen = {}
        ids = ",".join(job.job_id for job in active)
        try:
            listing = _run(["squeue", "--states=all", "-h", f"--jobs={ids}", "-o", "%i|%T|%r"])
        except SlurmError as exc:
            if "Invalid job id" not in str(exc):
                self.write(f"[pytest-moe submit] squeue failed, retrying at the next poll: {exc}")
                return  # a busy controller must not make running jobs look finished
            listing = ""  # every job asked about has aged out of the controller
        for line in listing.splitlines():
            job_id, state, reason = (line.split("|") + ["", ""])[:3]
            seen[job_id] = (state, reason)
        for job in active:
            if job.job_id in seen:
                state, reason = seen[job.job_id]
                job.state = JobState(state) if state in JobState.__members__ else JobState.UNKNOWN
                job.reason = "" if reason == "None" else reason
            else:
                job.state = JobState.UNKNOWN  # sbatch returned, so it was there: it ran and aged out of the controller

    def progress_line(self, elapsed_s: float) -> str:
        counts: dict[str, int] = {}
        for job in self.jobs:
            key = job.state.value.lower() if not job.state.finished else ("done" if job.state is JobState.COMPLETED else "ended")
            counts[key] = counts.get(key, 0) + 1
        parts = ", ".join(f"{n} {key}" for key, n in sorted(counts.items()))
        return f"[pytest-moe submit] {len(self.jobs)} jobs: {parts} ({elapsed_s:.0f} s)"

    def follow(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Poll until every job has finished, printing a progress line when it changes (or each interval)."""
        t0 = time.monotonic()
        last_line, last_print = "", 0.0
        while True:
            self.poll()
            now = time.monotonic()
            line = self.progress_line(now - t0)
            if line.split(" (")[0] != last_line.split(" (")[0] or now - last_print >= self.opts.progress_interval_s:
                self.write(line)
                last_line, last_print = line, now
            if all(job.state.finished for job in self.jobs):
                return
            sleep(self.opts.poll_s)

    def cancel(self, wait_s: float = 120.0) -> None:
        """``scancel`` every job, then wait until Slurm reports none of them pending, running or completing."""
        ids = [job.job_id for job in self.jobs if not job.state.finished]
        if not ids:
            return
        self.write(f"[pytest-moe submit] cancelling {len(ids)} job(s): {' '.join(ids)}")
        _run(["scancel", *ids], check=False)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            self.poll()
            if all(job.state.finished for job in self.jobs):
                return
            time.sleep(1.0)
        self.write("[pytest-moe submit] some jobs still not finished after scancel: "
                   + " ".join(f"{j.job_id}={j.state.value}" for j in self.jobs if not j.state.finished))

    # -- recording ---------------------------------------------------------------------------------
    def record(self) -> None:
        """Describe every job's outcome; write the failure entry of a job Slurm ended or that recorded nothing."""
        store = ResultsStore(self.results_dir)
        successes, failures = store.load()
        for job in self.jobs:
            success, failure = self._written_since(successes, job), self._written_since(failures, job)
            error_type = SLURM_ERROR_TYPES.get(job.state)
            if error_type is not None:
                message = (f"Slurm ended job {job.job_id} ({job.cfg.id}) with state {job.state.value}"
                           + (f" ({job.reason})" if job.reason else "") + f"; job output: {job.output}")
                entry = {**_identity(job.cfg), **(failure or {}), "error_type": error_type, "error_message": message,
                         "status": "failed", "slurm_job_id": job.job_id, "slurm_state": job.state.value}
                entry.pop("last_updated", None)
                store.record_failure(job.cfg.id, entry)
                job.outcome = f"failed: {error_type} (Slurm {job.state.value})"
            elif failure is not None:
                job.outcome = f"{failure.get('status', 'failed')}: {failure.get('error_type')}"
            elif success is not None:
                job.outcome = "success"
            elif job.state is JobState.COMPLETED:
                job.outcome = "passed (nothing recorded)"
            else:
                message = f"Slurm job {job.job_id} ({job.cfg.id}) ended {job.state.value} without recording the config; job output: {job.output}"
                store.record_failure(job.cfg.id, {**_identity(job.cfg), "error_type": "ServerError", "error_message": message,
                                                  "status": "failed", "slurm_job_id": job.job_id, "slurm_state": job.state.value})
                job.outcome = "failed: ServerError (nothing recorded)"

    def _written_since(self, entries: dict[str, Any], job: Job) -> dict[str, Any] | None:
        """The config's entry if this submission's job wrote it (entries persist across runs)."""
        entry = entries.get(job.cfg.id)
        return entry if entry is not None and entry.get("last_updated", "") >= self.started_at else None

    def summary(self) -> str:
        width = max((len(job.cfg.id) for job in self.jobs), default=6)
        lines = [f"{'config':<{width}}  {'job':>8}  {'slurm state':<13}  outcome"]
        lines += [f"{job.cfg.id:<{width}}  {job.job_id:>8}  {job.state.value:<13}  {job.outcome}" for job in self.jobs]
        ok = sum(job.outcome.startswith(("success", "passed", "xfailed")) for job in self.jobs)
        lines.append(f"{ok} of {len(self.jobs)} configs passed; results in {self.results_dir}")
        return "\n".join(lines)

    @property
    def all_passed(self) -> bool:
        return all(job.outcome.startswith(("success", "passed", "xfailed")) for job in self.jobs)


def _identity(cfg: ServerConfig) -> dict[str, Any]:
    return {"model": cfg.model, "config": cfg.name, "engine": cfg.engine}


def _run(argv: Sequence[str], check: bool = True) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError(f"{argv[0]} not found: submit needs the Slurm client commands on PATH") from None
    if check and proc.returncode:
        raise SlurmError(f"{shlex.join(argv[:3])} ... failed: {(proc.stderr or proc.stdout).strip()}")
    return proc.stdout


# -- the selection: the pytest run's own collection, so -m, -k, --moe-config and --moe-shard mean the same ----
class _Collector:
    def __init__(self) -> None:
        self.configs: dict[str, ServerConfig] = {}
        self.timeout_override_s: float | None = None
        self.results_dir: str = DEFAULT_RESULTS_DIR

    def pytest_collection_finish(self, session) -> None:
        opts = options.run_options(session.config, "")
        self.timeout_override_s = opts.timeout_override_s
        self.results_dir = str(opts.results_dir)
        for item in session.items:
            callspec = getattr(item, "callspec", None)
            cfg = callspec.params.get("moe_config") if callspec else None
            if cfg is not None:
                self.configs.setdefault(cfg.id, cfg)


def collect(pytest_args: list[str]) -> _Collector:
    """The configs ``pytest <args>`` would run; raise ``SlurmError`` when pytest rejects the arguments."""
    import pytest

    collector = _Collector()
    forget_tables()  # this process read the engine tables for its own options; the run may add engines
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        code = pytest.main([*pytest_args, "--collect-only", "-q", "-p", "no:cacheprovider"], plugins=[collector])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        tail = "; ".join(line for line in captured.getvalue().splitlines() if line.startswith(("ERROR", "E "))) or f"exit {int(code)}"
        raise SlurmError(f"pytest {shlex.join(pytest_args)} cannot be collected: {tail}")
    return collector


def forwarded_args(pytest_args: list[str]) -> list[str]:
    """The user's pytest arguments for the jobs, minus what the submitter decides per job.

    ``--moe-shard`` is dropped (the shard was chosen here; inside a one-config job it could select
    nothing), ``--moe-results-dir`` is replaced by the absolute shared directory.
    """
    out, skip = [], False
    for arg in pytest_args:
        if skip:
            skip = False
            continue
        if arg in ("--moe-shard", "--moe-results-dir"):
            skip = True
            continue
        if arg.startswith(("--moe-shard=", "--moe-results-dir=")):
            continue
        out.append(arg)
    return out


def submit_and_follow(pytest_args: list[str], opts: SubmitOptions) -> int:
    """The ``submit`` command: 0 all passed, 1 some config failed, 130 interrupted (jobs cancelled)."""
    collector = collect(pytest_args)
    if not collector.configs:
        print("[pytest-moe submit] the selection holds no config: nothing submitted")
        return 0
    submission = Submission(
        configs=list(collector.configs.values()), pytest_args=forwarded_args(pytest_args),
        results_dir=Path(collector.results_dir).resolve(), opts=opts,
    )
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    interrupted = False
    try:
        try:
            submission.submit(collector.timeout_override_s)
            submission.follow()
        except KeyboardInterrupt:
            interrupted = True
            submission.write("[pytest-moe submit] interrupted")
            submission.poll()
            submission.cancel()
    finally:
        signal.signal(signal.SIGTERM, previous)
    submission.poll()
    submission.record()
    print(submission.summary(), flush=True)
    if interrupted:
        return 130
    return 0 if submission.all_passed else 1


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")
