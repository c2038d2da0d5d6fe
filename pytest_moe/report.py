"""What a reader sees: per-model markdown tables, failure lines with a one-line repro, JUnit properties.

Everything here is pure formatting over plain dicts (the same entries the results files hold), so the
terminal summary, ``$GITHUB_STEP_SUMMARY`` and the CLI all print the same thing.  Every text that
leaves here goes through ``pytest_moe.redact`` (the one redaction of the harness).
"""

from __future__ import annotations

import os

import re
import shlex
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from pytest_moe.redact import redact

#: Seed 001's table columns, in order, with the entry field each one shows.
TABLE_COLUMNS = (
    ("batch size", "batch_size"),
    ("input len", "input_len"),
    ("latency (s)", "latency_s"),
    ("input throughput (tok/s)", "input_throughput_tok_per_s"),
    ("output throughput (tok/s)", "output_throughput_tok_per_s"),
    ("ITL (ms)", "itl_ms"),
    ("profile (extend)", "profile_extend"),
    ("profile (decode)", "profile_decode"),
)

def shell_line(argv: Iterable[str], env: dict[str, str] | None = None) -> str:
    """A copy-pasteable, redacted rendering of an argument list and the variables it needs."""
    prefix = ["env", *(f"{k}={v}" for k, v in sorted(env.items()))] if env else []
    return redact(shlex.join(prefix + list(argv)))


def repro_command(config_id: str, matrix_path: str, test_path: str = "test/nightly") -> str:
    """One command that reruns exactly this config (``--moe-config`` selects by exact id)."""
    return shlex.join(["pytest", test_path, "--moe-matrix", matrix_path, "--moe-config", config_id])


def _cell(value: Any) -> str:
    """Numbers as the seed prints them (two decimals); values from xdist workers arrive as strings."""
    if value is None or value in ("", "None"):
        return "-"
    if isinstance(value, str) and re.fullmatch(r"-?\d+\.\d+", value):
        value = float(value)
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def failure_text(entry: dict[str, Any]) -> str:
    """The lines a failing test's report carries: what failed, the one-line repro, the raw command, the log."""
    return redact(
        f"{entry['model']}::{entry['config']} failed: {entry['error_type']}: {entry['error_message']}\n"
        f"reproduce: {entry['repro_command']}\n"
        f"server command: {entry.get('server_command') or '(not started)'}\n"
        f"server log: {entry['log_path']}\n"
    )


def _bench_rows(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per batch size: the benchmark block's rows (profiles on the first), or the seed's flat fields."""
    rows = ((entry.get("checks") or {}).get("benchmark") or {}).get("rows")
    if not rows:
        return [entry] if entry.get("latency_s") is not None else []
    profiles = {"profile_extend": entry.get("profile_extend"), "profile_decode": entry.get("profile_decode")}
    return [{**row, **(profiles if i == 0 else {})} for i, row in enumerate(rows)]


def success_tables(entries: Iterable[dict[str, Any]]) -> str:
    """Seed 001's table, one per model, one row per config and batch size; then the other checks' table."""
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_model[entry["model"]].append(entry)
    blocks = []
    for model in sorted(by_model):
        header = "| config | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
        rule = "|" + "---|" * (len(TABLE_COLUMNS) + 1)
        rows = [
            "| " + " | ".join([_config_cell(entry), *(_cell(row.get(field)) for _, field in TABLE_COLUMNS)]) + " |"
            for entry in sorted(by_model[model], key=lambda e: e["config"])
            for row in _bench_rows(entry)
        ]
        checks = checks_table(by_model[model])
        blocks.append("\n".join([f"### {model}", "", header, rule, *rows] + (["", checks] if checks else [])))
    return "\n\n".join(blocks)


def _is_flaky(entry: dict[str, Any]) -> bool:
    """Passed only on a retry (``flaky`` arrives as the string "True" from xdist workers)."""
    return entry.get("flaky") in (True, "True")


def _config_cell(entry: dict[str, Any]) -> str:
    """The config name, marked when it passed only on a retry, with what failed the first time."""
    return f"{entry['config']} (flaky: {entry.get('first_attempt_error_type')})" if _is_flaky(entry) else entry["config"]


#: The accuracy and agreement columns: title, check name, and how a block becomes one cell.
CHECK_COLUMNS = (
    ("accuracy (score / bound / floor, N)", "accuracy",
     lambda b: f"{b['status']}: {b['score']:.3f} / {b['lower_bound']:.3f} / {_cell(b['floor'])}, {b['n']}"),
    ("agreement (exact / prefix vs reference)", "agreement",
     lambda b: f"{b['status']}: {b['exact_match']:.0%} / {b['mean_prefix']:.1f} vs {b['reference']}"
               + (f"; first divergence prompt {b['first_divergence']['prompt']} token {b['first_divergence']['position']}"
                  if b.get("first_divergence") else "")),
)


def _check_cell(block: dict[str, Any] | None, show: Any) -> str:
    """A check's figures; a check that ended in an exception has only its status ("failed")."""
    if block is None:
        return "-"
    return show(block) if len(block) > 1 else str(block["status"])


def checks_table(entries: Iterable[dict[str, Any]]) -> str:
    """One row per config with the non-benchmark checks' verdicts ("" when no config ran one)."""
    rows = []
    for entry in sorted(entries, key=lambda e: e["config"]):
        checks = entry.get("checks") or {}
        if not any(name in checks for _, name, _ in CHECK_COLUMNS):
            continue
        cells = [_check_cell(checks.get(name), show) for _, name, show in CHECK_COLUMNS]
        rows.append("| " + " | ".join([entry["config"], *cells]) + " |")
    if not rows:
        return ""
    header = "| config | " + " | ".join(title for title, _, _ in CHECK_COLUMNS) + " |"
    return "\n".join([header, "|" + "---|" * (len(CHECK_COLUMNS) + 1), *rows])


def failure_table(entries: Iterable[dict[str, Any]]) -> str:
    """Failed and predicted-to-fail configs with their error type, message and repro command."""
    entries = sorted(entries, key=lambda e: (e["model"], e["config"]))
    if not entries:
        return ""
    lines = ["### Failures", "", "| config | error type | status | message |", "|---|---|---|---|"]
    for entry in entries:
        message = _cell(entry.get("error_message")).replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(f"| {entry['model']}::{entry['config']} | {entry.get('error_type', '-')} | {entry.get('status', 'failed')} | {message} |")
    lines += ["", "Reproduce one config (then the raw server command):", ""]
    for entry in entries:
        lines.append(f"- {entry['model']}::{entry['config']}: `{entry.get('repro_command')}`")
        lines.append(f"  - server: `{entry.get('server_command') or '(not started)'}`")
    return "\n".join(lines)


def summary_markdown(successes: list[dict[str, Any]], failures: list[dict[str, Any]]) -> str:
    """The whole end-of-run summary: counts, then tables."""
    notes = [f"{n} {label}" for label, n in (
        ("predicted by preflight, not booted", sum(1 for f in failures if f.get("status") == "predicted")),
        ("known failures", sum(1 for f in failures if f.get("status") == "xfailed")),
        ("flaky", sum(1 for s in successes if _is_flaky(s))),
    ) if n]
    head = f"## pytest-moe: {len(successes)} succeeded, {len(failures)} failed" + (f" ({', '.join(notes)})" if notes else "")
    parts = [head]
    measured = [e for e in [*successes, *failures] if _bench_rows(e) or e.get("checks")]
    if measured:
        parts.append(success_tables(measured))
    if failures:
        parts.append(failure_table(failures))
    return redact("\n\n".join(parts) + "\n")


def junit_properties(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """Flat ``name=value`` pairs for ``record_property``; survives xdist (unlike testsuite properties).

    Check blocks are flattened: ``accuracy.score``, ``agreement.first_divergence.position``, and one group per
    benchmark row, ``benchmark.bs8.latency_s``.
    """
    return [(key, redact(str(value))) for key, value in _flatten(entry, "") if value is not None]


def _flatten(value: Any, prefix: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        key = (lambda k: f"{prefix}.{k}") if prefix else str
        return [pair for k, v in value.items() for pair in _flatten(v, key(k).removeprefix("checks."))]
    if isinstance(value, list) and all(isinstance(v, dict) and "batch_size" in v for v in value) and value:
        return [pair for v in value for pair in _flatten(v, f"{prefix.removesuffix('.rows')}.bs{v['batch_size']}")]
    return [(prefix, value)]


def publish(terminalreporter, title: str, text: str) -> None:
    """One section of the end-of-run report: the terminal, and ``$GITHUB_STEP_SUMMARY`` when a CI job sets it."""
    terminalreporter.section(title)
    terminalreporter.write(text)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if step_summary:
        with open(step_summary, "a", encoding="utf-8") as fh:
            fh.write(text)
