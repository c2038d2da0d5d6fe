"""A results entry → the history rows it stands for, with the provenance each row carries.

Why rows per config × check × metric (not one JSON blob per entry): the regression detector and the
report ask "the last K values of this one metric of this one config", which a row table answers with an
index; and a check added later (kernel, agreement) needs no schema change, only new metric names.

Two entry shapes are read: the typed ``checks`` block (one block per check, each with its own
``status``) and the seed's flat benchmark fields, which mean "the benchmark at the entry's batch size".
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from dataclasses import asdict, dataclass, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, StrictStr

from pytest_moe.configs import StrictModel
from pytest_moe.datafiles import load_yaml
from pytest_moe.redact import redact

KERNEL_LOGS_FILE = "moe_kernel_logs.yaml"
#: Only the head of a server log is read for the kernel line: engines pick it while loading the model.
KERNEL_LOG_HEAD_BYTES = 4 * 1024 * 1024


class Status(str, enum.Enum):
    """A row's outcome; the values are what the database stores."""

    PASSED = "passed"
    FAILED = "failed"
    XFAILED = "xfailed"
    PREDICTED = "predicted"

    @classmethod
    def of_entry(cls, entry: dict[str, Any]) -> Status:
        """Entries say ``success``; checks say ``passed``; anything unknown is a failure, never a pass."""
        raw = str(entry.get("status") or ("failed" if entry.get("error_type") else "success"))
        return {"success": cls.PASSED, "passed": cls.PASSED, "xfailed": cls.XFAILED, "predicted": cls.PREDICTED}.get(raw, cls.FAILED)


@dataclass(frozen=True)
class Metric:
    check: str
    name: str
    label: str
    unit: str
    higher_is_better: bool


#: The numbers the history keeps, per check; ``per_batch`` checks carry a ``rows`` list with ``batch_size``.
METRICS: dict[str, tuple[Metric, ...]] = {
    "benchmark": (
        Metric("benchmark", "output_throughput_tok_per_s", "output throughput", "tok/s", True),
        Metric("benchmark", "input_throughput_tok_per_s", "input throughput", "tok/s", True),
        Metric("benchmark", "latency_s", "latency", "s", False),
        Metric("benchmark", "ttft_s", "TTFT", "s", False),
        Metric("benchmark", "itl_ms", "ITL", "ms", False),
    ),
    "accuracy": (Metric("accuracy", "score", "accuracy", "", True),),
    "agreement": (
        Metric("agreement", "exact_match", "exact match", "", True),
        Metric("agreement", "mean_prefix", "mean prefix", "", True),
    ),
    "kernel": (Metric("kernel", "us_per_call", "kernel time", "us", False),),
}
PER_BATCH_CHECKS = frozenset({"benchmark", "kernel"})
#: The pseudo-check of the row every entry gets: the config's overall outcome and error type.
OUTCOME_CHECK = "outcome"
STATUS_METRIC = "status"


_BY_NAME = {(m.check, m.name): m for ms in METRICS.values() for m in ms}
METRIC_NAMES: tuple[str, ...] = tuple(dict.fromkeys(m.name for m in _BY_NAME.values()))


def metric(check: str, name: str) -> Metric | None:
    return _BY_NAME.get((check, name))


@dataclass(frozen=True)
class Row:
    check: str
    metric: str
    batch_size: int  # 0 where the metric has no batch size
    value: float | None
    status: Status
    error_type: str | None = None


@dataclass(frozen=True)
class ConfigProvenance:
    """Per-config facts every row of that config carries."""

    config_id: str
    model: str
    config: str
    engine: str | None
    engine_version: str | None
    engine_commit: str | None
    gpu_name: str | None
    gpu_count: int | None
    moe_backend: str | None
    moe_kernel: str | None
    server_command: str | None
    config_hash: str | None
    repro_command: str | None
    log_path: str | None


def entry_rows(entry: dict[str, Any]) -> list[Row]:
    status = Status.of_entry(entry)
    rows = [Row(OUTCOME_CHECK, STATUS_METRIC, 0, None, status, entry.get("error_type") or None)]
    checks = entry.get("checks")
    if isinstance(checks, dict) and checks:
        for name, block in sorted(checks.items()):
            if isinstance(block, dict):
                rows += _check_rows(name, block)
    elif status is Status.PASSED:
        rows += _flat_benchmark_rows(entry)
    return rows


def _check_rows(name: str, block: dict[str, Any]) -> list[Row]:
    status = Status.of_entry(block)
    rows = [Row(name, STATUS_METRIC, 0, None, status, block.get("error_type") or None)]
    metrics = METRICS.get(name, ())
    samples = block.get("rows") if name in PER_BATCH_CHECKS else [block]
    for sample in samples if isinstance(samples, list) else []:
        if not isinstance(sample, dict):
            continue
        batch = _int(sample.get("batch_size")) if name in PER_BATCH_CHECKS else 0
        for m in metrics:
            value = _float(sample.get(m.name))
            if value is not None:
                rows.append(Row(name, m.name, batch or 0, value, status))
    return rows


def _flat_benchmark_rows(entry: dict[str, Any]) -> list[Row]:
    """Seed 001's flat fields are the benchmark at the entry's batch size (batch 1 in the seeds)."""
    batch = _int(entry.get("batch_size")) or 1
    rows = [Row("benchmark", m.name, batch, v, Status.PASSED) for m in METRICS["benchmark"] if (v := _float(entry.get(m.name))) is not None]
    return [Row("benchmark", STATUS_METRIC, 0, None, Status.PASSED), *rows] if rows else []


def _float(value: Any) -> float | None:
    """Entries from xdist workers or JUnit arrive as strings; ``None``/"" mean "not measured"."""
    if isinstance(value, bool) or value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if out == out else None  # NaN is not a measurement


def _int(value: Any) -> int | None:
    number = _float(value)
    return int(number) if number is not None else None


_CONFIG_NAME = re.compile(r"^TP\d+(?:_EP\d+)?_(?P<backend>.+)$")


def backend_of(config_name: str) -> str | None:
    """The requested MoE backend from a ``TP8_EP2_auto`` style name (``matrix.config_name``'s format),
    for entries whose matrix config is not at hand (imports, crashed workers)."""
    match = _CONFIG_NAME.match(config_name)
    return match.group("backend") if match else None


def config_hash(cfg: Any) -> str | None:
    """Hash of the resolved config: two nights compare like with like only when it is equal."""
    if cfg is None or not is_dataclass(cfg):
        return None
    text = json.dumps(asdict(cfg), sort_keys=True, default=lambda o: o.model_dump() if isinstance(o, BaseModel) else str(o))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance(key: str, entry: dict[str, Any], cfg: Any = None) -> ConfigProvenance:
    model, _, name = key.partition("::")
    backend = getattr(cfg, "moe_backend", None) or entry.get("moe_backend") or backend_of(entry.get("config") or name)
    engine = entry.get("engine") or getattr(cfg, "engine", None)
    log_path = entry.get("log_path")
    server_command = entry.get("server_command")
    return ConfigProvenance(
        config_id=key,
        model=entry.get("model") or model,
        config=entry.get("config") or name,
        engine=engine,
        engine_version=_text(entry.get("engine_version")),
        engine_commit=_text(entry.get("engine_commit")),
        gpu_name=_text(entry.get("gpu_name")),
        gpu_count=_int(entry.get("gpu_count")),
        moe_backend=backend,
        moe_kernel=_text(entry.get("moe_kernel")) or (kernel_from_log(engine, Path(log_path)) if engine and log_path else None),
        server_command=redact(server_command) if isinstance(server_command, str) and server_command not in ("", "None") else None,
        config_hash=config_hash(cfg),
        repro_command=_text(entry.get("repro_command")),
        log_path=_text(log_path),
    )


def _text(value: Any) -> str | None:
    return None if value is None or value in ("", "None") else str(value)


class _KernelPattern(StrictModel):
    engines: list[StrictStr]
    pattern: StrictStr
    example: StrictStr
    source: StrictStr
    engine_version: StrictStr


class _KernelLogs(StrictModel):
    patterns: list[_KernelPattern]
    placeholders: list[StrictStr]


@lru_cache(maxsize=None)
def kernel_patterns() -> tuple[_KernelLogs, dict[str, list[re.Pattern[str]]]]:
    table = _KernelLogs.model_validate(load_yaml(KERNEL_LOGS_FILE))
    by_engine: dict[str, list[re.Pattern[str]]] = {}
    for p in table.patterns:
        for engine in p.engines:
            by_engine.setdefault(engine, []).append(re.compile(p.pattern))
    return table, by_engine


def kernel_from_text(engine: str, text: str) -> str | None:
    table, by_engine = kernel_patterns()
    for pattern in by_engine.get(engine, ()):
        for match in pattern.finditer(text):
            kernel = match.group("kernel").strip()
            if kernel not in table.placeholders:
                return kernel
    return None


def kernel_from_log(engine: str, path: Path) -> str | None:
    """The kernel the engine logged while loading; None when the log is gone or never said."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(KERNEL_LOG_HEAD_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    return kernel_from_text(engine, text)
