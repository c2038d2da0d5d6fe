"""Retries by failure type, against the stand-in engine: what is retried, what is not, what is recorded.

The stand-in (fakes/fake_engine.py) binds like uvicorn, so a taken port fails with the real
``Address already in use``; with ``--exit-after``/``--say-file`` it fails at start-up printing a chosen
engine message. Each case counts launches from the logs the harness keeps, not from our own code.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pytest_moe import learned, server as server_mod
from pytest_moe.engines.base import Engine
from pytest_moe.errors import LEARNED_ID, Classification
from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.report import junit_properties, summary_markdown
from pytest_moe.results import ResultsStore
from pytest_moe.retries import RetryPolicyError, load_policy, parse_policy, retry_launch
from pytest_moe.runner import CellRun, RunOptions
from pytest_moe.checks import CHECKS
from pytest_moe.server import ServerError

from fakes.standin import fake_config, fake_engine

FAKE = str(Path(__file__).parent / "fakes" / "fake_engine.py")
OOM_LINE = "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB"
# An engine message no pattern knows, with what changes between runs: pid, port, a path, a hex id.
UNKNOWN_LINE = "RuntimeError: expert map of rank {pid} at /tmp/run-{port}/expert_map.json is stale (handle 0x7f3b{port})"


def _engine(*extra: str) -> Engine:
    return fake_engine(*extra)


def _cfg(name: str = "TP1_auto", tp: int = 1) -> ServerConfig:
    return fake_config(name, tp, bench=BenchSpec(batch_size=1, input_len=8, output_len=4, warmup=0))


def _say(tmp_path: Path, line: str) -> str:
    """A file holding the engine message the stand-in prints before it exits."""
    path = tmp_path / "say.txt"
    path.write_text(line)
    return str(path)


def _cell(tmp_path: Path, monkeypatch, *engine_args: str, name: str = "TP1_auto", retries: int | None = None):
    monkeypatch.setattr("pytest_moe.runner.get_engine", lambda engine_name: _engine(*engine_args))
    lines: list[str] = []
    opts = RunOptions(matrix_path="m.yaml", results_dir=tmp_path, cooldown_s=0, grace_s=2, retries=retries)
    return CellRun(_cfg(name), opts, lease=None, progress=lines.append), lines


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.fixture
def taken_port(monkeypatch):
    """The first port the harness is handed is already held by another job's server."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    real_free_port = server_mod.free_port
    handed = iter([port])
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": next(handed, None) or real_free_port(host))
    yield port
    httpd.shutdown()
    httpd.server_close()


# --- the policy ---------------------------------------------------------------------------------


def test_packaged_policy_has_the_issue_defaults() -> None:
    policy = load_policy()
    assert policy.retries_for(Classification("PortInUse", "OSError: [Errno 98] Address already in use", None)) == 1
    assert policy.retries_for(Classification("Timeout", "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=1)", None)) == 1
    assert policy.retries_for(Classification("Timeout", "TimeoutError: Timed out waiting for engine core", None)) == 0
    assert policy.retries_for(Classification("NCCL", "ncclCommInitRank failed: Socket Timeout", None)) == 1
    assert policy.retries_for(Classification("NCCL", "RuntimeError: NCCL error: unhandled cuda error", None)) == 0
    download = "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='x', port=443): Max retries exceeded"
    assert policy.retries_for(Classification("ServerError", download, None)) == 1
    assert policy.retries_for(Classification("ServerError", "KeyError: 'layers.0.w13'", None)) == 0
    never = ["OOM", "QuantBlockAlignment", "QuantizationConflict", "UnsupportedBackend", "IllegalMemoryAccess",
             "CudaGraphCapture", "Crash", "InvalidArgument", "MissingDependency", "TrustRemoteCode"]
    assert sorted(policy.never) == sorted(never)
    for error_type in never:
        assert policy.retries_for(Classification(error_type, "x", None), override=5) == 0


def test_retry_launch_classifies_the_exception_it_caught_and_re_raises_it() -> None:
    class LaunchFailed(Exception):
        pass

    raised = LaunchFailed("OSError: [Errno 98] Address already in use")
    seen: list[BaseException] = []

    def launch():
        raise raised

    def classify_failure(exc):
        seen.append(exc)
        return Classification("OOM", str(exc), None)

    with pytest.raises(LaunchFailed) as info:
        retry_launch(launch, classify_failure, retryable=LaunchFailed)
    assert info.value is raised and seen == [raised]


def test_override_replaces_the_count_of_retried_types_only() -> None:
    policy = load_policy()
    port = Classification("PortInUse", "[Errno 98]", None)
    assert policy.retries_for(port, override=3) == 3
    assert policy.retries_for(port, override=0) == 0
    assert policy.retries_for(Classification("Timeout", "Server failed to start", None), override=3) == 0


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"rules": [{"error_type": "Melted", "retries": 1, "why": "w"}]}, r"x.yaml: rules.0.error_type: 'Melted' is not an error type"),
        ({"rules": [{"error_type": "OOM", "retries": 1, "why": "w"}], "never": ["OOM"]}, r"^x.yaml: top level: OOM is listed in 'never' but a rule retries it\.$"),
        ([], r"^x.yaml: top level: Input should be a valid dictionary"),
        ({"rules": [{"error_type": "NCCL", "retries": 9, "why": "w"}]}, r"rules.0.retries: Input should be less than or equal to 5"),
        ({"rules": [{"error_type": "NCCL", "retries": 1, "why": "w", "match": "(x"}]}, r"rules.0.match: invalid regex"),
        ({"rules": [{"error_type": "NCCL", "retries": "1", "why": "w"}]}, r"rules.0.retries: Input should be a valid integer"),
        ({"rules": [], "sometimes": []}, r"x.yaml: sometimes: Extra inputs are not permitted"),
    ],
)
def test_bad_policy_names_file_and_key(data, match) -> None:
    with pytest.raises(RetryPolicyError, match=match):
        parse_policy(data, "x.yaml")


def test_moe_retries_option_rejects_bad_counts(pytester) -> None:
    pytester.makefile(".yaml", model_matrix="models: {}\n")
    result = pytester.runpytest("--moe-retries", "-1")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--moe-retries*-1 is outside 0..5*"])


# --- with the stand-in engine --------------------------------------------------------------------


def test_port_clash_at_bind_is_retried_and_the_pass_recorded_flaky(tmp_path, monkeypatch, taken_port) -> None:
    cell, lines = _cell(tmp_path, monkeypatch)
    store = ResultsStore(tmp_path)
    server = cell.start_server()
    try:
        assert server.port != taken_port
        cell.run_check(CHECKS["benchmark"])
    finally:
        server.stop()
    cell.record(store)

    logs = tmp_path / "logs"
    assert "Address already in use" in (logs / "fake_TP1_auto.attempt1.log").read_text()
    assert "Address already in use" not in (logs / "fake_TP1_auto.log").read_text()
    assert any(f"launch failed on port {taken_port} (PortInUse" in line and "retry 1 of 1" in line for line in lines)

    entry = json.loads(store.success_path.read_text())["fake::TP1_auto"]
    assert entry["status"] == "success" and entry["flaky"] is True and entry["attempts"] == 2
    assert entry["first_attempt_error_type"] == "PortInUse"
    assert "ddress already in use" in entry["first_attempt_error_message"]
    assert ("flaky", "True") in junit_properties(entry)
    summary = summary_markdown([entry], [])
    assert "1 flaky" in summary and "| TP1_auto (flaky: PortInUse) |" in summary


def test_port_clash_with_retries_off_fails_as_port_in_use(tmp_path, monkeypatch, taken_port) -> None:
    cell, lines = _cell(tmp_path, monkeypatch, retries=0)
    with pytest.raises(ServerError) as info:
        cell.start_server()
    assert cell.classify_failure(info.value, str(info.value).splitlines()[0]).error_type == "PortInUse"
    assert not list((tmp_path / "logs").glob("*.attempt*.log")) and not lines


@pytest.mark.parametrize("retries", [None, 3])
def test_oom_is_never_retried(tmp_path, monkeypatch, retries) -> None:
    cell, lines = _cell(tmp_path, monkeypatch, "--exit-after", "0.1", "--exit-code", "1", "--say-file", _say(tmp_path, OOM_LINE),
                        retries=retries)
    with pytest.raises(ServerError) as info:
        cell.start_server()
    log = (tmp_path / "logs" / "fake_TP1_auto.log").read_text()
    assert log.count("fake engine starting") == 1  # one launch
    assert not list((tmp_path / "logs").glob("*.attempt*.log")) and not lines
    entry = cell.record(ResultsStore(tmp_path), cell.classify_failure(info.value, str(info.value).splitlines()[0]))
    assert entry["error_type"] == "OOM" and entry["error_message"].startswith("torch.OutOfMemoryError: CUDA out of memory.")
    assert "attempts" not in entry and "flaky" not in entry and "signature" not in entry


def test_a_learned_guess_is_retried_as_the_server_error_the_rules_left_it() -> None:
    policy = load_policy()
    download = "requests.exceptions.ConnectionError: HTTPSConnectionPool(host='huggingface.co', port=443): Max retries exceeded"
    assert policy.retries_for(Classification("OOM", download, "torch-cuda-oom")) == 0  # a rule's verdict: never
    assert policy.retries_for(Classification("OOM", download, LEARNED_ID)) == 1        # a guess: the network rule applies
    assert policy.retries_for(Classification("PortInUse", "RuntimeError: no idea", LEARNED_ID)) == 0


def test_an_unknown_failure_in_two_configs_gets_one_signature(tmp_path, monkeypatch) -> None:
    # about failures no rule names: the corpus-trained guess (which keeps the signature too) is left out
    monkeypatch.setattr(learned, "guess", lambda excerpt, exception: None)
    store = ResultsStore(tmp_path)
    entries = []
    for name in ("TP1_auto", "TP2_auto"):
        cell, _ = _cell(tmp_path, monkeypatch, "--exit-after", "0.1", "--exit-code", "1",
                         "--say-file", _say(tmp_path, UNKNOWN_LINE), name=name)
        with pytest.raises(ServerError) as info:
            cell.start_server()
        entries.append(cell.record(store, cell.classify_failure(info.value, str(info.value).splitlines()[0])))
    first, second = entries
    assert first["error_type"] == second["error_type"] == "ServerError"
    assert first["error_message"] != second["error_message"]  # pid and port differ between the two launches
    assert first["signature"] == second["signature"] == (
        "RuntimeError: expert map of rank <n> at <path> is stale (handle <hex>)"
    )
    recorded = json.loads(store.failure_path.read_text())
    assert recorded["fake::TP1_auto"]["signature"] == recorded["fake::TP2_auto"]["signature"]
