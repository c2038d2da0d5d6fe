"""Tuned fused-MoE kernel config files: what the engine calls them and whether one is there.

Why: when no tuned file matches a shape on a GPU the engine silently runs default Triton kernel
parameters, and a serving benchmark is slower for a reason nobody sees (seed 003). The engine decides
by file name alone, so pytest-moe computes the same name — with the engine's own function where it
imports, else with the rule recorded in ``data/kernel_configs.yaml`` (a test checks the two agree on
every file the engine ships) — and looks where the engine looks.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal
from unittest import mock

from pydantic import BaseModel, ValidationError

from pytest_moe.configs import StrictModel
from pytest_moe.datafiles import load_yaml

KERNEL_FILE = "kernel_configs.yaml"
GPUS_FILE = "gpus.yaml"


class CheckedAgainst(StrictModel):
    engine: str
    version: str
    source: str


class EngineNaming(StrictModel):
    """One engine's tuned-config facts (see the comments in ``kernel_configs.yaml``)."""

    applies_to: list[str]
    checked_against: CheckedAgainst
    naming_function: str
    device_name_hook: str
    family_aliases: dict[str, str]
    block_shape_format: str
    package: str
    shipped_dir: str
    versioned_subdirs: bool
    user_dir_env: str
    user_dir_replaces_shipped: bool
    refines_fp8_blocks: bool
    triton_backends: list[str]


class DtypeRule(StrictModel):
    method: str
    bits: int | None
    dtype: str
    block_shape: bool


class KernelData(StrictModel):
    engines: dict[str, EngineNaming]
    dtypes: list[DtypeRule]
    unquantized_dtypes: dict[str, str]
    default_batch_sizes: list[int]


class GpuEntry(StrictModel):
    """An entry of ``data/gpus.yaml``; only ``kernel_device_name`` is read here."""

    aliases: list[str] = []
    memory_mib: int
    compute_capability: list[int]
    kernel_device_name: str


class GpuCatalog(StrictModel):
    gpus: dict[str, GpuEntry]


@lru_cache(maxsize=None)
def kernel_data() -> KernelData:
    """``data/kernel_configs.yaml``, validated once."""
    return _validated(KernelData, KERNEL_FILE)


@lru_cache(maxsize=None)
def gpu_catalog() -> GpuCatalog:
    return _validated(GpuCatalog, GPUS_FILE)


def _validated(schema: type[BaseModel], name: str):
    try:
        return schema.model_validate(load_yaml(name))
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ValueError(f"pytest_moe/data/{name}: {where}: {err['msg']}") from None


def naming_for(engine: str) -> tuple[str, EngineNaming]:
    """The naming facts for a matrix engine name (``vllm-cpu`` shares vLLM's)."""
    for name, facts in kernel_data().engines.items():
        if engine in facts.applies_to:
            return name, facts
    raise ValueError(f"engine {engine!r} has no tuned-kernel naming in pytest_moe/data/{KERNEL_FILE}")


def kernel_device_name(gpu: str) -> str:
    """The device part of a tuned file name for a GPU named as ``--gpu`` or NVML names it."""
    wanted = gpu.strip().lower().removeprefix("nvidia ").strip()
    for key, entry in gpu_catalog().gpus.items():
        if wanted in {key.lower(), *(a.lower() for a in entry.aliases)} or wanted == entry.kernel_device_name.lower():
            return entry.kernel_device_name
    known = ", ".join(gpu_catalog().gpus)
    raise ValueError(f"unknown GPU {gpu!r} (pytest_moe/data/{GPUS_FILE}); known: {known}")


@dataclass(frozen=True)
class KernelShape:
    """The fused-MoE problem one rank runs, in the engine's terms.

    ``experts`` are the rank's local experts (all of them without expert parallelism), ``n`` the
    per-rank intermediate size the tuned file is named by (w2 is experts x hidden x n; the gate-up
    weight w13 is experts x 2n x hidden), ``dtype`` the file's dtype selector (None for bf16/fp16).
    """

    experts: int
    global_experts: int
    n: int
    hidden: int
    top_k: int
    dtype: str | None
    block_shape: tuple[int, int] | None
    activation_dtype: str

    def describe(self) -> str:
        block = f" block={list(self.block_shape)}" if self.block_shape else ""
        return (f"E={self.experts}/{self.global_experts} N={self.n} K={self.hidden} top_k={self.top_k} "
                f"dtype={self.dtype or self.activation_dtype}{block}")


# --------------------------------------------------------------------------- file names


def rule_file_name(engine: str, shape: KernelShape, device_name: str) -> str:
    """The file name by the rule recorded in ``kernel_configs.yaml`` (no engine import)."""
    _, facts = naming_for(engine)
    device = next((alias for family, alias in facts.family_aliases.items()
                   if family in device_name.split("_")), device_name)
    dtype = f",dtype={shape.dtype}" if shape.dtype else ""
    block = ""
    if shape.block_shape and all(shape.block_shape):
        block = ",block_shape=" + facts.block_shape_format.format(n=shape.block_shape[0], k=shape.block_shape[1])
    return f"E={shape.experts},N={shape.n},device_name={device}{dtype}{block}.json"


def engine_naming_function(engine: str) -> Callable[..., str] | None:
    """The engine's own ``get_config_file_name`` with the device swapped in, or None where it does not import."""
    _, facts = naming_for(engine)
    module_name, func_name = facts.naming_function.split(":")
    if importlib.util.find_spec(facts.package) is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception:  # an engine that fails to import (missing optional deps) leaves the rule to name files
        return None
    func = getattr(module, func_name)

    def name(shape: KernelShape, device_name: str) -> str:
        # The engine reads the device from the running platform; the hook is the one name it calls.
        with mock.patch.object(module, facts.device_name_hook, lambda *a, **k: device_name):
            block = list(shape.block_shape) if shape.block_shape else None
            return func(shape.experts, shape.n, shape.dtype, block)

    return name


def tuned_file_name(engine: str, shape: KernelShape, device_name: str) -> tuple[str, Literal["engine", "rule"]]:
    """The file name and whether the engine's function (``engine``) or the recorded rule (``rule``) gave it."""
    func = _cached_engine_function(engine)
    if func is not None:
        return func(shape, device_name), "engine"
    return rule_file_name(engine, shape, device_name), "rule"


@lru_cache(maxsize=None)
def _cached_engine_function(engine: str) -> Callable[..., str] | None:
    if os.environ.get("PYTEST_MOE_KERNEL_NAMING") == "rule":
        return None
    return engine_naming_function(engine)


# --------------------------------------------------------------------------- where the engine looks


def shipped_dir(engine: str) -> Path | None:
    """The engine's packaged configs folder, found without importing the engine."""
    _, facts = naming_for(engine)
    spec = importlib.util.find_spec(facts.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / facts.shipped_dir
    return folder if folder.is_dir() else None


def _candidates(folder: Path, name: str, versioned: bool) -> list[Path]:
    if not versioned:
        return [folder / name]
    subdirs = sorted((d for d in folder.glob("triton_*") if d.is_dir()), key=_triton_version, reverse=True)
    return [d / name for d in subdirs]


def _triton_version(path: Path) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


@dataclass(frozen=True)
class Coverage:
    """Whether a tuned file exists for one shape on one GPU, and where."""

    file_name: str
    named_by: str
    path: str | None
    searched: tuple[str, ...]

    @property
    def covered(self) -> bool:
        return self.path is not None


def find_tuned_config(engine: str, shape: KernelShape, device_name: str,
                      env: dict[str, str] | None = None, extra_dirs: tuple[str, ...] = ()) -> Coverage:
    """Look where the engine looks (its user folder from ``env``, then its package) and in ``extra_dirs``.

    ``env`` is the config's server environment over this process's; ``extra_dirs`` are the matrix's
    ``kernel.tuned_config_dirs`` (folders of tuned files, flat or in ``triton_*`` sub-folders).
    """
    _, facts = naming_for(engine)
    name, named_by = tuned_file_name(engine, shape, device_name)
    merged = {**os.environ, **(env or {})}
    folders: list[tuple[Path, bool]] = [(Path(d).expanduser(), any(Path(d).expanduser().glob("triton_*")))
                                        for d in extra_dirs]
    user = merged.get(facts.user_dir_env)
    if user:
        root = Path(user).expanduser()
        folders.append((root / "configs" if facts.versioned_subdirs else root, facts.versioned_subdirs))
    if not (user and facts.user_dir_replaces_shipped):
        shipped = shipped_dir(engine)
        if shipped is not None:
            folders.append((shipped, facts.versioned_subdirs))
    searched: list[str] = []
    for folder, versioned in folders:
        searched.append(str(folder))
        for candidate in _candidates(folder, name, versioned):
            if candidate.is_file():
                return Coverage(name, named_by, str(candidate), tuple(searched))
    return Coverage(name, named_by, None, tuple(searched))


def refined_block(block: tuple[int, int], n: int, hidden: int, moe_tp: int) -> tuple[int, int]:
    """vLLM's ``refine_fp8_moe_block_shape``: the block an undividable TP shard is refined to."""
    block_n, block_k = block
    if n % block_n == 0 and (moe_tp == 1 or n % block_k == 0):
        return block
    refine = math.gcd(block_n, block_k, n, hidden)
    return (refine, refine) if refine >= 32 else block
