"""``--moe-shard K/N`` at collection: keep this shard's configs of whatever the other options selected.

Why ``trylast``: the partition must be computed over the same set in every shard job, i.e. after ``-m``,
``-k`` and ``--moe-config`` have deselected (they depend only on the command line, which the shard jobs
share); the partition itself lives in ``shards.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from pytest_moe.models import ModelInspectionError, inspect_model
from pytest_moe.shards import Shard, ShardError, estimate_seconds, parse_shard, select, shard_loads
from pytest_moe.tiny import resolve_model_path

_DURATIONS = TypeAdapter(dict[str, float])


def load_durations(path: str | None) -> dict[str, float]:
    """``{config id: median seconds}`` (the history's export); {} when no file is given."""
    if not path:
        return {}
    try:
        return _DURATIONS.validate_python(json.loads(Path(path).read_text(encoding="utf-8")), strict=True)
    except OSError as exc:
        raise pytest.UsageError(f"--moe-durations {path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, ValidationError) as exc:
        raise pytest.UsageError(f"--moe-durations {path}: must be a JSON object of config id -> seconds ({str(exc).splitlines()[0]})") from None


def _estimate(cfg) -> float:
    """The estimate, with the checkpoint's real weight size when its config.json is on this machine."""
    try:
        weight_bytes = inspect_model(resolve_model_path(cfg.model_path, build=False)).weight_bytes
    except (ModelInspectionError, OSError):
        weight_bytes = None
    return estimate_seconds(cfg, weight_bytes)


class ShardPlugin:
    def __init__(self, config: pytest.Config):
        self.shard: Shard | None = None
        self.summary: str | None = None
        if config.option.moe_shard:
            try:
                self.shard = parse_shard(config.option.moe_shard)
            except ShardError as exc:
                raise pytest.UsageError(str(exc)) from None
        self.durations = load_durations(config.option.moe_durations)

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        if self.shard is None:
            return
        by_id = {}
        for item in items:
            cfg = _config(item)
            if cfg is not None:
                by_id.setdefault(cfg.id, cfg)
        kept = {cfg.id for cfg in select(list(by_id.values()), self.shard, self.durations, _estimate)}
        keep = [it for it in items if _config(it) is None or _config(it).id in kept]
        config.hook.pytest_deselected(items=[it for it in items if it not in keep])
        items[:] = keep
        mine = [cfg for cfg_id, cfg in by_id.items() if cfg_id in kept]
        hours = shard_loads([mine], self.durations, _estimate)[0] / 3600
        self.summary = f"pytest-moe shard {self.shard}: {len(mine)} of {len(by_id)} configs, ~{hours:.1f} GPU-hours expected"

    def pytest_report_collectionfinish(self, config: pytest.Config) -> str | None:
        return self.summary


def _config(item: pytest.Item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("moe_config") if callspec else None
