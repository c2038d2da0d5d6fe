"""The config records every stage passes along: what one matrix cell is and how it is benchmarked.

Why a leaf module (it imports nothing of pytest_moe): engines, preflight, the benchmark and the runner
all take a ``ServerConfig``; if it lived in ``matrix.py`` they would import the matrix loader (and,
through it, the engines and the error catalog) just to name a type.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BenchSpec(_Strict):
    """The benchmark shape: batch 1, 4096 in, 512 out in the seeds."""

    batch_size: int = Field(1, gt=0)
    input_len: int = Field(4096, gt=0)
    output_len: int = Field(512, gt=0)
    warmup: int = Field(1, ge=0)


class KnownFailure(_Strict):
    """A config expected to fail this way: it xfails on that error type and fails on any other outcome."""

    error_type: str
    reason: str


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

    @property
    def id(self) -> str:
        """``model::config``, the key of the results files and the test id."""
        return f"{self.model}::{self.name}"

    @property
    def gpus_needed(self) -> int:
        """GPUs this config occupies; CPU engines need none."""
        return self.tp if self.uses_gpus else 0

    @property
    def markers(self) -> list[str]:
        """Marker names: ``tpN``, ``gpusN``, the precision and the engine (``vllm-cpu`` → ``vllm_cpu``)."""
        return [f"tp{self.tp}", f"gpus{self.gpus_needed}", self.precision, engine_marker(self.engine)]


@dataclass(frozen=True)
class Matrix:
    path: Path
    configs: list[ServerConfig]

    def by_id(self) -> dict[str, ServerConfig]:
        return {cfg.id: cfg for cfg in self.configs}


def engine_marker(engine: str) -> str:
    """The marker of an engine's configs: its name as a Python identifier (``vllm-cpu`` → ``vllm_cpu``)."""
    return engine.replace("-", "_")


def config_name(tp: int, ep: int, backend: str) -> str:
    """The seeds' config naming: ``TP4_auto``, ``TP8_EP2_auto``."""
    return f"TP{tp}" + (f"_EP{ep}" if ep > 1 else "") + f"_{backend}"


