"""``-p fake_engine_plugin`` (with ``test/plugin/fakes`` on PYTHONPATH): matrices may say ``engine: fake``.

Why a plugin rather than a monkeypatch: Slurm jobs and pytester subprocesses are separate processes that
only share the command line and the environment.  The stand-in engine is the generic adapter over
``fake_engine.py``, with SGLang's multi-node flags; it uses no GPU.
"""

import pytest_moe.engines as engines
from fake_engine_spec import FAKE_ENGINE

_load_yaml = engines.load_yaml


def _with_fake(name: str):
    data = _load_yaml(name)
    return {**data, "fake": FAKE_ENGINE} if name == "engines.yaml" else data


engines.load_yaml = _with_fake
engines._ADAPTERS["fake"] = engines.Engine
