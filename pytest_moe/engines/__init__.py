"""Engine adapters by name. The table of engines is ``data/engines.yaml``; adapters add behaviour only."""

from __future__ import annotations

from functools import lru_cache

from pytest_moe.datafiles import load_yaml
from pytest_moe.engines.base import CommandRejected, Engine, EngineSpec
from pytest_moe.engines.sglang import SGLangEngine
from pytest_moe.engines.vllm import VLLMCPUEngine, VLLMEngine

_ADAPTERS: dict[str, type[Engine]] = {"sglang": SGLangEngine, "vllm": VLLMEngine, "vllm-cpu": VLLMCPUEngine}

__all__ = ["CommandRejected", "Engine", "EngineSpec", "engine_names", "get_engine"]


def engine_names() -> list[str]:
    """Names a matrix may use for ``engine``."""
    return sorted(load_yaml("engines.yaml"))


@lru_cache(maxsize=None)
def get_engine(name: str) -> Engine:
    """The adapter for engine ``name`` (validated names only: the matrix checks them first)."""
    spec = EngineSpec.from_yaml(name, load_yaml("engines.yaml")[name])
    return _ADAPTERS[spec.adapter](spec)
