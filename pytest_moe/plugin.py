"""The pytest glue: options, markers, the plugin objects, and the fixtures a matrix test uses.

Hooks only decide *when* things happen; *how* lives in ``matrix``, ``runner``, ``checks``, ``results`` and
``report``.  Each concern is its own plugin object (``pytest_moe.plugins``), registered here, the way
pytest-xdist registers its session and its reporter separately.  Registered through the ``pytest11`` entry
point ``moe``.
"""

from __future__ import annotations

import pytest

from pytest_moe import hookspecs
from pytest_moe.checks import Check, CheckSkipped
from pytest_moe.configs import ServerConfig
from pytest_moe.entries import CheckResult
from pytest_moe.history.plugin import HistoryPlugin
from pytest_moe.kernels.plugin import KernelPlugin
from pytest_moe.plugins import options
from pytest_moe.plugins.collection import MATRIX, MoECollection, markers
from pytest_moe.plugins.recording import MoERecorder
from pytest_moe.plugins.summary import MoESummary
from pytest_moe.runner import CellRun
from pytest_moe.server import Server
from pytest_moe.shardplugin import ShardPlugin


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    for line in markers():
        config.addinivalue_line("markers", line)
    collection = MoECollection(config)
    recorder = MoERecorder(config, collection, _progress_writer(config))
    config.pluginmanager.register(collection, "moe-collection")
    config.pluginmanager.register(recorder, "moe-recorder")
    config.pluginmanager.register(MoESummary(recorder), "moe-summary")
    config.pluginmanager.register(KernelPlugin(config), "moe-kernel")
    config.pluginmanager.register(HistoryPlugin(config, lambda: config.stash.get(MATRIX, None)), "moe-history")
    config.pluginmanager.register(ShardPlugin(config), "moe-shard")


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def moe_cell(request: pytest.FixtureRequest, moe_config: ServerConfig) -> CellRun:
    """The config's cell, shared by all of its checks (GPUs leased on its first check, until its last)."""
    recorder: MoERecorder = request.config.pluginmanager.get_plugin("moe-recorder")
    cell = recorder.cell(request.node, moe_config)
    recorder.running = cell
    return cell


@pytest.fixture
def moe_server(moe_cell: CellRun) -> Server:
    """The config's ready server: booted by its first check, stopped after its last (never twice)."""
    return moe_cell.ensure_server()


@pytest.fixture
def moe_run(moe_cell: CellRun, moe_server: Server, moe_check: Check):
    """Run this item's check on the config's server; a check that cannot judge (no reference yet) skips."""

    def run() -> CheckResult:
        try:
            return moe_cell.run_check(moe_check)
        except CheckSkipped as exc:
            pytest.skip(str(exc))

    return run


# -- helpers -------------------------------------------------------------------------------------
def _progress_writer(config: pytest.Config):
    """Progress lines go to the terminal even while output is captured."""

    def write(line: str) -> None:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capman is None:
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)

    return write
