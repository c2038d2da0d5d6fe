"""The run history on SQLite and on a real PostgreSQL server: the same tests, both backends.

PostgreSQL is started here from the installed binaries (``initdb``/``pg_ctl``) in a temporary directory,
as a non-root user, on a free loopback port. Missing PostgreSQL skips those cases with the reason; under
``CI=true`` it fails, because CI must test what teams sharing one history depend on.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa

from pytest_moe.history.imports import import_path
from pytest_moe.history.merge import merge_dirs
from pytest_moe.history.regress import State, compare, judge
from pytest_moe.history.rows import METRICS, Status, entry_rows, kernel_from_log, provenance
from pytest_moe.history.store import MIGRATIONS, HistoryError, HistoryStore, RunInfo, resolve_url, schema_version
from pytest_moe.configs import HistorySettings

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data" / "history"
#: Debian/Ubuntu keep the server binaries off PATH, one directory per major version (newest tried first).
PG_BIN_DIRS = (*sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True),
               Path("/usr/local/bin"))
NIGHT0 = datetime(2026, 11, 1, 2, 0)


# -- backends ------------------------------------------------------------------------------------
def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: PostgreSQL is required)")
    pytest.skip(reason)


def _pg_bin(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        if (directory / name).exists():
            return str(directory / name)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL 15 cluster; stopped (immediate) and deleted at module teardown."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        _missing("PostgreSQL binaries initdb/pg_ctl not found (apt-get install postgresql)")
    prefix: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="moe-pg-"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            _missing("running as root and no 'postgres'/'nobody' user with runuser to start PostgreSQL")
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, port = base / "data", _free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "moe", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=60"
    try:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "60", "-o", options, "start"],
                       check=True, capture_output=True, timeout=90)
        yield f"postgresql://moe@127.0.0.1:{port}"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(params=["sqlite", "postgresql"])
def history_url(request, tmp_path):
    """A fresh, empty history: a SQLite file, or a new database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'history.sqlite'}"
    server = request.getfixturevalue("postgres_server")
    name = f"h_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(f"{server}/postgres".replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return f"{server}/{name}"


@pytest.fixture
def store(history_url):
    s = HistoryStore(history_url)
    yield s
    s.dispose()


# -- entries -------------------------------------------------------------------------------------
def bench_entry(model: str, config: str, thr: float, status: str = "success", **extra) -> dict:
    """A seed-001 flat success entry whose figures follow from one output throughput."""
    return {
        "model": model, "config": config, "engine": "vllm-cpu", "engine_version": "0.32.0", "batch_size": 1,
        "input_len": 4096, "output_len": 512, "latency_s": round(0.1 + 512 / thr, 4), "ttft_s": 0.1,
        "input_throughput_tok_per_s": 40960.0, "output_throughput_tok_per_s": thr, "itl_ms": round(1000 / thr, 4),
        "gpu_name": "cpu", "gpu_count": 0, "status": status, **extra,
    }


def failure_entry(model: str, config: str, error_type: str) -> dict:
    return {"model": model, "config": config, "engine": "vllm-cpu", "error_type": error_type,
            "error_message": f"{error_type} happened", "status": "failed"}


def night(n: int) -> RunInfo:
    return RunInfo(run_id=f"night-{n:02d}", started_at=NIGHT0 + timedelta(days=n), host="runner-1")


def put(store: HistoryStore, n: int, key: str, entry: dict) -> None:
    store.record(night(n), provenance(key, entry), entry_rows(entry))


# -- rows (no database) --------------------------------------------------------------------------
def test_flat_entry_is_the_benchmark_at_its_batch_size():
    entry = bench_entry("M", "TP1_auto", 80.0, batch_size=4)
    rows = entry_rows(entry)
    numeric = {(r.check, r.metric, r.batch_size): r.value for r in rows if r.value is not None}
    assert numeric == {("benchmark", m.name, 4): entry[m.name] for m in METRICS["benchmark"]}
    assert rows[0].check == "outcome" and rows[0].status is Status.PASSED


def test_checks_block_gives_one_row_per_check_metric_and_batch():
    entry = {
        **bench_entry("M", "TP1_auto", 80.0),
        "checks": {
            "benchmark": {"status": "passed", "rows": [
                {"batch_size": 1, "latency_s": 2.0, "ttft_s": 0.2, "input_throughput_tok_per_s": 1.0, "output_throughput_tok_per_s": 90.0, "itl_ms": 11.0},
                {"batch_size": 8, "latency_s": 3.0, "ttft_s": 0.3, "input_throughput_tok_per_s": 2.0, "output_throughput_tok_per_s": 400.0, "itl_ms": 12.0},
            ]},
            "accuracy": {"status": "failed", "score": 0.41, "n": 100, "lower_bound": 0.31, "floor": 0.5, "per_question_file": "q.jsonl"},
            "agreement": {"status": "passed", "reference": "TP1", "exact_match": 0.9, "mean_prefix": 0.95, "first_divergence": 3, "threshold": 0.8},
        },
    }
    got = {(r.check, r.metric, r.batch_size): (r.value, r.status) for r in entry_rows(entry)}
    assert got[("benchmark", "output_throughput_tok_per_s", 8)] == (400.0, Status.PASSED)
    assert got[("benchmark", "itl_ms", 1)] == (11.0, Status.PASSED)
    assert got[("accuracy", "score", 0)] == (0.41, Status.FAILED)
    assert got[("agreement", "exact_match", 0)] == (0.9, Status.PASSED)
    # the flat fields are not counted twice when the checks block is there
    assert sum(1 for k in got if k[:2] == ("benchmark", "output_throughput_tok_per_s")) == 2


def test_failure_entry_is_one_outcome_row_with_its_error_type():
    rows = entry_rows(failure_entry("M", "TP4_auto", "OOM"))
    assert [(r.check, r.status, r.error_type) for r in rows] == [("outcome", Status.FAILED, "OOM")]


def test_kernel_chosen_under_auto_is_read_from_a_real_vllm_cpu_log():
    """An excerpt of a real vLLM 0.32 CPU server log (tiny-qwen3-moe, TP1, auto)."""
    log = DATA / "vllm_cpu_tp1_auto_head.log"
    line = next(l for l in log.read_text().splitlines() if "Unquantized MoE backend out of potential backends" in l)
    expected = line.split("Using ", 1)[1].split(" Unquantized", 1)[0]
    assert kernel_from_log("vllm-cpu", log) == expected == "CPU"
    assert kernel_from_log("sglang", log) is None


def test_provenance_redacts_the_server_command(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    entry = bench_entry("M", "TP1_auto", 80.0, server_command="env HF_TOKEN=hf_secretvalue123 vllm serve m --api-key abcdef")
    prov = provenance("M::TP1_auto", entry)
    assert "hf_secretvalue123" not in prov.server_command and "abcdef" not in prov.server_command
    assert prov.moe_backend == "auto"


def test_history_url_precedence_command_line_then_env_then_ini(tmp_path):
    assert resolve_url("sqlite:///a", "sqlite:///b", "sqlite:///c") == "sqlite:///a"
    assert resolve_url(None, "sqlite:///b", "sqlite:///c") == "sqlite:///b"
    assert resolve_url(None, None, "sqlite:///c") == "sqlite:///c"
    assert resolve_url(None, None, None).endswith("history.sqlite") and str(ROOT) not in resolve_url(None, None, None)
    assert resolve_url("off", "sqlite:///b", None) is None
    assert resolve_url(str(tmp_path / "h.db"), None, None) == f"sqlite:///{tmp_path / 'h.db'}"


# -- the judge (pure) ----------------------------------------------------------------------------
def test_judge_band_is_median_plus_max_of_relative_and_k_noise():
    settings = HistorySettings(noise_k=3.0, default_relative=0.05, min_nights=3)
    thr = METRICS["benchmark"][0]
    previous = [100.0, 90.0, 110.0, 100.0, 95.0, 105.0, 100.0]
    # median 100; |dev| = 0,10,10,0,5,5,0 -> MAD 5 -> sigma 7.413 -> 3 sigma 22.24 > 5 % of 100
    v = judge(previous, 80.0, thr, 0.05, settings)
    assert v.state is State.UNCHANGED and v.median == 100.0
    assert v.low == pytest.approx(100 - 3 * 1.4826 * 5)
    assert judge(previous, 77.0, thr, 0.05, settings).state is State.REGRESSED
    assert judge(previous[:2], 10.0, thr, 0.05, settings).state is State.NOT_ENOUGH_HISTORY
    itl = next(m for m in METRICS["benchmark"] if m.name == "itl_ms")
    assert judge([10.0] * 5, 10.6, itl, 0.05, settings).state is State.REGRESSED  # quiet series: the 5 % floor
    assert judge([10.0] * 5, 9.4, itl, 0.05, settings).state is State.IMPROVED


# -- the database, both backends -----------------------------------------------------------------
def test_rows_and_provenance_round_trip(store):
    entry = bench_entry("M", "TP1_auto", 80.0, server_command="vllm serve m", repro_command="pytest x", log_path=str(DATA / "vllm_cpu_tp1_auto_head.log"))
    put(store, 0, "M::TP1_auto", entry)
    rows = store.rows()
    assert {r["run_id"] for r in rows} == {"night-00"}
    thr = next(r for r in rows if r["metric"] == "output_throughput_tok_per_s")
    assert (thr["value"], thr["batch_size"], thr["engine_version"], thr["moe_backend"], thr["moe_kernel"]) == (80.0, 1, "0.32.0", "auto", "CPU")
    assert thr["server_command"] == "vllm serve m" and thr["repro_command"] == "pytest x"
    assert store.runs()[0]["host"] == "runner-1"
    assert store.version() == len(MIGRATIONS)


def test_planted_drop_is_flagged_noise_is_not_and_flips_are_listed(store):
    rnd = random.Random(8)
    for n in range(8):
        for cfg in ("TP1_auto", "TP2_auto", "TP1_triton"):
            thr = 100.0 * rnd.uniform(0.97, 1.03)
            if n == 7 and cfg == "TP1_auto":
                thr = 70.0  # the planted 30 % drop
            entry = bench_entry("M", cfg, thr)
            if cfg == "TP2_auto" and n == 7:
                entry = failure_entry("M", cfg, "OOM")
            put(store, n, f"M::{cfg}", entry)
    changes = compare(store.rows(), {"night-07"}, HistorySettings())
    regressed = {(c.row["config_id"], c.metric.name) for c in changes.of_state(State.REGRESSED)}
    assert ("M::TP1_auto", "output_throughput_tok_per_s") in regressed
    assert not any(cid == "M::TP1_triton" for cid, _ in regressed)  # +-3 % noise stays inside the band
    drop = next(c for c in changes.of_state(State.REGRESSED) if c.metric.name == "output_throughput_tok_per_s")
    earlier = [r["value"] for r in store.rows(config_ids=["M::TP1_auto"]) if r["metric"] == "output_throughput_tok_per_s" and r["run_id"] != "night-07"]
    assert drop.verdict.median == pytest.approx(sorted(earlier)[3]) and drop.verdict.low < drop.verdict.median
    assert drop.verdict.delta == pytest.approx(70.0 / drop.verdict.median - 1)
    assert [(f.config_id, f.kind) for f in changes.flips] == [("M::TP2_auto", "passed → failed")]


def test_status_flips_back_and_new_error_type_and_auto_kernel_change(store):
    put(store, 0, "M::A_auto", failure_entry("M", "TP1_auto", "OOM"))
    put(store, 0, "M::B_auto", failure_entry("M", "TP2_auto", "OOM"))
    put(store, 0, "M::C_auto", bench_entry("M", "TP4_auto", 50.0, moe_kernel="TRITON"))
    put(store, 1, "M::A_auto", bench_entry("M", "TP1_auto", 50.0))
    put(store, 1, "M::B_auto", failure_entry("M", "TP2_auto", "Timeout"))
    put(store, 1, "M::C_auto", bench_entry("M", "TP4_auto", 50.0, moe_kernel="FlashInfer CUTLASS"))
    flips = {(f.config_id, f.kind, f.before, f.after) for f in compare(store.rows(), {"night-01"}, HistorySettings()).flips}
    assert flips == {
        ("M::A_auto", "failed → passed", "failed (OOM)", "passed"),
        ("M::B_auto", "new error type", "OOM", "Timeout"),
        ("M::C_auto", "auto kernel changed", "TRITON", "FlashInfer CUTLASS"),
    }


def test_not_enough_history_is_its_own_state(store):
    for n in range(2):
        put(store, n, "M::TP1_auto", bench_entry("M", "TP1_auto", 100.0 if n == 0 else 10.0))
    changes = compare(store.rows(), {"night-01"}, HistorySettings())
    assert changes.of_state(State.REGRESSED) == []
    assert {c.row["config_id"] for c in changes.of_state(State.NOT_ENOUGH_HISTORY)} == {"M::TP1_auto"}


def test_per_model_threshold_from_the_matrix_history_block(store, tmp_path):
    from pytest_moe.matrix import load_matrix

    matrix = tmp_path / "m.yaml"
    matrix.write_text("defaults: {engine: vllm-cpu}\nhistory:\n  relative: {output_throughput_tok_per_s: 0.05}\n"
                      "  models: {M: {output_throughput_tok_per_s: 0.25}}\nmodels:\n  M: {path: tiny:tiny-qwen3-moe, tp: [1]}\n")
    settings = load_matrix(matrix).history
    for n in range(5):
        put(store, n, "M::TP1_auto", bench_entry("M", "TP1_auto", 100.0 if n < 4 else 80.0))
        put(store, n, "N::TP1_auto", bench_entry("N", "TP1_auto", 100.0 if n < 4 else 80.0))
    regressed = {c.row["model"] for c in compare(store.rows(), {"night-04"}, settings).of_state(State.REGRESSED) if c.metric.name == "output_throughput_tok_per_s"}
    assert regressed == {"N"}  # -20 % is inside M's 25 % but outside the default 5 %


def test_newer_schema_is_refused_with_one_sentence(history_url):
    HistoryStore(history_url).dispose()
    engine = sa.create_engine(history_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(schema_version.update().values(version=len(MIGRATIONS) + 1))
    engine.dispose()
    with pytest.raises(HistoryError, match=r"schema version \d+, newer than this pytest-moe understands"):
        HistoryStore(history_url)


WRITER = """
import sys
from datetime import datetime
from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import HistoryStore, RunInfo
url, worker, configs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
store = HistoryStore(url)
run = RunInfo(run_id="shared-run", started_at=datetime(2026, 11, 1, 2))
for i in range(configs):
    key = f"W{worker}::TP1_c{i}"
    entry = {"model": f"W{worker}", "config": f"TP1_c{i}", "output_throughput_tok_per_s": 100.0 + i, "itl_ms": 10.0,
             "latency_s": 1.0, "ttft_s": 0.1, "input_throughput_tok_per_s": 1.0, "batch_size": 1, "status": "success"}
    store.record(run, provenance(key, entry), entry_rows(entry))
"""


def test_concurrent_writer_processes_lose_nothing(history_url):
    """Four processes (as xdist workers or runners of one run would be) migrate and write at once."""
    workers, configs = 4, 25
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, history_url, str(w), str(configs)], env=env, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    try:
        errors = [p.communicate(timeout=240)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * workers, errors
    store = HistoryStore(history_url)
    try:
        rows = store.rows()
        per_entry = len(entry_rows({"output_throughput_tok_per_s": 1.0, "itl_ms": 1.0, "latency_s": 1.0, "ttft_s": 0.1,
                                    "input_throughput_tok_per_s": 1.0, "status": "success"}))
        assert len(rows) == workers * configs * per_entry
        assert len({r["config_id"] for r in rows}) == workers * configs
        assert [r["run_id"] for r in store.runs()] == ["shared-run"]
    finally:
        store.dispose()


def test_import_results_json_and_junit_once(store, tmp_path):
    results_dir = tmp_path / "res"
    results_dir.mkdir()
    (results_dir / "success_results.json").write_text(json.dumps({"M::TP1_auto": {**bench_entry("M", "TP1_auto", 90.0), "last_updated": "2026-11-20T02:10:00"}}))
    (results_dir / "failure_results.json").write_text(json.dumps({"M::TP4_auto": {**failure_entry("M", "TP4_auto", "OOM"), "last_updated": "2026-11-20T02:30:00"}}))
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest" timestamp="2026-11-21T02:00:00"><testcase name="test_benchmark[M::TP1_auto]">'
        '<properties><property name="moe_id" value="M::TP1_auto"/><property name="model" value="M"/>'
        '<property name="config" value="TP1_auto"/><property name="output_throughput_tok_per_s" value="88.5"/>'
        '<property name="batch_size" value="1"/><property name="status" value="success"/></properties></testcase>'
        '<testcase name="test_benchmark[M::TP4_auto]"><properties><property name="moe_id" value="M::TP4_auto"/>'
        '<property name="error_type" value="OOM"/></properties><failure message="x"/></testcase></testsuite></testsuites>'
    )
    first = import_path(store, results_dir)
    again = import_path(store, results_dir)
    from_junit = import_path(store, junit)
    assert (first.skipped, again.skipped, from_junit.skipped) == (False, True, False)
    runs = store.runs()
    assert [r["started_at"] for r in runs] == [datetime(2026, 11, 20, 2, 10), datetime(2026, 11, 21, 2, 0)]
    rows = store.rows(run_ids=[from_junit.run_id])
    assert {(r["config_id"], r["metric"], r["value"], r["status"], r["error_type"]) for r in rows} == {
        ("M::TP1_auto", "status", None, "passed", None),  # the outcome row and the benchmark check's row
        ("M::TP1_auto", "output_throughput_tok_per_s", 88.5, "passed", None),
        ("M::TP4_auto", "status", None, "failed", "OOM"),
    }


def test_merge_follows_seed_001_rules(tmp_path):
    """Job A: X failed early, Y succeeded. Job B: X succeeded later, Y failed later, Z failed."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for d in (a, b):
        (d / "logs").mkdir(parents=True)
    (a / "logs" / "x.log").write_text("a")
    (b / "junit-2gpu.xml").write_text("<testsuites/>")
    (a / "failure_results.json").write_text(json.dumps({"M::X": {"error_type": "OOM", "last_updated": "2026-11-20T02:00:00"}}))
    (a / "success_results.json").write_text(json.dumps({"M::Y": {"output_throughput_tok_per_s": 1.0, "last_updated": "2026-11-20T02:01:00"}}))
    (b / "success_results.json").write_text(json.dumps({"M::X": {"output_throughput_tok_per_s": 2.0, "last_updated": "2026-11-20T03:00:00"}}))
    (b / "failure_results.json").write_text(json.dumps({
        "M::Y": {"error_type": "Timeout", "last_updated": "2026-11-20T03:05:00"},
        "M::Z": {"error_type": "Crash", "last_updated": "2026-11-20T03:06:00"},
    }))
    merged = merge_dirs([a, b], out)
    successes = json.loads((out / "success_results.json").read_text())
    failures = json.loads((out / "failure_results.json").read_text())
    assert set(successes) == {"M::X", "M::Y"}  # a later failure never overwrites Y's success
    assert set(failures) == {"M::Y", "M::Z"}  # X's later success removed its failure
    assert (out / "logs" / "x.log").read_text() == "a" and (out / "junit-2gpu.xml").exists()
    assert (merged.successes, merged.failures) == (2, 2)


def test_cli_merge_and_import_errors_are_one_sentence(tmp_path, capsys):
    from pytest_moe.cli import main

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "success_results.json").write_text("[1, 2]")
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    assert main(["merge", str(tmp_path / "a"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'a' / 'success_results.json'}: not a results file (expected {{\"Model::Config\": entry}})\n"
    assert main(["history", "import", str(tmp_path / "a"), "--moe-history", url]) == 2
    assert "not a results file" in capsys.readouterr().err
    assert main(["history", "import", str(tmp_path / "a"), "--moe-history", "mysql+nodriver://x/y"]) == 2
    assert capsys.readouterr().err == "error: history URL mysql+nodriver://x/y: only sqlite and postgresql are supported\n"
    (tmp_path / "a" / "success_results.json").write_text(json.dumps({"M::TP1_auto": bench_entry("M", "TP1_auto", 80.0)}))
    assert main(["history", "import", str(tmp_path / "a"), "--moe-history", url]) == 0
    assert "1 entries, 7 rows" in capsys.readouterr().out  # flat entry: outcome + benchmark status + 5 metrics
    assert main(["history", "import", str(tmp_path / "a"), "--moe-history", url]) == 0
    assert "already imported" in capsys.readouterr().out


def test_matrix_history_block_rejects_an_unknown_metric(tmp_path):
    from pytest_moe.matrix import MatrixError, load_matrix

    matrix = tmp_path / "m.yaml"
    matrix.write_text("history:\n  models: {M: {itl: 0.1}}\nmodels:\n  M: {path: x, tp: [1]}\n")
    with pytest.raises(MatrixError, match=r"m.yaml:2: history.models.M.itl: unknown metric 'itl' \(allowed: .*itl_ms"):
        load_matrix(matrix)
