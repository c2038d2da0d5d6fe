"""Seed 001's results-file semantics, including concurrent writers (xdist workers are processes)."""

import json
import multiprocessing

from pytest_moe.results import ResultsStore


def _read(store):
    return json.loads(store.success_path.read_text()), json.loads(store.failure_path.read_text())


def test_success_removes_failure_and_failure_never_overwrites_success(tmp_path):
    store = ResultsStore(tmp_path)
    store.record_failure("M::TP4_auto", {"model": "M", "config": "TP4_auto", "error_type": "OOM", "error_message": "x"})
    ok, bad = _read(store)
    assert ok == {} and bad["M::TP4_auto"]["error_type"] == "OOM"
    store.record_success("M::TP4_auto", {"model": "M", "config": "TP4_auto", "latency_s": 1.0})
    ok, bad = _read(store)
    assert "M::TP4_auto" in ok and bad == {}
    store.record_failure("M::TP4_auto", {"model": "M", "config": "TP4_auto", "error_type": "Crash", "error_message": "y"})
    ok, bad = _read(store)
    assert ok["M::TP4_auto"]["latency_s"] == 1.0  # the success is untouched
    assert bad["M::TP4_auto"]["error_type"] == "Crash"
    assert set(ok["M::TP4_auto"]) >= {"model", "config", "latency_s", "last_updated"}


def test_both_files_exist_after_any_first_record(tmp_path):
    ResultsStore(tmp_path / "a").record_success("A::TP1_auto", {"model": "A"})
    ResultsStore(tmp_path / "b").record_failure("B::TP1_auto", {"model": "B"})
    for d in ("a", "b"):
        assert json.loads((tmp_path / d / "success_results.json").read_text()) is not None
        assert json.loads((tmp_path / d / "failure_results.json").read_text()) is not None


def test_entries_persist_across_stores(tmp_path):
    ResultsStore(tmp_path).record_success("A::TP1_auto", {"model": "A", "config": "TP1_auto"})
    ResultsStore(tmp_path).record_success("B::TP1_auto", {"model": "B", "config": "TP1_auto"})
    ok, _ = ResultsStore(tmp_path).load()
    assert set(ok) == {"A::TP1_auto", "B::TP1_auto"}


def test_corrupt_file_is_kept_aside_not_lost(tmp_path):
    store = ResultsStore(tmp_path)
    store.success_path.write_text("{not json")
    store.record_success("A::TP1_auto", {"model": "A"})
    assert json.loads(store.success_path.read_text()) == {"A::TP1_auto": store.load()[0]["A::TP1_auto"]}
    assert list(tmp_path.glob("success_results.corrupt-*.json"))


def _writer(directory, worker, count):
    store = ResultsStore(directory)
    for i in range(count):
        if i % 2:
            store.record_failure(f"w{worker}::c{i}", {"model": f"w{worker}", "config": f"c{i}"})
        else:
            store.record_success(f"w{worker}::c{i}", {"model": f"w{worker}", "config": f"c{i}"})


def test_concurrent_workers_lose_no_entry(tmp_path):
    procs = [multiprocessing.get_context("spawn").Process(target=_writer, args=(tmp_path, w, 20)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ok, bad = ResultsStore(tmp_path).load()
    assert len(ok) == 40 and len(bad) == 40
