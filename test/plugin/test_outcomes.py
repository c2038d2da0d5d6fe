"""The outcome path without a real engine: the nightly suite boots a stand-in vLLM through the plugin.

Why a stand-in and not a patched plugin: each config's own ``env`` puts ``fakes/fake_vllm`` first on the
server's ``PYTHONPATH``, so ``python -m vllm.entrypoints.launchers.api_server.entry`` starts the stand-in; matrix,
selection, launch, readiness, benchmark, classification, known failures, results files, JUnit XML and the
report all run unchanged.  Everything is asserted through those files and the terminal output, the public
surface, so the tests hold whatever the plugin's inside looks like.
"""

from __future__ import annotations

import _thread
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import psutil
import pytest

from fakes.standin import interruptible

ROOT = Path(__file__).resolve().parents[2]
FAKE_VLLM = Path(__file__).parent / "fakes" / "fake_vllm"
NIGHTLY = ROOT / "test" / "nightly"
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"  # what --fake-fail oom prints

MATRIX = f"""\
defaults:
  engine: vllm-cpu
  timeout_s: 60
  env: {{PYTHONPATH: "{FAKE_VLLM}"}}
  bench: {{batch_size: 2, input_len: 8, output_len: 5, warmup: 0}}
models:
  Good: {{path: org/good, tp: [1]}}
  Oom:
    path: org/oom
    tp: [1]
    args: [--fake-fail, oom]
  KnownOom:
    path: org/known-oom
    tp: [1]
    args: [--fake-fail, oom]
    known_failures: {{TP1_auto: {{error_type: OOM, reason: too big for one node, issue: "https://github.com/org/repo/issues/1", expires: 2099-01-01}}}}
  KnownOther:
    path: org/known-other
    tp: [1]
    args: [--fake-fail, nccl]
    known_failures: {{TP1_auto: {{error_type: OOM, reason: too big for one node, issue: "https://github.com/org/repo/issues/1", expires: 2099-01-01}}}}
  KnownPass:
    path: org/known-pass
    tp: [1]
    known_failures: {{TP1_auto: {{error_type: OOM, reason: too big for one node, issue: "https://github.com/org/repo/issues/1", expires: 2099-01-01}}}}
  Slow:
    path: org/slow
    tp: [1]
    timeout_s: 1.5
    args: [--fake-hang]
"""


def _nightly_argv(tmp: Path, *extra: str) -> list[str]:
    return [str(NIGHTLY), "--moe-matrix", str(tmp / "matrix.yaml"), "--moe-results-dir", str(tmp / "res"),
            "--moe-cooldown", "0", "--moe-grace", "2", "-m", "benchmark", "-p", "no:cacheprovider", "-p", "no:randomly", *extra]


@pytest.fixture(scope="module")
def outcome_run(tmp_path_factory):
    """One run of the nightly suite over the six stand-in configs (about 6 s), shared by the tests below.

    In this process (as pytester's in-process runs do), so the plugin's hooks are seen by coverage and by
    mutation testing's per-test bookkeeping; the servers are real child processes all the same.
    """
    tmp = tmp_path_factory.mktemp("outcomes")
    (tmp / "matrix.yaml").write_text(MATRIX)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        ret = pytest.main(_nightly_argv(tmp, "--junitxml", str(tmp / "junit.xml"), "-rA"))
    output = buffer.getvalue()
    cases = {}
    for case in ET.parse(tmp / "junit.xml").getroot().iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases[props.get("moe_id", case.get("name"))] = (case, props)
    return {
        "ret": int(ret), "output": output, "cases": cases, "dir": tmp,
        "success": json.loads((tmp / "res" / "success_results.json").read_text()),
        "failure": json.loads((tmp / "res" / "failure_results.json").read_text()),
    }


def _verdict(case: ET.Element) -> str:
    for tag in ("failure", "error", "skipped"):
        if case.find(tag) is not None:
            return tag
    return "passed"


def _failed(case: ET.Element) -> bool:
    """A failure in the test or in its server fixture (JUnit calls the latter an error)."""
    return _verdict(case) in ("failure", "error")


def _launches(run, config_id: str) -> int:
    """How many times a config's server was started: each start appends its command line to the log."""
    log = run["dir"] / "res" / "logs" / (config_id.replace("::", "_") + ".log")
    return log.read_text().count("fake vllm starting")


def test_every_config_is_in_exactly_one_results_file_and_the_run_fails(outcome_run):
    assert outcome_run["ret"] == pytest.ExitCode.TESTS_FAILED, outcome_run["output"][-3000:]
    # A known failure that passes has real figures: they are kept, and the test still fails (below).
    assert set(outcome_run["success"]) == {"Good::TP1_auto", "KnownPass::TP1_auto"}
    assert set(outcome_run["failure"]) == {"Oom::TP1_auto", "KnownOom::TP1_auto", "KnownOther::TP1_auto", "Slow::TP1_auto"}


def test_success_entry_carries_the_benchmark_shape_and_the_command(outcome_run):
    entry = outcome_run["success"]["Good::TP1_auto"]
    assert (entry["model"], entry["config"], entry["engine"], entry["status"]) == ("Good", "TP1_auto", "vllm-cpu", "success")
    assert (entry["batch_size"], entry["input_len"], entry["output_len"]) == (2, 8, 5)  # the matrix's bench
    assert 0 < entry["ttft_s"] < entry["latency_s"]
    assert "-m vllm.entrypoints.launchers.api_server.entry" in entry["server_command"] and "--tensor-parallel-size 1" in entry["server_command"]
    assert entry["repro_command"].endswith("--moe-config Good::TP1_auto")
    case, props = outcome_run["cases"]["Good::TP1_auto"]
    assert _verdict(case) == "passed"
    assert props["status"] == "success" and props["batch_size"] == "2" and props["engine"] == "vllm-cpu"
    # the whole entry too, its keys in order: the same entry is the same text in every night's JUnit
    attached = json.loads(props["moe_entry"])
    assert attached == {k: v for k, v in entry.items() if k != "last_updated"}  # the store stamps the file's copy
    assert list(attached) == sorted(attached)


def test_failure_entry_is_classified_from_the_log_with_repro_and_report_section(outcome_run):
    entry = outcome_run["failure"]["Oom::TP1_auto"]
    assert (entry["error_type"], entry["status"]) == ("OOM", "failed")
    assert "CUDA out of memory" in entry["error_message"]
    assert Path(entry["log_path"]).name == "Oom_TP1_auto.log" and OOM_LINE in Path(entry["log_path"]).read_text()
    assert entry["repro_command"].endswith("--moe-config Oom::TP1_auto")
    case, props = outcome_run["cases"]["Oom::TP1_auto"]
    assert _failed(case)
    assert (props["moe_id"], props["error_type"], props["status"]) == ("Oom::TP1_auto", "OOM", "failed")
    # The report section: what failed, the one-line repro, the server command, the log.
    out = outcome_run["output"]
    assert "Oom::TP1_auto failed: OOM: " in out
    assert "reproduce: " in out and "--moe-config Oom::TP1_auto" in out
    assert f"server log: {entry['log_path']}" in out


def test_a_launch_failure_other_than_a_port_clash_is_not_retried(outcome_run):
    """The port-clash retry (test_server.py) must leave every other launch failure, timeouts included, alone."""
    assert _launches(outcome_run, "Oom::TP1_auto") == 1
    assert _launches(outcome_run, "KnownOther::TP1_auto") == 1
    assert _launches(outcome_run, "Slow::TP1_auto") == 1


def test_a_launch_timeout_is_recorded_as_timeout(outcome_run):
    entry = outcome_run["failure"]["Slow::TP1_auto"]
    assert entry["error_type"] == "Timeout" and "(1.5 s)" in entry["error_message"]


def test_known_failure_of_the_declared_type_is_an_xfail(outcome_run):
    entry = outcome_run["failure"]["KnownOom::TP1_auto"]
    assert entry["error_type"] == "OOM"
    case, props = outcome_run["cases"]["KnownOom::TP1_auto"]
    assert _verdict(case) == "skipped"
    assert "known failure (OOM, https://github.com/org/repo/issues/1, until 2099-01-01): too big for one node" in case.find("skipped").get("message")
    assert props["error_type"] == "OOM"


def test_known_failure_of_another_type_fails_naming_both(outcome_run):
    entry = outcome_run["failure"]["KnownOther::TP1_auto"]
    assert (entry["error_type"], entry["status"]) == ("NCCL", "failed")
    case, _ = outcome_run["cases"]["KnownOther::TP1_auto"]
    assert _failed(case)
    assert "expected OOM (too big for one node, https://github.com/org/repo/issues/1), got NCCL" in outcome_run["output"]


def test_known_failure_that_passes_fails_strictly_and_says_remove_it(outcome_run):
    case, _ = outcome_run["cases"]["KnownPass::TP1_auto"]
    assert _verdict(case) == "failure"
    assert "KnownPass::TP1_auto passed but is waived in known_failures (OOM, https://github.com/org/repo/issues/1): the waiver is no longer needed, delete" in case.find("failure").get("message", "") + (case.find("failure").text or "")


def test_summary_section_counts_the_outcomes(outcome_run):
    out = outcome_run["output"]
    # Benchmarked: Good and KnownPass (whose test still fails, above); not: Oom, KnownOom, KnownOther, Slow,
    # of which KnownOom is the one known failure.
    assert "## pytest-moe: 2 succeeded, 4 failed (1 known failures)" in out
    assert "| Oom::TP1_auto | OOM | failed |" in out and "| Slow::TP1_auto | Timeout | failed |" in out
    assert "| TP1_auto | 2 | 8 |" in out  # Good's row: batch size 2, input len 8


def test_a_known_failure_is_recorded_as_xfailed_in_the_results_file_too(outcome_run):
    _, props = outcome_run["cases"]["KnownOom::TP1_auto"]
    assert props["status"] == "xfailed"
    assert outcome_run["failure"]["KnownOom::TP1_auto"]["status"] == "xfailed"


# -- interrupts: Ctrl-C, or the SIGTERM of a cancelled CI job, while a server loads ---------------------------
HANG_MATRIX = f"""\
defaults:
  engine: vllm-cpu
  timeout_s: 120
  env: {{PYTHONPATH: "{FAKE_VLLM}"}}
models:
  Hang: {{path: org/hang, tp: [1], args: [--fake-hang, --fake-children, "1"]}}
"""


def _pids_in(log: Path) -> list[int]:
    """The stand-in's own pid and its children's, as it printed them."""
    text = log.read_text()
    leader = int(text.split("fake vllm starting (pid ")[1].split(")")[0])
    children = text.split("fake vllm children:")[1].split("\n")[0].split()
    return [leader, *map(int, children)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_a_server_loads_is_recorded_and_the_tree_torn_down(tmp_path, sig):
    (tmp_path / "matrix.yaml").write_text(HANG_MATRIX)
    log = tmp_path / "res" / "logs" / "Hang_TP1_auto.log"
    proc = subprocess.Popen([sys.executable, "-m", "pytest", *_nightly_argv(tmp_path)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=interruptible)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and "fake vllm loading forever" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.05)
        pids = _pids_in(log)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output[-3000:]
    entry = json.loads((tmp_path / "res" / "failure_results.json").read_text())["Hang::TP1_auto"]
    assert entry["error_type"] == "ServerError" and "interrupted" in entry["error_message"]
    survivors = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert survivors == []


def test_an_interrupt_in_this_process_records_the_config_it_cut_short(tmp_path):
    """The same interrupt delivered in this process (``_thread.interrupt_main``), so the plugin's interrupt hook
    runs where coverage and mutation testing's bookkeeping see it (the subprocess test above cannot show them)."""
    (tmp_path / "matrix.yaml").write_text(HANG_MATRIX)
    log = tmp_path / "res" / "logs" / "Hang_TP1_auto.log"
    loading = threading.Event()

    def interrupt_once_loading() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.exists() and "fake vllm loading forever" in log.read_text():
                loading.set()
                _thread.interrupt_main()
                return
            time.sleep(0.05)

    class Recorded:
        """What the plugin tells the other plugin objects (the history) it recorded."""

        def __init__(self) -> None:
            self.calls: list[tuple[str, str, str]] = []

        @pytest.hookimpl
        def pytest_moe_entry_recorded(self, config, key, entry, outcome):
            self.calls.append((key, outcome, entry["error_type"]))

    recorded = Recorded()
    # interrupt_main does nothing while SIGINT is ignored, as it is in a job a shell started in the background (a CI
    # step, nohup): Python's own handler, for this run only
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher = threading.Thread(target=interrupt_once_loading, daemon=True)
    watcher.start()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            ret = pytest.main(_nightly_argv(tmp_path), plugins=[recorded])
    finally:
        signal.signal(signal.SIGINT, previous)
    watcher.join(5)
    assert loading.is_set(), buffer.getvalue()[-3000:]
    pids = _pids_in(log)
    assert ret == pytest.ExitCode.INTERRUPTED, buffer.getvalue()[-3000:]
    entry = json.loads((tmp_path / "res" / "failure_results.json").read_text())["Hang::TP1_auto"]
    assert entry["error_type"] == "ServerError"
    assert entry["error_message"] == "run interrupted (KeyboardInterrupt) before Hang::TP1_auto finished"
    assert recorded.calls == [("Hang::TP1_auto", "interrupted", "ServerError")]
    assert not (tmp_path / "res" / "success_results.json").exists() or "Hang::TP1_auto" not in json.loads(
        (tmp_path / "res" / "success_results.json").read_text())
    assert [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE] == []


# -- selection before boot: no GPU on this host ----------------------------------------------------------------
def test_a_tp1_gpu_config_on_a_host_without_gpus_is_skipped_and_a_cpu_config_is_not(pytester, monkeypatch):
    """Discovery is faked the way CUDA does it: an empty CUDA_VISIBLE_DEVICES hides every GPU, NVML or not."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("PYTEST_MOE_GPUS", raising=False)
    pytester.makefile(".yaml", model_matrix="""\
models:
  Gpu: {path: org/gpu, engine: sglang, tp: [1]}
  Cpu: {path: org/cpu, engine: vllm-cpu, tp: [1]}
""")
    pytester.makepyfile(test_nightly="def test_benchmark(moe_config):\n    print('RAN', moe_config.id)\n")
    result = pytester.runpytest("-s", "-rs", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    assert [line.split("RAN ")[1] for line in result.outlines if "RAN " in line] == ["Cpu::TP1_auto"]
    result.stdout.fnmatch_lines(["*Gpu::TP1_auto needs 1 GPUs, found 0 (CUDA_VISIBLE_DEVICES='')*"])


BREAK_WRITES = """\
import os


def pytest_runtest_call(item):
    if hasattr(item.config, "workerinput"):  # in the xdist worker only: the results file becomes unwritable
        os.makedirs(os.path.join(os.environ["MOE_RES"], "success_results.json"), exist_ok=True)
"""


def test_a_results_write_failing_in_an_xdist_worker_is_a_warning_in_the_controllers_summary(tmp_path):
    (tmp_path / "matrix.yaml").write_text(MATRIX.split("  Oom:")[0])  # the defaults and Good alone
    (tmp_path / "breakwrites.py").write_text(BREAK_WRITES)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MOE_RES": str(tmp_path / "res")}
    proc = subprocess.run([sys.executable, "-m", "pytest", *_nightly_argv(tmp_path, "-n", "1", "-p", "breakwrites")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert "> warning: could not" in output and "success_results.json" in output, output[-3000:]


def test_pytest_timeouts_thread_method_records_the_config_and_kills_its_tree_before_the_exit(tmp_path):
    """pytest-timeout's ``thread`` method ends the process with ``os._exit(1)``: no teardown and no report run, so
    the plugin's own timer records the config and kills its server first (the real-engine case is in test_faults.py)."""
    (tmp_path / "matrix.yaml").write_text(HANG_MATRIX)
    # output captured while the server loads, which pytest-timeout shows on expiry (it is no report's any more)
    (tmp_path / "says_something.py").write_text(
        "import pytest\n\n@pytest.fixture(autouse=True)\ndef says_something():\n    print('SAID BEFORE THE HANG')\n")
    log = tmp_path / "res" / "logs" / "Hang_TP1_auto.log"
    argv = [*_nightly_argv(tmp_path), "--timeout", "4", "--timeout-method", "thread", "-p", "says_something"]
    proc = subprocess.run([sys.executable, "-m", "pytest", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, start_new_session=True)
    pids = _pids_in(log)
    try:
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        entry = json.loads((tmp_path / "res" / "failure_results.json").read_text())["Hang::TP1_auto"]
        assert entry["error_type"] == "Timeout"
        assert entry["error_message"] == "Timeout >4.0s (pytest-timeout, thread method) in Hang::TP1_auto"
        banner = "+" * 35 + " Timeout " + "+" * 35
        banners = [line for line in proc.stderr.splitlines() if line.strip("+") == " Timeout "]
        assert banners == [banner, banner] and "Thread" in proc.stderr  # every thread's stack between the banners
        captured = "~" * 30 + " Captured stdout " + "~" * 30 + "\nSAID BEFORE THE HANG\n"
        assert captured in proc.stderr.split(banner)[1]
        deadline = time.monotonic() + 10  # killed with no grace: only the kernel's reaping is left
        while (alive := [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive == []
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
