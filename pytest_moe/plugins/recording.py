"""Recording outcomes: every check's result, boot failures, timeouts, interrupts and crashed workers.

Why its own plugin object: recording must happen whatever ends a check (a failed assert, a server crash,
pytest-timeout, Ctrl-C, a SIGKILLed xdist worker), and each of those arrives through a different hook.
It also owns the cells (``runner.CellPool``): a config's server is stopped when the next item belongs to
another config, so each config boots once for all of its checks.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
from typing import Any

import pytest

from pytest_moe.checks import CHECKS
from pytest_moe.configs import ServerConfig
from pytest_moe.errors import Classification, ErrorType
from pytest_moe.plugins import options
from pytest_moe.plugins.collection import PREDICTED, MoECollection, check_of, config_of
from pytest_moe.redact import redact
from pytest_moe.report import failure_text, junit_properties
from pytest_moe.results import ResultsError, ResultsStore
from pytest_moe.runner import INTERRUPTED_TYPE, CellPool, CellRun, RunOptions, crashed_worker_entry, predicted_entry
from pytest_moe.server import kill_tree
from pytest_moe.waivers import apply_waiver

CELL = pytest.StashKey[CellRun]()
#: The JUnit/user property carrying the whole entry as JSON: the summary reads it (also from xdist workers).
ENTRY_PROPERTY = "moe_entry"


class MoERecorder:
    def __init__(self, config: pytest.Config, collection: MoECollection, progress: Any):
        self.config = config
        self.collection = collection
        self.progress = progress
        self._store: ResultsStore | None = None
        self._pool: CellPool | None = None
        #: The cell whose check runs in this process right now (an interrupt or timeout records it).
        self.running: CellRun | None = None
        self._previous_sigterm: Any = None

    @property
    def options(self) -> RunOptions:
        matrix = self.collection.matrix
        return options.run_options(self.config, str(matrix.path) if matrix else options.DEFAULT_MATRIX)

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.options.results_dir)
        return self._store

    @property
    def pool(self) -> CellPool:
        if self._pool is None:
            self._pool = CellPool(self.options, self.progress)
        return self._pool

    def cell(self, item: pytest.Item, cfg: ServerConfig) -> CellRun:
        cell = self.pool.get(cfg)
        item.stash[CELL] = cell
        return cell

    # -- signals: a cancelled CI job sends SIGTERM; turn it into an interrupt so teardown runs ------
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self._pool is not None:
            self._pool.close_all()
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)

    @pytest.hookimpl(trylast=True)
    def pytest_collection(self, session: pytest.Session) -> None:
        """Before any server boots (the controller, once): results that could not be written are a usage error."""
        if self.collection.matrix is None or hasattr(self.config, "workerinput"):
            return
        try:
            self.store.check()
        except ResultsError as exc:
            raise pytest.UsageError(f"--moe-results-dir: {exc}") from None

    def _recorded(self, key: str, entry: dict[str, Any], outcome: str) -> None:
        """Tell the other plugin objects (the history) that this config's entry was written."""
        self.config.hook.pytest_moe_entry_recorded(config=self.config, key=key, entry=entry, outcome=outcome)

    # -- one boot per config -----------------------------------------------------------------------
    @pytest.hookimpl(trylast=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> None:
        """After a config's last item (the next one is another config, or none), stop its server."""
        cfg = config_of(item)
        self.running = None
        if cfg is not None and self._pool is not None and (nextitem is None or getattr(config_of(nextitem), "id", None) != cfg.id):
            self._pool.close(cfg.id)

    # -- outcomes ----------------------------------------------------------------------------------
    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        report = yield
        cfg = config_of(item)
        problems = item.stash.get(PREDICTED, None)
        if problems and report.when == "setup" and report.skipped:
            entry = predicted_entry(cfg, self.options, problems).to_dict()
            self.store.record_failure(cfg.id, entry)
            self._recorded(cfg.id, entry, "predicted")
            self._attach(item, report, entry, record_on_item=False)
            return report
        cell = item.stash.get(CELL, None)
        check = check_of(item)
        if cell is None or check is None or report.when == "teardown" or report.skipped:
            return report
        if report.when == "setup" and report.passed:
            return report
        if report.passed:
            entry = cell.record(self.store)
        else:
            result = cell.results.get(check.name)
            failure = None
            if result is None or result.passed:  # not a verdict: an exception (boot, crash, timeout, bad answer)
                exc = call.excinfo.value if call.excinfo else None
                failure = cell.classify_failure(exc, call.excinfo.exconly() if call.excinfo else str(report.longrepr))
                cell.check_raised(check, failure)
            entry = cell.record(self.store, failure)
            report.sections.append(("pytest-moe", failure_text(entry)))
            if redact(str(report.longrepr)) != str(report.longrepr):  # JUnit's failure text
                report.longrepr = redact(str(report.longrepr))
        apply_waiver(report, cell.cfg, entry)
        if entry.get("status") == "xfailed":  # the waiver turned the written failure into an expected one
            self.store.record_failure(cell.cfg.id, entry)
        self._recorded(cell.cfg.id, entry, "xfailed" if entry.get("status") == "xfailed" else report.outcome)
        self._attach(item, report, entry, record_on_item=True)
        return report

    @staticmethod
    def _attach(item: pytest.Item, report: pytest.TestReport, entry: dict[str, Any], record_on_item: bool) -> None:
        props = [("moe_id", f"{entry['model']}::{entry['config']}"), *junit_properties(entry),
                 (ENTRY_PROPERTY, json.dumps(entry, sort_keys=True))]
        if record_on_item:
            item.user_properties.extend(props)
        report.user_properties = list(report.user_properties) + props

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        """Ctrl-C or SIGTERM: record the config cut short before teardown stops its server."""
        cell = self.running
        if cell is not None:
            message = f"run interrupted ({excinfo.exconly()}) before {cell.cfg.id} finished"
            self._recorded(cell.cfg.id, cell.record(self.store, Classification(INTERRUPTED_TYPE, message, None)), "interrupted")

    @pytest.hookimpl(optionalhook=True, tryfirst=True)
    def pytest_timeout_set_timer(self, item: pytest.Item, settings: Any) -> bool | None:
        """pytest-timeout's ``thread`` method ends the process with ``os._exit``: no teardown, no report.

        For matrix tests we arm the same kind of timer; when it fires, the config is recorded as a Timeout, its
        server tree is killed, and the process ends the way pytest-timeout's would (stacks dumped, exit code 1).
        """
        if settings.method != "thread" or config_of(item) is None:
            return None
        timer = threading.Timer(settings.timeout, self._thread_timeout, (item, settings))
        timer.name = f"pytest-moe timeout {item.nodeid}"
        timer.daemon = True

        def cancel() -> None:
            timer.cancel()
            timer.join()

        item.cancel_timeout = cancel
        timer.start()
        return True

    def _thread_timeout(self, item: pytest.Item, settings: Any) -> None:
        cell = item.stash.get(CELL, None)
        if cell is not None:
            message = f"Timeout >{settings.timeout}s (pytest-timeout, thread method) in {cell.cfg.id}"
            self._recorded(cell.cfg.id, cell.record(self.store, Classification(ErrorType.TIMEOUT, message, None)), "timeout")
            if cell.server is not None and cell.server.proc is not None:
                kill_tree(cell.server.proc.pid, grace_s=0)
        _exit_like_pytest_timeout(item, settings)

    @pytest.hookimpl(optionalhook=True)
    def pytest_handlecrashitem(self, crashitem: str, report: pytest.TestReport, sched: Any) -> None:
        """xdist controller: a worker died (e.g. SIGKILL) mid-config; its janitor stopped the server."""
        param = crashitem[crashitem.find("[") + 1 : crashitem.rfind("]")]
        config_id, dash, check = param.rpartition("-")
        if not dash or check not in CHECKS:
            config_id = param
        if "::" not in config_id:
            return
        entry = crashed_worker_entry(config_id, self.options, f"pytest-xdist worker crashed while running {param}").to_dict()
        self.store.record_failure(config_id, entry)
        self._recorded(config_id, entry, "crashed")
        report.user_properties = list(report.user_properties) + [
            ("moe_id", config_id), (ENTRY_PROPERTY, json.dumps(entry, sort_keys=True))]


def _exit_like_pytest_timeout(item: pytest.Item, settings: Any) -> None:
    """What pytest-timeout's thread method does on expiry (its ``timeout_timer`` is private): stop capturing, show what
    was captured, dump every thread's stack, exit 1.  Without the first step the stacks went into the capture buffer,
    which ``os._exit`` throws away: the run ended with no word of why."""
    capman = item.config.pluginmanager.get_plugin("capturemanager")
    captured = ("", "")
    if capman is not None:
        capman.suspend_global_capture(in_=True)
        captured = capman.read_global_capture()
    sys.stderr.write(f"\n{'+' * 35} Timeout {'+' * 35}\n")
    for name, text in zip(("stdout", "stderr"), captured):
        if text:
            sys.stderr.write(f"{'~' * 30} Captured {name} {'~' * 30}\n{text}")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.write(f"{'+' * 35} Timeout {'+' * 35}\n")
    sys.stderr.flush()
    os._exit(1)


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")
