"""The results files as a reader (and git) sees them: where they go, their format, their timestamps.

Written to kill the survivors of ``scripts/bench_mutation.sh results``: each test pins one promise of
the files that no other test checked.
"""

import json
import os
import re
from datetime import datetime
from pathlib import Path

from pytest_moe.results import ResultsStore

SEED_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")  # seed 001: "2025-11-27T23:45:12"


def test_a_results_dir_that_does_not_exist_yet_is_created_with_its_parents(tmp_path):
    store = ResultsStore(tmp_path / "nightly" / "2026-11-25" / "results")
    store.record_success("M::TP1_auto", {"latency_s": 1.0})
    assert json.loads((tmp_path / "nightly/2026-11-25/results/success_results.json").read_text())["M::TP1_auto"]["latency_s"] == 1.0


def test_every_entry_says_when_it_was_written_in_the_seed_format(tmp_path):
    store = ResultsStore(tmp_path)
    before = datetime.now().replace(microsecond=0)
    store.record_success("A::TP1_auto", {"latency_s": 1.0})
    store.record_failure("B::TP1_auto", {"error_type": "OOM"})
    successes, failures = store.load()
    for stamp in (successes["A::TP1_auto"]["last_updated"], failures["B::TP1_auto"]["last_updated"]):
        assert SEED_TIME.match(stamp), stamp
        assert datetime.fromisoformat(stamp) >= before


def test_files_are_pretty_printed_with_sorted_keys_for_readable_diffs(tmp_path):
    store = ResultsStore(tmp_path)
    store.record_failure("Z::TP2_auto", {"status": "failed", "error_type": "OOM"})
    text = (tmp_path / "failure_results.json").read_text()
    lines = text.splitlines()
    assert lines[0] == "{" and lines[1] == '  "Z::TP2_auto": {' and lines[2].startswith('    "error_type": "OOM"')
    keys = [line.strip().split('"')[1] for line in lines[2:5]]
    assert keys == ["error_type", "last_updated", "status"]  # alphabetical, whatever the insertion order
    assert text.endswith("}\n")


def test_writes_go_through_a_temp_file_beside_the_target_and_leave_nothing_else(tmp_path, monkeypatch):
    """os.replace is atomic only within one file system: the temp file must sit in the results dir."""
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append((Path(src), Path(dst))), real_replace(src, dst)))
    store = ResultsStore(tmp_path)
    store.record_success("A::TP1_auto", {"latency_s": 1.0})
    store.record_failure("B::TP1_auto", {"error_type": "OOM"})
    assert replaced and all(src.parent == dst.parent == tmp_path for src, dst in replaced)
    assert all(src.name.startswith("." + dst.name) for src, dst in replaced)  # hidden while half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == [".results.lock", "failure_results.json", "success_results.json"]


def test_a_file_that_holds_no_object_is_kept_aside_and_then_replaced(tmp_path):
    (tmp_path / "success_results.json").write_text("[1, 2, 3]\n")
    (tmp_path / "failure_results.json").write_text("")
    store = ResultsStore(tmp_path)
    assert store.load() == ({}, {})
    kept = [p for p in tmp_path.glob("*.json") if p.name not in ("failure_results.json", "success_results.json")]
    # the list is not ours to drop: it is kept under its own name (an empty file holds nothing to keep)
    assert [p.read_text() for p in kept] == ["[1, 2, 3]\n"] and kept[0].name.startswith("success_results")
    store.record_success("A::TP1_auto", {"latency_s": 1.0})
    assert list(json.loads((tmp_path / "success_results.json").read_text())) == ["A::TP1_auto"]



def test_a_results_file_that_cannot_be_read_mid_run_reads_as_empty_with_a_warning(tmp_path):
    store = ResultsStore(tmp_path)
    store.record_failure("m::TP1_auto", {"status": "failed"})
    (tmp_path / "success_results.json").unlink()
    (tmp_path / "success_results.json").mkdir()  # replaced behind our back after the run's start-up check
    assert store.load() == ({}, {})
    assert store.warnings == [f"could not read the results in {tmp_path}: Is a directory"]


def test_a_check_joins_the_entry_where_it_is_or_starts_one_in_the_file_of_its_status(tmp_path):
    """The kernel check runs without a server: its block goes into whichever file already holds the config,
    else into the file its own status names, stamped, with the other file created empty."""
    store = ResultsStore(tmp_path)
    before = datetime.now().replace(microsecond=0)
    store.record_check("new-bad::TP1", "kernel", {"status": "failed"}, {"status": "failed"})
    assert json.loads((tmp_path / "success_results.json").read_text()) == {}  # created, empty
    store.record_success("ok::TP1", {"status": "success"})
    store.record_failure("bad::TP1", {"status": "failed"})
    store.record_check("ok::TP1", "kernel", {"status": "failed"}, {"status": "failed"})     # stays a success
    store.record_check("bad::TP1", "kernel", {"status": "passed"}, {"status": "success"})   # stays a failure
    store.record_check("new-ok::TP1", "kernel", {"status": "passed"}, {"status": "success"})
    successes = json.loads((tmp_path / "success_results.json").read_text())
    failures = json.loads((tmp_path / "failure_results.json").read_text())
    assert (sorted(successes), sorted(failures)) == (["new-ok::TP1", "ok::TP1"], ["bad::TP1", "new-bad::TP1"])
    assert successes["ok::TP1"]["checks"] == {"kernel": {"status": "failed"}}
    assert failures["bad::TP1"]["checks"] == {"kernel": {"status": "passed"}}
    for entry in [*successes.values(), *failures.values()]:
        assert datetime.fromisoformat(entry["last_updated"]) >= before


def test_a_write_that_fails_mid_run_names_what_it_was_recording(tmp_path):
    store = ResultsStore(tmp_path / "s")
    (tmp_path / "s" / "success_results.json").mkdir(parents=True)  # unreadable and unwritable from here on
    store.record_success("a::TP1", {"status": "success"})
    entry = store.record_check("c::TP1", "kernel", {"status": "passed"}, {"status": "success"})
    assert entry == {"status": "success", "checks": {"kernel": {"status": "passed"}}}  # what the caller reports
    other = ResultsStore(tmp_path / "f")
    (tmp_path / "f" / "failure_results.json").mkdir(parents=True)
    other.record_failure("b::TP1", {"status": "failed"})
    assert store.warnings + other.warnings == [f"could not {doing}: Is a directory" for doing in (
        f"record the success of a::TP1 in {tmp_path / 's'}", f"record the kernel check of c::TP1 in {tmp_path / 's'}",
        f"record the failure of b::TP1 in {tmp_path / 'f'}")]
