"""Preflight scored against reality: what the rules said of a booted config, next to what happened.

Why: a wrong "predicted to fail" is never booted, so nobody learns the rule was wrong. Every booted
config (with ``--moe-no-preflight``, also those a rule predicted) records the prediction beside its
outcome in its entry (``"preflight"``), and ``python -m pytest_moe preflight --score RESULTS_DIR``
counts, per rule, how often it was right.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_moe.configs import ServerConfig
from pytest_moe.gpus import GpuInfo
from pytest_moe.preflight import Problem, check_config
from pytest_moe.results import ResultsStore

#: The entry key of the prediction block.
ENTRY_KEY = "preflight"


def prediction_block(problems: list[Problem] | None, error_type: str | None) -> dict[str, Any] | None:
    """``{"rules", "prevents", "predicted", "outcome", "right"}`` for one booted config; None when preflight could
    not look at the model (nothing was predicted).

    ``error_type`` None means the config succeeded. A rule is right when the config failed with the
    error type it prevents; "no rule fired" is right when the config succeeded.
    """
    if problems is None:
        return None
    predicted = [p.prevents for p in problems]
    right = error_type in predicted if problems else error_type is None
    return {"rules": [p.rule_id for p in problems], "prevents": predicted,
            "predicted": predicted[0] if predicted else "success",
            "outcome": error_type or "success", "right": right}


def predict_booted(cfg: ServerConfig, gpus: list[GpuInfo], error_type: str | None) -> dict[str, Any] | None:
    """The prediction block of a config that was booted (on the GPUs it ran on)."""
    return prediction_block(check_config(cfg, gpus), error_type)


@dataclass
class RuleScore:
    rule_id: str
    prevents: str
    fired: int = 0
    right: int = 0

    @property
    def accuracy(self) -> float | None:
        return self.right / self.fired if self.fired else None


@dataclass
class Score:
    rules: dict[str, RuleScore]
    #: Booted configs no rule fired on: how many, and how many of those failed (error type → count).
    silent: int
    silent_failures: dict[str, int]
    #: Configs skipped on a prediction (``status: predicted``): never booted, so not scored.
    unverified: int


def score(results_dir: str | Path) -> Score:
    """Count every entry's prediction against its outcome."""
    successes, failures = ResultsStore(results_dir).load()
    result = Score({}, 0, {}, 0)
    for entry in [*successes.values(), *failures.values()]:
        if entry.get("status") == "predicted":
            result.unverified += 1
            continue
        block = entry.get(ENTRY_KEY)
        if not isinstance(block, dict):
            continue
        outcome = block.get("outcome", "success")
        if not block.get("rules"):
            result.silent += 1
            if outcome != "success":
                result.silent_failures[outcome] = result.silent_failures.get(outcome, 0) + 1
            continue
        for rule_id, prevents in zip(block["rules"], block.get("prevents", [])):
            rule = result.rules.setdefault(rule_id, RuleScore(rule_id, prevents))
            rule.fired += 1
            rule.right += outcome == prevents
    return result


def render_score(result: Score) -> str:
    """One line per rule: how often it fired on a booted config and how often the outcome agreed."""
    lines = ["| rule | prevents | fired on booted configs | right | accuracy |", "|---|---|---:|---:|---:|"]
    for rule in sorted(result.rules.values(), key=lambda r: r.rule_id):
        accuracy = f"{100 * rule.accuracy:.0f}%" if rule.accuracy is not None else "—"
        lines.append(f"| `{rule.rule_id}` | {rule.prevents} | {rule.fired} | {rule.right} | {accuracy} |")
    missed = ", ".join(f"{kind} x{n}" for kind, n in sorted(result.silent_failures.items())) or "none"
    lines += ["", f"booted with no rule firing: {result.silent} (failed: {missed})",
              f"skipped on a prediction, never booted (not scored): {result.unverified}"]
    return "\n".join(lines) + "\n"
