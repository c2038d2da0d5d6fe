"""The stand-in engine (fake_engine.py) as an ``Engine``, built once here for every unit test that needs one.

Why one place: the engine table's schema is strict, so a copy of the table in each test file breaks in
each file when the schema grows a field.
"""

from __future__ import annotations

import signal

from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.engines.base import Engine, EngineSpec

from fakes.fake_engine_spec import FAKE_ENGINE


def fake_engine(*extra: str) -> Engine:
    """The stand-in with ``extra`` engine arguments (``--ready-after 1``, ``--exit-after 0.2``, ...)."""
    return Engine(EngineSpec.from_yaml("fake", {**FAKE_ENGINE, "args": list(extra)}))


def fake_config(name: str = "TP1_auto", tp: int = 1, timeout_s: float = 30, env: tuple = (),
                bench: BenchSpec | None = None) -> ServerConfig:
    """A config of the stand-in engine (model ``fake``), with the seed's benchmark unless ``bench`` is given."""
    return ServerConfig(
        model="fake", name=name, model_path="/m", engine="fake", tp=tp, ep=1, precision="native",
        quantization=None, moe_backend="auto", args=(), env=env, timeout_s=timeout_s, host="127.0.0.1",
        bench=bench or BenchSpec(), known_failure=None, matrix_path="m.yaml",
    )


def interruptible() -> None:
    """``preexec_fn`` of a child Python that a test interrupts with SIGINT.

    A shell starts background jobs (``cmd &``, CI steps run that way, nohup) with SIGINT ignored, the child
    inherits that, and Python then installs no KeyboardInterrupt handler: the test's Ctrl-C would do nothing and
    the child would run on.  Restored to the default, Python turns SIGINT into KeyboardInterrupt as in a terminal.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
