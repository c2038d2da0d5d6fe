"""Classify a failed server launch or benchmark into one ``error_type`` for the nightly report.

Why a classifier at all: the nightly matrix fails in a few dozen recurring ways, and the person
reading ``failure_results.json`` needs to see at a glance "OOM at TP=2" or "FP8 block alignment
at TP=8" instead of scrolling a 4 MiB server log. So each failure gets one type from
``ErrorType`` plus the one log line that decided it; a failure no rule knows gets a stable
``signature`` instead, so the same unknown failure groups across nights and configs.

The patterns are data (``pytest_moe/data/error_patterns.yaml``, read through a strict schema), each
with the engine that prints it, the releases it was checked against and where the message comes
from, because wording drifts between engines and releases and updating a regex should not mean
touching code. How well they hold on logs they were not written from is measured on a corpus of
real failure excerpts from public issue threads (``scripts/bench_classifier.py``).

Real logs first go through ``normalize``: ANSI colour, process prefixes (``(Worker pid=…)``,
``(EngineCore_DP0 pid=…)``, ``(ApiServer_7 pid=…)``), rank tags (``[… TP3]``, ``[rank0]:``),
timestamps, container/journald prefixes and box drawing are removed, and a line printed again by
another rank is dropped (the first copy, the earliest in time, stays). Patterns search that text.

Root cause by precedence, then by time. A real log is a cascade: the root exception, then
``EngineDeadError`` / "Received sigquit from a child process", then shutdown noise; NCCL errors on
every rank follow one rank's OOM; the harness prepends "Server failed to start within the timeout
period" to whatever the server printed. So:

* The YAML's ``precedence`` list orders the types; the first type with any match wins. Specific,
  self-explaining configuration errors come first, device faults next, and the generic symptoms
  (``Crash``, then ``Timeout``) last, so they only win when nothing says *why*.
* Within the winning type, the match on the earliest line wins: it is the one closest in time to
  the root cause (ties go to the pattern listed first).
* ``weak`` patterns (evidence from a traceback frame, e.g. a stack passing through
  ``ncclCommInitRank`` with the error line cut off) are only tried, in the same order, when no
  message pattern of any type matched.
* Nothing matched: ``ServerError``, with the last exception-looking line of the log as message and
  its ``signature``. Lines listed under ``cascade`` in the YAML (EngineDeadError, "See root cause
  above", ...) are skipped there, because they name a consequence, never the cause.

Speed: regexes are compiled once per process (``load_rules``) and must start with a literal so
CPython's ``re`` can scan for it; normalizing a 4 MiB tail is one pass over its lines.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from pytest_moe.configs import Regex, StrictModel
from pytest_moe.datafiles import load_yaml


class ErrorType(StrEnum):
    """What a failure is; ``SERVER_ERROR`` is the fallback when no rule knows it."""

    OOM = "OOM"
    TIMEOUT = "Timeout"
    QUANT_BLOCK_ALIGNMENT = "QuantBlockAlignment"
    QUANTIZATION_CONFLICT = "QuantizationConflict"
    UNSUPPORTED_BACKEND = "UnsupportedBackend"
    CUDA_GRAPH_CAPTURE = "CudaGraphCapture"
    NCCL = "NCCL"
    ILLEGAL_MEMORY_ACCESS = "IllegalMemoryAccess"
    CRASH = "Crash"
    INVALID_ARGUMENT = "InvalidArgument"
    PORT_IN_USE = "PortInUse"
    MISSING_DEPENDENCY = "MissingDependency"
    TRUST_REMOTE_CODE = "TrustRemoteCode"
    SERVER_ERROR = "ServerError"


#: The type names as the results files and the matrix spell them.
ERROR_TYPES: tuple[str, ...] = tuple(t.value for t in ErrorType)
FALLBACK_TYPE = ErrorType.SERVER_ERROR.value
PATTERNS_FILE = "error_patterns.yaml"
#: ``Classification.pattern_id`` of a type guessed by the corpus-trained fallback (``pytest_moe.learned``).
LEARNED_ID = "learned"
#: Who prints a message; a pattern names one so per-engine wording stays traceable.
ENGINES = (
    "sglang", "vllm", "torch", "nccl", "cuda", "flashinfer", "triton", "cutlass", "deepgemm", "transformers", "python", "tgi",
    "cann", "harness",
)

#: How much of a server log ``classify_file`` reads: the failure is at the end, and whole logs of
#: multi-hour runs can be gigabytes.
TAIL_BYTES = 4 * 1024 * 1024
#: Longest ``Classification.message``; the report is a table, not a log viewer.
MAX_MESSAGE_CHARS = 300
#: Longest ``Classification.signature``: enough to tell failures apart, short enough to group on.
MAX_SIGNATURE_CHARS = 200

# --- normalization -------------------------------------------------------------------------------
# ANSI colour, also when a copy-paste lost the ESC byte ("[1;36m(VllmWorker ..." / "1;36m(VllmWorker"); without
# the ESC a digit is required, or the "[m" of "[multiproc_executor.py:49]" would go too.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|\[\d[0-9;]*m(?=\S)|^[0-9;]+m(?=\()")
# Prefixes engines, launchers and log collectors put in front of a line; stripped repeatedly, since
# one line can carry several ("[ts] (Worker_TP0 pid=9) ERROR 12-13 11:54:35 [x.py:826] ...").
_PREFIXES = re.compile(
    r"""^(?:
      \s*│\s?                                                   # k9s / rich box drawing
    | [\w.]*[-_][\w.-]*\s+\|\s                                  # docker compose: "vllm-1  | ", "vllm-qwen-72b  | "
    | [A-Z][a-z]{2}\s[\s\d]\d\s\d\d:\d\d:\d\d\s\S+\s[\w./-]+\[\d+\]:\s   # journald: "Aug 17 18:42:18 host vllm[8052]: "
    | \[?\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?Z?\]?\s+        # ISO timestamps (CI, k8s): "2024-02-08T08:40:56.16Z "
    | \d{4}-\d\d-\d\d\s\d\d:\d\d:\d\d(?:[.,]\d+)?\s\|\s\w+\s\|\s(?:\w+\s\|\s)?   # FastChat-style "ts | ERROR | stderr | "
    | \([^()]*\bpid=\d+[^()]*\)\s?                              # "(VllmWorker rank=7 pid=240) ", "(EngineCore_DP0 pid=1) "
    | \[[\w.-]+\]:\s                                            # launcher tags: "[vllm]: "
    | \[rank\d+\]:\s?                                           # torch: "[rank0]: "
    | \[\d+\]\s(?=\S)                                           # torchrun / tee line tags: "[80746] "
    | (?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s\d\d-\d\d\s\d\d:\d\d:\d\d(?:\.\d+)?\s(?:\[[^\]]*\]|[\w.]+:\d+\])\s?  # vLLM
    | \[\d{4}-\d\d-\d\d\s\d\d:\d\d:\d\d[^\]]*\]\s?               # SGLang: "[2025-02-21 22:59:28 TP0] "
    | \[\d\d-\d\d\s\d\d:\d\d:\d\d[^\]]*\]\s?                     # SGLang diffusion: "[12-16 14:27:08] "
    | \[[EWIF]\d{0,4}(?:\s\d\d:\d\d:\d\d\.\d+)?\s[\w.]+:\d+\]\s?  # c10 glog: "[E321 02:07:08.40 ProcessGroupNCCL.cpp:607] "
    | [IWEF]\d{4}\s\d\d:\d\d:\d\d\.\d+\s+\d+\s[\w.]+:\d+\]\s     # glog: "I0508 20:24:09.727326 152 model.py:284] "
    | [\w.-]+:\d+:\d+\s\[\d+\]\s(?=\S)                          # NCCL: "host:pid:tid [dev] "
    )""",
    re.VERBOSE,
)
_TRAILING_BOX = re.compile(r"\s*│\s*$")

# --- fallback message and signature ------------------------------------------------------------
# Fallback message tiers: a Python exception line, else a line saying error/failed/fatal. The
# needles find candidate lines with str.rfind (fast); the regex then confirms the candidate.
_EXCEPTION_NEEDLES = ("Error", "Exception", "Interrupt")
_EXCEPTION_LINE = re.compile(r"\w(?:Error|Exception|Interrupt)\b")
_ERRORISH_NEEDLES = ("error", "Error", "ERROR", "failed", "Failed", "FAILED", "fatal", "Fatal", "FATAL")
_ERRORISH_LINE = re.compile(r"(?i)\b(?:error|failed|fatal)\b")
# What differs between two runs of the same failure: paths, hex ids, addresses, numbers.
#: A file path: where a file is installed, never what failed (the learned fallback drops them too).
PATH = re.compile(r"(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[/\\][\w.@+-]+){2,}[/\\]?")
_SIGNATURE_PARTS = (
    (PATH, "<path>"),
    (re.compile(r"\b0x[0-9a-fA-F]+\b"), "<hex>"),
    (re.compile(r"\b(?=[0-9a-fA-F-]*\d)[0-9a-fA-F]{6,}(?:-[0-9a-fA-F]{4,})*\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)*"), "<n>"),
    (re.compile(r"\s+"), " "),
)
# A regex must start with a literal character (not a metacharacter, not \\b-like escapes, and not
# made optional by a quantifier): see _check_fast.
_LITERAL_START = re.compile(r"(?:[^\\^$.|?*+()\[{]|\\[^\w])(?![?*{])")


class ErrorPatternsError(ValueError):
    """``error_patterns.yaml`` is malformed: a bug in our data, reported with file and pattern id."""


@dataclass(frozen=True)
class Classification:
    """What went wrong, for the report: a type, the deciding line, the rule that decided it.

    ``signature`` is set when no rule decided (the fallback type, or a type guessed by the learned
    fallback, ``pattern_id == LEARNED_ID``): the deciding line with everything that changes from run to
    run removed, so unknown failures can be grouped.
    """

    error_type: str
    message: str
    pattern_id: str | None
    signature: str | None = None


@dataclass(frozen=True)
class Pattern:
    """One YAML rule: any of ``regexes`` matching means ``error_type`` (or, in ``cascade``, noise)."""

    id: str
    error_type: str
    regexes: tuple[re.Pattern[str], ...]
    source: str
    example: str
    engine: str = "python"
    releases: str = ""
    weak: bool = False

    def earliest(self, text: str) -> int | None:
        """Offset of the start of the first line this rule matches in ``text``, or None."""
        starts = [m.start() for rx in self.regexes if (m := rx.search(text))]
        return text.rfind("\n", 0, min(starts)) + 1 if starts else None


class LearnedSettings(StrictModel):
    """How the learned fallback is fitted and when its guess is used (``pytest_moe.learned``)."""

    min_probability: float = Field(ge=0, le=1)
    #: For a deciding line that is not an exception (a last line, a line saying "failed"): such lines are
    #: in healthy logs too, so the model must be surer.
    min_probability_without_exception: float = Field(ge=0, le=1)
    regularisation_c: float = Field(gt=0, le=1e6)
    skip_lines: list[Regex] = Field(default_factory=list, max_length=100)

    def skips(self, line: str) -> bool:
        return any(re.search(regex, line) for regex in self.skip_lines)


@dataclass(frozen=True)
class Rules:
    """The parsed YAML: types in precedence order, their patterns, the cascade lines, the learned fallback."""

    precedence: tuple[str, ...]
    patterns: tuple[Pattern, ...]
    cascade: tuple[Pattern, ...]
    learned: LearnedSettings

    def of_type(self, error_type: str, *, weak: bool = False) -> tuple[Pattern, ...]:
        """The message (or, with ``weak``, the traceback-frame) patterns of one type, in file order."""
        return tuple(p for p in self.patterns if p.error_type == error_type and p.weak is weak)


# --- the YAML schema ---------------------------------------------------------------------------
class _CascadeSpec(StrictModel):
    id: str = Field(min_length=1)
    regex: str | list[str]
    source: str = Field(min_length=1)
    example: str = Field(min_length=1)


class _PatternSpec(_CascadeSpec):
    error_type: str
    engine: Literal[ENGINES]  # type: ignore[valid-type]
    releases: str = Field("", description="engine releases the wording was checked against")
    weak: bool = False

    @field_validator("error_type")
    @classmethod
    def _typed(cls, value: str) -> str:
        typed = [t for t in ERROR_TYPES if t != FALLBACK_TYPE]
        if value not in typed:
            raise ValueError(f"error_type {value!r} is not one of {', '.join(typed)}")
        return value


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

    if not isinstance(data, dict) or set(data) - {"precedence", "patterns", "cascade", "learned"}:
        raise fail("top level", "expected a mapping with only 'precedence', 'patterns', 'cascade' and 'learned'")
    if not isinstance(data.get("learned"), dict):
        raise fail("learned", f"expected a mapping with {', '.join(LearnedSettings.model_fields)}")
    try:
        learned = LearnedSettings.model_validate(data["learned"])
    except ValidationError as exc:
        raise fail("learned", _describe(exc, "learned")) from None
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
        schema = _CascadeSpec if section == "cascade" else _PatternSpec
        try:
            spec = schema.model_validate(entry)
        except ValidationError as exc:
            raise fail(where, _describe(exc, section)) from None
        raw_list = [spec.regex] if isinstance(spec.regex, str) else spec.regex
        if not raw_list or not all(raw_list):
            raise fail(where, "'regex' must be a non-empty string or list of strings")
        try:
            regexes = tuple(re.compile(r, re.MULTILINE) for r in raw_list)
        except re.error as exc:
            raise fail(where, f"invalid regex ({exc})") from None
        for r in raw_list:
            if slow := _check_fast(r):
                raise fail(where, f"regex {r!r} {slow}")
        if isinstance(spec, _PatternSpec):
            return Pattern(pid, spec.error_type, regexes, spec.source, spec.example, spec.engine, spec.releases, spec.weak)
        return Pattern(pid, FALLBACK_TYPE, regexes, spec.source, spec.example)

    parsed: dict[str, tuple[Pattern, ...]] = {}
    for section in ("patterns", "cascade"):
        entries = data.get(section)
        if not isinstance(entries, list):
            raise fail(section, "expected a list")
        parsed[section] = tuple(parse(e, section, i) for i, e in enumerate(entries))
    return Rules(tuple(precedence), parsed["patterns"], parsed["cascade"], learned)


def _describe(exc: ValidationError, section: str) -> str:
    """The first schema error as the clause after "pattern 'id': "."""
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "entry"
    if err["type"] == "extra_forbidden":
        if section == "cascade" and field == "error_type":
            return "cascade lines have no error_type"
        allowed = {"cascade": _CascadeSpec, "learned": LearnedSettings}.get(section, _PatternSpec).model_fields
        return f"unknown key {field!r} (allowed: {', '.join(allowed)})"
    if err["type"] == "missing":
        return f"missing {field!r}"
    if field == "error_type" and err["type"] == "value_error":
        return str(err["ctx"]["error"])
    return f"{field}: {err['msg']}"


@lru_cache(maxsize=None)
def load_rules() -> Rules:
    """The packaged rules, validated and compiled once per process."""
    return parse_rules(load_yaml(PATTERNS_FILE), f"pytest_moe/data/{PATTERNS_FILE}")


# --- classifying -------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """The log with colour, process/rank prefixes and timestamps removed and rank duplicates dropped.

    A line printed again (by another rank, or by a relaunch) is dropped: the first copy is the
    earliest in time, and keeping it contiguous with its own neighbours de-interleaves the ranks'
    tracebacks. Blank lines are kept once in a row.
    """
    out: list[str] = []
    seen: set[str] = set()
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        while (m := _PREFIXES.match(line)) and m.end() > 0:
            line = line[m.end():]
        line = _TRAILING_BOX.sub("", line).rstrip()
        if not line.strip():
            if out and out[-1]:
                out.append("")
            continue
        if line in seen:
            continue
        seen.add(line)
        out.append(line)
    return "\n".join(out)


def classify(text: str) -> Classification:
    """Classify a failure from its log text (harness lines, server stdout/stderr, tracebacks)."""
    rules = load_rules()
    clean = normalize(text)
    for weak in (False, True):
        for error_type in rules.precedence:
            hits = [(pos, i, p) for i, p in enumerate(rules.of_type(error_type, weak=weak))
                    if (pos := p.earliest(clean)) is not None]
            if hits:
                pos, _, pattern = min(hits, key=lambda hit: hit[:2])
                return Classification(error_type, _message(_line_at(clean, pos)), pattern.id)
    deciding = deciding_line(clean, rules.cascade)
    message = deciding.message
    if deciding.end is not None and not rules.learned.skips(message):
        # No rule knows it: the corpus-trained model may (lazy import: learned.py reads the corpus, whose
        # loader needs this module's types).
        from pytest_moe.learned import guess, window

        guessed = guess(window(clean, deciding.end), exception=deciding.exception)
        if guessed is not None and guessed.error_type != FALLBACK_TYPE:
            return Classification(guessed.error_type, message, LEARNED_ID, signature(message))
    return Classification(FALLBACK_TYPE, message, None, signature(message))


def signature(message: str) -> str:
    """``message`` without what differs between runs of the same failure (paths, ids, numbers).

    Two configs that fail the same unknown way on two nights get the same signature, so the
    history can group them although no rule names the failure.
    """
    text = message
    for rx, repl in _SIGNATURE_PARTS:
        text = rx.sub(repl, text)
    text = text.strip()
    return text if len(text) <= MAX_SIGNATURE_CHARS else text[: MAX_SIGNATURE_CHARS - 1] + "…"


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
    """One line for humans: stripped, at most MAX_MESSAGE_CHARS (the text is already normalized)."""
    line = line.strip()
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 1] + "…"


@dataclass(frozen=True)
class Deciding:
    """The line that explains an unrecognised failure, where it ends, and whether it is an exception line."""

    message: str
    #: Offset just past the line in the normalized text; None when only cascade lines (or nothing) were left.
    end: int | None
    exception: bool


def deciding_line(text: str, cascade: tuple[Pattern, ...]) -> Deciding:
    """The line most likely to explain an unrecognised failure.

    The last exception line (``FooError: ...``) wins, else the last line saying error/failed/fatal,
    else the last non-empty line. Cascade lines are skipped while anything else is left, because
    "EngineDeadError ... see above" explains nothing; a log of cascade lines alone has no ``end``, so
    the learned fallback gets nothing to read.
    """

    def useful(line: str) -> bool:
        return not any(rx.search(line) for p in cascade for rx in p.regexes)

    for needles, confirm in ((_EXCEPTION_NEEDLES, _EXCEPTION_LINE), (_ERRORISH_NEEDLES, _ERRORISH_LINE)):
        for start, line in _lines_with(text, needles):
            if confirm.search(line) and useful(line):
                return Deciding(_message(line), start + len(line), confirm is _EXCEPTION_LINE)
    tail = text[max(0, len(text) - 64 * 1024):]  # the last lines are enough here
    offset = len(text) - len(tail)
    lines, pos = [], offset
    for line in tail.split("\n"):
        if line.strip():
            lines.append((pos + len(line), line))
        pos += len(line) + 1
    chosen = next(((end, line) for end, line in reversed(lines) if useful(line)), None)
    if chosen is not None:
        return Deciding(_message(chosen[1]), chosen[0], False)
    return Deciding(_message(lines[-1][1]) if lines else "(empty log)", None, False)


def _lines_with(text: str, needles: tuple[str, ...]) -> Iterator[tuple[int, str]]:
    """Lines of ``text`` containing any of ``needles`` with their offsets, last line first.

    Each needle's previous occurrence is found with ``str.rfind`` and remembered, so the whole walk
    scans the text once per needle however many candidate lines it rejects.
    """
    found = {n: text.rfind(n) for n in needles}
    while (hit := max(found.values())) >= 0:
        start = text.rfind("\n", 0, hit) + 1
        yield start, _line_at(text, hit)
        found = {n: (text.rfind(n, 0, start) if pos >= start else pos) for n, pos in found.items()}
