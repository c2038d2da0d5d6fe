"""The pytest glue: options, markers, one parametrized test per matrix config, fixtures, hooks.

Hooks only decide *when* things happen; *how* lives in ``matrix``, ``runner``, ``results`` and ``report``.
Registered through the ``pytest11`` entry point ``moe``.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from pytest_moe import gpus, hookspecs
from pytest_moe.args import bounded_int, seconds
from pytest_moe.retries import MAX_RETRIES
from pytest_moe.configs import Matrix, ServerConfig, engine_marker
from pytest_moe.engines import EngineTableError, engine_names
from pytest_moe.errors import Classification
from pytest_moe.history.plugin import HistoryPlugin, add_history_options
from pytest_moe.matrix import MAX_NODES, MatrixError, load_matrix
from pytest_moe.kernels.plugin import MARKER as KERNEL_MARKER
from pytest_moe.kernels.plugin import KernelPlugin
from pytest_moe.multinode import nodes_offered
from pytest_moe.preflight import Problem
from pytest_moe.report import failure_text, junit_properties, summary_markdown
from pytest_moe.redact import redact
from pytest_moe.results import DEFAULT_RESULTS_DIR, ResultsError, ResultsStore

from pytest_moe.runner import INTERRUPTED_TYPE, CellRun, RunOptions, crashed_worker_entry, predicted_entry
from pytest_moe.selection import decide, run_order, unknown_config_ids
from pytest_moe.server import kill_tree
from pytest_moe.shardplugin import ShardPlugin
from pytest_moe.waivers import apply_waiver

DEFAULT_MATRIX = "model_matrix.yaml"
MARKERS = (
    [f"tp{n}: configs with tensor parallel size {n}" for n in (1, 2, 4, 8, 16)]
    + [f"gpus{n}: configs that need {n} GPUs" for n in (0, 1, 2, 4, 8, 16)]
    + ["fp8: FP8-quantized configs", "native: native-precision (bf16/fp16) configs"]
    + [KERNEL_MARKER]
    + [f"nodes{n}: configs whose server spans {n} nodes" for n in (2, 4)]
)

_MATRIX = pytest.StashKey[Matrix | None]()
_CELL = pytest.StashKey[CellRun]()
_PREDICTED = pytest.StashKey[list[Problem]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe", "pytest-moe: MoE serving matrix")
    group.addoption("--moe-matrix", metavar="PATH", help=f"matrix file (default: {DEFAULT_MATRIX} in the rootdir)")
    group.addoption("--moe-config", metavar="ID", action="append", default=[],
                    help="run only this config id, e.g. 'Qwen3-235B::TP8_EP2_auto' (repeatable)")
    group.addoption("--moe-results-dir", metavar="DIR", default=DEFAULT_RESULTS_DIR,
                    help=f"where results JSON, logs and traces go (default: {DEFAULT_RESULTS_DIR})")
    group.addoption("--moe-server-timeout", metavar="S", type=seconds(0, allow_zero=False), default=None,
                    help="server launch timeout in seconds for every config (default: the matrix's, 2000)")
    group.addoption("--moe-profile", action="store_true", help="save extend and decode traces per config")
    group.addoption("--moe-cooldown", metavar="S", type=seconds(), default=None,
                    help="minimum pause after each teardown (default: 0 after an NVML memory wait, else 5)")
    group.addoption("--moe-grace", metavar="S", type=seconds(), default=10.0,
                    help="seconds between SIGTERM and SIGKILL at teardown (default: 10)")
    group.addoption("--moe-no-preflight", action="store_true",
                    help="boot configs that preflight predicts to fail (to check a rule against the engine)")
    group.addoption("--moe-progress-interval", metavar="S", type=seconds(0, allow_zero=False), default=30.0,
                    help="seconds between progress lines while a server loads (default: 30)")
    group.addoption("--moe-retries", metavar="N", type=bounded_int(0, MAX_RETRIES), default=None,
                    help="retries of a failed launch, for the types the retry policy retries (default: the policy's)")
    group.addoption("--moe-shard", metavar="K/N", default=None,
                    help="run only shard K of N, balanced by expected GPU-seconds (e.g. 1/4)")
    group.addoption("--moe-durations", metavar="JSON", default=None,
                    help="measured seconds per config id ({id: seconds}, e.g. history medians) for --moe-shard")
    group.addoption("--moe-nodes", metavar="N", type=bounded_int(1, MAX_NODES), default=None,
                    help="nodes a server may span (default: the Slurm allocation's, else 1); "
                         "without Slurm, N>1 runs the members as local processes")
    add_history_options(parser, group)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


def pytest_configure(config: pytest.Config) -> None:
    for line in MARKERS:
        config.addinivalue_line("markers", line)
    try:  # one marker per engine of the engine tables; a broken table is reported when the matrix loads
        engines = engine_names()
    except EngineTableError:
        engines = []
    for name in engines:
        config.addinivalue_line("markers", f"{engine_marker(name)}: served by engine {name}")
    config.pluginmanager.register(MoESession(config), "moe-session")
    config.pluginmanager.register(KernelPlugin(config), "moe-kernel")
    config.pluginmanager.register(HistoryPlugin(config, lambda: config.stash.get(_MATRIX, None)), "moe-history")
    config.pluginmanager.register(ShardPlugin(config), "moe-shard")


class MoESession:
    """Per-run state: the results store, this run's outcomes (also from xdist workers), the summary."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.outcomes: list[dict[str, Any]] = []
        #: Cells whose test is running in this process (one at a time; each xdist worker has its own).
        self.active_cells: list[CellRun] = []
        self._store: ResultsStore | None = None
        self._previous_sigterm: Any = None

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.options.results_dir)
        return self._store

    @property
    def options(self) -> RunOptions:
        opt = self.config.option
        matrix = self.config.stash.get(_MATRIX, None)
        return RunOptions(
            matrix_path=str(matrix.path) if matrix else (opt.moe_matrix or DEFAULT_MATRIX),
            results_dir=Path(opt.moe_results_dir),
            timeout_override_s=opt.moe_server_timeout,
            profile=opt.moe_profile,
            cooldown_s=opt.moe_cooldown,
            grace_s=opt.moe_grace,
            progress_interval_s=opt.moe_progress_interval,
            retries=opt.moe_retries,
        )

    # -- signals: a cancelled CI job sends SIGTERM; turn it into an interrupt so teardown runs ------
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    # -- collection ------------------------------------------------------------------------------
    @pytest.hookimpl(tryfirst=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        """Load and validate the matrix before any test is collected: a bad file is a usage error."""
        given = self.config.option.moe_matrix
        path = Path(given) if given else self.config.rootpath / DEFAULT_MATRIX
        if not given and not path.exists():
            self.config.stash[_MATRIX] = None
            return
        try:
            self.config.stash[_MATRIX] = load_matrix(path)
            if not hasattr(self.config, "workerinput"):  # the controller checks once, before any server boots
                self.store.check()
        except MatrixError as exc:
            raise pytest.UsageError(str(exc)) from None
        except ResultsError as exc:
            raise pytest.UsageError(f"--moe-results-dir: {exc}") from None

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "moe_config" not in metafunc.fixturenames:
            return
        matrix = self.config.stash.get(_MATRIX, None)
        if matrix is None:
            raise pytest.UsageError(f"no matrix: {DEFAULT_MATRIX} is not in {self.config.rootpath}; pass --moe-matrix PATH")
        metafunc.parametrize(
            "moe_config",
            [pytest.param(cfg, id=cfg.id, marks=[getattr(pytest.mark, m) for m in cfg.markers]) for cfg in matrix.configs],
        )

    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        """``--moe-config`` selection, skips decided before boot, and largest-first order."""
        matrix = config.stash.get(_MATRIX, None)
        if config.option.moe_config:
            error = unknown_config_ids(config.option.moe_config, matrix)
            if error:
                raise pytest.UsageError(error)
            keep = [it for it in items if _config(it) is None or _config(it).id in config.option.moe_config]
            config.hook.pytest_deselected(items=[it for it in items if it not in keep])
            items[:] = keep
        host_gpus = gpus.discover_gpus() if any(_config(it) for it in items) else []
        for item in filter(_config, items):
            decision = decide(_config(item), host_gpus, preflight=not config.option.moe_no_preflight,
                              nodes_offered=nodes_offered(config.option.moe_nodes))
            if decision.skip_reason:
                item.add_marker(pytest.mark.skip(reason=decision.skip_reason))
            if decision.predicted:
                item.stash[_PREDICTED] = list(decision.predicted)
        items.sort(key=lambda it: run_order(_config(it)))

    # -- outcomes ----------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        report = yield
        problems = item.stash.get(_PREDICTED, None)
        if problems and report.when == "setup" and report.skipped:
            entry = predicted_entry(_config(item), self.options, problems)
            self.store.record_failure(_config(item).id, entry)
            self._recorded(_config(item).id, entry, "predicted")
            report.user_properties = list(report.user_properties) + [("moe_id", _config(item).id), *junit_properties(entry)]
            return report
        cell = item.stash.get(_CELL, None)
        if cell is None or report.when == "teardown" or report.skipped or (report.when == "setup" and report.passed):
            return report
        if report.passed and cell.result is None:
            return report  # a test of this config that ran no benchmark has no figures to record
        if report.passed:
            entry = cell.record_success(self.store)
        else:
            exc = call.excinfo.value if call.excinfo else None
            classification = cell.classify_failure(exc, call.excinfo.exconly() if call.excinfo else str(report.longrepr))
            entry = cell.record_failure(self.store, classification)
            report.sections.append(("pytest-moe", failure_text(entry)))
            if redact(str(report.longrepr)) != str(report.longrepr):  # JUnit's failure text
                report.longrepr = redact(str(report.longrepr))
        apply_waiver(report, cell.cfg, entry)
        self._recorded(cell.cfg.id, entry, "xfailed" if entry.get("status") == "xfailed" else report.outcome)
        props = [("moe_id", cell.cfg.id), *junit_properties(entry)]
        item.user_properties.extend(props)
        report.user_properties = list(report.user_properties) + props
        return report

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """Ctrl-C or SIGTERM: record the configs cut short before teardown stops their servers."""
        for cell in self.active_cells:
            if cell.recorded is None:
                message = f"run interrupted ({excinfo.exconly()}) before {cell.cfg.id} finished"
                self.outcomes.append(cell.record_failure(self.store, Classification(INTERRUPTED_TYPE, message, None)))
                self._recorded(cell.cfg.id, cell.recorded, "interrupted")

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        """pytest-timeout's ``thread`` method ends the process with ``os._exit``: no teardown, no report.

        For matrix tests we arm the same timer, but before pytest-timeout's own handler dumps the stacks
        and exits, the config is recorded as a Timeout and its server tree is killed.
        """
        if settings.method != "thread" or _config(item) is None:
            return None
        import pytest_timeout

        timer = threading.Timer(settings.timeout, self._thread_timeout, (item, settings, pytest_timeout.timeout_timer))
        timer.name = f"pytest-moe timeout {item.nodeid}"
        timer.daemon = True

        def cancel() -> None:
            timer.cancel()
            timer.join()

        item.cancel_timeout = cancel
        timer.start()
        return True

    def _thread_timeout(self, item: pytest.Item, settings: Any, exit_via: Any) -> None:
        cell = item.stash.get(_CELL, None)
        if cell is not None:
            if cell.recorded is None:
                message = f"Timeout >{settings.timeout}s (pytest-timeout, thread method) in {cell.cfg.id}"
                cell.record_failure(self.store, Classification("Timeout", message, None))
                self._recorded(cell.cfg.id, cell.recorded, "timeout")
            if cell.server is not None and cell.server.proc is not None:
                kill_tree(cell.server.proc.pid, grace_s=0)
        exit_via(item, settings)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        """xdist controller: a worker died (e.g. SIGKILL) mid-config; its janitor stopped the server."""
        config_id = crashitem[crashitem.find("[") + 1 : crashitem.rfind("]")]
        if "::" not in config_id:
            return
        entry = crashed_worker_entry(config_id, self.options, f"pytest-xdist worker crashed while running {config_id}")
        self.store.record_failure(config_id, entry)
        self._recorded(config_id, entry, "crashed")
        self.outcomes.append({"moe_id": config_id, **entry})

    def _recorded(self, key: str, entry: dict[str, Any], outcome: str) -> None:
        self.config.hook.pytest_moe_entry_recorded(config=self.config, key=key, entry=entry, outcome=outcome)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        """Collect outcomes here: under xdist this runs in the controller with the workers' properties."""
        props = dict(report.user_properties)
        if "moe_id" in props and report.when != "teardown":
            self.outcomes.append(props)

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        if hasattr(config, "workerinput") or not (self.outcomes or self._store and self._store.warnings):
            return
        successes = [o for o in self.outcomes if o.get("status") == "success"]
        failures = [o for o in self.outcomes if o.get("status") != "success"]
        text = summary_markdown(successes, failures) + "".join(f"\n> warning: {w}\n" for w in self.store.warnings)
        terminalreporter.section("pytest-moe results")
        terminalreporter.write(text)
        terminalreporter.write_line(f"results: {self.store.success_path} and {self.store.failure_path}")
        step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if step_summary:
            with open(step_summary, "a", encoding="utf-8") as fh:
                fh.write(text)


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture
def moe_cell(request: pytest.FixtureRequest, moe_config: ServerConfig):
    """The run of one config; leases its GPUs for the whole test (released after the memory check)."""
    session: MoESession = request.config.pluginmanager.get_plugin("moe-session")
    lease = gpus.GpuLeaser().acquire(moe_config.gpus_per_node, config_id=moe_config.id) if moe_config.gpus_per_node else None
    try:
        cell = CellRun(moe_config, session.options, lease=lease, progress=_progress_writer(request.config))
        request.node.stash[_CELL] = cell
        session.active_cells.append(cell)
        yield cell
        session.active_cells.remove(cell)
    finally:
        if lease is not None:
            lease.release()


@pytest.fixture
def moe_server(moe_cell: CellRun):
    """A ready server for the config; always torn down, whatever happens in the test."""
    server = moe_cell.start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def moe_bench(moe_cell: CellRun, moe_server):
    """Run the benchmark (and the profiles with ``--moe-profile``) against ``moe_server``."""
    return moe_cell.benchmark


# -- helpers -------------------------------------------------------------------------------------
def _config(item: pytest.Item) -> ServerConfig | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("moe_config") if callspec else None


def _progress_writer(config: pytest.Config):
    """Progress lines go to the terminal even while output is captured."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")

    def write(line: str) -> None:
        if reporter is None or capman is None:
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(line)

    return write


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")

