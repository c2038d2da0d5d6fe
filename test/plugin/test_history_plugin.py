"""The history inside a pytest run: rows per config as it finishes, one run id across xdist workers,
``--moe-fail-on-regression`` in the JUnit file, and the "what changed" summary in ``$GITHUB_STEP_SUMMARY``.

The matrix tests here hand the cell a benchmark result instead of booting a server: what is under test is
the recording path, and a real server's figures would not be planted.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from xml.etree import ElementTree

import pytest

from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import HistoryStore, RunInfo

MATRIX = """\
defaults: {engine: vllm-cpu, moe_backends: [auto]}
models:
  Tiny:
    path: tiny:tiny-qwen3-moe
    tp: [1, 2]
"""

TEST_FILE = """\
import os
from pytest_moe.bench import compute_metrics
from pytest_moe.entries import BenchmarkResult, CheckStatus

def test_benchmark(moe_check, moe_cell):
    thr = float(os.environ["FAKE_OUTPUT_THROUGHPUT"])
    row = compute_metrics(1, 4096, 512, 0.1 + 512 / thr, 0.1).record()
    moe_cell.results[moe_check.name] = BenchmarkResult(status=CheckStatus.PASSED, rows=[row])
"""


@pytest.fixture
def suite(pytester, tmp_path, monkeypatch):
    pytester.makefile(".yaml", model_matrix=MATRIX)
    pytester.makepyfile(test_nightly=TEST_FILE)
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    store = HistoryStore(url)
    start = datetime(2026, 11, 1, 2)
    for n, thr in enumerate([99.0, 101.0, 100.0, 98.5, 100.5]):
        run = RunInfo(run_id=f"night-{n}", started_at=start + timedelta(days=n))
        for cfg in ("TP1_auto", "TP2_auto"):
            entry = {"model": "Tiny", "config": cfg, "engine": "vllm-cpu", "batch_size": 1, "output_throughput_tok_per_s": thr,
                     "itl_ms": 1000 / thr, "ttft_s": 0.1, "latency_s": 0.1 + 512 / thr, "gpu_name": "cpu",
                     "status": "success"}
            store.record(run, provenance(f"Tiny::{cfg}", entry), entry_rows(entry))
    store.dispose()
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "summary.md"))
    monkeypatch.setenv("PYTEST_MOE_RUN_ID", "gh-4242-1")
    return pytester, url, tmp_path


def _run(suite, throughput: float, *extra: str):
    pytester, url, tmp_path = suite
    pytester._monkeypatch.setenv("FAKE_OUTPUT_THROUGHPUT", str(throughput))
    junit = tmp_path / "junit.xml"
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "-m", "benchmark", "--moe-no-preflight", "--moe-history", url,
        "--moe-results-dir", str(tmp_path / "res"), "--junitxml", str(junit), *extra,
    )
    return result, junit


def test_regression_fails_the_config_with_the_flag_and_lands_in_junit(suite):
    result, junit = _run(suite, 70.0, "--moe-fail-on-regression")
    result.assert_outcomes(failed=2)
    failures = [tc.find("failure").get("message", "") + (tc.find("failure").text or "")
                for tc in ElementTree.parse(junit).getroot().iter("testcase")]
    assert len(failures) == 2 and all("regressed against the run history" in f for f in failures)
    _, url, tmp_path = suite
    store = HistoryStore(url)
    rows = store.rows(run_ids=["gh-4242-1"])
    assert {r["config_id"] for r in rows} == {"Tiny::TP1_auto", "Tiny::TP2_auto"}  # both workers, one run
    thr = [r for r in rows if r["metric"] == "output_throughput_tok_per_s"]
    assert [round(r["value"], 2) for r in thr] == [70.0, 70.0]
    assert {r["moe_backend"] for r in thr} == {"auto"} and all(r["config_hash"] for r in thr)
    run = store.runs()[-1]
    assert (run["run_id"], run["host"] is not None, run["pytest_moe_version"] is not None) == ("gh-4242-1", True, True)
    summary = (tmp_path / "summary.md").read_text()
    assert "What changed since last night" in summary and "| Tiny::TP1_auto | output throughput | 1 | 70 |" in summary


def test_without_the_flag_a_regression_is_reported_not_failed(suite):
    result, _ = _run(suite, 70.0)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*2 configs: * regressions*", "*Tiny::TP1_auto | output throughput | 1 | 70 |*regressed*"])


def test_history_off_writes_nothing(suite):
    pytester, url, tmp_path = suite
    pytester._monkeypatch.setenv("FAKE_OUTPUT_THROUGHPUT", "100")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-m", "benchmark", "--moe-no-preflight", "--moe-history", "off",
                                           "--moe-results-dir", str(tmp_path / "res"))
    result.assert_outcomes(passed=2)
    assert not HistoryStore(url).has_run("gh-4242-1")


def test_bad_history_url_is_a_usage_error(suite):
    pytester, _, _ = suite
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--moe-history", "oracle://db/x")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--moe-history / $PYTEST_MOE_HISTORY / ini moe_history: history URL oracle://db/x: only sqlite and postgresql are supported*"])
    assert "Traceback" not in result.stderr.str()
