"""The kernel check: time the engine's own MoE op for a config's shape, no server needed.

Why: seed 003 measures the fused-MoE kernel alone across batch sizes, which separates "the kernel
is slow here (no tuned config, a regression in the op)" from everything else a serving benchmark
mixes in. The op runs in a child process (:mod:`pytest_moe.kernels.worker`) that is killed at its
timeout; the parent knows the shape (from the model's ``config.json``) and the tuned file it will
use, and returns one typed :class:`KernelResult`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_moe.kernels.naming import Coverage, KernelShape, find_tuned_config, kernel_data, kernel_device_name, naming_for
from pytest_moe.kernels.shapes import shape_for
from pytest_moe.kernels.worker import DTYPES, UNSUPPORTED_EXIT
from pytest_moe.models import inspect_model
from pytest_moe.redact import redact
from pytest_moe.server import kill_tree
from pytest_moe.tiny import resolve_model_path

if TYPE_CHECKING:
    from pytest_moe.configs import KernelSpec, ServerConfig

#: The check's name under an entry's ``checks``.
CHECK_NAME = "kernel"
#: Engines whose own MoE op the worker can run (vLLM's CPU op and its Triton op).
_OP_ENGINES = ("vllm", "vllm-cpu")


class KernelStatus(str, Enum):
    PASSED = "passed"
    FAILED = "failed"


class KernelUnsupported(Exception):
    """No engine op to time for this config here (the test skips with this message)."""


class KernelCheckError(Exception):
    """The op crashed or ran past its timeout; the message says which and shows the child's last output."""

    def __init__(self, message: str, error_type: str):
        super().__init__(message)
        #: One of ``errors.ERROR_TYPES``: ``Crash`` or ``Timeout``.
        self.error_type = error_type


@dataclass(frozen=True)
class KernelSettings:
    """The matrix's ``defaults.kernel``, with seed 003's batch sizes as the default and folders made absolute."""

    batch_sizes: tuple[int, ...]
    warmup: int
    repeats: int
    tuned_config_dirs: tuple[str, ...]
    timeout_s: float = 600.0

    @classmethod
    def from_spec(cls, spec: KernelSpec, matrix_path: str | os.PathLike[str]) -> KernelSettings:
        base = Path(matrix_path).resolve().parent
        return cls(
            batch_sizes=tuple(spec.batch_sizes or kernel_data().default_batch_sizes),
            warmup=spec.warmup,
            repeats=spec.repeats,
            tuned_config_dirs=tuple(str((base / d).resolve()) for d in spec.tuned_config_dirs),
        )


@dataclass(frozen=True)
class KernelRow:
    batch_size: int
    us_per_call: float


@dataclass(frozen=True)
class KernelResult:
    """One kernel check: the shape, the tuned file (GPU only), the op timed and µs per call per batch size."""

    config_id: str
    shape: KernelShape
    device: str
    op: str
    rows: tuple[KernelRow, ...]
    coverage: Coverage | None
    status: KernelStatus = KernelStatus.PASSED
    error_message: str | None = None

    @property
    def warning(self) -> str | None:
        """Set when a GPU runs this shape without a tuned file: the engine's defaults are slower."""
        if self.coverage is None or self.coverage.covered:
            return None
        return (f"{self.config_id}: no tuned fused-MoE kernel config {self.coverage.file_name} on {self.device} "
                f"(looked in {', '.join(self.coverage.searched) or 'nothing'}): the engine runs default kernel "
                f"parameters; tune it (docs/kernels.md)")

    def record(self) -> dict[str, Any]:
        """The ``checks.kernel`` block of a results entry."""
        block: dict[str, Any] = {
            "status": self.status.value,
            "rows": [asdict(row) for row in self.rows],
            "tuned_config": self.coverage.path if self.coverage else None,
            "tuned_config_file": self.coverage.file_name if self.coverage else None,
            "tuned_config_named_by": self.coverage.named_by if self.coverage else None,
            "shape": {**asdict(self.shape), "block_shape": list(self.shape.block_shape) if self.shape.block_shape else None},
            "device": self.device,
            "op": self.op,
        }
        if self.warning:
            block["warning"] = self.warning
        if self.error_message:
            block["error_message"] = self.error_message
        return block


def coverage_for(cfg: ServerConfig, shape: KernelShape, gpu: str, settings: KernelSettings) -> Coverage:
    """The tuned file for ``cfg``'s shape on ``gpu``, looked up where ``cfg``'s server would look."""
    return find_tuned_config(cfg.engine, shape, kernel_device_name(gpu), env=dict(cfg.env),
                             extra_dirs=settings.tuned_config_dirs)


def config_shape(cfg: ServerConfig, build: bool = True) -> KernelShape:
    """``cfg``'s shape from its model's config.json (a ``tiny:`` model is built on first use when ``build``)."""
    return shape_for(cfg, inspect_model(resolve_model_path(cfg.model_path, build=build)))


def run_kernel_check(cfg: ServerConfig, settings: KernelSettings, gpu: str | None = None,
                     env: dict[str, str] | None = None) -> KernelResult:
    """Time the engine's op for ``cfg``'s shape: on CUDA when ``gpu`` names the host's GPU, else on CPU.

    ``env`` is laid over this process's for the child (a GPU lease's ``CUDA_VISIBLE_DEVICES``).
    """
    if cfg.engine not in _OP_ENGINES:
        raise KernelUnsupported(f"{cfg.id}: the kernel check runs vLLM's MoE op; engine {cfg.engine} has none wired")
    shape = config_shape(cfg)
    device = "cuda" if gpu else "cpu"
    if shape.dtype not in DTYPES[device]:
        # Known before spawning the worker (seconds of engine import) that it would refuse.
        supported = ", ".join(d or shape.activation_dtype for d in DTYPES[device])
        raise KernelUnsupported(f"{cfg.id}: the kernel check has no {shape.dtype} MoE op to time on {device} "
                                f"(it runs: {supported})")
    coverage = coverage_for(cfg, shape, gpu, settings) if gpu else None
    child_env = {**os.environ, **dict(cfg.env), **(env or {})}
    if coverage is not None and coverage.covered:
        # The op reads the tuned file itself: point it at the folder the file was found in.
        child_env[naming_for(cfg.engine)[1].user_dir_env] = str(Path(coverage.path).parent)
    with tempfile.TemporaryDirectory(prefix="pytest-moe-kernel-") as tmp:
        output = Path(tmp) / "result.json"
        request = {
            "shape": {**asdict(shape), "block_shape": list(shape.block_shape) if shape.block_shape else None},
            "batch_sizes": list(settings.batch_sizes), "warmup": settings.warmup, "repeats": settings.repeats,
            "device": device, "output": str(output),
        }
        log = Path(tmp) / "worker.log"
        returncode = _run_worker(request, child_env, log, settings.timeout_s, cfg.id)
        if returncode == UNSUPPORTED_EXIT:
            raise KernelUnsupported(f"{cfg.id}: {json.loads(output.read_text())['unsupported']}")
        if returncode != 0 or not output.is_file():
            tail = redact(" | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]))
            raise KernelCheckError(f"{cfg.id}: the kernel worker exited with status {returncode}: {tail}", "Crash")
        result = json.loads(output.read_text())
    rows = tuple(KernelRow(r["batch_size"], r["us_per_call"]) for r in result["rows"])
    return KernelResult(cfg.id, shape, gpu or "cpu", result["op"], rows, coverage)


def _run_worker(request: dict[str, Any], env: dict[str, str], log: Path, timeout_s: float, config_id: str) -> int:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest_moe.kernels.worker"], stdin=subprocess.PIPE,
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            proc.communicate(json.dumps(request).encode(), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise KernelCheckError(f"{config_id}: the kernel worker ran past {timeout_s:g} s", "Timeout") from None
        finally:
            if proc.poll() is None:
                kill_tree(proc.pid, grace_s=0)
                proc.wait()
    return proc.returncode
