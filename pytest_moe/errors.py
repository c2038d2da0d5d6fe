"""Classify a failed server launch or benchmark into one ``error_type`` for the nightly report.

Why a classifier at all: the nightly matrix fails in a few dozen recurring ways, and the person
reading ``failure_results.json`` needs to see at a glance "OOM at TP=2" or "FP8 block alignment
at TP=8" instead of scrolling a 4 MiB server log. So each failure gets one type from
``ERROR_TYPES`` plus the one log line that decided it.

The patterns are data (``pytest_moe/data/error_patterns.yaml``), each with the real engine message
it was built from and where that message comes from, because engine wording drifts between
releases and updating a regex should not mean touching code.

Precedence — the root cause wins. A real log is a cascade: the root exception, then
``EngineDeadError`` / "Received sigquit from a child process", then shutdown noise; NCCL errors on
every rank follow one rank's OOM; the harness prepends "Server failed to start within the timeout
period" to whatever the server printed. So:

* The YAML's ``precedence`` list orders the types; the first type with any match wins. Specific,
  self-explaining configuration errors come first, device faults next, and the generic symptoms
  (``Crash``, then ``Timeout``) last, so they only win when nothing says *why*.
* Within the winning type, the match that occurs earliest in the text is reported: it is the one
  closest to the root cause.
* Nothing matched: ``ServerError``, with the last exception-looking line of the log as message.
  Lines listed under ``cascade`` in the YAML (EngineDeadError, "See root cause above", ...) are
  skipped there, because they name a consequence, never the cause.

Speed: regexes are compiled once per process (``load_rules``); types are tried in precedence order and
the search stops at the first type that matches, so a 4 MiB log costs a few whole-text regex scans.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterator

from pytest_moe.datafiles import load_yaml

ERROR_TYPES: tuple[str, ...] = (
    "OOM",
    "Timeout",
    "QuantBlockAlignment",
    "QuantizationConflict",
    "UnsupportedBackend",
    "CudaGraphCapture",
    "NCCL",
    "IllegalMemoryAccess",
    "Crash",
    "InvalidArgument",
    "PortInUse",
    "MissingDependency",
    "TrustRemoteCode",
    "ServerError",
)
FALLBACK_TYPE = "ServerError"
#: The same types as an enum, so entries and checks name them without bare strings; ``parse_rules`` keeps
#: the data file's ``precedence`` equal to this set, so the enum is the data file's list of types.
ErrorType = enum.StrEnum("ErrorType", {name: name for name in ERROR_TYPES})
PATTERNS_FILE = "error_patterns.yaml"

#: How much of a server log ``classify_file`` reads: the failure is at the end, and whole logs of
#: multi-hour runs can be gigabytes.
TAIL_BYTES = 4 * 1024 * 1024
#: Longest ``Classification.message``; the report is a table, not a log viewer.
MAX_MESSAGE_CHARS = 300

# Prefixes that engines put in front of every line; removed from the reported message only (the
# patterns search the raw text). ANSI colours (Ray), "(EngineCore_DP0 pid=42) " / "[rank0]: ",
# vLLM's "ERROR 11-22 08:20:15 [core.py:123] ", SGLang's "[2025-11-22 08:20:15 TP0] ".
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LINE_PREFIX = re.compile(
    r"^(?:\([^)]*\bpid=\d+[^)]*\)\s*|\[rank\d+\]:\s*)?"
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)? \[[^\]]*\]\s*"
    r"|\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[^\]]*\]\s*)?"
)
# Fallback message tiers: a Python exception line, else a line saying error/failed/fatal. The
# needles find candidate lines with str.rfind (fast); the regex then confirms the candidate.
_EXCEPTION_NEEDLES = ("Error", "Exception", "Interrupt")
_EXCEPTION_LINE = re.compile(r"\w(?:Error|Exception|Interrupt)\b")
_ERRORISH_NEEDLES = ("error", "Error", "ERROR", "failed", "Failed", "FAILED", "fatal", "Fatal", "FATAL")
_ERRORISH_LINE = re.compile(r"(?i)\b(?:error|failed|fatal)\b")
# A regex must start with a literal character (not a metacharacter, not \\b-like escapes, and not
# made optional by a quantifier): see _check_fast.
_LITERAL_START = re.compile(r"(?:[^\\^$.|?*+()\[{]|\\[^\w])(?![?*{])")


class ErrorPatternsError(ValueError):
    """``error_patterns.yaml`` is malformed: a bug in our data, reported with file and pattern id."""


@dataclass(frozen=True)
class Classification:
    """What went wrong, for the report: a type, the deciding line, and the rule that decided it."""

    error_type: str
    message: str
    pattern_id: str | None


@dataclass(frozen=True)
class Pattern:
    """One YAML rule: any of ``regexes`` matching means ``error_type`` (or, in ``cascade``, noise)."""

    id: str
    error_type: str
    regexes: tuple[re.Pattern[str], ...]
    source: str
    example: str

    def earliest(self, text: str) -> int | None:
        """Offset of this rule's first match in ``text``, or None."""
        starts = [m.start() for rx in self.regexes if (m := rx.search(text))]
        return min(starts, default=None)


@dataclass(frozen=True)
class Rules:
    """The parsed YAML: types in precedence order, their patterns, and the cascade lines."""

    precedence: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    cascade: tuple[Pattern, ...]

    def of_type(self, error_type: str) -> tuple[Pattern, ...]:
        """The patterns of one type, in file order."""
        return tuple(p for p in self.patterns if p.error_type == error_type)


def _check_fast(regex: str) -> str | None:
    """Why ``regex`` would be slow on a 4 MiB log, or None.

    CPython's ``re`` only searches quickly (a substring scan for the literal prefix, ~1 ms per
    4 MiB) when the pattern starts with a literal and does not alternate at top level; a leading
    ``\\b``, ``^``, ``(?i)``, group or class makes it try every offset, about 80 times slower.
    """
    if not _LITERAL_START.match(regex):
        return "must start with a literal character (not \\b, ^, (?i), a group or a class)"
    depth, i = 0, 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            i += 1
        elif c == "[":  # skip a character class, where | and ( are literal
            i = regex.index("]", i + 2 if regex.startswith("[^", i) else i + 1)
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return "must not alternate at top level (list the alternatives instead)"
        i += 1
    return None


def parse_rules(data: Any, source: str = PATTERNS_FILE) -> Rules:
    """Validate and compile the YAML document ``data``; ``source`` names the file in errors.

    Raises ``ErrorPatternsError`` with one sentence naming the file and the offending pattern id.
    """

    def fail(where: str, problem: str) -> ErrorPatternsError:
        return ErrorPatternsError(f"{source}: {where}: {problem}.")

    if not isinstance(data, dict):
        raise fail("top level", "expected a mapping with 'precedence', 'patterns' and 'cascade'")
    typed = tuple(t for t in ERROR_TYPES if t != FALLBACK_TYPE)
    precedence = data.get("precedence")
    if not isinstance(precedence, list) or sorted(map(str, precedence)) != sorted(typed):
        raise fail(
            "precedence",
            f"must list each of {', '.join(typed)} exactly once ({FALLBACK_TYPE} is the implicit last)",
        )

    seen: set[str] = set()

    def parse(entry: Any, section: str, index: int) -> Pattern:
        pid = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(pid, str) or not pid:
            raise fail(f"{section}[{index}]", "expected a mapping with an 'id'")
        where = f"pattern {pid!r}"
        if pid in seen:
            raise fail(where, "duplicate id")
        seen.add(pid)
        if section == "cascade":
            if "error_type" in entry:
                raise fail(where, "cascade lines have no error_type")
            error_type = FALLBACK_TYPE
        else:
            error_type = entry.get("error_type")
            if error_type not in typed:
                raise fail(where, f"error_type {error_type!r} is not one of {', '.join(typed)}")
        raw = entry.get("regex")
        raw_list = [raw] if isinstance(raw, str) else raw
        if not isinstance(raw_list, list) or not raw_list or not all(isinstance(r, str) and r for r in raw_list):
            raise fail(where, "'regex' must be a non-empty string or list of strings")
        for key in ("source", "example"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise fail(where, f"missing '{key}'")
        try:
            regexes = tuple(re.compile(r, re.MULTILINE) for r in raw_list)
        except re.error as exc:
            raise fail(where, f"invalid regex ({exc})") from None
        for r in raw_list:
            if slow := _check_fast(r):
                raise fail(where, f"regex {r!r} {slow}")
        return Pattern(pid, error_type, regexes, entry["source"], entry["example"])

    parsed: dict[str, tuple[Pattern, ...]] = {}
    for section in ("patterns", "cascade"):
        entries = data.get(section)
        if not isinstance(entries, list):
            raise fail(section, "expected a list")
        parsed[section] = tuple(parse(e, section, i) for i, e in enumerate(entries))
    return Rules(tuple(precedence), parsed["patterns"], parsed["cascade"])


@lru_cache(maxsize=None)
def load_rules() -> Rules:
    """The packaged rules, validated and compiled once per process."""
    return parse_rules(load_yaml(PATTERNS_FILE), f"pytest_moe/data/{PATTERNS_FILE}")


def classify(text: str) -> Classification:
    """Classify a failure from its log text (harness lines, server stdout/stderr, tracebacks)."""
    rules = load_rules()
    for error_type in rules.precedence:
        hits = [(pos, p) for p in rules.of_type(error_type) if (pos := p.earliest(text)) is not None]
        if hits:
            pos, pattern = min(hits, key=lambda hit: hit[0])
            return Classification(error_type, _message(_line_at(text, pos)), pattern.id)
    return Classification(FALLBACK_TYPE, _fallback_message(text, rules.cascade), None)


def read_log_tail(path: str | os.PathLike[str], max_bytes: int = TAIL_BYTES) -> str:
    """The last ``max_bytes`` of a log as text (undecodable bytes replaced, partial first line dropped).

    Raises ``OSError`` if the file cannot be read: a missing log is the caller's fact to report.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = max(0, size - max_bytes)
        f.seek(start)
        data = f.read()
    if start:  # we began mid-line (maybe mid-character): drop that partial line
        data = data[data.find(b"\n") + 1 :]
    return data.decode("utf-8", errors="replace")


def classify_file(path: str | os.PathLike[str]) -> Classification:
    """Classify a server log file from its last ``TAIL_BYTES``."""
    return classify(read_log_tail(path))


def _line_at(text: str, pos: int) -> str:
    """The whole line of ``text`` that contains offset ``pos``."""
    end = text.find("\n", pos)
    return text[text.rfind("\n", 0, pos) + 1 : len(text) if end < 0 else end]


def _message(line: str) -> str:
    """One line for humans: colours and engine log prefixes removed, at most MAX_MESSAGE_CHARS."""
    line = _ANSI.sub("", line).strip()
    line = _LINE_PREFIX.sub("", line, count=1).strip() or line
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


def _fallback_message(text: str, cascade: tuple[Pattern, ...]) -> str:
    """The line most likely to explain an unrecognised failure.

    The last exception line (``FooError: ...``) wins, else the last line saying error/failed/fatal,
    else the last non-empty line. Cascade lines are skipped while anything else is left, because
    "EngineDeadError ... see above" explains nothing.
    """

    def useful(line: str) -> bool:
        return not any(rx.search(line) for p in cascade for rx in p.regexes)

    for needles, confirm in ((_EXCEPTION_NEEDLES, _EXCEPTION_LINE), (_ERRORISH_NEEDLES, _ERRORISH_LINE)):
        for line in _lines_with(text, needles):
            if confirm.search(line) and useful(line):
                return _message(line)
    lines = [line for line in text.splitlines()[-200:] if line.strip()]  # the tail is enough here
    chosen = next((line for line in reversed(lines) if useful(line)), lines[-1] if lines else None)
    return _message(chosen) if chosen else "(empty log)"


def _lines_with(text: str, needles: tuple[str, ...]) -> Iterator[str]:
    """Lines of ``text`` containing any of ``needles``, last line first.

    Each needle's previous occurrence is found with ``str.rfind`` and remembered, so the whole walk
    scans the text once per needle however many candidate lines it rejects.
    """
    found = {n: text.rfind(n) for n in needles}
    while (hit := max(found.values())) >= 0:
        start = text.rfind("\n", 0, hit) + 1
        yield _line_at(text, hit)
        found = {n: (text.rfind(n, 0, start) if pos >= start else pos) for n, pos in found.items()}
