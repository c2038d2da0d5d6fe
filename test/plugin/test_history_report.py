"""The morning report: the HTML file's content, and the page in a real headless chromium.

The browser is Debian's ``chromium`` driven by Playwright (its own browser download does not work
here). Missing chromium or Playwright skips with the reason; under ``CI=true`` it fails.
Set ``PYTEST_MOE_DOCS_SCREENSHOT=1`` to refresh ``docs/report.png`` from this test.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from pytest_moe.history.html import parse_since
from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import HistoryStore, RunInfo, utcnow

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome"))
                 if p and Path(p).exists()), "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NIGHTS = 14
CONFIGS = ("TP1_auto", "TP2_auto", "TP1_triton")


def _entry(model: str, cfg: str, thr: float, n: int) -> dict:
    return {
        "model": model, "config": cfg, "engine": "vllm-cpu", "engine_version": "0.32.0", "batch_size": 1,
        "output_throughput_tok_per_s": thr, "itl_ms": 1000 / thr, "ttft_s": 0.05 + 0.001 * (n % 3),
        "latency_s": 0.05 + 512 / thr, "input_throughput_tok_per_s": 40000.0, "gpu_name": "cpu", "gpu_count": 0,
        "moe_kernel": "CPU", "server_command": f"python -m vllm.entrypoints.openai.api_server --model {model}",
        "repro_command": f"pytest test/nightly --moe-config {model}::{cfg}", "status": "success",
        "checks": {
            "benchmark": {"status": "passed", "rows": [{"batch_size": 1, "latency_s": 0.05 + 512 / thr, "ttft_s": 0.05 + 0.001 * (n % 3),
                                                        "input_throughput_tok_per_s": 40000.0, "output_throughput_tok_per_s": thr, "itl_ms": 1000 / thr}]},
            "accuracy": {"status": "passed", "score": 0.62 + 0.01 * (n % 2), "n": 200, "lower_bound": 0.55, "floor": 0.5, "per_question_file": "q.jsonl"},
        },
    }


@pytest.fixture
def history(tmp_path):
    """Two weeks of nights: noise, a planted 30 % drop last night on one config, an OOM flip on another."""
    url = f"sqlite:///{tmp_path / 'history.sqlite'}"
    store = HistoryStore(url)
    rnd = random.Random(3)
    start = utcnow() - timedelta(days=NIGHTS, hours=-12)  # nights at noon: a 7d window holds exactly 7
    for n in range(NIGHTS):
        run = RunInfo(run_id=f"night-{n:02d}", started_at=start + timedelta(days=n), host="runner-1",
                      pytest_moe_version="0.1.0", suite_commit="4841787")
        for model in ("tiny-qwen3-moe", "tiny-mixtral"):
            for cfg in CONFIGS:
                key = f"{model}::{cfg}"
                thr = (140.0 if "qwen" in model else 95.0) * rnd.uniform(0.97, 1.03)
                if n == NIGHTS - 1 and key == "tiny-qwen3-moe::TP2_auto":
                    thr *= 0.7
                entry = _entry(model, cfg, thr, n)
                if n == NIGHTS - 1 and key == "tiny-mixtral::TP2_auto":
                    entry = {"model": model, "config": cfg, "engine": "vllm-cpu", "status": "failed", "error_type": "OOM",
                             "error_message": "CUDA out of memory", "repro_command": f"pytest test/nightly --moe-config {key}"}
                store.record(run, provenance(key, entry), entry_rows(entry))
    store.dispose()
    return url


def _report(url: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "pytest_moe", "report", "--html", str(out), "--moe-history", url, *extra],
                          capture_output=True, text=True, env=env, cwd=out.parent, timeout=120)


def test_report_command_writes_one_self_contained_file(history, tmp_path):
    out = tmp_path / "report.html"
    done = _report(history, out, "--since", "7d")
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "http://" not in page and "https://" not in page and "<script src" not in page and "<link" not in page
    assert "tiny-qwen3-moe::TP2_auto" in done.stdout and "regressed" in done.stdout
    assert "passed → failed" in page
    assert page.count("<svg class=chart") == 2 * 4  # two models × throughput, ITL, TTFT, accuracy
    assert page.count("<th title='night-") == 7  # --since 7d: the nights of the last week


def test_report_refuses_a_bad_since(history, tmp_path):
    done = _report(history, tmp_path / "r.html", "--since", "fortnight")
    assert done.returncode == 2 and done.stderr.startswith("error: --since 'fortnight' is not a duration")
    assert parse_since("2w") == timedelta(weeks=2)


def _browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    reason = None if sync_playwright else "playwright is not installed (pip install playwright)"
    if reason is None and not Path(CHROMIUM).exists():
        reason = "no chromium found (apt-get install chromium)"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: the report must be checked in a browser)")
        pytest.skip(reason)
    return sync_playwright


def test_report_renders_in_headless_chromium(history, tmp_path):
    sync_playwright = _browser()
    out = tmp_path / "report.html"
    assert _report(history, out).returncode == 0
    console_errors, requests = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: console_errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url) if not r.url.startswith("file://") else None)
            page.goto(out.as_uri())
            charts = page.locator("svg.chart")
            assert charts.count() == 8
            for i in range(charts.count()):
                box = charts.nth(i).bounding_box()
                assert box and box["width"] > 300 and box["height"] > 100
            lines = page.locator("svg.chart polyline")
            assert lines.count() == 8 * len(CONFIGS)  # every config a line in each chart (the OOM one stops a night early)
            assert all(len(lines.nth(i).get_attribute("points").split()) >= 2 for i in range(lines.count()))
            marker = page.locator("svg.chart path.mark.bad").first
            marker.click()
            detail = page.locator("#detail").inner_text()
            assert "tiny-qwen3-moe::TP2_auto" in detail and "reproduce: pytest test/nightly --moe-config tiny-qwen3-moe::TP2_auto" in detail
            assert "kernel CPU" in detail and "suite commit 4841787" in detail
            page.locator("table.grid td[data-c]").last.click()
            assert page.locator("table.grid td[data-c]").count() == 2 * len(CONFIGS) * NIGHTS
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert console_errors == [] and requests == []
    assert shot.stat().st_size > 10_000
    if os.environ.get("PYTEST_MOE_DOCS_SCREENSHOT") == "1":
        shutil.copy(shot, ROOT / "docs" / "report.png")


def test_nightly_workflow_keeps_history_outside_the_workspace_and_ends_with_one_report():
    import yaml

    wf = yaml.safe_load((ROOT / ".github/workflows/nightly.yml").read_text())
    matrix_env = wf["jobs"]["matrix"]["env"]
    assert "secrets.PYTEST_MOE_HISTORY_URL" in matrix_env["PYTEST_MOE_HISTORY"]
    assert "github.run_id" in matrix_env["PYTEST_MOE_RUN_ID"]  # the GPU-count jobs append to one run
    job = wf["jobs"]["report"]
    assert job["needs"] == "matrix" and job["if"] == "always()"
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    assert "python -m pytest_moe merge artifacts/*/ --out merged" in runs
    assert "python -m pytest_moe report --html merged/report.html" in runs and "$GITHUB_STEP_SUMMARY" in runs
    download = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/download-artifact"))
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert "github.run_id" in download["with"]["pattern"] and upload["with"]["path"] == "merged"
