"""The kernel check inside pytest: the ``moe_kernel`` fixture, its results, its end-of-run section.

Why its own plugin object: the kernel check needs no server and one GPU, so it does not go through
``moe_cell`` (which leases all of a config's GPUs for a serving run and owns the serving outcome of the
entry); it shares the matrix, selection, results files and report with the serving checks and adds
only ``checks.kernel`` to a config's entry. Registered by ``plugin.pytest_configure``.
"""

from __future__ import annotations

import json
import warnings
from functools import lru_cache
from typing import Any, Callable

import pytest

from pytest_moe import gpus
from pytest_moe.kernels.check import (
    CHECK_NAME,
    KernelCheckError,
    KernelResult,
    KernelSettings,
    KernelUnsupported,
    run_kernel_check,
)
from pytest_moe.configs import ServerConfig
from pytest_moe.matrix import load_matrix
from pytest_moe.report import publish, repro_command

MARKER = "kernel: the fused-MoE kernel check (seed 003): times the engine's MoE op, no server"
_WARNING_PROPERTY = "moe_kernel_warning"
_RESULT_PROPERTY = "moe_kernel"


class UntunedKernelWarning(UserWarning):
    """A config runs on a GPU without a tuned fused-MoE kernel config."""


@lru_cache(maxsize=None)
def _settings(matrix_path: str) -> KernelSettings:
    return KernelSettings.from_spec(load_matrix(matrix_path).kernel, matrix_path)


class KernelPlugin:
    """Runs and records kernel checks; lists the configs without a tuned kernel config at the end."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.untuned: list[str] = []
        self.results: list[dict[str, Any]] = []

    @pytest.fixture
    def moe_kernel(self, request: pytest.FixtureRequest, moe_config: ServerConfig) -> Callable[[], KernelResult]:
        """Run the kernel check for ``moe_config`` (on one leased GPU where the config uses GPUs) and record it."""
        session = request.config.pluginmanager.get_plugin("moe-recorder")

        def run() -> KernelResult:
            lease = gpus.GpuLeaser().acquire(1, config_id=moe_config.id) if moe_config.gpus_needed else None
            try:
                return self._run(request, session, moe_config, lease)
            finally:
                if lease is not None:
                    lease.release()

        return run

    def _run(self, request: pytest.FixtureRequest, session: Any, cfg: ServerConfig, lease: gpus.GpuLease | None) -> KernelResult:
        new_entry = {"model": cfg.model, "config": cfg.name, "engine": cfg.engine,
                     "repro_command": repro_command(cfg.id, cfg.matrix_path, session.options.test_path) + " -m kernel"}
        try:
            result = run_kernel_check(cfg, _settings(cfg.matrix_path), gpu=lease.gpus[0].name if lease else None,
                                      env=lease.env() if lease else None)
        except KernelUnsupported as exc:
            pytest.skip(str(exc))
        except KernelCheckError as exc:
            block = {"status": "failed", "rows": [], "tuned_config": None, "error_message": str(exc)}
            entry = session.store.record_check(cfg.id, CHECK_NAME, block, {**new_entry, "status": "failed",
                                               "error_type": exc.error_type, "error_message": str(exc)})
            request.config.hook.pytest_moe_entry_recorded(config=request.config, key=cfg.id, entry=entry, outcome="failed")
            raise
        entry = session.store.record_check(cfg.id, CHECK_NAME, result.record(), {**new_entry, "status": "success"})
        request.config.hook.pytest_moe_entry_recorded(config=request.config, key=cfg.id, entry=entry, outcome="passed")
        request.node.user_properties.append((_RESULT_PROPERTY, json.dumps({"id": cfg.id, **result.record()})))
        if result.warning:
            warnings.warn(UntunedKernelWarning(result.warning), stacklevel=2)
            request.node.user_properties.append((_WARNING_PROPERTY, result.warning))
        return result

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collected here so that xdist workers' results reach the controller's summary."""
        if report.when == "call":
            self.untuned += [value for name, value in report.user_properties if name == _WARNING_PROPERTY]
            self.results += [json.loads(value) for name, value in report.user_properties if name == _RESULT_PROPERTY]

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if not (self.results or self.untuned) or hasattr(config, "workerinput"):
            return
        text = kernel_summary(self.results, self.untuned)
        publish(terminalreporter, "pytest-moe kernels", text)


def kernel_summary(results: list[dict[str, Any]], untuned: list[str]) -> str:
    """µs per call per batch size, one row per config, then the configs without a tuned kernel config."""
    parts = []
    if results:
        sizes = sorted({row["batch_size"] for r in results for row in r["rows"]})
        lines = ["### Kernel check: µs per call by batch size", "",
                 "| config | device | tuned config | " + " | ".join(map(str, sizes)) + " |",
                 "|" + "---|" * (len(sizes) + 3)]
        for r in sorted(results, key=lambda r: r["id"]):
            us = {row["batch_size"]: row["us_per_call"] for row in r["rows"]}
            tuned = r["tuned_config_file"] if r["tuned_config"] else ("none" if r["tuned_config_file"] else "-")
            lines.append(f"| {r['id']} | {r['device']} | {tuned} | "
                         + " | ".join(f"{us[b]:.1f}" if b in us else "-" for b in sizes) + " |")
        parts.append("\n".join(lines))
    if untuned:
        parts.append("### Configs without a tuned fused-MoE kernel config\n\n" + "\n".join(f"- {w}" for w in untuned))
    return "\n\n".join(parts) + "\n"
