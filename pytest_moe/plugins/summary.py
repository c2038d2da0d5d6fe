"""The end-of-run summary: per model, the benchmark rows, the accuracy and agreement verdicts, the failures.

Why from report properties and not from the cells: under pytest-xdist only the controller prints, and it
sees the workers' results only as the ``user_properties`` of their reports.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pytest_moe.plugins.recording import ENTRY_PROPERTY, MoERecorder
from pytest_moe.report import publish, summary_markdown


#: ``workeroutput`` key under which an xdist worker hands its results-file warnings to the controller.
WARNINGS_KEY = "pytest_moe_warnings"


class MoESummary:
    def __init__(self, recorder: MoERecorder):
        self.recorder = recorder
        #: The last entry recorded per config in this run (a config's later checks update it).
        self.entries: dict[str, dict[str, Any]] = {}
        #: Warnings of the xdist workers' results writes (a worker writes, only the controller prints).
        self.worker_warnings: list[str] = []

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        output = getattr(session.config, "workeroutput", None)
        if output is not None and self.recorder.store.warnings:
            output[WARNINGS_KEY] = list(self.recorder.store.warnings)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker finished; keep what its results writes warned about."""
        self.worker_warnings += getattr(node, "workeroutput", {}).get(WARNINGS_KEY, [])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props = dict(report.user_properties)
        if ENTRY_PROPERTY in props and report.when != "teardown":
            self.entries[props["moe_id"]] = json.loads(props[ENTRY_PROPERTY])

    def pytest_terminal_summary(self, terminalreporter, exitstatus: int, config: pytest.Config) -> None:
        store = self.recorder.store
        warnings = list(dict.fromkeys(store.warnings + self.worker_warnings))  # each once, in order
        if hasattr(config, "workerinput") or not (self.entries or warnings):
            return
        entries = [self.entries[key] for key in sorted(self.entries)]
        text = summary_markdown([e for e in entries if e.get("status") == "success"],
                                [e for e in entries if e.get("status") != "success"])
        text += "".join(f"\n> warning: {w}\n" for w in warnings)
        publish(terminalreporter, "pytest-moe results", text)
        terminalreporter.write_line(f"results: {store.success_path} and {store.failure_path}")
