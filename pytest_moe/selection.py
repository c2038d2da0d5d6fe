"""Which configs of a run go ahead, which are skipped before boot (and why), and in what order.

Why its own module: the decision is the product's (GPU shortfall, preflight prediction, largest first),
not pytest's; the collection hook only applies it to items.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pytest_moe.gpus import GpuInfo, shortfall_reason
from pytest_moe.configs import Matrix, ServerConfig
from pytest_moe.preflight import Problem, check_config


@dataclass(frozen=True)
class Decision:
    """``skip_reason`` None means boot it; ``predicted`` holds the preflight problems behind a skip."""

    skip_reason: str | None = None
    predicted: tuple[Problem, ...] = ()


def unknown_config_ids(wanted: Iterable[str], matrix: Matrix | None) -> str | None:
    """The usage error for ``--moe-config`` ids the matrix does not have, or None."""
    known = sorted(matrix.by_id()) if matrix else []
    unknown = sorted(set(wanted) - set(known))
    if not unknown:
        return None
    if matrix is None:
        return f"--moe-config {unknown[0]!r}: no matrix is loaded to select it from; pass --moe-matrix PATH"
    return f"--moe-config {unknown[0]!r} is not a config of {matrix.path} (e.g. {', '.join(known[:3])})"


def decide(cfg: ServerConfig, host_gpus: list[GpuInfo], *, preflight: bool, nodes_offered: int) -> Decision:
    """Node shortfall, then GPU shortfall per node (neither needs the model), then preflight.

    Preflight sees ``nodes`` copies of this host's GPUs: the nodes of one allocation are alike.
    """
    if cfg.nodes > nodes_offered:
        return Decision(f"{cfg.id} needs {cfg.nodes} nodes, the executor offers {nodes_offered}")
    if cfg.gpus_per_node:
        reason = shortfall_reason(cfg.gpus_per_node, host_gpus)
        if reason:
            return Decision(f"{cfg.id} {reason}" + (" per node" if cfg.nodes > 1 else ""))
    problems = check_config(cfg, host_gpus * cfg.nodes) if preflight else None
    if not problems:
        return Decision()
    first = problems[0]
    return Decision(
        f"{cfg.id} predicted to fail ({first.prevents}) by preflight rule {first.rule_id}: {first.message}",
        tuple(problems),
    )


def run_order(cfg: ServerConfig | None) -> tuple[bool, int]:
    """Sort key: agreement references first (the other configs compare with this run's outputs), then
    configs needing the most GPUs first, so small ones fill the gaps of a shared node."""
    if cfg is None:
        return (True, 0)
    return (not cfg.is_reference, -cfg.gpus_needed)
