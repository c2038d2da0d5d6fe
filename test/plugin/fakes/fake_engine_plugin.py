"""``-p fake_engine_plugin`` (with ``test/plugin/fakes`` on PYTHONPATH): matrices may say ``engine: fake``.

Why a plugin rather than a monkeypatch: Slurm jobs and pytester subprocesses are separate processes that
only share the command line and the environment.  The stand-in engine is the generic adapter over
``fake_engine.py``, with SGLang's multi-node flags; it uses no GPU.
"""

import sys
from pathlib import Path

import pytest_moe.engines as engines

FAKE_ENGINE = {
    "adapter": "fake", "distributions": [], "launch": [sys.executable, str(Path(__file__).with_name("fake_engine.py"))],
    "uses_gpus": False,
    "flags": {"model": "--model", "served_model_name": "--served-model-name", "tp": "--tp", "ep": "--ep",
              "quantization": "--quantization", "moe_backend": "--moe-backend", "host": "--host", "port": "--port",
              "nnodes": "--nnodes", "node_rank": "--node-rank", "dist_init_addr": "--dist-init-addr"},
    "ep_style": "size", "readiness_path": "/health", "models_path": "/v1/models", "profile": {},
    "moe_backends": ["auto"], "log_patterns": {"loading": "starting", "http_up": "startup complete"},
}
_load_yaml = engines.load_yaml


def _with_fake(name: str):
    data = _load_yaml(name)
    return {**data, "fake": FAKE_ENGINE} if name == "engines.yaml" else data


engines.load_yaml = _with_fake
engines._ADAPTERS["fake"] = engines.Engine
