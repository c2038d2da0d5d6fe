"""The stand-in engine's ``engines.yaml`` entry (no side effects: ``fake_engine_plugin`` registers it)."""

import sys
from pathlib import Path

FAKE_ENGINE = {
    "adapter": "fake", "family": "fake", "family_title": "Fake", "distributions": [],
    "launch": [sys.executable, str(Path(__file__).with_name("fake_engine.py"))], "uses_gpus": False,
    "flags": {"model": "--model", "served_model_name": "--served-model-name", "tp": "--tp", "ep": "--ep",
              "quantization": "--quantization", "moe_backend": "--moe-backend", "mem_fraction": "--mem",
              "trust_remote_code": "--trust-remote-code", "host": "--host", "port": "--port",
              "nnodes": "--nnodes", "node_rank": "--node-rank", "dist_init_addr": "--dist-init-addr"},
    "ep_style": "size", "readiness_path": "/health", "models_path": "/v1/models",
    "profile": {"start": "/start_profile", "stop": "/stop_profile"},
    "default_mem_fraction": {"fraction": 0.5, "checked": {"version": "0", "source": "fake_engine.py"}},
    "plan_backends": ["auto"],
    "moe_backends": ["auto"], "log_patterns": {"loading": "starting", "http_up": "startup complete"},
}
