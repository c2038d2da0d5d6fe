"""Engine adapters by name. The table of engines is ``data/engines.yaml``; adapters add behaviour only.

Why extra tables: an engine is its ``engines.yaml`` block plus one adapter class, so a site (or a test)
adds one without editing this package: ``PYTEST_MOE_ENGINES`` lists more YAML files (``os.pathsep``
separated) whose blocks name their adapter as ``module:Class``.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import ValidationError

from pytest_moe.datafiles import load_yaml
from pytest_moe.engines.base import CommandRejected, Engine, EngineSpec, EpStyle
from pytest_moe.engines.sglang import SGLangEngine
from pytest_moe.engines.vllm import VLLMCPUEngine, VLLMEngine

_ADAPTERS: dict[str, type[Engine]] = {"sglang": SGLangEngine, "vllm": VLLMEngine, "vllm-cpu": VLLMCPUEngine}
#: Environment variable naming extra engine tables.
ENGINES_ENV = "PYTEST_MOE_ENGINES"

__all__ = ["CommandRejected", "Engine", "EngineSpec", "EngineTableError", "EpStyle", "engine_names", "forget_tables",
           "get_engine"]


class EngineTableError(ValueError):
    """An engine table is malformed; the message names the file, the engine and the key."""


def engine_names() -> list[str]:
    """Names a matrix may use for ``engine``."""
    return sorted(_engines())


def get_engine(name: str) -> Engine:
    """The adapter for engine ``name``."""
    engines = _engines()
    if name not in engines:
        raise EngineTableError(f"unknown engine {name!r} (known: {', '.join(sorted(engines))})")
    return engines[name]


def forget_tables() -> None:
    """Read the engine tables again on next use: a pytest run started in this process may add engines
    (``PYTEST_MOE_ENGINES``, or a plugin given with ``-p``) after an earlier run read them."""
    _specs.cache_clear()
    _engines.cache_clear()


@lru_cache(maxsize=1)
def _engines() -> dict[str, Engine]:
    return {name: _adapter(spec, where)(spec) for name, (spec, where) in _specs().items()}


@lru_cache(maxsize=1)
def _specs() -> dict[str, tuple[EngineSpec, str]]:
    tables = [("pytest_moe/data/engines.yaml", load_yaml("engines.yaml"))]
    for extra in filter(None, os.environ.get(ENGINES_ENV, "").split(os.pathsep)):
        try:
            tables.append((extra, yaml.safe_load(Path(extra).read_text(encoding="utf-8"))))
        except (OSError, yaml.YAMLError) as exc:
            raise EngineTableError(f"{ENGINES_ENV}: cannot read engine table {extra}: {exc}") from None
    specs: dict[str, tuple[EngineSpec, str]] = {}
    for where, table in tables:
        if not isinstance(table, dict):
            raise EngineTableError(f"{where}: an engine table must map engine names to their blocks")
        for name, raw in table.items():
            if name in specs:
                raise EngineTableError(f"{where}: engine {name!r} is already defined in {specs[name][1]}")
            try:
                specs[name] = (EngineSpec.from_yaml(name, raw), where)
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(k) for k in err["loc"])
                raise EngineTableError(f"{where}: engine {name}: {key or '(block)'}: {err['msg']}") from None
    return specs


def _adapter(spec: EngineSpec, where: str) -> type[Engine]:
    """A built-in adapter by name, or ``module:Class`` for an engine added from outside the package."""
    if spec.adapter in _ADAPTERS:
        return _ADAPTERS[spec.adapter]
    module, _, cls = spec.adapter.partition(":")
    try:
        adapter = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError, ValueError) as exc:
        raise EngineTableError(f"{where}: engine {spec.name}: adapter {spec.adapter!r} cannot be imported ({exc})") from None
    if not (isinstance(adapter, type) and issubclass(adapter, Engine)):
        raise EngineTableError(f"{where}: engine {spec.name}: adapter {spec.adapter!r} is not an Engine subclass")
    return adapter
