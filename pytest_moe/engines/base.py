"""What every engine adapter shares: the engine's data from ``engines.yaml`` and the generic behaviour.

Why data plus a thin adapter: the lifecycle code (``server.py``) and the benchmark only talk to this
interface, so adding an engine means one YAML entry and, at most, a small subclass — never an edit to the
code that starts, watches and stops processes.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from pytest_moe.matrix import ServerConfig


@dataclass(frozen=True)
class EngineSpec:
    """One engine's entry of ``engines.yaml``."""

    name: str
    adapter: str
    distributions: tuple[str, ...]
    launch: tuple[str, ...]
    uses_gpus: bool
    flags: dict[str, str | None]
    readiness_path: str
    models_path: str
    profile: dict[str, str]
    moe_backends: tuple[str, ...]
    log_patterns: dict[str, str]
    ep_style: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    model_positional: bool = False
    #: POST endpoint that empties the engine's prefix/KV cache between benchmark cases (None: it has none).
    flush_cache_path: str | None = None

    @classmethod
    def from_yaml(cls, name: str, raw: dict[str, Any]) -> EngineSpec:
        return cls(
            name=name,
            adapter=raw["adapter"],
            distributions=tuple(raw["distributions"]),
            launch=tuple(raw["launch"]),
            uses_gpus=bool(raw["uses_gpus"]),
            flags=dict(raw["flags"]),
            readiness_path=raw["readiness_path"],
            models_path=raw["models_path"],
            profile=dict(raw["profile"]),
            moe_backends=tuple(raw["moe_backends"]),
            log_patterns=dict(raw["log_patterns"]),
            ep_style=raw["ep_style"],
            env={k: str(v) for k, v in (raw.get("env") or {}).items()},
            args=tuple(str(a) for a in raw.get("args") or ()),
            model_positional=bool(raw.get("model_positional", False)),
            flush_cache_path=raw.get("flush_cache_path"),
        )


class CommandRejected(ValueError):
    """The engine's own argument parser refused a command line we generated."""


class Engine:
    """Generic adapter: renders launch commands from ``EngineSpec`` and probes the OpenAI-style server."""

    def __init__(self, spec: EngineSpec):
        self.spec = spec

    @property
    def name(self) -> str:
        return self.spec.name

    # -- launching ---------------------------------------------------------------------------------
    def command(
        self, cfg: ServerConfig, model_path: str, *, host: str, port: int, served_name: str, profile_dir: Path | None
    ) -> list[str]:
        """The full argument list (never a shell string) that starts ``cfg`` on ``host:port``."""
        flags = self.spec.flags
        argv = [part.replace("{python}", sys.executable) for part in self.spec.launch]
        argv += [model_path] if self.spec.model_positional else [flags["model"], model_path]
        argv += [flags["served_model_name"], served_name, flags["tp"], str(cfg.tp)]
        argv += self.ep_args(cfg.ep)
        if cfg.quantization:
            argv += [flags["quantization"], cfg.quantization]
        if cfg.moe_backend != "auto":
            argv += [flags["moe_backend"], cfg.moe_backend]
        argv += list(self.spec.args) + list(cfg.args)
        argv += self.profile_args(profile_dir)
        argv += [flags["host"], host, flags["port"], str(port)]
        return argv

    def ep_args(self, ep: int) -> list[str]:
        """``ep_style: size`` takes ``--ep N``; ``flag`` is a switch (vLLM: EP size = TP x DP)."""
        if ep <= 1:
            return []
        return [self.spec.flags["ep"]] if self.spec.ep_style == "flag" else [self.spec.flags["ep"], str(ep)]

    def profile_args(self, profile_dir: Path | None) -> list[str]:
        """Launch flags that enable profiling; none by default (SGLang profiles on request)."""
        return []

    def environment(self, cfg: ServerConfig, profile_dir: Path | None) -> dict[str, str]:
        """Variables added to the server's environment on top of the caller's."""
        return {**self.spec.env, **dict(cfg.env)}

    def version(self) -> str | None:
        """Installed version of the engine in this interpreter, if any."""
        for dist in self.spec.distributions:
            try:
                return f"{dist} {importlib.metadata.version(dist)}"
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def check_command(self, argv: list[str]) -> None:
        """Parse ``argv`` with the engine's real argument parser; raise ``CommandRejected`` if it refuses."""
        raise NotImplementedError

    def phase(self, log_text: str) -> str:
        """Where a loading server is, from its log (``log_patterns``): shown in the progress lines."""
        patterns = self.spec.log_patterns
        if re.search(patterns["http_up"], log_text):
            return "HTTP server up, not ready yet"
        if re.search(patterns["loading"], log_text):
            return "loading weights"
        return "starting"

    # -- probing a running server -------------------------------------------------------------------
    def served_models(self, base_url: str, timeout: float = 2.0) -> list[str]:
        """Model ids the server at ``base_url`` says it serves ([] when it does not answer yet)."""
        try:
            resp = requests.get(base_url + self.spec.models_path, timeout=timeout)
            if resp.status_code != 200:
                return []
            return [entry.get("id", "") for entry in resp.json().get("data", [])]
        except (requests.RequestException, ValueError):
            return []

    def is_ready(self, base_url: str, served_name: str, timeout: float = 5.0) -> bool:
        """Ready = the readiness endpoint answers 200 *and* the server is ours (serves ``served_name``).

        The second check matters when a leftover server of another job sits on the same port.
        """
        try:
            resp = requests.get(base_url + self.spec.readiness_path, timeout=timeout)
        except requests.RequestException:
            return False
        return resp.status_code == 200 and served_name in self.served_models(base_url)

    def start_profile(self, base_url: str, out_dir: Path, num_steps: int) -> None:
        raise NotImplementedError

    def stop_profile(self, base_url: str) -> None:
        resp = requests.post(base_url + self.spec.profile["stop"], timeout=600)
        resp.raise_for_status()


def profile_json(**fields: Any) -> str:
    """Compact JSON for flags such as vLLM's ``--profiler-config``."""
    return json.dumps(fields, separators=(",", ":"))
