"""Typed result entries: what ``success_results.json`` / ``failure_results.json`` hold for one config.

Why one module of dataclasses: entries used to be dicts built in four places (success, failure, predicted,
crashed worker) and every new check would have added a fifth.  Here an entry is one ``Entry`` with one
``to_dict`` that writes the contract every reader codes against (docs/cells.md):

* seed 001's flat benchmark fields stay at the top level, exactly, from the first batch size measured;
* each check's own result sits under ``checks[<check name>]`` with at least ``status``;
* a failed check adds ``error_type`` / ``error_message`` without dropping another check's block.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_moe.errors import ErrorType


class Status(enum.StrEnum):
    """An entry's ``status``: the seed's ``success``/``failed`` plus the harness's own outcomes."""

    SUCCESS = "success"
    FAILED = "failed"
    PREDICTED = "predicted"
    XFAILED = "xfailed"


class CheckStatus(enum.StrEnum):
    PASSED = "passed"
    FAILED = "failed"


class CheckFailure(enum.StrEnum):
    """``error_type`` of a config whose server served but whose answers were judged wrong.

    Not classifier types (``ErrorType``): the engine reported no error, the check's verdict did.
    """

    WRONG_ANSWERS = "WrongAnswers"
    DISAGREEMENT = "Disagreement"


@dataclass(frozen=True, kw_only=True)
class CheckResult:
    """What every check records; subclasses add their figures."""

    status: CheckStatus
    #: One sentence for a reader; a failed check's becomes the entry's ``error_message`` (not stored twice).
    verdict: str = ""

    @property
    def passed(self) -> bool:
        return self.status is CheckStatus.PASSED

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key not in self.hidden()}

    def hidden(self) -> frozenset[str]:
        """Fields kept in memory only."""
        return frozenset({"verdict"})


@dataclass(frozen=True, kw_only=True)
class BenchmarkResult(CheckResult):
    #: One row per batch size: seed 001's metric fields (``bench.BenchResult.record()``).
    rows: list[dict[str, float | int]]
    #: ``--moe-profile`` trace directories by stage; shown as the entry's ``profile_extend``/``profile_decode``.
    profiles: dict[str, str] = field(default_factory=dict)

    def hidden(self) -> frozenset[str]:
        return frozenset({"verdict", "profiles"})


@dataclass(frozen=True, kw_only=True)
class AccuracyResult(CheckResult):
    score: float
    n: int
    lower_bound: float
    floor: float | None
    per_question_file: str
    seconds_per_question: float


@dataclass(frozen=True)
class Divergence:
    """Where a config first answered differently from its reference."""

    prompt: int
    prompt_text: str
    position: int
    expected_token: int | None
    got_token: int | None


@dataclass(frozen=True, kw_only=True)
class AgreementResult(CheckResult):
    reference: str
    exact_match: float
    mean_prefix: float
    first_divergence: Divergence | None
    threshold: float
    outputs_file: str


#: Success-entry fields the seed always writes, even when empty.
_SEED_NULLABLE = ("profile_extend", "profile_decode", "ready_after_s")


@dataclass
class Entry:
    """One config's record; ``to_dict`` is the file format."""

    model: str
    config: str
    status: Status
    engine: str | None = None
    engine_version: str | None = None
    gpu_name: str | None = None
    gpu_count: int | None = None
    server_command: str | None = None
    log_path: str | None = None
    repro_command: str | None = None
    ready_after_s: float | None = None
    profile_extend: str | None = None
    profile_decode: str | None = None
    error_type: ErrorType | CheckFailure | None = None
    error_message: str | None = None
    rule_ids: str | None = None
    #: An unknown failure's stable signature (errors.signature): the same failure groups across nights.
    signature: str | None = None
    #: retries.entry_fields: ``flaky``, ``attempts``, the first attempt's type and message (empty: one launch).
    retry_fields: dict[str, Any] = field(default_factory=dict)
    #: scoring.py's block: what preflight said of this booted config, beside its outcome.
    preflight: dict[str, Any] | None = None
    checks: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.model}::{self.config}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("model", "config", "engine", "engine_version", "gpu_name", "gpu_count", "server_command",
                     "log_path", "repro_command", "error_type", "error_message", "rule_ids", "signature", "preflight"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if isinstance(value, enum.Enum) else value
        bench = self.checks.get("benchmark")
        if isinstance(bench, BenchmarkResult) and bench.rows:
            out.update(bench.rows[0])
        if self.status is Status.SUCCESS or any(getattr(self, name) is not None for name in _SEED_NULLABLE):
            out.update({name: getattr(self, name) for name in _SEED_NULLABLE})
        out.update(self.retry_fields)
        if self.checks:
            out["checks"] = {name: result.to_dict() for name, result in self.checks.items()}
        out["status"] = str(self.status)
        return out
