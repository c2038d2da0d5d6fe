"""The cell's own decisions, without a server: what it hands the server it launches, when it waits for GPU memory
and how long it pauses, what a retried launch leaves behind, which failures are timeouts whatever the log says, and
which blocks of last night's success entry a partial run keeps.

Why unit tests here: these paths run in every pytester and end-to-end cell too, but there a wrong grace period, a
skipped memory wait or a truncated retry line passes unnoticed; here each expectation comes from the test's inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from pytest_moe import runner
from pytest_moe.entries import BenchmarkResult, CheckResult, CheckStatus, Status
from pytest_moe.errors import ErrorType
from pytest_moe.gpus import GpuInfo, GpuLease
from pytest_moe.results import ResultsStore
from pytest_moe.retries import Attempt
from pytest_moe.runner import SEED_COOLDOWN_S, CellRun, RunOptions
from pytest_moe.server import ServerError, Teardown

from fakes.standin import fake_config, fake_engine


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(runner, "get_engine", lambda name: fake_engine())


def _cell(tmp_path: Path, lease: GpuLease | None = None, lines: list[str] | None = None, **opts) -> CellRun:
    options = RunOptions(matrix_path="m.yaml", results_dir=tmp_path, **opts)
    return CellRun(fake_config(timeout_s=45), options, lease=lease,
                   progress=(lines.append if lines is not None else print))


class _Recorder:
    """Stands in for the Server class: keeps what the cell passed and 'boots' at once."""

    calls: list[tuple[tuple, dict]] = []

    def __init__(self, *args, **kwargs):
        _Recorder.calls.append((args, kwargs))

    def __enter__(self):
        return self


@pytest.fixture
def launched(monkeypatch, stand_in):
    _Recorder.calls = []
    monkeypatch.setattr(runner, "Server", _Recorder)
    monkeypatch.setattr(runner, "resolve_model_path", lambda path, build=True: f"/resolved{path}")
    return _Recorder.calls


def test_a_launch_hands_the_server_the_runs_grace_timeout_log_and_a_fresh_served_name(tmp_path, launched):
    cell = _cell(tmp_path, grace_s=3.5, progress_interval_s=7.0)
    first, second = cell._launch(), cell._launch()
    assert cell.server is second and first is not second
    (_, kw1), (_, kw2) = launched
    assert kw1["grace_s"] == 3.5 and kw1["progress_interval_s"] == 7.0
    assert kw1["timeout_s"] == 45  # the config's own, no override given
    assert kw1["log_path"] == tmp_path / "logs" / "fake_TP1_auto.log"
    assert kw1["model_path"] == "/resolved/m"
    assert (kw1["profile_dir"], kw1["extra_env"], tuple(kw1["pass_fds"])) == (None, {}, ())
    assert kw1["after_stop"] == cell._after_stop and kw1["progress"] == cell.progress
    # a served name per launch: a leftover server of an earlier attempt never answers for this one
    names = [kw["served_name"] for kw in (kw1, kw2)]
    assert all(re.fullmatch(r"pytest-moe/fake_TP1_auto/[0-9a-f]{6}", n) for n in names) and names[0] != names[1]


def test_a_timeout_override_replaces_the_configs_timeout_and_a_profile_run_gets_a_raw_folder(tmp_path, launched):
    _cell(tmp_path, timeout_override_s=12.0, profile=True)._launch()
    kw = launched[0][1]
    assert kw["timeout_s"] == 12.0
    assert kw["profile_dir"] == tmp_path / "traces" / "fake" / "TP1_auto" / "raw"


@dataclass
class _Waited:
    seconds: float

    def describe(self) -> str:
        return f"GPU memory released after {self.seconds:.2f} s"


class _StoppedServer:
    def __init__(self, pids: list[int] | None):
        self.teardown = Teardown(pids=pids) if pids is not None else None


def _lease(*indices: int) -> GpuLease:
    return GpuLease(None, 1, [GpuInfo(i, "NVIDIA H100", None, None, None) for i in indices], [], "fake::TP1_auto", 0.0)


@pytest.mark.parametrize(
    ("indices", "pids", "cooldown", "waits", "pause"),
    [
        ((2, 3), [41, 42], None, True, 0.0),  # measured release replaces the fixed pause
        ((2, 3), [41, 42], 1.5, True, 1.5),  # an explicit --moe-cooldown still applies
        ((), [41], None, False, SEED_COOLDOWN_S),  # no GPUs: nothing to wait for, the seed's pause
        ((2,), None, None, False, SEED_COOLDOWN_S),  # never launched: no teardown pids to wait on
    ],
)
def test_after_stop_waits_for_the_leased_gpus_memory_only_with_gpus_and_a_teardown(
        tmp_path, monkeypatch, stand_in, indices, pids, cooldown, waits, pause):
    calls, sleeps, lines = [], [], []
    monkeypatch.setattr(runner.gpus, "wait_for_memory_release",
                        lambda *a, **kw: calls.append((a, kw)) or _Waited(0.25))
    monkeypatch.setattr(runner.time, "sleep", sleeps.append)
    cell = _cell(tmp_path, lease=_lease(*indices) if indices else None, lines=lines, cooldown_s=cooldown,
                 memory_timeout_s=33.0)
    cell._memory_baseline = {i: 1000 + i for i in indices}
    cell._after_stop(_StoppedServer(pids))
    assert sleeps == [pause]
    if waits:
        assert calls == [((list(indices), set(pids), {i: 1000 + i for i in indices}), {"timeout_s": 33.0})]
        assert lines == ["[pytest-moe] fake::TP1_auto: GPU memory released after 0.25 s"]
    else:
        assert calls == [] and lines == []


def test_a_retried_launch_keeps_its_log_apart_and_says_why_in_one_line(tmp_path, stand_in):
    lines: list[str] = []
    cell = _cell(tmp_path, lines=lines)
    cell.log_path.parent.mkdir(parents=True)
    cell.log_path.write_text("OSError: [Errno 98] Address already in use\n")
    message = "OSError: [Errno 98] Address already in use " + "x" * 200
    cell._before_retry(Attempt("PortInUse", message), 1, 2)
    assert not cell.log_path.exists()
    assert "Address already in use" in cell.log_path.with_name("fake_TP1_auto.attempt1.log").read_text()
    assert lines == [f"[pytest-moe] fake::TP1_auto: launch failed (PortInUse: {message[:120]}); retry 1 of 2"]


@pytest.mark.parametrize(
    ("exc", "text", "expected"),
    [
        # the harness says it timed out: a timeout, though the log names an OOM
        (ServerError("TimeoutError: Server failed to start", log_path=Path("x"), log_tail="", timed_out=True),
         "TimeoutError: Server failed to start\nmore", ErrorType.TIMEOUT),
        # pytest-timeout's text on any exception
        (RuntimeError("boom"), "Failed: Timeout >30.0s", ErrorType.TIMEOUT),
        # a server error that did not time out is read, with the log: the OOM wins
        (ServerError("exited with code 1", log_path=Path("x"), log_tail="", timed_out=False),
         "Server process exited with code 1", ErrorType.OOM),
        # "Timeout" inside a line is not pytest-timeout's failure
        (RuntimeError("boom"), "RuntimeError: Failed: Timeout", ErrorType.OOM),
    ],
)
def test_harness_timeouts_are_timeouts_whatever_the_log_says(tmp_path, stand_in, exc, text, expected):
    cell = _cell(tmp_path)
    cell.log_path.parent.mkdir(parents=True)
    cell.log_path.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    got = cell.classify_failure(exc, text)
    assert got.error_type == expected
    if expected is ErrorType.TIMEOUT:
        assert got.message == text.splitlines()[0]


def test_a_failure_with_no_log_yet_is_read_from_the_exception_alone(tmp_path, stand_in):
    got = _cell(tmp_path).classify_failure(RuntimeError("x"), "torch.OutOfMemoryError: CUDA out of memory.")
    assert (got.error_type, got.message) == (ErrorType.OOM, "torch.OutOfMemoryError: CUDA out of memory.")


def _bench(latency: float, profile: str | None = None) -> BenchmarkResult:
    return BenchmarkResult(status=CheckStatus.PASSED, rows=[{"batch_size": 1, "latency_s": latency}],
                           profiles={"extend": profile} if profile else {})


def test_a_partial_run_keeps_last_nights_benchmark_and_a_new_benchmark_replaces_all_of_it(tmp_path, stand_in):
    store = ResultsStore(tmp_path)
    night1 = _cell(tmp_path, profile=True)
    night1.results = {"benchmark": _bench(2.5, profile="/old/trace"), "accuracy": CheckResult(status=CheckStatus.PASSED)}
    night1.record(store)

    accuracy_only = _cell(tmp_path)
    accuracy_only.results = {"accuracy": CheckResult(status=CheckStatus.PASSED)}
    kept = accuracy_only.record(store)
    assert (kept["latency_s"], kept["profile_extend"]) == (2.5, "/old/trace")
    assert set(kept["checks"]) == {"benchmark", "accuracy"}

    rerun = _cell(tmp_path)
    rerun.results = {"benchmark": _bench(1.5)}
    fresh = rerun.record(store)
    assert fresh["latency_s"] == 1.5 and fresh["profile_extend"] is None  # not last night's trace
    assert store.load()[0]["fake::TP1_auto"]["latency_s"] == 1.5


def test_an_entry_that_was_never_recorded_is_none_and_a_recorded_one_is_what_was_written(tmp_path, stand_in):
    store = ResultsStore(tmp_path)
    cell = _cell(tmp_path)
    assert cell.recorded is None
    written = cell.record(store)
    assert cell.recorded == written and written["status"] == str(Status.SUCCESS)


def test_a_check_sees_the_running_server_and_where_this_config_writes(tmp_path, stand_in):
    seen = {}

    class Looks:
        name = "looks"

        def run(self, ctx):
            seen["ctx"] = ctx
            return CheckResult(status=CheckStatus.PASSED)

    cell = _cell(tmp_path, profile=True)
    cell.server = SimpleNamespace(base_url="http://127.0.0.1:9", served_name="pytest-moe/x/abc123",
                                  profile_dir=tmp_path / "launch-traces")
    result = cell.run_check(Looks())
    ctx = seen["ctx"]
    assert cell.results == {"looks": result}
    assert (ctx.cfg, ctx.base_url, ctx.served_name) == (cell.cfg, "http://127.0.0.1:9", "pytest-moe/x/abc123")
    assert ctx.out_dir == tmp_path / "checks" / "fake_TP1_auto" and ctx.results_dir == tmp_path
    assert ctx.profile_dir == tmp_path / "traces" / "fake" / "TP1_auto"
    assert ctx.launch_profile_dir == tmp_path / "launch-traces"


def test_an_entry_with_no_check_of_its_own_keeps_last_nights_checks(tmp_path, stand_in):
    store = ResultsStore(tmp_path)
    night1 = _cell(tmp_path)
    night1.results = {"benchmark": _bench(2.5)}
    night1.record(store)
    nothing_ran = _cell(tmp_path).record(store)  # every check deselected, the cell recorded all the same
    assert set(nothing_ran["checks"]) == {"benchmark"} and nothing_ran["latency_s"] == 2.5


class _Stoppable:
    """Stands in for a running server: counts its stops."""

    def __init__(self):
        self.stops = 0

    def stop(self):
        self.stops += 1


@pytest.mark.parametrize("error_type, stops", [(ErrorType.TIMEOUT, 1), (ErrorType.OOM, 0), (ErrorType.CRASH, 0)])
def test_a_check_that_timed_out_stops_the_server_and_the_configs_later_checks_fail_at_once(
        tmp_path, stand_in, error_type, stops):
    cell = _cell(tmp_path)
    server = cell.server = _Stoppable()
    check = SimpleNamespace(name="benchmark")
    cell.check_raised(check, runner.Classification(error_type, "Failed: Timeout (>3.0s) from pytest-timeout.", None))
    assert server.stops == stops
    assert cell.results["benchmark"].status == CheckStatus.FAILED
    if not stops:
        assert cell.ensure_server() is server  # the server serves the next check
        return
    with pytest.raises(ServerError) as raised:
        cell.ensure_server()
    assert raised.value.timed_out
    assert str(raised.value).startswith("not run: the benchmark check timed out on the server of fake::TP1_auto")
    cell.check_raised(SimpleNamespace(name="accuracy"), cell.classify_failure(raised.value, str(raised.value)))
    assert server.stops == 1  # not stopped twice
