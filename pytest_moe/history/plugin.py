"""The history's pytest side: record each config's rows when it finishes, judge them, summarise the run.

Why rows are written from the ``pytest_moe_entry_recorded`` hook (in whichever process recorded the entry)
and not at session end: a run that dies at config 40 of 60 keeps the 39 finished configs' history, exactly
as the results JSON files do. The controller of an xdist run hands its run id to the workers, so all of
them — and, with ``PYTEST_MOE_RUN_ID``, the jobs of one workflow run — append to one run.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from pytest_moe.report import publish
from pytest_moe.history.regress import Change, changes_markdown, compare
from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import (
    ENV_VAR, INI_NAME, HistoryError, HistoryStore, RunInfo, host_name, parse_url, resolve_url, utcnow,
)
from pytest_moe.configs import HistorySettings, Matrix

RUN_ID_ENV = "PYTEST_MOE_RUN_ID"
_WORKER_KEY = "moe_history_run"


def add_history_options(parser: pytest.Parser, group: Any) -> None:
    group.addoption("--moe-history", metavar="URL",
                    help=f"history database: sqlite:///PATH, postgresql://..., a file path, or 'off' "
                         f"(default: ${ENV_VAR}, then ini {INI_NAME}, then SQLite in the user cache dir)")
    group.addoption("--moe-fail-on-regression", action="store_true",
                    help="a config whose metrics regressed against the history fails its test (default: reported only)")
    parser.addini(INI_NAME, "history database URL (overridden by $PYTEST_MOE_HISTORY and --moe-history)", default="")


class HistoryPlugin:
    def __init__(self, config: pytest.Config, matrix: Callable[[], Matrix | None]):
        self.config = config
        self._matrix = matrix
        self.url = resolve_url(config.getoption("moe_history"), os.environ.get(ENV_VAR), config.getini(INI_NAME))
        if self.url:
            try:
                parse_url(self.url)
            except HistoryError as exc:
                raise pytest.UsageError(f"--moe-history / ${ENV_VAR} / ini {INI_NAME}: {exc}") from None
        self.fail_on_regression: bool = config.getoption("moe_fail_on_regression")
        inherited = getattr(config, "workerinput", {}).get(_WORKER_KEY)
        if inherited:
            self.run = RunInfo(**{**inherited, "started_at": datetime.fromisoformat(inherited["started_at"])})
        else:
            self.run = _this_run(config.rootpath)
        self._store: HistoryStore | None = None
        self.error: str | None = None
        #: Regressions found per config id in this process, until that config's report picks them up.
        self.regressions: dict[str, list[Change]] = {}

    @property
    def settings(self) -> HistorySettings:
        matrix = self._matrix()
        return matrix.history if matrix else HistorySettings()

    def store(self) -> HistoryStore | None:
        """Opened on first use: a pytest run that records nothing never touches the database."""
        if self._store is None and self.url and self.error is None:
            try:
                self._store = HistoryStore(self.url)
            except HistoryError as exc:
                self.error = str(exc)
        return self._store

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: every worker appends to this run."""
        info = {**self.run.__dict__, "started_at": self.run.started_at.isoformat()}
        node.workerinput[_WORKER_KEY] = info

    def pytest_moe_entry_recorded(self, config: pytest.Config, key: str, entry: dict[str, Any], outcome: str) -> None:
        store = self.store()
        if store is None:
            return
        matrix = self._matrix()
        cfg = matrix.by_id().get(key) if matrix else None
        try:
            store.record(self.run, provenance(key, entry, cfg), entry_rows(entry))
            if self.fail_on_regression:
                changes = compare(store.rows(config_ids=[key]), {self.run.run_id}, self.settings)
                self.regressions[key] = changes.regressions_of(key)
        except sa.exc.SQLAlchemyError as exc:  # a history outage must not fail the config that just ran
            self.error = f"history not recorded for {key} in {store.display_url}: {str(exc).splitlines()[0]}"

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):
        """Outermost wrapper: runs after the session recorded the entry (and this plugin judged it)."""
        report = yield
        config_id = dict(report.user_properties).get("moe_id")
        found = self.regressions.pop(config_id, None) if config_id and report.when == "call" else None
        if found and report.passed:
            report.outcome = "failed"
            report.longrepr = f"{config_id} regressed against the run history (--moe-fail-on-regression):\n" + "\n".join(
                f"  {c.metric.label} batch {c.row['batch_size']}: {c.verdict.value:.4g}, baseline median "
                f"{c.verdict.median:.4g}, band {c.verdict.low:.4g} – {c.verdict.high:.4g} ({c.verdict.delta:+.1%})"
                for c in found
            )
        return report

    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        if hasattr(config, "workerinput") or self.url is None or self._matrix() is None:
            return
        store = self.store()
        if store is not None and store.has_run(self.run.run_id):
            tonight = {r["config_id"] for r in store.rows(run_ids=[self.run.run_id])}
            changes = compare(store.rows(config_ids=tonight), {self.run.run_id}, self.settings)
            text = changes_markdown(changes)
            publish(terminalreporter, "pytest-moe history", text)
            terminalreporter.write_line(f"history: run {self.run.run_id} in {store.display_url}")
        if self.error:
            terminalreporter.write_line(f"pytest-moe history: {self.error}", red=True)


def _this_run(rootpath: Path) -> RunInfo:
    started = utcnow()
    driver, cuda = _driver_and_cuda()
    return RunInfo(
        run_id=os.environ.get(RUN_ID_ENV) or f"{started:%Y%m%dT%H%M%S}-{host_name()}-{secrets.token_hex(3)}",
        started_at=started,
        pytest_moe_version=_version(),
        suite_commit=_git_commit(rootpath),
        host=host_name(),
        gpu_driver=driver,
        cuda_version=cuda,
    )


def _version() -> str | None:
    try:
        return metadata.version("pytest-moe")
    except metadata.PackageNotFoundError:
        return None


def _git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _driver_and_cuda() -> tuple[str | None, str | None]:
    """From NVML when a driver is there; CPU runs leave both empty."""
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
    except pynvml.NVMLError:  # no driver or no GPU: not a GPU run
        return None, None
    driver = driver.decode() if isinstance(driver, bytes) else str(driver)
    return driver, f"{cuda // 1000}.{cuda % 1000 // 10}"
