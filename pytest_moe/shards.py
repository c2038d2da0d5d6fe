"""Splitting a run's configs into N shards of about equal expected GPU-seconds (``--moe-shard K/N``).

Why longest-processing-time-first over *expected* cost, not round-robin over ids: one DeepSeek-V3 TP8
config costs as much as twenty TP1 configs of a small model, so equal counts give shards that finish hours
apart (SGLang partitions its CI suites the same way, by measured duration, longest first).  The cost of a
config is ``GPUs x seconds``: its measured median duration when the history has one, else an estimate
from what dominates a cell — loading the weights and running the benchmark.

Everything here is a pure function of its inputs (no clock, no randomness, no process state), so every
shard job of one nightly computes the same partition and the shards together are exactly the selection.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

#: Fixed part of a boot: interpreter and engine import, process-group set-up, CUDA-graph capture, warm-up.
BOOT_FIXED_S = 120.0
#: Weight loading rate per GPU, bytes/s (safetensors from local NVMe; each rank reads its own slice).
LOAD_BYTES_PER_S_PER_GPU = 1.0e9
#: Prefill and decode rates assumed for the benchmark estimate (tokens/s at batch 1).
PREFILL_TOK_PER_S = 8000.0
DECODE_TOK_PER_S = 40.0
#: Weight size assumed when neither the checkpoint nor the model name says (a mid-size MoE, ~100 GB).
DEFAULT_WEIGHT_BYTES = 100e9
#: Parameter counts written in model names: "Qwen3-235B-A22B" → 235e9, "Mixtral-8x7B" → 56e9.
_NAME_PARAMS = re.compile(r"(?:(\d+)x)?(\d+(?:\.\d+)?)([BM])(?![a-z])", re.IGNORECASE)


class ShardError(ValueError):
    """A malformed ``--moe-shard`` value; the message names the option and what is allowed."""


class Sharded(Protocol):
    """What the partition needs from a config (``ServerConfig`` has it; tests pass small fakes)."""

    @property
    def id(self) -> str: ...
    @property
    def gpus_needed(self) -> int: ...


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` → ``Shard(2, 4)``; 1 <= K <= N, as GitHub's and Buildkite's matrix numbers run from 1 and 0."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise ShardError(f"--moe-shard {text!r} is not K/N (e.g. 1/4)")
    index, count = int(match[1]), int(match[2])
    if count < 1 or not 1 <= index <= count:
        raise ShardError(f"--moe-shard {text!r}: K must be between 1 and N (N >= 1), e.g. 1/{max(count, 1)}")
    return Shard(index, count)


def params_from_name(*names: str) -> float | None:
    """Total parameters written in a model name or path, or None; ``8x7B`` counts all experts."""
    for name in names:
        found = [(float(m[1] or 1) * float(m[2]) * (1e9 if m[3].upper() == "B" else 1e6)) for m in _NAME_PARAMS.finditer(name)]
        if found:
            return max(found)  # "235B-A22B": the total, not the active count
    return None


def estimate_seconds(cfg, weight_bytes: float | None = None) -> float:
    """Expected wall seconds of one cell: fixed boot + loading its weights over its GPUs + the benchmark.

    ``weight_bytes`` comes from the checkpoint when known; else the name's parameter count at the config's
    precision (1 byte for FP8, 2 otherwise); else ``DEFAULT_WEIGHT_BYTES``.
    """
    if weight_bytes is None:
        params = params_from_name(cfg.model, cfg.model_path)
        weight_bytes = params * (1 if cfg.precision == "fp8" else 2) if params else DEFAULT_WEIGHT_BYTES
    load_s = weight_bytes / (LOAD_BYTES_PER_S_PER_GPU * max(cfg.gpus_needed, 1))
    bench = cfg.bench
    per_run = bench.input_len / PREFILL_TOK_PER_S + bench.output_len / DECODE_TOK_PER_S
    return BOOT_FIXED_S + load_s + (bench.warmup + 1) * per_run


def expected_cost(cfg, durations: Mapping[str, float], estimate: Callable[[object], float]) -> float:
    """GPU-seconds: measured median duration when known, else the estimate; a CPU config counts one slot."""
    seconds = durations.get(cfg.id)
    return max(cfg.gpus_needed, 1) * (seconds if seconds is not None else estimate(cfg))


def partition(
    configs: Sequence[Sharded],
    count: int,
    durations: Mapping[str, float] | None = None,
    estimate: Callable[[object], float] = estimate_seconds,
) -> list[list[Sharded]]:
    """Greedy LPT: most expensive config first, each to the currently lightest shard (ties: lowest index).

    Ordering by ``(-cost, id)`` makes the result independent of the input order.
    """
    durations = durations or {}
    costs = {cfg.id: expected_cost(cfg, durations, estimate) for cfg in configs}
    shards: list[list[Sharded]] = [[] for _ in range(count)]
    loads = [0.0] * count
    for cfg in sorted(configs, key=lambda c: (-costs[c.id], c.id)):
        lightest = min(range(count), key=lambda i: (loads[i], i))
        shards[lightest].append(cfg)
        loads[lightest] += costs[cfg.id]
    return shards


def shard_loads(shards: Sequence[Sequence[Sharded]], durations: Mapping[str, float] | None = None,
                estimate: Callable[[object], float] = estimate_seconds) -> list[float]:
    """Expected GPU-seconds per shard, for the report line and the balance figures."""
    return [sum(expected_cost(cfg, durations or {}, estimate) for cfg in shard) for shard in shards]


def select(configs: Sequence[Sharded], shard: Shard, durations: Mapping[str, float] | None = None,
           estimate: Callable[[object], float] = estimate_seconds) -> list[Sharded]:
    """The configs of ``shard`` (its members, in the order given)."""
    keep = {cfg.id for cfg in partition(configs, shard.count, durations, estimate)[shard.index - 1]}
    return [cfg for cfg in configs if cfg.id in keep]
