"""Running one matrix cell: model → server → benchmark → the entry that goes into the results files.

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
from pytest_moe.bench import BenchResult, profile_stages, run_benchmark
from pytest_moe.engines import get_engine
from pytest_moe.errors import Classification, classify, read_log_tail
from pytest_moe.configs import ServerConfig
from pytest_moe.matrix import file_stem as safe_name
from pytest_moe.multinode import MultiNodeServer, allocation_hosts
from pytest_moe.preflight import Problem
from pytest_moe.redact import redact
from pytest_moe.report import repro_command, shell_line
from pytest_moe.results import ResultsStore
from pytest_moe.retries import Attempt, entry_fields, retry_launch
from pytest_moe.scoring import ENTRY_KEY as SCORE_KEY
from pytest_moe.scoring import predict_booted
from pytest_moe.server import Progress, Server, ServerError
from pytest_moe.tiny import TINY_PREFIX, resolve_model_path

#: The seed's fixed pause between configs; used when no GPU memory wait could replace it.
SEED_COOLDOWN_S = 5.0
#: What an interrupted config (Ctrl-C, SIGTERM from a cancelled job) is recorded as: the type list has no
#: "Interrupted", and the fallback type says "not a known engine failure" without blaming the engine.
INTERRUPTED_TYPE = "ServerError"
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
    """State of one config's run, from launch to its results entry."""

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
        self.result: BenchResult | None = None
        self.profiles: dict[str, str] = {}
        self._memory_baseline: dict[int, int] | None = None
        #: The entry written for this config, once written (the hook, a timeout or an interrupt may write it).
        self.recorded: dict[str, Any] | None = None
        #: Launch attempts that failed and were retried (retry policy), oldest first.
        self.attempts: list[Attempt] = []

    # -- running -----------------------------------------------------------------------------------
    def start_server(self) -> Server:
        """Launch and wait for readiness; on any failure the server is already torn down.

        A failed launch is retried as the retry policy says for its type (a port taken between our
        free-port probe and the bind, a download cut off, an NCCL set-up timeout); each failed
        attempt's log is kept beside the config's log, and the attempt in ``self.attempts``.
        """
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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

    def benchmark(self) -> BenchResult:
        assert self.server is not None
        self.result = run_benchmark(self.server.base_url, self.server.served_name, self.cfg.bench)
        if self.profile_dir is not None:
            self.profiles = profile_stages(
                self.engine, self.server.base_url, self.server.served_name, self.cfg.bench,
                launch_dir=self.server.profile_dir, out_dir=self.profile_dir,
            )
        return self.result

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
    def base_entry(self) -> dict[str, Any]:
        """Fields every entry carries so a reader can act on it without opening anything else."""
        names = sorted({g.name for g in self.lease.gpus}) if self.lease else []
        server_command = shell_line(self.server.argv, self.server.launch_env) if self.server else None
        return {
            "model": self.cfg.model,
            "config": self.cfg.name,
            "engine": self.cfg.engine,
            "engine_version": self.engine.version(),
            "gpu_name": ", ".join(names) if names else ("cpu" if not self.engine.spec.uses_gpus else "unknown"),
            "gpu_count": len(self.gpu_indices),
            "server_command": server_command,
            "log_path": str(self.log_path),
            "repro_command": repro_command(self.cfg.id, self.cfg.matrix_path, self.opts.test_path),
        }

    def success_entry(self) -> dict[str, Any]:
        assert self.result is not None
        entry = {**self.base_entry(), **self.result.record()}
        entry["profile_extend"] = self.profiles.get("extend")
        entry["profile_decode"] = self.profiles.get("decode")
        entry["ready_after_s"] = round(self.server.ready_after_s, 1) if self.server and self.server.ready_after_s else None
        entry.update(entry_fields(self.attempts, passed=True, scrub=redact))
        return {**entry, **self.preflight_score(None)}

    def failure_entry(self, classification: Classification) -> dict[str, Any]:
        entry = {
            **self.base_entry(),
            "error_type": classification.error_type,
            "error_message": redact(classification.message),
            "status": "failed",
            **self.preflight_score(classification.error_type),
        }
        if classification.signature:
            entry["signature"] = redact(classification.signature)
        entry.update(entry_fields(self.attempts, passed=False, scrub=redact))
        return entry

    def preflight_score(self, error_type: str | None) -> dict[str, Any]:
        """What preflight said of this booted config beside its outcome (scoring.py), when it could tell."""
        block = predict_booted(self.cfg, list(self.lease.gpus) if self.lease else [], error_type)
        return {SCORE_KEY: block} if block is not None else {}

    def record_success(self, store: ResultsStore) -> dict[str, Any]:
        entry = {**self.success_entry(), "status": "success"}
        store.record_success(self.cfg.id, entry)
        self.recorded = entry
        return entry

    def record_failure(self, store: ResultsStore, classification: Classification) -> dict[str, Any]:
        """Write the failure now: whatever kills the run next, this config's outcome is on disk."""
        entry = self.failure_entry(classification)
        store.record_failure(self.cfg.id, entry)
        self.recorded = entry
        return entry

    def classify_failure(self, exc: BaseException | None, exc_text: str) -> Classification:
        """Harness-known timeouts first; otherwise the classifier reads the exception and the server log."""
        if isinstance(exc, ServerError) and exc.timed_out or _PYTEST_TIMEOUT.match(exc_text):
            return Classification("Timeout", exc_text.splitlines()[0][:300], None)
        log = read_log_tail(self.log_path) if self.log_path.exists() else ""
        return classify(exc_text + "\n" + log)


def display_command(cfg: ServerConfig) -> str:
    """The server command of ``cfg`` as ``list`` shows it: SGLang's default port, the plain model name."""
    engine = get_engine(cfg.engine)
    argv = engine.command(
        cfg, resolve_model_path(cfg.model_path, build=False), host=cfg.host, port=LIST_PORT,
        served_name=cfg.model_path.removeprefix(TINY_PREFIX), profile_dir=None,
    )
    return shell_line(argv, engine.environment(cfg, None))


def predicted_entry(cfg: ServerConfig, opts: RunOptions, problems: list[Problem]) -> dict[str, Any]:
    """A failure preflight predicts: recorded like a real one, but ``status: predicted`` and never booted."""
    return {
        "model": cfg.model,
        "config": cfg.name,
        "engine": cfg.engine,
        "error_type": problems[0].prevents,
        "error_message": "; ".join(f"{p.rule_id}: {p.message}" for p in problems),
        "rule_ids": ",".join(p.rule_id for p in problems),
        "server_command": display_command(cfg),
        "repro_command": repro_command(cfg.id, opts.matrix_path, opts.test_path) + " --moe-no-preflight",
        "status": "predicted",
    }


def crashed_worker_entry(config_id: str, opts: RunOptions, message: str) -> dict[str, Any]:
    """The failure entry the xdist controller writes for a config whose worker process died."""
    model, _, name = config_id.partition("::")
    return {
        "model": model,
        "config": name,
        "error_type": "Crash",
        "error_message": message,
        "log_path": str(opts.log_dir / f"{safe_name(config_id)}.log"),
        "repro_command": repro_command(config_id, opts.matrix_path, opts.test_path),
        "status": "failed",
    }
