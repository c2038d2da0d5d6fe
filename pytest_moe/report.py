"""What a reader sees: per-model markdown tables, failure lines with a one-line repro, JUnit properties.

Everything here is pure formatting over plain dicts (the same entries the results files hold), so the
terminal summary, ``$GITHUB_STEP_SUMMARY`` and the CLI all print the same thing.  Every text that
leaves here goes through ``pytest_moe.redact`` (the one redaction of the harness).
"""

from __future__ import annotations

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


def success_tables(entries: Iterable[dict[str, Any]]) -> str:
    """Seed 001's table, one per model, one row per config."""
    by_model: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in entries:
        by_model[entry["model"]].append(entry)
    blocks = []
    for model in sorted(by_model):
        header = "| config | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
        rule = "|" + "---|" * (len(TABLE_COLUMNS) + 1)
        rows = [
            "| " + " | ".join([_config_cell(entry), *(_cell(entry.get(field)) for _, field in TABLE_COLUMNS)]) + " |"
            for entry in sorted(by_model[model], key=lambda e: e["config"])
        ]
        blocks.append("\n".join([f"### {model}", "", header, rule, *rows]))
    return "\n\n".join(blocks)


def _is_flaky(entry: dict[str, Any]) -> bool:
    """Passed only on a retry (``flaky`` arrives as the string "True" from xdist workers)."""
    return entry.get("flaky") in (True, "True")


def _config_cell(entry: dict[str, Any]) -> str:
    """The config name, marked when it passed only on a retry, with what failed the first time."""
    return f"{entry['config']} (flaky: {entry.get('first_attempt_error_type')})" if _is_flaky(entry) else entry["config"]


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
    if successes:
        parts.append(success_tables(successes))
    if failures:
        parts.append(failure_table(failures))
    return redact("\n\n".join(parts) + "\n")


def junit_properties(entry: dict[str, Any]) -> list[tuple[str, str]]:
    """Flat ``name=value`` pairs for ``record_property``; survives xdist (unlike testsuite properties)."""
    return [(key, redact(str(value))) for key, value in entry.items() if value is not None]
