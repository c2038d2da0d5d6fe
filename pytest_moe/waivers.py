"""Waivers (``known_failures``) with an owner and an end: an issue link, an expiry date, a last outcome.

Why: a waiver that never ends turns a real regression into permanent noise. TensorRT-LLM's
``waives.txt`` lines carry a bug link, a checker validates the file and a bot removes a waiver
when its bug closes. Here each ``known_failures`` entry names its ``issue`` and ``expires``; after
that date the waiver no longer applies and the failure says so, a waived config that passes fails
and names the matrix line to delete, and ``python -m pytest_moe waivers`` lists every waiver with
its age, expiry and last outcome and exits non-zero when one has expired or no longer fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from enum import Enum
from pathlib import Path
from typing import Any

import yaml

from pytest_moe.configs import KnownFailure, Matrix, ServerConfig
from pytest_moe.results import ResultsStore

#: Exit status of ``waivers`` when a waiver needs attention (like preflight's "failure predicted").
NEEDS_ATTENTION = 1


@dataclass(frozen=True)
class Waiver:
    """One ``known_failures`` entry, where it is written, and what the last run said."""

    config_id: str
    known: KnownFailure
    location: str
    last_outcome: str

    def expired(self, today: date) -> bool:
        return self.known.expires < today

    def age_days(self, today: date) -> int | None:
        return (today - self.known.added).days if self.known.added else None

    def problem(self, today: date) -> str | None:
        """Why this waiver needs a person, or None while it is current and still failing as waived."""
        if self.expired(today):
            return f"expired on {self.known.expires}"
        if self.last_outcome == "passed":
            return f"no longer fails: delete {self.location}"
        return None


def matrix_line(matrix_path: str | Path, cfg: ServerConfig) -> str:
    """``file:line`` of the ``known_failures`` entry of ``cfg`` (the line a passing config asks to delete)."""
    path = Path(matrix_path)
    try:
        node = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, yaml.YAMLError):
        return str(path)
    for key in ("models", cfg.model, "known_failures", cfg.name):
        match = next((v for k, v in node.value if k.value == key), None) if isinstance(node, yaml.MappingNode) else None
        if match is None:
            return str(path)
        line = next(k.start_mark.line + 1 for k, v in node.value if v is match)
        node = match
    return f"{path}:{line}"


class Verdict(Enum):
    """What a waiver makes of an outcome it covers."""

    XFAIL = "xfail"  # failed as waived
    FAIL = "fail"  # the waiver does not cover this outcome (passed, expired, another type)


@dataclass(frozen=True)
class Ruling:
    verdict: Verdict
    #: The reason shown in the report (the xfail reason, or why the outcome now fails).
    text: str


def check_outcome(cfg: ServerConfig, error_type: str | None, *, passed: bool, today: date | None = None) -> Ruling | None:
    """What the waiver of ``cfg`` makes of one outcome; None when ``cfg`` has no waiver."""
    known = cfg.known_failure
    if known is None:
        return None
    today = today or date.today()
    if passed:
        return Ruling(Verdict.FAIL, (
            f"[XPASS(strict)] {cfg.id} passed but is waived in known_failures ({known.error_type}, {known.issue}): "
            f"the waiver is no longer needed, delete {matrix_line(cfg.matrix_path, cfg)}"
        ))
    if known.expires < today:
        return Ruling(Verdict.FAIL, (
            f"waiver for {cfg.id} expired on {known.expires} ({known.issue}); it failed with {error_type} "
            f"and now counts as a failure: fix it, or renew the waiver in {matrix_line(cfg.matrix_path, cfg)}"
        ))
    if error_type == known.error_type:
        return Ruling(Verdict.XFAIL,
                      f"known failure ({known.error_type}, {known.issue}, until {known.expires}): {known.reason}")
    return Ruling(Verdict.FAIL, f"expected {known.error_type} ({known.reason}, {known.issue}), got {error_type}")


def apply_waiver(report: Any, cfg: ServerConfig, entry: dict[str, Any], today: date | None = None) -> None:
    """Turn a matrix test's report into what the waiver says: xfail, strict failure, or unchanged."""
    if report.when != "call" and report.passed:
        return
    ruling = check_outcome(cfg, entry.get("error_type"), passed=report.passed, today=today)
    if ruling is None:
        return
    if ruling.verdict is Verdict.XFAIL:
        report.outcome = "skipped"
        report.wasxfail = ruling.text
        entry["status"] = "xfailed"
    elif report.passed:
        report.outcome = "failed"
        report.longrepr = ruling.text
    else:
        report.sections.append(("pytest-moe", ruling.text))
        entry["waiver"] = ruling.text


def list_waivers(matrix: Matrix, results_dir: str | Path) -> list[Waiver]:
    """Every waiver of ``matrix`` with its matrix line and the last outcome in ``results_dir``."""
    successes: dict[str, Any] = {}
    failures: dict[str, Any] = {}
    if Path(results_dir).is_dir():
        successes, failures = ResultsStore(results_dir).load()
    out = []
    for cfg in matrix.configs:
        if cfg.known_failure is not None:
            out.append(Waiver(cfg.id, cfg.known_failure, matrix_line(matrix.path, cfg),
                              _last_outcome(successes.get(cfg.id), failures.get(cfg.id))))
    return out


def _last_outcome(success: dict[str, Any] | None, failure: dict[str, Any] | None) -> str:
    """``passed``, ``failed: <type>`` (or ``xfailed: <type>``), or ``no result`` — the newer entry wins."""
    if success and (not failure or str(success.get("last_updated", "")) >= str(failure.get("last_updated", ""))):
        return "passed"
    if failure:
        return f"{failure.get('status', 'failed')}: {failure.get('error_type', '?')}"
    return "no result"


def render(waivers: list[Waiver], today: date) -> str:
    """The ``waivers`` command's table: one row per waiver, then what needs attention."""
    header = ("config", "waived type", "issue", "age", "expires", "last outcome", "state")
    rows = []
    for w in waivers:
        age = w.age_days(today)
        rows.append((w.config_id, w.known.error_type, w.known.issue, "?" if age is None else f"{age} d",
                     str(w.known.expires), w.last_outcome, w.problem(today) or "ok"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]
    attention = [w for w in waivers if w.problem(today)]
    lines.append(f"{len(waivers)} waiver(s), {len(attention)} need attention" if waivers else "no waivers")
    return "\n".join(lines)
