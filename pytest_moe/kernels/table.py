"""``python -m pytest_moe kernels``: every config's fused-MoE shape and whether a tuned file covers it.

Why a table before any run: a missing tuned file is decided by file name alone, so it can be
reported for a whole matrix on a laptop, for the GPU the nightly will run on (``--gpu H200``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_moe.kernels.check import KernelSettings, config_shape, coverage_for
from pytest_moe.kernels.naming import Coverage, KernelShape, naming_for
from pytest_moe.configs import Matrix, ServerConfig
from pytest_moe.models import ModelInspectionError


@dataclass(frozen=True)
class KernelRowInfo:
    """One config's line: its shape (None with ``problem`` when it cannot be derived) and coverage."""

    config: ServerConfig
    shape: KernelShape | None
    coverage: Coverage | None
    problem: str | None

    @property
    def covered(self) -> str:
        if self.problem or self.coverage is None:
            return "-"
        return "yes" if self.coverage.covered else "NO"


def kernel_rows(matrix: Matrix, gpu: str | None) -> list[KernelRowInfo]:
    """The table's rows; ``gpu`` None lists shapes only (tuned files are per GPU)."""
    settings = KernelSettings.from_spec(matrix.kernel, matrix.path)
    rows = []
    for cfg in matrix.configs:
        try:
            shape = config_shape(cfg, build=False)  # a listing never builds checkpoints
        except (ModelInspectionError, ValueError) as exc:
            rows.append(KernelRowInfo(cfg, None, None, str(exc)))
            continue
        triton = naming_for(cfg.engine)[1].triton_backends
        if cfg.moe_backend not in triton:
            rows.append(KernelRowInfo(cfg, shape, None, f"MoE backend {cfg.moe_backend} does not read Triton tuned configs"))
            continue
        rows.append(KernelRowInfo(cfg, shape, coverage_for(cfg, shape, gpu, settings) if gpu else None, None))
    return rows


def render_kernel_table(rows: list[KernelRowInfo], gpu: str | None) -> str:
    """A markdown table plus the list of configs without a tuned file."""
    header = ["config", "engine", "E (local/all)", "N", "K", "top-k", "dtype", "block", "tuned config file", f"covered on {gpu or '(no --gpu)'}", "found in / note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        s = row.shape
        cells = [row.config.id, row.config.engine]
        if s is None:
            cells += ["-"] * 7
        else:
            cells += [f"{s.experts}/{s.global_experts}", str(s.n), str(s.hidden), str(s.top_k),
                      s.dtype or s.activation_dtype, f"{list(s.block_shape)}" if s.block_shape else "-",
                      row.coverage.file_name if row.coverage else "-"]
        note = row.problem or (row.coverage.path if row.coverage and row.coverage.path else "")
        cells += [row.covered, (note or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    checked = [r for r in rows if r.coverage is not None]
    missing = [r for r in checked if not r.coverage.covered]
    if gpu:
        lines += ["", f"{len(missing)} of {len(checked)} checked configs have no tuned config on {gpu}"
                  + (f" ({len(rows) - len(checked)} not checked: see the notes)" if len(checked) < len(rows) else "")
                  + (": " + ", ".join(r.config.id for r in missing) if missing else "")]
    return "\n".join(lines) + "\n"
