"""The config records every stage passes along: what one matrix cell is and how it is benchmarked.

Why a leaf module (it imports nothing of pytest_moe): engines, preflight, the benchmark and the runner
all take a ``ServerConfig``; if it lived in ``matrix.py`` they would import the matrix loader (and,
through it, the engines and the error catalog) just to name a type.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PositiveInt

CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _printable(value: str) -> str:
    if CONTROL_CHARS.search(value):
        raise ValueError("control characters (newline, tab, NUL, ...) are not allowed")
    return value


#: A string without control characters (they would break ids, logs and the server's command line).
Text = Annotated[str, AfterValidator(_printable)]


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regex ({exc})") from None
    return value


#: A Python regular expression, checked when the data file is read rather than when it is first used.
Regex = Annotated[str, AfterValidator(_compiles)]


class StrictModel(BaseModel):
    """Every schema block of our YAML: unknown keys rejected, no coercion ("8" is not 8), no inf/nan."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class FrozenModel(StrictModel):
    """A ``StrictModel`` whose instances are hashable and read-only (cached lookups hand them out)."""

    model_config = ConfigDict(frozen=True)


class BenchSpec(StrictModel):
    """The benchmark shape: batch 1, 4096 in, 512 out in the seeds; ``batch_sizes`` sweeps (SGLang: 1, 8, 16, 64)."""

    batch_size: int = Field(1, gt=0, le=4096)
    batch_sizes: list[Annotated[int, Field(gt=0, le=4096)]] | None = Field(None, min_length=1, max_length=64)
    input_len: int = Field(4096, gt=0, le=1 << 20)
    output_len: int = Field(512, gt=0, le=1 << 20)
    warmup: int = Field(1, ge=0, le=100)

    @property
    def sweep(self) -> list[int]:
        """Batch sizes measured, in order; the first one's row is the entry's flat (seed) fields."""
        return list(self.batch_sizes or [self.batch_size])

    def at(self, batch_size: int) -> BenchSpec:
        """This shape at one batch size (what ``bench.run_benchmark`` measures)."""
        return self.model_copy(update={"batch_size": batch_size, "batch_sizes": None})


class AccuracySpec(StrictModel):
    """gsm8k-style few-shot check; ``floor`` is per model (a floor copied between models is sglang PR 38725's bug)."""

    floor: float | None = Field(None, ge=0, le=1)
    n: int = Field(50, gt=0, le=100_000)
    shots: int = Field(5, ge=0, le=64)
    dataset: Text | None = None
    max_tokens: int = Field(64, gt=0, le=1 << 16)
    confidence: float = Field(0.99, gt=0.5, lt=1)
    parallel: int = Field(8, gt=0, le=1024)


class AgreementSpec(StrictModel):
    """Seed 004's oracle: every config of a model must answer like its ``reference`` config."""

    reference: Text | None = None
    threshold: float = Field(1.0, ge=0, le=1)
    max_tokens: int = Field(32, gt=0, le=1 << 16)


class KernelSpec(StrictModel):
    """The kernel check (seed 003): batch sizes (default: seed 003's), timing, extra tuned-config folders.

    ``tuned_config_dirs`` are folders of tuned fused-MoE files (e.g. a ``benchmark_moe.py --tune``
    run), relative to the matrix file; the server reads one only through the engine's own variable
    (``env: {VLLM_TUNED_CONFIG_FOLDER: ...}``), see docs/kernels.md.
    """

    batch_sizes: list[Annotated[PositiveInt, Field(le=1 << 16)]] | None = Field(None, min_length=1)
    warmup: int = Field(3, ge=0, le=1000)
    repeats: int = Field(20, gt=0, le=10000)
    tuned_config_dirs: list[Text] = []


class KnownFailure(StrictModel):
    """A config expected to fail this way: it xfails on that error type and fails on any other outcome.

    A waiver has an owner and an end (pytest_moe/waivers.py): the ``issue`` tracking the failure and
    the date it ``expires``, after which it no longer applies; ``added`` dates it for the listing.
    """

    error_type: Text
    reason: Text
    issue: str = Field(pattern=r"^https?://\S+$")
    expires: date
    added: date | None = None


class HistorySettings(StrictModel):
    """How the run history judges tonight (docs/history.md): relative thresholds per metric and per model.

    Metric names are checked against the history's metric table when the matrix loads (matrix.py).
    """

    baseline_nights: int = Field(7, gt=0, le=1000)
    min_nights: int = Field(3, gt=0, le=1000)
    noise_k: float = Field(3.0, gt=0, le=100)
    default_relative: float = Field(0.05, ge=0, le=10)
    relative: dict[Text, Annotated[float, Field(ge=0, le=10)]] = {}
    models: dict[Text, dict[Text, Annotated[float, Field(ge=0, le=10)]]] = {}

    def relative_for(self, model: str, metric: str) -> float:
        """Model-specific threshold > metric threshold > the default."""
        return self.models.get(model, {}).get(metric, self.relative.get(metric, self.default_relative))


@dataclass(frozen=True)
class ServerConfig:
    """One cell of the matrix: everything needed to boot, benchmark and record it."""

    model: str
    name: str
    model_path: str
    engine: str
    tp: int
    ep: int
    precision: str
    quantization: str | None
    moe_backend: str
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    timeout_s: float
    host: str
    bench: BenchSpec
    known_failure: KnownFailure | None
    matrix_path: str
    #: From the engine's spec at resolve time, so this record needs no engine lookup (``vllm-cpu``: False).
    uses_gpus: bool = True
    #: Nodes one server spans (TP16 = 2 nodes x 8 GPUs); the TP ranks split evenly over them.
    nodes: int = 1
    accuracy: AccuracySpec = field(default_factory=AccuracySpec)
    agreement: AgreementSpec = field(default_factory=AgreementSpec)

    @property
    def is_reference(self) -> bool:
        """This config's greedy outputs are what the model's other configs are compared with."""
        return self.agreement.reference == self.name

    @property
    def id(self) -> str:
        """``model::config``, the key of the results files and the test id."""
        return f"{self.model}::{self.name}"

    @property
    def gpus_per_node(self) -> int:
        """GPUs each node gives the server; CPU engines need none."""
        return self.tp // self.nodes if self.uses_gpus else 0

    @property
    def gpus_needed(self) -> int:
        """GPUs this config occupies in all: nodes x GPUs per node."""
        return self.nodes * self.gpus_per_node

    @property
    def markers(self) -> list[str]:
        """Marker names: ``tpN``, ``gpusN``, the precision, the engine (``vllm-cpu`` → ``vllm_cpu``), ``nodesN`` past one."""
        marks = [f"tp{self.tp}", f"gpus{self.gpus_needed}", self.precision, engine_marker(self.engine)]
        return marks + ([f"nodes{self.nodes}"] if self.nodes > 1 else [])


@dataclass(frozen=True)
class Matrix:
    path: Path
    configs: list[ServerConfig]
    kernel: KernelSpec = field(default_factory=KernelSpec)
    history: HistorySettings = field(default_factory=HistorySettings)

    def by_id(self) -> dict[str, ServerConfig]:
        return {cfg.id: cfg for cfg in self.configs}


def engine_marker(engine: str) -> str:
    """The marker of an engine's configs: its name as a Python identifier (``vllm-cpu`` → ``vllm_cpu``)."""
    return engine.replace("-", "_")


def config_name(tp: int, ep: int, backend: str, nodes: int = 1) -> str:
    """The seeds' config naming: ``TP4_auto``, ``TP8_EP2_auto``; ``TP16_N2_auto`` for a two-node server."""
    return f"TP{tp}" + (f"_EP{ep}" if ep > 1 else "") + (f"_N{nodes}" if nodes > 1 else "") + f"_{backend}"


