"""Servers spanning nodes: the engines' multi-node flags (checked by their real parsers), ``nodes`` in the
matrix, and the two-member launcher with the stand-in engine (readiness on the head, death anywhere, teardown).
"""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pytest_moe.engines import get_engine
from pytest_moe.matrix import BenchSpec, MatrixError, ServerConfig, load_matrix
from pytest_moe.multinode import MultiNodeServer, nodes_offered

FAKES = Path(__file__).parent / "fakes"
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(FAKES))
from fake_engine_spec import FAKE_ENGINE  # noqa: E402

from pytest_moe.engines.base import Engine, EngineSpec  # noqa: E402


def _cfg(engine: str, tp: int = 16, nodes: int = 2) -> ServerConfig:
    return ServerConfig(
        model="m", name=f"TP{tp}_N{nodes}_auto", model_path="/models/m", engine=engine, tp=tp, ep=1, precision="native",
        quantization=None, moe_backend="auto", args=(), env=(), timeout_s=30, host="127.0.0.1", bench=BenchSpec(),
        known_failure=None, matrix_path="m.yaml", nodes=nodes,
    )


# -- the engines' forms, parsed by the engines ------------------------------------------------------
@pytest.mark.parametrize("rank", [0, 1])
def test_sglang_multinode_flags_are_accepted_by_sglang_with_these_values(rank):
    pytest.importorskip("sglang.srt.server_args")
    from sglang.srt.server_args import prepare_server_args

    engine = get_engine("sglang")
    argv = engine.command(_cfg("sglang"), "/models/m", host="127.0.0.1", port=30000, served_name="m", profile_dir=None)
    argv += engine.multinode_args(2, rank, "node-a", 5000)
    engine.check_command(argv)
    parsed = prepare_server_args(argv[len(engine.spec.launch):])
    assert (parsed.nnodes, parsed.node_rank, parsed.dist_init_addr, parsed.tp_size) == (2, rank, "node-a:5000", 16)


@pytest.mark.parametrize("engine_name", ["vllm", "vllm-cpu"])
@pytest.mark.parametrize("rank", [0, 1])
def test_vllm_multinode_flags_are_accepted_by_vllm_with_these_values(engine_name, rank):
    pytest.importorskip("vllm.entrypoints.launchers.cli_args")
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    engine = get_engine(engine_name)
    argv = engine.command(_cfg(engine_name), "/models/m", host="127.0.0.1", port=8000, served_name="m", profile_dir=None)
    argv += engine.multinode_args(2, rank, "node-a", 5000)
    engine.check_command(argv)
    flags = argv[len(engine.spec.launch):]
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(flags if flags[0].startswith("-") else ["--model", *flags])
    assert (parsed.nnodes, parsed.node_rank, parsed.master_addr, parsed.master_port) == (2, rank, "node-a", 5000)
    assert parsed.headless is (rank > 0)  # worker nodes run no API server; the head alone serves HTTP


# -- the matrix ----------------------------------------------------------------------------------------
def test_nodes_in_the_matrix(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("models:\n  Kimi: {path: org/kimi, tp: [8, 16], nodes: 2, moe_backends: [auto]}\n"
                    "  Small: {path: org/s, tp: [8], moe_backends: [auto], configs: [{tp: 16, nodes: 2}]}\n")
    by_id = load_matrix(path).by_id()
    assert sorted(by_id) == ["Kimi::TP16_N2_auto", "Kimi::TP8_N2_auto", "Small::TP16_N2_auto", "Small::TP8_auto"]
    kimi = by_id["Kimi::TP16_N2_auto"]
    assert (kimi.nodes, kimi.gpus_per_node, kimi.gpus_needed) == (2, 8, 16)
    assert {"nodes2", "gpus16", "tp16"} <= set(kimi.markers)
    assert "nodes1" not in by_id["Small::TP8_auto"].markers and by_id["Small::TP8_auto"].nodes == 1


def test_nodes_must_divide_tp(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("models:\n  M: {path: org/m, tp: [1], nodes: 2}\n")
    with pytest.raises(MatrixError, match=r"m.yaml:2: models.M.tp\[0\]: 2 nodes do not divide TP 1"):
        load_matrix(path)


def test_nodes_offered(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    assert nodes_offered(None) == 1
    assert nodes_offered(2) == 2
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "4")
    assert nodes_offered(None) == 4


MATRIX = """\
defaults: {{engine: fake, moe_backends: [auto], timeout_s: 60}}
models:
  one: {{path: {model}/one, tp: [1]}}
  two: {{path: {model}/two, tp: [2], nodes: 2{args}}}
"""
TEST_FILE = """\
import time
def test_serves(moe_config, moe_server):
    assert moe_server.alive()
    print("SERVING", moe_config.id, flush=True)
    time.sleep(float(__import__("os").environ.get("HOLD_S", "0")))
    assert moe_server.alive()
"""


@pytest.fixture
def suite(pytester, monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(FAKES), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    pytester.makepyfile(test_cells=TEST_FILE)
    return pytester


def _write_matrix(suite, tmp_path, args=""):
    suite.makefile(".yaml", model_matrix=MATRIX.format(model=tmp_path / "model", args=args))


def test_a_two_node_config_is_skipped_when_the_executor_offers_one_node(suite, tmp_path):
    _write_matrix(suite, tmp_path)
    result = suite.runpytest_subprocess("-p", "fake_engine_plugin", "-rs", "-m", "nodes2")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*two::TP2_N2_auto needs 2 nodes, the executor offers 1*"])


def _members_of(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


def _wait_gone(marker: str, timeout_s: float = 30) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (left := _members_of(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_two_members_serve_with_node_ranks_0_and_1_and_leave_nothing(suite, tmp_path):
    _write_matrix(suite, tmp_path)
    result = suite.runpytest_subprocess("-p", "fake_engine_plugin", "-s", "--moe-nodes", "2", "--moe-results-dir",
                                        str(tmp_path / "results"))
    result.assert_outcomes(passed=2)
    logs = tmp_path / "results" / "logs"
    head, member = (logs / "two_TP2_N2_auto.log").read_text(), (logs / "two_TP2_N2_auto.node1.log").read_text()
    head_addr = re.search(r"--dist-init-addr (\S+)", head)[1]
    assert "--nnodes 2 --node-rank 0" in head and "Application startup complete" in head
    assert "--nnodes 2 --node-rank 1" in member and f"joining {head_addr}" in member  # same rendezvous address
    assert _wait_gone(str(tmp_path / "model")) == []


def test_a_member_dying_before_readiness_fails_the_config_with_its_log(suite, tmp_path):
    _write_matrix(suite, tmp_path, args=', args: [--ready-after, "100", --member-exit-after, "0.5", --exit-code, "7"]')
    result = suite.runpytest_subprocess("-p", "fake_engine_plugin", "--moe-nodes", "2", "-m", "nodes2",
                                        "--moe-results-dir", str(tmp_path / "results"))
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*Server member 1 of 2 (node rank 1) for two::TP2_N2_auto exited with code 7 after*"])
    result.stdout.fnmatch_lines(["*--- last lines of *two_TP2_N2_auto.node1.log ---*"])
    assert "fake engine member 1 exiting" in (tmp_path / "results" / "logs" / "two_TP2_N2_auto.node1.log").read_text()
    assert _wait_gone(str(tmp_path / "model")) == []


def test_a_member_dying_while_serving_brings_the_whole_server_down(tmp_path):
    cfg = _cfg("fake", tp=2, nodes=2)
    engine = Engine(EngineSpec.from_yaml("fake", {**FAKE_ENGINE, "args": ["--member-exit-after", "1.5"]}))
    lines = []
    srv = MultiNodeServer(engine, cfg, hosts=None, model_path=str(tmp_path / "model"), served_name="ours",
                          log_path=tmp_path / "s.log", timeout_s=30, grace_s=2, progress=lines.append)
    with srv:
        deadline = time.monotonic() + 30
        while srv.members[0].proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert srv.members[0].proc.poll() is not None, "the head was not stopped after member 1 died"
    assert "[pytest-moe] Server member 1 of 2 (node rank 1) exited with code 0 while serving" in (tmp_path / "s.log").read_text()
    assert any("stopping every member" in line for line in lines)
    assert srv.teardown.survivors == []
    assert _wait_gone(str(tmp_path / "model")) == []


def test_killing_pytest_leaves_no_member_behind(suite, tmp_path):
    _write_matrix(suite, tmp_path)
    env = {**os.environ, "HOLD_S": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "fake_engine_plugin", "-s", "--moe-nodes", "2",
                             "-m", "nodes2", "--moe-results-dir", str(tmp_path / "results"), "-p", "no:cacheprovider"],
                            cwd=suite.path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "SERVING two::TP2_N2_auto" in line:
                break
        assert len(_members_of(str(tmp_path / "model"))) >= 2
        proc.send_signal(signal.SIGKILL)  # no teardown runs: the janitors must stop both members
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _wait_gone(str(tmp_path / "model"), timeout_s=60) == []


REAL_MATRIX = """\
defaults: {engine: vllm-cpu, timeout_s: 900, moe_backends: [auto], args: [--max-model-len, "8192", --dtype, bfloat16],
           bench: {batch_size: 1, input_len: 256, output_len: 16, warmup: 0}}
models:
  tiny-qwen3-moe: {path: "tiny:tiny-qwen3-moe", tp: [2], nodes: 2}
"""


def test_the_vllm_cpu_build_serves_across_two_members(pytester, monkeypatch, tmp_path):
    """Two members (node ranks 0 and 1, TP2 split one rank per member over gloo) of the real vLLM CPU build."""
    monkeypatch.delenv("SLURM_JOB_NUM_NODES", raising=False)
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    pytester.makefile(".yaml", model_matrix=REAL_MATRIX)
    pytester.makepyfile(test_nightly=(REPO / "test" / "nightly" / "test_moe_matrix.py").read_text())
    results = tmp_path / "results"
    result = pytester.runpytest_subprocess("--moe-nodes", "2", "--moe-results-dir", str(results), "--moe-grace", "5",
                                           "--moe-cooldown", "0", timeout=1200)
    logs = results / "logs"
    head, member = logs / "tiny-qwen3-moe_TP2_N2_auto.log", logs / "tiny-qwen3-moe_TP2_N2_auto.node1.log"
    assert result.ret == 0, "\n".join(result.outlines[-30:]) + member.read_text()[-3000:]
    assert "--nnodes 2 --node-rank 0" in head.read_text()
    assert "pytest_moe.engines.vllm_headless" in member.read_text() and "--headless" in member.read_text()
    entry = __import__("json").loads((results / "success_results.json").read_text())["tiny-qwen3-moe::TP2_N2_auto"]
    assert entry["output_throughput_tok_per_s"] > 0
    assert _wait_gone("tiny-qwen3-moe --served-model-name pytest-moe/tiny-qwen3-moe_TP2_N2_auto") == []


def test_inside_an_allocation_each_member_is_one_srun_task_on_its_node(tmp_path, monkeypatch):
    monkeypatch.setattr("pytest_moe.multinode.node_address", lambda name: f"addr-of-{name}")
    engine = Engine(EngineSpec.from_yaml("fake", FAKE_ENGINE))
    srv = MultiNodeServer(engine, _cfg("fake", tp=2, nodes=2), hosts=["gpu-a", "gpu-b"], model_path="/m",
                          served_name="ours", log_path=tmp_path / "s.log", timeout_s=30)
    for rank in (0, 1):
        argv = srv.member_argv(rank)
        assert argv[:6] == ["srun", "--nodes=1", "--ntasks=1", f"--relative={rank}", "--overlap", "--kill-on-bad-exit=1"]
        assert argv[argv.index("--node-rank") + 1] == str(rank)
        assert argv[argv.index("--dist-init-addr") + 1] == f"addr-of-gpu-a:{srv.dist_port}"  # the first node is the head
    assert srv.argv == srv.member_argv(0)  # the command recorded for the config is the head's


def test_a_member_that_cannot_be_launched_still_stops_the_head(tmp_path, monkeypatch):
    engine = Engine(EngineSpec.from_yaml("fake", FAKE_ENGINE))
    srv = MultiNodeServer(engine, _cfg("fake", tp=2, nodes=2), hosts=None, model_path=str(tmp_path / "model"),
                          served_name="ours", log_path=tmp_path / "s.log", timeout_s=30, grace_s=2)
    real = srv.member_argv
    monkeypatch.setattr(srv, "member_argv", lambda rank: real(rank) if rank == 0 else ["/nonexistent/engine"])
    with pytest.raises(FileNotFoundError):
        srv.__enter__()
    assert srv.teardown is not None and srv.members[0].proc.poll() is not None
    assert _wait_gone(str(tmp_path / "model")) == []


@pytest.mark.parametrize("allocation, hosts", [
    (None, None),                        # no Slurm allocation: both members run here
    (["n1"], None),                      # an allocation of fewer nodes than the config spans: here too
    (["n1", "n2", "n3"], ["n1", "n2"]),  # enough nodes: the config's first two, in the allocation's order
])
def test_a_cell_places_a_two_node_server_on_its_allocations_first_nodes(tmp_path, monkeypatch, allocation, hosts):
    from pytest_moe import runner

    made = []

    class Recorder:
        def __init__(self, engine, cfg, **kwargs):
            made.append(kwargs)

        def __enter__(self):
            return self

    monkeypatch.setattr(runner, "allocation_hosts", lambda: allocation)
    monkeypatch.setattr(runner, "MultiNodeServer", Recorder)
    monkeypatch.setattr(runner, "get_engine", lambda name: Engine(EngineSpec.from_yaml("fake", FAKE_ENGINE)))
    opts = runner.RunOptions(matrix_path="m.yaml", results_dir=tmp_path)
    runner.CellRun(_cfg("fake", tp=2, nodes=2), opts, lease=None, progress=print).start_server()
    assert len(made) == 1 and made[0]["hosts"] == hosts


def test_a_cell_of_two_nodes_outside_an_allocation_serves_from_two_local_members(tmp_path, monkeypatch):
    from pytest_moe import runner

    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.setattr(runner, "get_engine", lambda name: Engine(EngineSpec.from_yaml("fake", FAKE_ENGINE)))
    cfg = dataclasses.replace(_cfg("fake", tp=2, nodes=2), model_path=str(tmp_path / "model"))
    cell = runner.CellRun(cfg, runner.RunOptions(matrix_path="m.yaml", results_dir=tmp_path, cooldown_s=0, grace_s=2),
                          lease=None, progress=print)
    try:
        srv = cell.start_server()
        assert isinstance(srv, MultiNodeServer) and [m.proc.poll() for m in srv.members] == [None, None]
    finally:
        cell.stop()
    assert "--nnodes 2 --node-rank 1" in (tmp_path / "logs" / "m_TP2_N2_auto.node1.log").read_text()
    assert _wait_gone(str(tmp_path / "model")) == []
