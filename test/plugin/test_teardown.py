"""Teardown of stand-in server trees that resist: SIGTERM ignored, SIGSTOPped, both; and the janitor.

A stand-in (``fakes/fake_vllm``) with two children is started the way the plugin starts an engine
(``server.Server``: own session, janitor beside it). The whole tree is listed with psutil before
teardown and checked after it, so a child that outlives its parent counts as a survivor too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from pytest_moe import janitor
from fakes.fake_engine_spec import FAKE_ENGINE
from pytest_moe.engines.base import Engine, EngineSpec
from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.server import Server

FAKE = str(Path(__file__).parent / "fakes" / "fake_vllm" / "vllm" / "entrypoints" / "openai" / "api_server.py")
#: Short where escalation is expected (each such test waits it out once).
GRACE_S = 1.0
#: A hang guard, not a timing assertion: teardown that never escalates waits forever on a SIGTERM-proof tree.
pytestmark = pytest.mark.timeout(60)
#: Where no escalation is expected: long enough that a loaded 2-core machine never makes it escalate
#: (a resumed tree takes about 2 s to be reaped there); a passing test does not wait for it.
LONG_GRACE_S = 10.0


def _engine(*args: str) -> Engine:
    return Engine(EngineSpec.from_yaml("fake", {**FAKE_ENGINE, "launch": [sys.executable, FAKE], "args": list(args)}))


def _cfg() -> ServerConfig:
    return ServerConfig(
        model="fake", name="TP1_auto", model_path="/m", engine="fake", tp=1, ep=1, precision="native",
        quantization=None, moe_backend="auto", args=(), env=(), timeout_s=30, host="127.0.0.1",
        bench=BenchSpec(), known_failure=None, matrix_path="m.yaml",
    )


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_children(srv: Server, count: int) -> list[psutil.Process]:
    """The stand-in prints its children's pids once they exist; ordering by the log, not by a sleep."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        tree = _tree(srv.proc.pid)
        if len(tree) == 1 + count:
            return tree
        time.sleep(0.05)
    raise AssertionError(f"stand-in did not start {count} children: {srv.log_path.read_text()}")


def _suspend(tree: list[psutil.Process]) -> None:
    """SIGSTOP every process and wait until the kernel shows each one stopped (delivery is asynchronous)."""
    for proc in tree:
        proc.suspend()
    deadline = time.monotonic() + 30
    while not all(p.status() == psutil.STATUS_STOPPED for p in tree):
        assert time.monotonic() < deadline, [p.status() for p in tree]
        time.sleep(0.01)


@pytest.fixture
def started(tmp_path):
    """A ready stand-in server; whatever a test does, every process of its tree is killed afterwards."""
    servers: list[Server] = []
    trees: list[list[psutil.Process]] = []

    def start(*args: str, grace_s: float = GRACE_S) -> tuple[Server, list[psutil.Process]]:
        srv = Server(_engine("--fake-children", "2", *args), _cfg(), model_path="/m", served_name="ours",
                     log_path=tmp_path / f"s{len(servers)}.log", timeout_s=30, grace_s=grace_s)
        servers.append(srv)
        srv.__enter__()
        tree = _wait_children(srv, 2)
        trees.append(tree)
        return srv, tree

    yield start
    for tree in trees:
        for proc in tree:
            try:
                proc.resume()
                proc.kill()
            except psutil.Error:
                pass
    for srv in servers:
        if srv._janitor is not None and srv._janitor.poll() is None:
            srv._janitor.kill()
            srv._janitor.wait()


def test_a_tree_that_ignores_sigterm_is_killed_with_sigkill_and_nothing_survives(started):
    srv, tree = started("--fake-ignore-sigterm")
    teardown = srv.stop()
    assert teardown.escalated_to_sigkill
    assert teardown.survivors == []
    assert sorted(teardown.pids) == sorted(p.pid for p in tree)
    assert [p.pid for p in tree if not _gone(p)] == []
    # it waited out the grace period before SIGKILL, and says how long the whole teardown took
    assert GRACE_S <= teardown.seconds < GRACE_S + 30
    # the janitor beside the server is stopped and reaped with it (returncode set by stop's own wait, not a poll here)
    assert srv._janitor is not None and srv._janitor.returncode is not None


def test_stop_is_idempotent_and_hands_the_stopped_server_to_the_after_stop_hook(tmp_path):
    stopped: list[Server] = []
    srv = Server(_engine(), _cfg(), model_path="/m", served_name="ours", log_path=tmp_path / "s.log", timeout_s=30,
                 grace_s=GRACE_S, after_stop=stopped.append)
    try:
        srv.__enter__()
        first = srv.stop()
        assert srv.stop() is first and stopped == [srv]
    finally:
        srv.stop()
        if srv._janitor is not None and srv._janitor.poll() is None:
            srv._janitor.kill()
            srv._janitor.wait()
    never_started = Server(_engine(), _cfg(), model_path="/m", served_name="ours", log_path=tmp_path / "n.log",
                           timeout_s=30, grace_s=GRACE_S, after_stop=stopped.append)
    assert never_started.stop().pids == [] and stopped == [srv]


def _kill_leftovers(leader: subprocess.Popen, *pids: int | None) -> None:
    """Whatever a failing assertion left running: SIGKILL the leader and the known pids, reap the leader."""
    for pid in [leader.pid, *(p for p in pids if p is not None)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leader.wait()


def _assert_kill_tree_kills(pid_file: Path, script: str, *args: str, check_first=None) -> None:
    """Run ``script`` (it writes a pid to ``pid_file``, then prints "ready") as a leader in a session of its own, and
    check that ``kill_tree`` on the leader kills that process and leaves nothing behind."""
    from pytest_moe.server import kill_tree

    leader = subprocess.Popen([sys.executable, "-c", script, str(pid_file), *args], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    pid = None
    try:
        assert leader.stdout.readline().strip() == "ready"
        pid = int(pid_file.read_text())
        if check_first:
            check_first(leader, pid)
        teardown = kill_tree(leader.pid, GRACE_S)
        leader.wait(timeout=30)
        assert pid in teardown.pids and teardown.survivors == []
        assert not psutil.pid_exists(pid) or _gone(psutil.Process(pid))
    finally:
        _kill_leftovers(leader, pid)


_RESPAWNER = """
import signal, subprocess, sys, time
pid_file = sys.argv[1]

def respawn(*_):
    # a supervisor that answers SIGTERM by starting a new worker in a session of its own (out of our process
    # group, so a group signal cannot reach it), and keeps running itself
    worker = subprocess.Popen([sys.executable, "-c",
                               "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
                              start_new_session=True)
    open(pid_file, "w").write(str(worker.pid))

signal.signal(signal.SIGTERM, respawn)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_process_started_during_the_grace_period_is_killed_too(tmp_path):
    """``kill_tree`` looks again after the grace period: what the tree started meanwhile (here outside the process
    group, where only a per-process SIGKILL reaches it) is a straggler like the leader that ignored SIGTERM."""
    from pytest_moe.server import kill_tree

    pid_file = tmp_path / "worker.pid"
    leader = subprocess.Popen([sys.executable, "-c", _RESPAWNER, str(pid_file)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    worker_pid = None
    try:
        assert leader.stdout.readline().strip() == "ready"
        teardown = kill_tree(leader.pid, GRACE_S)
        leader.wait(timeout=30)
        worker_pid = int(pid_file.read_text())  # the respawn happened
        assert teardown.escalated_to_sigkill and teardown.survivors == []
        assert not psutil.pid_exists(worker_pid) or _gone(psutil.Process(worker_pid))
    finally:
        _kill_leftovers(leader, worker_pid)


_GRANDCHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"
_CHILD = """
import subprocess, sys, time
# starts a grandchild in a session of its own (out of the leader's process group) that ignores SIGTERM
grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[2]], start_new_session=True, stdout=subprocess.PIPE,
                              text=True)
grandchild.stdout.readline()
open(sys.argv[1], "w").write(str(grandchild.pid))
time.sleep(600)
"""
_GRANDPARENT = """
import subprocess, sys, time
pid_file, child, grandchild = sys.argv[1:]
subprocess.Popen([sys.executable, "-c", child, pid_file, grandchild])  # in our process group
while True:
    try:
        if open(pid_file).read():
            break
    except FileNotFoundError:
        pass
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_grandchild_that_left_the_process_group_is_still_killed(tmp_path):
    """Descendants are found through the whole tree, not only the leader's children: a grandchild in a session of
    its own is out of reach of the group signal and, once its parents are gone, of the tree."""
    _assert_kill_tree_kills(tmp_path / "grandchild.pid", _GRANDPARENT, _CHILD, _GRANDCHILD)


_ORPHANER = """
import subprocess, sys, time
pid_file, grandchild = sys.argv[1:]
# a child (in our process group) that starts a grandchild (in the group too) and exits: the grandchild is
# re-parented, so it is no longer our descendant, only a member of our group
child = subprocess.Popen([sys.executable, "-c",
                          "import subprocess, sys; g = subprocess.Popen([sys.executable, '-c', sys.argv[2]], "
                          "stdout=subprocess.PIPE, text=True); g.stdout.readline(); open(sys.argv[1], 'w').write(str(g.pid))",
                          pid_file, grandchild])
child.wait()
print("ready", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("vanished_first", [False, True])
def test_an_orphan_left_in_the_process_group_is_found_and_killed(tmp_path, monkeypatch, vanished_first):
    """A member of the group whose parent exited is no descendant of the leader: only the group scan finds it, and it
    goes on past a process that exits while it looks (here put first in its scan)."""
    if vanished_first:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        scan = psutil.process_iter
        monkeypatch.setattr(psutil, "process_iter", lambda: iter([SimpleNamespace(pid=dead.pid), *scan()]))

    def not_a_descendant(leader: subprocess.Popen, orphan_pid: int) -> None:
        assert orphan_pid not in {p.pid for p in _tree(leader.pid)} and os.getpgid(orphan_pid) == leader.pid

    _assert_kill_tree_kills(tmp_path / "orphan.pid", _ORPHANER, _GRANDCHILD, check_first=not_a_descendant)


def test_a_zombie_or_a_vanished_process_is_not_live():
    from pytest_moe.server import _is_live

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    proc = psutil.Process(child.pid)
    try:
        deadline = time.monotonic() + 30
        while proc.status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert proc.is_running() and not _is_live(proc)
    finally:
        child.wait()
    assert not _is_live(proc)

    class Vanishing:
        def is_running(self):
            raise psutil.NoSuchProcess(child.pid)

    assert not _is_live(Vanishing())


def test_a_sigstopped_server_gets_sigcont_so_sigterm_alone_stops_it(started):
    """A stopped process cannot act on SIGTERM; without the SIGCONT it would wait out the grace and be SIGKILLed."""
    srv, tree = started(grace_s=LONG_GRACE_S)
    _suspend(tree)
    teardown = srv.stop()
    assert not teardown.escalated_to_sigkill
    assert teardown.survivors == []
    assert [p.pid for p in tree if not _gone(p)] == []


def test_a_sigstopped_tree_that_ignores_sigterm_is_still_killed(started):
    srv, tree = started("--fake-ignore-sigterm")
    _suspend(tree)
    teardown = srv.stop()
    assert teardown.escalated_to_sigkill and teardown.survivors == []
    assert [p.pid for p in tree if not _gone(p)] == []


OWNER = """\
import subprocess, sys, time
leader = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE, text=True, start_new_session=True)
for line in leader.stdout:
    if line.startswith("fake vllm loading forever"):
        break
print(leader.pid, flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("where", ["in-process", "as-started-by-server"])
def test_the_janitor_kills_the_tree_when_its_owner_dies(tmp_path, where):
    """The owner (a pytest worker in real life, the server's parent) is SIGKILLed: no teardown runs there.

    ``in-process`` calls ``janitor.watch`` here (so coverage and mutation testing see it); the other runs
    ``python -m pytest_moe.janitor`` exactly as ``server.Server`` starts it.
    """
    owner = subprocess.Popen([sys.executable, "-c", OWNER, FAKE, "--fake-hang", "--fake-ignore-sigterm", "--fake-children", "2"],
                             stdout=subprocess.PIPE, text=True)
    janitor_proc = None
    tree: list[psutil.Process] = []
    try:
        leader = int(owner.stdout.readline())
        tree = _tree(leader)
        assert len(tree) == 3
        owner.kill()
        owner.wait()
        if where == "in-process":
            assert janitor.watch(owner.pid, leader, GRACE_S) == 1  # 1: it had to kill
        else:
            janitor_proc = subprocess.Popen([sys.executable, "-m", "pytest_moe.janitor", str(owner.pid), str(leader), str(GRACE_S)])
            assert janitor_proc.wait(timeout=60) == 1
        assert [p.pid for p in tree if not _gone(p)] == []
    finally:
        for proc in [owner, janitor_proc, *tree]:
            try:
                if proc is not None:
                    proc.kill()
            except (ProcessLookupError, psutil.Error):
                pass
        owner.wait()
        if janitor_proc is not None:
            janitor_proc.wait()


def test_the_janitor_leaves_the_tree_alone_while_its_owner_lives_and_returns_when_the_tree_is_gone(tmp_path):
    leader = subprocess.Popen([sys.executable, FAKE, "--fake-hang"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    result: list[int] = []
    watcher = threading.Thread(target=lambda: result.append(janitor.watch(os.getpid(), leader.pid, 0)), daemon=True)
    try:
        for line in leader.stdout:
            if line.startswith("fake vllm loading forever"):
                break
        watcher.start()
        watcher.join(2)  # four of its polls: the owner (this process) lives, so nothing may be killed
        assert watcher.is_alive() and leader.poll() is None
        leader.kill()
        leader.wait()
        watcher.join(30)
        assert result == [0]  # 0: the tree went away by itself
    finally:
        leader.kill()
        leader.wait()
