"""Collection and selection: the matrix becomes one item per (config, check), selected and ordered.

Items are ``test_moe[<model>::<config>-<check>]``: ``-k accuracy``, ``-m agreement`` and ``--moe-config ID``
(all of one config's checks) select them.  Items of one config stay together, so the config boots once.
"""

from __future__ import annotations

from typing import Any

import pytest

from pytest_moe import gpus
from pytest_moe.checks import CHECKS, Check
from pytest_moe.configs import Matrix, ServerConfig, engine_marker
from pytest_moe.engines import EngineTableError, engine_names
from pytest_moe.kernels.plugin import MARKER as KERNEL_MARKER
from pytest_moe.matrix import MatrixError, load_matrix
from pytest_moe.multinode import nodes_offered
from pytest_moe.plugins import options
from pytest_moe.preflight import Problem
from pytest_moe.selection import decide, run_order, unknown_config_ids

MATRIX = pytest.StashKey[Matrix | None]()
PREDICTED = pytest.StashKey[list[Problem]]()


def markers() -> list[str]:
    """Marker lines: sizes, nodes and precision, one per engine of the registry, one per check, the kernel check."""
    try:  # a broken engine table is reported, with its file and key, when the matrix loads
        engines = engine_names()
    except EngineTableError:
        engines = []
    return (
        [f"tp{n}: configs with tensor parallel size {n}" for n in (1, 2, 4, 8, 16)]
        + [f"gpus{n}: configs that need {n} GPUs" for n in (0, 1, 2, 4, 8, 16)]
        + [f"nodes{n}: configs whose server spans {n} nodes" for n in (2, 4)]
        + ["fp8: FP8-quantized configs", "native: native-precision (bf16/fp16) configs"]
        + [f"{engine_marker(name)}: served by engine {name}" for name in engines]
        + [check.help for check in CHECKS.values()]
        + [KERNEL_MARKER]
        + ["xdist_group: pytest-xdist's --dist loadgroup group (one per config)"]
    )


def config_of(item: pytest.Item) -> ServerConfig | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("moe_config") if callspec else None


def check_of(item: pytest.Item) -> Check | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("moe_check") if callspec else None


class MoECollection:
    def __init__(self, config: pytest.Config):
        self.config = config
        self._host_gpus: list[gpus.GpuInfo] | None = None
        #: The first matrix test collected while no matrix is loaded (a usage error once collection is over).
        self._needs_matrix: str | None = None

    @property
    def matrix(self) -> Matrix | None:
        """The matrix, loaded once; a bad file is a usage error (exit 4) naming file, line and key."""
        if MATRIX not in self.config.stash:
            path, _, explicit = options.matrix_path(self.config)
            if not explicit and not path.exists():
                self.config.stash[MATRIX] = None
            else:
                try:
                    self.config.stash[MATRIX] = load_matrix(path)
                except MatrixError as exc:
                    raise pytest.UsageError(str(exc)) from None
        return self.config.stash[MATRIX]

    def host_gpus(self) -> list[gpus.GpuInfo]:
        if self._host_gpus is None:
            self._host_gpus = gpus.discover_gpus()
        return self._host_gpus

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        path, source, _ = options.matrix_path(config)
        try:
            matrix = self.matrix
        except pytest.UsageError:
            return [f"pytest-moe: matrix {path} ({source}) is invalid"]
        if matrix is None:
            return [f"pytest-moe: no matrix ({path} does not exist)"]
        found = self.host_gpus()
        names = ", ".join(sorted({g.name for g in found})) or "none"
        return [
            f"pytest-moe: matrix {matrix.path} ({source}), {len(matrix.configs)} configs, "
            f"{len(matrix.configs) * len(CHECKS)} checks",
            f"pytest-moe: {len(found)} GPUs ({names}) from {gpus.gpu_source()}",
        ]

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        """Load and validate the matrix and the options before any test is collected (errors exit 4)."""
        matrix = self.matrix
        options.run_options(self.config, str(matrix.path) if matrix else options.DEFAULT_MATRIX)

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "moe_config" not in metafunc.fixturenames:
            return
        matrix = self.matrix
        if matrix is None:
            # refused once collection is over (pytest_collection_modifyitems): raised here, pytest reports it as a
            # collection error with a traceback instead of a usage error's one line
            self._needs_matrix = self._needs_matrix or metafunc.definition.nodeid
            metafunc.parametrize("moe_config", [])
            return
        if "moe_check" not in metafunc.fixturenames:
            metafunc.parametrize("moe_config", [pytest.param(cfg, id=cfg.id, marks=_marks(cfg)) for cfg in matrix.configs])
            return
        metafunc.parametrize(
            ("moe_config", "moe_check"),
            [pytest.param(cfg, check, id=f"{cfg.id}-{name}", marks=[*_marks(cfg), getattr(pytest.mark, name)])
             for cfg in matrix.configs for name, check in CHECKS.items()],
        )

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """``--moe-config`` selection, skips decided before boot, and the order (references first, then largest)."""
        matrix = self.matrix
        if self._needs_matrix:
            raise pytest.UsageError(f"no matrix: {options.DEFAULT_MATRIX} is not in {self.config.rootpath} and "
                                    f"{self._needs_matrix} needs one; pass --moe-matrix PATH")
        if config.option.moe_config:
            error = unknown_config_ids(config.option.moe_config, matrix)
            if error:
                raise pytest.UsageError(error)
            keep = [it for it in items if config_of(it) is None or config_of(it).id in config.option.moe_config]
            config.hook.pytest_deselected(items=[it for it in items if it not in keep])
            items[:] = keep
        host_gpus = self.host_gpus() if any(config_of(it) for it in items) else []
        decisions: dict[str, Any] = {}
        for item in filter(config_of, items):
            cfg = config_of(item)
            if cfg.id not in decisions:
                decisions[cfg.id] = decide(cfg, host_gpus, preflight=not config.option.moe_no_preflight,
                                           nodes_offered=nodes_offered(config.option.moe_nodes))
            decision = decisions[cfg.id]
            if decision.skip_reason:
                item.add_marker(pytest.mark.skip(reason=decision.skip_reason))
            if decision.predicted:
                item.stash[PREDICTED] = list(decision.predicted)
        items.sort(key=lambda it: run_order(config_of(it)))


def _marks(cfg: ServerConfig) -> list[Any]:
    """The config's markers, plus an xdist group so ``--dist loadgroup`` keeps a config's checks on one worker."""
    return [*(getattr(pytest.mark, m) for m in cfg.markers), pytest.mark.xdist_group(cfg.id)]
