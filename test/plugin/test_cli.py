"""``python -m pytest_moe`` sub-commands, run as a user runs them (a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "test/plugin/data/configs"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_moe", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_inspect_prints_the_moe_description_as_json():
    proc = _cli("inspect", str(CONFIGS / "qwen3-235b-a22b-instruct-2507-fp8.json"))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    assert (spec["num_experts"], spec["experts_per_token"], spec["moe_intermediate_size"]) == (128, 8, 1536)


def test_preflight_exit_codes_and_rule_ids():
    model = str(CONFIGS / "qwen3-235b-a22b-instruct-2507-fp8.json")
    bad = _cli("preflight", "--model", model, "--tp", "8", "--quantization", "fp8", "--gpu", "H200", "--gpus", "8")
    assert bad.returncode == 1
    verdict = json.loads(bad.stdout)
    assert verdict["ok"] is False and verdict["problems"][0]["rule_id"] == "fp8-block-alignment"
    assert "--ep-size 2" in verdict["problems"][0]["message"]
    good = _cli("preflight", "--model", model, "--tp", "8", "--ep", "2", "--quantization", "fp8", "--gpu", "H200")
    assert good.returncode == 0 and json.loads(good.stdout) == {"ok": True, "problems": []}


def test_plan_lists_passing_and_rejected_combinations():
    proc = _cli("plan", "--model", str(CONFIGS / "glm-4.6.json"), "--gpu", "H200", "--gpus", "8")
    assert proc.returncode == 0
    assert "passes" in proc.stdout and "weights-fit-memory" in proc.stdout


def test_classify_prints_the_type_alone(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("INFO loading\ntorch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    proc = _cli("classify", str(log))
    assert (proc.returncode, proc.stdout) == (0, "OOM\n")


def test_bad_input_is_one_sentence_and_exit_2(tmp_path):
    for args, message in [
        (("classify", str(tmp_path / "missing.log")), f"error: cannot read {tmp_path / 'missing.log'}: No such file or directory"),
        (("inspect", str(tmp_path)), "error: "),
        (("plan", "--model", str(CONFIGS / "glm-4.6.json"), "--gpu", "Z100"), "error: unknown GPU 'Z100'"),
        (("list", "--moe-matrix", str(tmp_path / "nope.yaml")), "error: cannot read matrix file"),
    ]:
        proc = _cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
