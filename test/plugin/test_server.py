"""Server lifecycle against a stand-in engine process: readiness, death, port clashes, leftovers, teardown.

The real engines go through the same code in test_e2e_cpu.py and test_faults.py; a stand-in makes the
timing-sensitive cases here fast and deterministic.
"""

import os
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest

from pytest_moe import server as server_mod
from pytest_moe.engines.base import Engine
from pytest_moe.entries import Status
from pytest_moe.gpus import GpuInfo, GpuLease, GpuLeaser
from pytest_moe.configs import ServerConfig
from pytest_moe.runner import CellPool, CellRun, RunOptions
from pytest_moe.server import Server, ServerError

from fakes.standin import fake_config, fake_engine

FAKE = str(Path(__file__).parent / "fakes" / "fake_engine.py")


def _engine(*extra: str) -> Engine:
    return fake_engine(*extra)


def _cfg(timeout_s: float = 30) -> ServerConfig:
    return fake_config(timeout_s=timeout_s)


def _server(tmp_path, *extra, timeout_s=30, **kw) -> Server:
    return Server(_engine(*extra), _cfg(timeout_s), model_path="/m", served_name="ours", log_path=tmp_path / "s.log",
                  timeout_s=timeout_s, grace_s=2, **kw)


def test_ready_server_then_teardown_leaves_nothing(tmp_path):
    t0 = time.monotonic()
    with _server(tmp_path, "--ready-after", "0.6") as srv:
        pid = srv.proc.pid
        assert srv.engine.is_ready(srv.base_url, "ours")
        assert 0.6 <= srv.ready_after_s <= time.monotonic() - t0  # seconds since the launch, not a clock reading
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert srv.teardown.survivors == [] and not srv.teardown.escalated_to_sigkill
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", srv.port))


@pytest.mark.parametrize("code", [0, 3])
def test_a_server_that_exits_before_ready_is_noticed_within_a_second_even_with_exit_code_0(tmp_path, code):
    srv = _server(tmp_path, "--exit-after", "0.3", "--exit-code", str(code))
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=f"exited with code {code} after") as info:
        srv.__enter__()
    assert srv.noticed_exit_at - t0 < 0.3 + 1.0 + 1.0  # exit after 0.3 s + interpreter start; noticed within a poll
    after = float(re.search(r"after ([\d.]+) s, before it was ready", str(info.value)).group(1))
    assert 0.3 <= after <= srv.noticed_exit_at - t0 + 0.1  # the seconds it ran, as the message says
    assert srv.exited() == ("Server process", code, tmp_path / "s.log") and not srv.alive()
    assert "fake engine exiting before it was ready" in info.value.log_tail  # the tail of its log is reported
    assert info.value.log_path == tmp_path / "s.log"


def test_a_server_makes_its_log_folders_and_a_janitor_watches_it_until_it_stops(tmp_path):
    log = tmp_path / "results" / "logs" / "s.log"
    srv = Server(_engine(), _cfg(), model_path="/m", served_name="ours", log_path=log, timeout_s=30, grace_s=2)
    with srv:
        janitors = [p for p in psutil.Process().children() if "pytest_moe.janitor" in " ".join(p.cmdline())]
        assert len(janitors) == 1 and janitors[0].status() != psutil.STATUS_ZOMBIE
        assert janitors[0].cmdline()[-3:] == [str(os.getpid()), str(srv.proc.pid), "2"]
        assert "fake engine starting" in log.read_text()
        assert srv.exited() is None and srv.alive()
        # the engine writes only to its log; the janitor to nothing (not into pytest's output or an xdist pipe)
        fds = {pid: [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)] for pid in (srv.proc.pid, janitors[0].pid)}
        assert fds[srv.proc.pid] == ["/dev/null", str(log), str(log)]
        assert fds[janitors[0].pid] == ["/dev/null"] * 3
    janitors[0].wait(10)  # its server gone, the janitor ends too


def test_launch_timeout_tears_down_and_says_timeout(tmp_path):
    srv = _server(tmp_path, "--ready-after", "60", timeout_s=1.5)
    with pytest.raises(ServerError, match=r"Server failed to start within the timeout period \(1.5 s\)") as info:
        srv.__enter__()
    assert info.value.timed_out
    assert srv.teardown is not None and srv.proc.poll() is not None  # torn down inside __enter__ (vLLM #37230)


def test_progress_lines_carry_elapsed_time_phase_and_last_log_line(tmp_path):
    lines = []
    t0 = time.monotonic()
    with _server(tmp_path, "--ready-after", "1.2", progress=lines.append, progress_interval_s=0.5):
        wall = time.monotonic() - t0
    assert lines and "waiting for readiness" in lines[0] and "s elapsed" in lines[0]
    elapsed = [int(re.search(r"waiting for readiness, (\d+) s elapsed", line).group(1)) for line in lines]
    assert elapsed == sorted(elapsed) and elapsed[-1] <= wall + 1  # seconds since the launch, not a clock reading
    assert "(HTTP server up, not ready yet); last log line: Application startup complete." in lines[-1]


class _Foreign(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        body = b'{"data": [{"id": "someone-else"}]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def foreign_server():
    """A leftover server of another job, healthy, on a port we will be handed."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()


def test_readiness_never_accepts_a_leftover_server_with_another_model(foreign_server):
    engine = _engine()
    base = f"http://127.0.0.1:{foreign_server}"
    assert not engine.is_ready(base, "ours")
    assert engine.is_ready(base, "someone-else")


def test_port_taken_at_bind_time_is_retried_on_another_port(tmp_path, monkeypatch, foreign_server):
    real_free_port = server_mod.free_port
    handed = iter([foreign_server])
    monkeypatch.setattr(server_mod, "free_port", lambda host="127.0.0.1": next(handed, None) or real_free_port(host))
    lines = []
    monkeypatch.setattr("pytest_moe.runner.get_engine", lambda name: _engine())
    cell = CellRun(_cfg(), RunOptions(matrix_path="m.yaml", results_dir=tmp_path, cooldown_s=0), lease=None,
                   progress=lines.append)
    srv = cell.start_server()
    try:
        assert srv.port != foreign_server and srv.engine.is_ready(srv.base_url, srv.served_name)
        assert any(f"launch failed on port {foreign_server} (PortInUse" in line for line in lines)
        assert "Address already in use" in (tmp_path / "logs" / "fake_TP1_auto.attempt1.log").read_text()
    finally:
        srv.stop()


def test_a_cells_server_runs_on_its_lease_holds_its_locks_and_reports_its_wait(tmp_path, monkeypatch):
    """What the cell hands its server, seen from the server process: the leased GPUs in its environment, the
    lease's lock files open in it (so the lease outlives a crashed worker), progress while it loads; and a
    fresh log, not the last run's."""
    monkeypatch.setattr("pytest_moe.runner.get_engine", lambda name: _engine("--ready-after", "1.0"))
    leaser = GpuLeaser(tmp_path / "leases", gpu_indices=[3, 5, 6])
    lease = leaser.acquire(2, config_id="fake::TP1_auto")
    lines: list[str] = []
    opts = RunOptions(matrix_path="m.yaml", results_dir=tmp_path / "res", profile=True, progress_interval_s=0.2,
                      cooldown_s=0, grace_s=2)
    cell = CellRun(_cfg(), opts, lease=lease, progress=lines.append)
    cell.log_path.parent.mkdir(parents=True)
    cell.log_path.write_text("STALE LINE from last night\n")
    srv = cell.start_server()
    try:
        proc = psutil.Process(srv.proc.pid)
        env = proc.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in lease.indices)
        assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert {f"gpu-{i}.lock" for i in lease.indices} <= {Path(f.path).name for f in proc.open_files()}
        assert srv.profile_dir == tmp_path / "res" / "traces" / "fake" / "TP1_auto" / "raw"
        assert any(line.startswith("[pytest-moe] fake::TP1_auto: waiting for readiness") for line in lines)
        assert "STALE LINE" not in cell.log_path.read_text()
    finally:
        cell.stop()
    assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    with leaser.acquire(3, timeout_s=2, config_id="next") as everything:  # stop gave the two GPUs back
        assert sorted(everything.indices) == [3, 5, 6]


def test_a_pools_cell_reports_its_servers_wait_to_the_pools_progress(tmp_path, monkeypatch):
    monkeypatch.setattr("pytest_moe.runner.get_engine", lambda name: _engine("--ready-after", "1.0"))
    lines: list[str] = []
    pool = CellPool(RunOptions(matrix_path="m.yaml", results_dir=tmp_path, progress_interval_s=0.2, cooldown_s=0,
                               grace_s=2), lines.append)
    monkeypatch.setattr("pytest_moe.runner.gpus.GpuLeaser", lambda: GpuLeaser(tmp_path / "leases", gpu_indices=[7]))
    cell = pool.get(_cfg())
    assert pool.get(_cfg()) is cell and cell.lease.indices == (7,)  # leased once, on the first ask
    try:
        cell.start_server()
    finally:
        pool.close_all()
    assert any(line.startswith("[pytest-moe] fake::TP1_auto: waiting for readiness") for line in lines)
    assert pool.cells == {} and not cell.server.alive() and cell.lease.released


def test_an_entry_names_its_leased_gpus_and_its_own_log(tmp_path, monkeypatch):
    monkeypatch.setattr("pytest_moe.runner.get_engine", lambda name: _engine())
    held = [GpuInfo(4, "NVIDIA H200", None, None, None), GpuInfo(5, "NVIDIA H200", None, None, None)]
    lease = GpuLease(None, 7, held, [], "fake::TP1_auto", 0.0)
    cell = CellRun(_cfg(), RunOptions(matrix_path="m.yaml", results_dir=tmp_path), lease=lease, progress=print)
    entry = cell.entry(Status.SUCCESS).to_dict()
    assert (entry["gpu_name"], entry["gpu_count"], entry["engine"]) == ("NVIDIA H200", 2, _cfg().engine)
    assert entry["log_path"] == str(tmp_path / "logs" / "fake_TP1_auto.log")
    assert "fake::TP1_auto" in entry["repro_command"] and "m.yaml" in entry["repro_command"]


def test_secrets_in_the_log_never_reach_the_error_message_nor_the_kept_log(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijklmnop")
    srv = _server(tmp_path, "--exit-after", "0.1", "--served-model-name", "x", "--token-echo", "hf_abcdefghijklmnop",
                  "--api_key", "sk-passed-to-server")
    with pytest.raises(ServerError) as info:
        srv.__enter__()
    log = (tmp_path / "s.log").read_text()
    assert "fake engine starting:" in log and "--token-echo ***" in log  # the engine printed it; the kept copy is masked
    for secret in ("hf_abcdefghijklmnop", "sk-passed-to-server"):
        assert secret not in log and secret not in str(info.value)


@pytest.mark.parametrize("name, safe", [
    ("Qwen3-235B::TP8_EP2_auto", "Qwen3-235B_TP8_EP2_auto"),
    ("../../etc/passwd::TP1_auto", "etc_passwd_TP1_auto-"),
    ("org/model with spaces::TP1", "org_model_with_spaces_TP1-"),
])
def test_config_ids_are_made_safe_before_they_become_file_names(name, safe):
    from pytest_moe.runner import safe_name

    assert safe_name(name).startswith(safe) and "/" not in safe_name(name)  # lossy ones get a hash suffix
