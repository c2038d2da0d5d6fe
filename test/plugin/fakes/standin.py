"""The stand-in engine (fake_engine.py) as an ``Engine``, built once here for every unit test that needs one.

Why one place: the engine table's schema is strict, so a copy of the table in each test file breaks in
each file when the schema grows a field.
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.engines.base import Engine, EngineSpec

FAKE = str(Path(__file__).parent / "fake_engine.py")


def fake_engine(*extra: str) -> Engine:
    """The stand-in with ``extra`` engine arguments (``--ready-after 1``, ``--exit-after 0.2``, ...)."""
    return Engine(EngineSpec.from_yaml("fake", {
        "adapter": "fake", "family": "fake", "family_title": "Fake", "distributions": [],
        "launch": [sys.executable, FAKE], "uses_gpus": False,
        "flags": {"model": "--model", "served_model_name": "--served-model-name", "tp": "--tp", "ep": "--ep",
                  "quantization": "--quantization", "moe_backend": "--moe-backend", "mem_fraction": "--mem",
                  "trust_remote_code": "--trust-remote-code", "host": "--host", "port": "--port"},
        "ep_style": "size", "readiness_path": "/health", "models_path": "/v1/models",
        "profile": {"start": "/start_profile", "stop": "/stop_profile"},
        "default_mem_fraction": {"fraction": 0.5, "checked": {"version": "0", "source": "fake_engine.py"}},
        "plan_backends": ["auto"],
        "moe_backends": ["auto"], "log_patterns": {"loading": "starting", "http_up": "startup complete"},
        "args": list(extra),
    }))


def fake_config(name: str = "TP1_auto", tp: int = 1, timeout_s: float = 30, env: tuple = (),
                bench: BenchSpec | None = None) -> ServerConfig:
    """A config of the stand-in engine (model ``fake``), with the seed's benchmark unless ``bench`` is given."""
    return ServerConfig(
        model="fake", name=name, model_path="/m", engine="fake", tp=tp, ep=1, precision="native",
        quantization=None, moe_backend="auto", args=(), env=env, timeout_s=timeout_s, host="127.0.0.1",
        bench=bench or BenchSpec(), known_failure=None, matrix_path="m.yaml",
    )
