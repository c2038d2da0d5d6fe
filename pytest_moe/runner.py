"""Running one matrix cell: model → one server → every check → the entry that goes into the results files.

Why a module of its own: the pytest fixtures and hooks stay thin (they only decide *when*), and this
is the one place that knows *how* a config is run and described — also usable without pytest.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_moe import gpus
from pytest_moe.checks import CHECKS, Check, CheckContext
from pytest_moe.engines import get_engine
from pytest_moe.configs import ServerConfig
from pytest_moe.entries import BenchmarkResult, CheckResult, CheckStatus, Entry, Status
from pytest_moe.errors import Classification, ErrorType, classify, read_log_tail
from pytest_moe.matrix import file_stem as safe_name
from pytest_moe.multinode import MultiNodeServer, allocation_hosts
from pytest_moe.preflight import Problem
from pytest_moe.redact import redact
from pytest_moe.report import repro_command, shell_line
from pytest_moe.results import ResultsStore
from pytest_moe.retries import Attempt, entry_fields, retry_launch
from pytest_moe.scoring import predict_booted
from pytest_moe.server import Progress, Server, ServerError, tail
from pytest_moe.tiny import TINY_PREFIX, resolve_model_path

#: The seed's fixed pause between configs; used when no GPU memory wait could replace it.
SEED_COOLDOWN_S = 5.0
#: What an interrupted config (Ctrl-C, SIGTERM from a cancelled job) is recorded as: the type list has no
#: "Interrupted", and the fallback type says "not a known engine failure" without blaming the engine.
INTERRUPTED_TYPE = ErrorType.SERVER_ERROR
#: The benchmark check's name: its first row is the entry's seed fields.
BENCHMARK = "benchmark"
#: Seed 001's flat benchmark fields of a success entry.
BENCH_FIELDS = ("batch_size", "input_len", "output_len", "latency_s", "ttft_s", "input_throughput_tok_per_s",
                "output_throughput_tok_per_s", "itl_ms", "profile_extend", "profile_decode")
#: Port shown in commands that were never launched (SGLang's default); a real launch picks a free one.
LIST_PORT = 30000
#: pytest-timeout's failure text (``signal`` method): a harness-level timeout, whatever the log says.
_PYTEST_TIMEOUT = re.compile(r"^Failed: Timeout\b")


@dataclass(frozen=True)
class RunOptions:
    """Command-line choices that apply to every cell of a run."""

    matrix_path: str
    results_dir: Path
    timeout_override_s: float | None = None
    profile: bool = False
    cooldown_s: float | None = None
    grace_s: float = 10.0
    progress_interval_s: float = 30.0
    memory_timeout_s: float = 120.0
    test_path: str = "test/nightly"
    #: ``--moe-retries``: replaces the retry policy's counts for this run (None: the policy's own).
    retries: int | None = None

    @property
    def log_dir(self) -> Path:
        return self.results_dir / "logs"


class CellRun:
    """One config's cell: its server, shared by all of its checks, and the entry their results make."""

    def __init__(self, cfg: ServerConfig, opts: RunOptions, *, lease: gpus.GpuLease | None, progress: Progress):
        self.cfg = cfg
        self.opts = opts
        self.engine = get_engine(cfg.engine)
        self.lease = lease
        self.gpu_indices = list(lease.indices) if lease else []
        self.progress = progress
        self.log_path = opts.log_dir / f"{safe_name(cfg.id)}.log"
        self.profile_dir = opts.results_dir / "traces" / safe_name(cfg.model) / safe_name(cfg.name) if opts.profile else None
        self.server: Server | None = None
        #: Why the server can serve no further check (its one boot failed, or a check timed out on it): every
        #: later check of the config fails with it instead of booting again or waiting out its own timeout.
        self.server_error: ServerError | None = None
        #: Results of the checks that ran, in run order.
        self.results: dict[str, CheckResult] = {}
        #: The first failure that was not a check's verdict (boot, crash, timeout): it sticks, so a later
        #: passing check cannot turn the config's entry back into a success.
        self.failure: Classification | None = None
        self._memory_baseline: dict[int, int] | None = None
        #: The last entry written for this config (the hook, a timeout or an interrupt may write it).
        self.recorded: dict[str, Any] | None = None
        #: Launch attempts that failed and were retried (retry policy), oldest first.
        self.attempts: list[Attempt] = []

    # -- running -----------------------------------------------------------------------------------
    def ensure_server(self) -> Server:
        """The config's server, booted on its first check; a failed boot is not retried by later checks."""
        if self.server_error is not None:
            raise self.server_error
        if self.server is None:
            try:
                self.start_server()
            except ServerError as exc:
                self.server_error = exc
                raise
        return self.server

    def start_server(self) -> Server:
        """Launch and wait for readiness; on any failure the server is already torn down.

        A failed launch is retried as the retry policy says for its type (a port taken between our
        free-port probe and the bind, a download cut off, an NCCL set-up timeout); each failed
        attempt's log is kept beside the config's log, and the attempt in ``self.attempts``.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.server is None:  # a fresh log per run; a second boot of this cell would append (and show)
            self.log_path.unlink(missing_ok=True)
        self._memory_baseline = gpus.memory_snapshot(self.gpu_indices) if self.gpu_indices else None
        server, self.attempts = retry_launch(
            self._launch,
            lambda exc: self.classify_failure(exc, str(exc).splitlines()[0]),
            retryable=ServerError,
            override=self.opts.retries,
            on_retry=self._before_retry,
        )
        return server

    def _before_retry(self, attempt: Attempt, number: int, allowed: int) -> None:
        """Keep the failed attempt's log apart, so the next attempt is classified on its own output."""
        self.log_path.replace(self.log_path.with_suffix(f".attempt{number}.log"))
        port = f" on port {self.server.port}" if self.server else ""
        self.progress(f"[pytest-moe] {self.cfg.id}: launch failed{port} ({attempt.error_type}: {attempt.message[:120]}); "
                      f"retry {number} of {allowed}")

    def _launch(self) -> Server:
        server_class, placement = Server, {}
        if self.cfg.nodes > 1:  # srun members inside an allocation with enough nodes, else local members
            hosts = allocation_hosts()
            enough = hosts is not None and len(hosts) >= self.cfg.nodes
            server_class, placement = MultiNodeServer, {"hosts": hosts[: self.cfg.nodes] if enough else None}
        self.server = server_class(
            self.engine, self.cfg, **placement,
            model_path=resolve_model_path(self.cfg.model_path),
            served_name=f"pytest-moe/{safe_name(self.cfg.id)}/{secrets.token_hex(3)}",
            log_path=self.log_path,
            timeout_s=self.opts.timeout_override_s or self.cfg.timeout_s,
            profile_dir=self.profile_dir / "raw" if self.profile_dir else None,
            extra_env=self.lease.env() if self.lease else {},
            pass_fds=self.lease.lock_fds if self.lease else (),
            progress=self.progress,
            progress_interval_s=self.opts.progress_interval_s,
            grace_s=self.opts.grace_s,
            after_stop=self._after_stop,
        )
        return self.server.__enter__()

    def run_check(self, check: Check) -> CheckResult:
        """Run one check against the (already booted) server and keep its result for the entry."""
        server = self.ensure_server()
        ctx = CheckContext(
            cfg=self.cfg, engine=self.engine, base_url=server.base_url, served_name=server.served_name,
            out_dir=self.opts.results_dir / "checks" / safe_name(self.cfg.id), results_dir=self.opts.results_dir,
            profile_dir=self.profile_dir, launch_profile_dir=server.profile_dir,
        )
        result = check.run(ctx)
        self.results[check.name] = result
        return result

    def stop(self) -> None:
        """Tear the server down (after the config's last check) and give its GPUs back."""
        try:
            if self.server is not None:
                self.server.stop()
        finally:
            if self.lease is not None:
                self.lease.release()

    def _after_stop(self, server: Server) -> None:
        """Wait for GPU memory to come back (NVML), else fall back to the seed's fixed pause."""
        waited = None
        if self.gpu_indices and server.teardown is not None:
            waited = gpus.wait_for_memory_release(
                self.gpu_indices, set(server.teardown.pids), self._memory_baseline, timeout_s=self.opts.memory_timeout_s,
            )
            if waited is not None:
                self.progress(f"[pytest-moe] {self.cfg.id}: {waited.describe()}")
        pause = self.opts.cooldown_s if self.opts.cooldown_s is not None else (0.0 if waited is not None else SEED_COOLDOWN_S)
        time.sleep(pause)

    # -- describing --------------------------------------------------------------------------------
    def entry(self, status: Status, failure: Classification | None = None) -> Entry:
        """The config's entry as of now: every check that ran keeps its block whatever failed."""
        names = sorted({g.name for g in self.lease.gpus}) if self.lease else []
        bench = self.results.get(BENCHMARK)
        profiles = bench.profiles if isinstance(bench, BenchmarkResult) else {}
        return Entry(
            model=self.cfg.model, config=self.cfg.name, status=status, engine=self.cfg.engine,
            engine_version=self.engine.version(),
            gpu_name=", ".join(names) if names else ("cpu" if not self.engine.spec.uses_gpus else "unknown"),
            gpu_count=len(self.gpu_indices),
            server_command=shell_line(self.server.argv, self.server.launch_env) if self.server else None,
            log_path=str(self.log_path),
            repro_command=repro_command(self.cfg.id, self.cfg.matrix_path, self.opts.test_path),
            ready_after_s=round(self.server.ready_after_s, 1) if self.server and self.server.ready_after_s else None,
            profile_extend=profiles.get("extend"), profile_decode=profiles.get("decode"),
            error_type=failure.error_type if failure else None,
            error_message=redact(failure.message) if failure else None,
            signature=redact(failure.signature) if failure and failure.signature else None,
            retry_fields=entry_fields(self.attempts, passed=failure is None, scrub=redact),
            preflight=self.preflight_score(failure.error_type if failure else None),
            checks=dict(self.results),
        )

    def check_raised(self, check: Check, failure: Classification) -> None:
        """A check that ended in an exception still gets its block (``status: failed``) in the entry.

        A check that timed out leaves a server presumed hung (a frozen engine answers no request, so each later
        check would wait out its own timeout, an hour each in a nightly): it is stopped now, which also ends
        the requests still waiting on it, and the config's later checks fail at once saying why.
        """
        self.results.setdefault(check.name, CheckResult(status=CheckStatus.FAILED, verdict=failure.message))
        if failure.error_type == ErrorType.TIMEOUT and self.server is not None and self.server_error is None:
            self.server.stop()
            self.server_error = ServerError(
                f"not run: the {check.name} check timed out on the server of {self.cfg.id}, which was then stopped",
                log_path=self.log_path, log_tail=tail(self.log_path), timed_out=True)

    def first_failed_check(self) -> Classification | None:
        """A check whose verdict failed, as the failure the entry reports (the first one that ran)."""
        for name, result in self.results.items():
            if not result.passed and CHECKS[name].failure_type is not None:
                return Classification(CHECKS[name].failure_type, result.verdict, None)
        return None

    def preflight_score(self, error_type: str | None) -> dict[str, Any] | None:
        """What preflight said of this booted config beside its outcome (scoring.py), when it could tell."""
        block = predict_booted(self.cfg, list(self.lease.gpus) if self.lease else [], error_type)
        return block

    def record(self, store: ResultsStore, failure: Classification | None = None) -> dict[str, Any]:
        """Write this config's entry now, so whatever kills the run next, its outcome is on disk.

        The success file gets the entry whenever the benchmark's figures are good (or nothing failed): a
        failed accuracy or agreement check never discards them.  The failure file gets it whenever the boot or
        any check failed; an old failure is cleared only once every check of the config passed.  Checks not run this time keep their previous blocks in the success entry, so
        ``-m accuracy`` does not erase last night's benchmark.
        """
        self.failure = self.failure or failure
        failure = self.failure or self.first_failed_check()
        bench = self.results.get(BENCHMARK)
        written = None
        if failure is None or (bench is not None and bench.passed):
            written = _merged_with_previous(store, self.entry(Status.SUCCESS).to_dict(), self.cfg.id)
            store.record_success(self.cfg.id, written, clear_failure=failure is None and set(self.results) == set(CHECKS))
        if failure is not None:
            written = self.entry(Status.FAILED, failure).to_dict()
            store.record_failure(self.cfg.id, written)
        self.recorded = written
        return written

    def classify_failure(self, exc: BaseException | None, exc_text: str) -> Classification:
        """Harness-known timeouts first; otherwise the classifier reads the exception and the server log."""
        if isinstance(exc, ServerError) and exc.timed_out or _PYTEST_TIMEOUT.match(exc_text):
            return Classification(ErrorType.TIMEOUT, exc_text.splitlines()[0][:300], None)
        log = read_log_tail(self.log_path) if self.log_path.exists() else ""
        return classify(exc_text + "\n" + log)


class CellPool:
    """The session's cells by config id: a config boots once, on its first check, and stops after its last.

    Why a pool and not a fixture scope: pytest has no "per parameter" scope, and a module- or session-scoped
    server would keep every config's server (and GPUs) alive until the end.  Items are ordered config by config,
    so the plugin closes a cell when the next item belongs to another config (``close``) and closes whatever
    is left at session end (``close_all``, also on Ctrl-C).
    """

    def __init__(self, opts: RunOptions, progress: Progress):
        self.opts = opts
        self.progress = progress
        self.cells: dict[str, CellRun] = {}

    def get(self, cfg: ServerConfig) -> CellRun:
        """The config's cell; its GPUs are leased when it is first asked for and held until ``close``."""
        if cfg.id not in self.cells:
            lease = gpus.GpuLeaser().acquire(cfg.gpus_per_node, config_id=cfg.id) if cfg.gpus_per_node else None
            self.cells[cfg.id] = CellRun(cfg, self.opts, lease=lease, progress=self.progress)
        return self.cells[cfg.id]

    def close(self, config_id: str) -> None:
        cell = self.cells.pop(config_id, None)
        if cell is not None:
            cell.stop()

    def close_all(self) -> None:
        for config_id in list(self.cells):
            self.close(config_id)


def _merged_with_previous(store: ResultsStore, entry: dict[str, Any], key: str) -> dict[str, Any]:
    """Keep a previous success's blocks (and its seed figures) for checks this run did not run."""
    previous = store.load()[0].get(key)
    if not isinstance(previous, dict) or not isinstance(previous.get("checks"), dict):
        return entry
    merged_checks = {**previous["checks"], **entry.get("checks", {})}
    if BENCHMARK in entry.get("checks", {}):
        return {**entry, "checks": merged_checks}
    # a run without the benchmark has none of its figures, but writes the seed's always-present profile fields as
    # null: last night's win, or a partial run would drop its trace folders
    carried = {k: v for k, v in previous.items() if k in BENCH_FIELDS}
    return {**entry, **carried, "checks": merged_checks}


def display_command(cfg: ServerConfig) -> str:
    """The server command of ``cfg`` as ``list`` shows it: SGLang's default port, the plain model name."""
    engine = get_engine(cfg.engine)
    argv = engine.command(
        cfg, resolve_model_path(cfg.model_path, build=False), host=cfg.host, port=LIST_PORT,
        served_name=cfg.model_path.removeprefix(TINY_PREFIX), profile_dir=None,
    )
    return shell_line(argv, engine.environment(cfg, None))


def predicted_entry(cfg: ServerConfig, opts: RunOptions, problems: list[Problem]) -> Entry:
    """A failure preflight predicts: recorded like a real one, but ``status: predicted`` and never booted."""
    return Entry(
        model=cfg.model, config=cfg.name, engine=cfg.engine, status=Status.PREDICTED,
        error_type=ErrorType(problems[0].prevents),
        error_message="; ".join(f"{p.rule_id}: {p.message}" for p in problems),
        rule_ids=",".join(p.rule_id for p in problems),
        server_command=display_command(cfg),
        repro_command=repro_command(cfg.id, opts.matrix_path, opts.test_path) + " --moe-no-preflight",
    )


def crashed_worker_entry(config_id: str, opts: RunOptions, message: str) -> Entry:
    """The failure entry the xdist controller writes for a config whose worker process died."""
    model, _, name = config_id.partition("::")
    return Entry(
        model=model, config=name, status=Status.FAILED, error_type=ErrorType.CRASH, error_message=message,
        log_path=str(opts.log_dir / f"{safe_name(config_id)}.log"),
        repro_command=repro_command(config_id, opts.matrix_path, opts.test_path),
    )
