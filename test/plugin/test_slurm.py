"""``submit`` against a real one-node Slurm started by the fixtures (stand-in engine, one real vLLM CPU config).

Unit tests of the job rendering and recording come first; they need no Slurm.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from fakes.standin import interruptible
from local_slurm import local_slurm  # noqa: F401 (fixture)

from pytest_moe.matrix import load_matrix
from pytest_moe.slurm import Job, JobState, Submission, SubmitOptions, forwarded_args

FAKES = Path(__file__).parent / "fakes"
REPO = Path(__file__).resolve().parents[2]
TEST_FILE = """\
def test_serves(moe_config, moe_check, moe_server):
    assert moe_server.alive()
"""


def _matrix(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "model_matrix.yaml"
    path.write_text(body)
    return path


# -- no Slurm needed --------------------------------------------------------------------------------
def test_sbatch_asks_for_exactly_the_config_resources(tmp_path):
    matrix = load_matrix(_matrix(tmp_path, """\
defaults: {engine: sglang, moe_backends: [auto], timeout_s: 2000}
models:
  Big: {path: org/big, tp: [16], nodes: 2}
  Cpu: {path: tiny:tiny-qwen3-moe, engine: vllm-cpu, tp: [1], timeout_s: 300}
"""))
    big, cpu = matrix.configs
    sub = Submission(configs=[big, cpu], pytest_args=["test/nightly", "-m", "nodes2"], results_dir=tmp_path / "r",
                     opts=SubmitOptions(partition="gpu", account="moe", run_allowance_s=1800))
    argv = sub.sbatch_argv(big, tmp_path / "o.out", None)
    assert "--nodes=2" in argv and "--gres=gpu:8" in argv and "--partition=gpu" in argv and "--account=moe" in argv
    assert f"--time={(2000 + 1800 + 59) // 60}" in argv
    wrapped = argv[argv.index("--wrap") + 1]
    assert wrapped.startswith(f"exec {sys.executable} -m pytest test/nightly -m nodes2 --moe-config Big::TP16_N2_auto ")
    assert f"--moe-results-dir {tmp_path / 'r'}" in wrapped
    cpu_argv = sub.sbatch_argv(cpu, tmp_path / "o.out", 60)
    assert not any(a.startswith("--gres") for a in cpu_argv)  # a CPU config asks for no GPU
    assert f"--time={(60 + 1800 + 59) // 60}" in cpu_argv  # --moe-server-timeout replaces the matrix's


def test_forwarded_args_drop_the_shard_and_the_results_dir():
    args = ["test/nightly", "--moe-shard", "2/4", "-m", "tp8", "--moe-results-dir=x", "--moe-results-dir", "y", "-k", "z"]
    assert forwarded_args(args) == ["test/nightly", "-m", "tp8", "-k", "z"]


@pytest.mark.parametrize("state, error_type", [(JobState.TIMEOUT, "Timeout"), (JobState.NODE_FAIL, "Crash"),
                                               (JobState.PREEMPTED, "ServerError"), (JobState.OUT_OF_MEMORY, "OOM")])
def test_a_job_slurm_ended_is_recorded_with_its_type_keeping_what_the_job_wrote(tmp_path, state, error_type):
    cfg = load_matrix(_matrix(tmp_path, "models:\n  M: {path: org/m, tp: [1], moe_backends: [auto]}\n")).configs[0]
    results = tmp_path / "r"
    sub = Submission(configs=[cfg], pytest_args=[], results_dir=results, opts=SubmitOptions(partition="p"))
    sub.started_at = "2000-01-01T00:00:00"
    from pytest_moe.results import ResultsStore
    ResultsStore(results).record_failure(cfg.id, {"error_type": "ServerError", "log_path": "/logs/m.log", "status": "failed"})
    sub.jobs = [Job(cfg, "42", tmp_path / "o.out", state=state, reason="")]
    sub.record()
    entry = json.loads((results / "failure_results.json").read_text())[cfg.id]
    assert (entry["error_type"], entry["slurm_state"], entry["slurm_job_id"]) == (error_type, state.value, "42")
    assert entry["log_path"] == "/logs/m.log"
    assert f"with state {state.value}" in entry["error_message"]
    assert re.search(rf"{re.escape(cfg.id)}\s+42\s+{state.value}\s+failed: {error_type}", sub.summary())


# -- against the local Slurm -----------------------------------------------------------------------
def _env(cluster) -> dict[str, str]:
    return {**os.environ, **cluster.env, "PYTHONPATH": os.pathsep.join([str(REPO), str(FAKES), os.environ.get("PYTHONPATH", "")])}


def _submit(cluster, cwd: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pytest_moe", "submit", "--slurm-partition", cluster.partition,
                             "--slurm-poll", "1", *args], cwd=cwd, env=_env(cluster), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=interruptible, **kw)


def _leftovers(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_gone(marker: str, timeout_s: float = 60) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _leftovers(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _results(tmp_path: Path, name: str) -> dict:
    path = tmp_path / "results" / name
    return json.loads(path.read_text()) if path.exists() else {}


FAKE_MATRIX = """\
defaults: {{engine: fake, moe_backends: [auto], timeout_s: {timeout}}}
models:
  ok: {{path: {model}/ok, tp: [1]}}
  dies: {{path: {model}/dies, tp: [1], args: [--exit-after, "0.2", --exit-code, "3"]}}
"""


def test_submit_runs_every_config_as_a_job_and_records_what_the_jobs_recorded(local_slurm, tmp_path):
    _matrix(tmp_path, FAKE_MATRIX.format(timeout=60, model=tmp_path / "model"))
    (tmp_path / "test_cells.py").write_text(TEST_FILE)
    proc = _submit(local_slurm, tmp_path, "-p", "fake_engine_plugin", "test_cells.py", "--moe-results-dir", "results")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out  # one config fails
    assert re.search(r"\[pytest-moe submit\] ok::TP1_auto: job \d+", out)
    assert re.search(r"\[pytest-moe submit\] 2 jobs: .*(pending|running)", out)  # the progress line
    assert re.search(r"ok::TP1_auto\s+\d+\s+COMPLETED\s+success", out)
    assert re.search(r"dies::TP1_auto\s+\d+\s+FAILED\s+failed: ServerError", out)
    failure = _results(tmp_path, "failure_results.json")["dies::TP1_auto"]
    assert "exited with code 3" in failure["error_message"]  # written by pytest inside the job
    assert Path(failure["log_path"]).is_relative_to(tmp_path / "results")
    assert local_slurm.squeue_ids() == []
    assert _wait_gone(str(tmp_path / "model")) == []


def test_a_job_killed_at_its_time_limit_is_recorded_as_timeout(local_slurm, tmp_path):
    _matrix(tmp_path, "defaults: {engine: fake, moe_backends: [auto], timeout_s: 3000}\nmodels:\n"
                      f"  slow: {{path: {tmp_path}/model/slow, tp: [1], args: [--ready-after, '100000']}}\n")
    (tmp_path / "test_cells.py").write_text(TEST_FILE)
    proc = _submit(local_slurm, tmp_path, "--slurm-time", "1", "-p", "fake_engine_plugin", "test_cells.py",
                   "--moe-results-dir", "results")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    entry = _results(tmp_path, "failure_results.json")["slow::TP1_auto"]
    assert (entry["error_type"], entry["slurm_state"]) == ("Timeout", "TIMEOUT"), entry
    assert re.search(r"slow::TP1_auto\s+\d+\s+TIMEOUT\s+failed: Timeout", out)
    assert _wait_gone(str(tmp_path / "model")) == []


def test_ctrl_c_on_the_submitter_cancels_every_job_and_leaves_no_process(local_slurm, tmp_path):
    _matrix(tmp_path, "defaults: {engine: fake, moe_backends: [auto], timeout_s: 3000}\nmodels:\n"
                      f"  a: {{path: {tmp_path}/model/a, tp: [1], args: [--ready-after, '100000']}}\n"
                      f"  b: {{path: {tmp_path}/model/b, tp: [1], args: [--ready-after, '100000']}}\n")
    (tmp_path / "test_cells.py").write_text(TEST_FILE)
    proc = _submit(local_slurm, tmp_path, "-p", "fake_engine_plugin", "test_cells.py", "--moe-results-dir", "results")
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if re.search(r"2 jobs: .*2 running", line):
                break
        deadline = time.monotonic() + 60
        while len(_leftovers(str(tmp_path / "model"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)  # both stand-in servers are up inside their jobs
        assert len(_leftovers(str(tmp_path / "model"))) >= 2, "".join(lines)
        proc.send_signal(signal.SIGINT)
        out = "".join(lines) + proc.communicate(timeout=180)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert "cancelling 2 job(s)" in out
    assert local_slurm.squeue_ids() == []
    assert _wait_gone(str(tmp_path / "model")) == []
    assert re.search(r"a::TP1_auto\s+\d+\s+CANCELLED\s+failed: ServerError", out)


def test_a_real_vllm_cpu_smoke_config_runs_as_a_slurm_job_and_is_recorded(local_slurm, tmp_path):
    config = "tiny-qwen3-moe::TP1_auto"
    proc = _submit(local_slurm, REPO, "test/nightly", "--moe-matrix", "test/nightly/smoke_matrix.yaml",
                   "--moe-config", config, "--moe-results-dir", str(tmp_path / "results"))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + "".join(p.read_text() for p in (tmp_path / "results" / "slurm").glob("*.out"))
    entry = _results(tmp_path, "success_results.json")[config]
    assert entry["engine"] == "vllm-cpu" and entry["output_throughput_tok_per_s"] > 0
    assert re.search(rf"{re.escape(config)}\s+\d+\s+COMPLETED\s+success", out)
    assert local_slurm.squeue_ids() == []


def test_submit_usage_errors_exit_2_with_one_sentence(tmp_path):
    _matrix(tmp_path, "models:\n  M: {path: org/m, tp: [1], moe_backends: [auto]}\n")
    (tmp_path / "test_cells.py").write_text(TEST_FILE)

    def run(*args):
        return subprocess.run([sys.executable, "-m", "pytest_moe", *args], cwd=tmp_path, capture_output=True, text=True)

    bad_shard = run("submit", "--slurm-partition", "p", "test_cells.py", "--moe-shard", "5/2")
    assert bad_shard.returncode == 2
    assert re.fullmatch(r"error: pytest test_cells.py --moe-shard 5/2 cannot be collected: ERROR: --moe-shard '5/2': K must be"
                        r" between 1 and N.*\n", bad_shard.stderr)
    no_partition = run("submit", "test_cells.py")
    assert no_partition.returncode == 2 and "--slurm-partition" in no_partition.stderr
    other_command = run("list", "--moe-matrix", "model_matrix.yaml", "-m", "tp8")
    assert other_command.returncode == 2 and "unrecognized arguments: -m tp8" in other_command.stderr


TWO_NODE_TEST = """\
import os
def test_serves(moe_config, moe_check, moe_server):
    assert moe_server.alive()
    assert os.environ["SLURM_JOB_NUM_NODES"] == "2"
"""


@pytest.mark.parametrize("member_dies", [False, True])
def test_a_two_node_config_runs_one_srun_member_per_node(local_slurm, tmp_path, member_dies):
    args = ', args: [--ready-after, "100", --member-exit-after, "1", --exit-code, "9"]' if member_dies else ""
    _matrix(tmp_path, "defaults: {engine: fake, moe_backends: [auto], timeout_s: 120}\nmodels:\n"
                      f"  two: {{path: {tmp_path}/model/two, tp: [2], nodes: 2{args}}}\n")
    (tmp_path / "test_cells.py").write_text(TWO_NODE_TEST)
    proc = _submit(local_slurm, tmp_path, "-p", "fake_engine_plugin", "test_cells.py", "--moe-results-dir", "results")
    out, _ = proc.communicate(timeout=300)
    logs = tmp_path / "results" / "logs"
    head, member = (logs / "two_TP2_N2_auto.log").read_text(), (logs / "two_TP2_N2_auto.node1.log").read_text()
    assert head.startswith("$ srun --nodes=1 --ntasks=1 --relative=0 ") and member.startswith("$ srun --nodes=1 --ntasks=1 --relative=1 ")
    assert "--nnodes 2 --node-rank 1 --dist-init-addr 127.0.0.1:" in member  # the head node's NodeAddr
    if member_dies:
        assert proc.returncode == 1, out
        failure = _results(tmp_path, "failure_results.json")["two::TP2_N2_auto"]
        # the classifier picks the deciding log line; the member's own log (read above) is kept beside the head's
        assert failure["status"] == "failed" and failure["log_path"].endswith("two_TP2_N2_auto.log")
    else:
        assert proc.returncode == 0, out
        assert re.search(r"two::TP2_N2_auto\s+\d+\s+COMPLETED\s+success", out)
    assert local_slurm.squeue_ids() == []
    assert _wait_gone(str(tmp_path / "model")) == []
