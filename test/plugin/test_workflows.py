"""The GitHub workflows say what the nightly promises: schedule, dispatch inputs, per-GPU-count jobs,
timeouts, and artifacts uploaded even when a job fails or is cancelled."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _load(name):
    data = yaml.safe_load((ROOT / ".github/workflows" / name).read_text())
    return data, data.get("on", data.get(True))  # PyYAML reads the bare key `on` as True


def test_nightly_workflow():
    wf, on = _load("nightly.yml")
    assert on["schedule"] and set(on["workflow_dispatch"]["inputs"]) >= {"marker", "config"}
    job = wf["jobs"]["matrix"]
    assert {e["gpus"] for e in job["strategy"]["matrix"]["include"]} == {1, 2, 4, 8}
    assert job["strategy"]["fail-fast"] is False and job["timeout-minutes"]
    steps = {s.get("name"): s for s in job["steps"]}
    run = steps["Run the matrix"]["run"]
    assert 'select="gpus${{ matrix.gpus }}"' in run and "--moe-config" in run and "--junitxml" in run
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"


def test_ci_workflow_runs_the_readme_test_command():
    wf, _ = _load("ci.yml")
    runs = [s.get("run", "") for s in wf["jobs"]["cpu-suite"]["steps"]]
    assert any(r.startswith("bash scripts/test.sh") for r in runs)
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text() and "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()
