"""Waivers: an issue and an expiry on every ``known_failures`` entry, strict outcomes, the ``waivers`` listing.

Expected matrix lines are found in the YAML text written by each test, not asked from the code.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest

from pytest_moe import cli
from pytest_moe.matrix import MatrixError, load_matrix
from pytest_moe.waivers import Verdict, apply_waiver, check_outcome

TODAY = date(2026, 11, 25)
FUTURE = TODAY + timedelta(days=90)
PAST = date(2020, 1, 1)


def _matrix(tmp_path: Path, waivers: dict[str, str]) -> Path:
    """A one-model matrix (TP1, TP2 on vllm-cpu) whose ``known_failures`` are the given YAML bodies."""
    lines = [
        "defaults: {engine: vllm-cpu}",
        "models:",
        "  M:",
        "    path: tiny:tiny-qwen3-moe",
        "    tp: [1, 2]",
    ]
    if waivers:
        lines.append("    known_failures:")
        for name, body in waivers.items():
            lines.append(f"      {name}:")
            lines += [f"        {line}" for line in body.strip().splitlines()]
    path = tmp_path / "matrix.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if line.strip() == text)


def _waiver(error_type: str = "Crash", expires: date = FUTURE, issue: str = "https://github.com/vllm-project/vllm/issues/57837") -> str:
    return f"error_type: {error_type}\nreason: EP crashes on CPU\nissue: {issue}\nadded: 2026-10-26\nexpires: {expires}\n"


def _report(outcome: str) -> pytest.TestReport:
    return pytest.TestReport(nodeid="t[M::TP1_auto]", location=("t", 0, "t"), keywords={}, outcome=outcome,
                             longrepr=None if outcome == "passed" else "boom", when="call")


def _cfg(path: Path, name: str = "TP1_auto"):
    return load_matrix(path).by_id()[f"M::{name}"]


# --- the schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("error_type: Crash\nreason: r\nexpires: 2027-01-01\n", r"known_failures.TP1_auto.issue: required key is missing"),
        ("error_type: Crash\nreason: r\nissue: https://x/1\n", r"known_failures.TP1_auto.expires: required key is missing"),
        ("error_type: Crash\nreason: r\nissue: see chat\nexpires: 2027-01-01\n", r"known_failures.TP1_auto.issue: String should match"),
        ("error_type: Crash\nreason: r\nissue: https://x/1\nexpires: someday\n", r"known_failures.TP1_auto.expires: Input should be a valid date"),
    ],
)
def test_a_waiver_needs_an_issue_and_an_expiry(tmp_path, body, match) -> None:
    path = _matrix(tmp_path, {"TP1_auto": body})
    with pytest.raises(MatrixError, match=match) as info:
        load_matrix(path)
    assert str(info.value).startswith(f"{path}:")


# --- outcomes -----------------------------------------------------------------------------------


def test_a_current_waiver_xfails_its_own_error_type(tmp_path) -> None:
    cfg = _cfg(_matrix(tmp_path, {"TP1_auto": _waiver()}))
    report, entry = _report("failed"), {"error_type": "Crash", "status": "failed"}
    apply_waiver(report, cfg, entry, today=TODAY)
    assert report.outcome == "skipped" and entry["status"] == "xfailed"
    assert "https://github.com/vllm-project/vllm/issues/57837" in report.wasxfail and str(FUTURE) in report.wasxfail


def test_an_expired_waiver_no_longer_applies_and_says_so(tmp_path) -> None:
    path = _matrix(tmp_path, {"TP1_auto": _waiver(expires=PAST)})
    report, entry = _report("failed"), {"error_type": "Crash", "status": "failed"}
    apply_waiver(report, _cfg(path), entry, today=TODAY)
    assert report.outcome == "failed" and entry["status"] == "failed"
    text = dict(report.sections)["pytest-moe"]
    assert text.startswith("waiver for M::TP1_auto expired on 2020-01-01")
    assert f"{path}:{_line_of(path, 'TP1_auto:')}" in text and entry["waiver"] == text


def test_a_waived_config_that_passes_fails_naming_the_line_to_delete(tmp_path) -> None:
    path = _matrix(tmp_path, {"TP2_auto": _waiver(), "TP1_auto": _waiver()})
    report = _report("passed")
    apply_waiver(report, _cfg(path), {"status": "success"}, today=TODAY)
    assert report.outcome == "failed"
    line = _line_of(path, "TP1_auto:")
    assert line != _line_of(path, "TP2_auto:")
    assert report.longrepr.startswith("[XPASS(strict)] M::TP1_auto passed but is waived")
    assert report.longrepr.endswith(f"delete {path}:{line}")


def test_another_error_type_than_the_waived_one_fails(tmp_path) -> None:
    report = _report("failed")
    apply_waiver(report, _cfg(_matrix(tmp_path, {"TP1_auto": _waiver("OOM")})), {"error_type": "Crash"}, today=TODAY)
    assert report.outcome == "failed" and "expected OOM" in dict(report.sections)["pytest-moe"]


def test_configs_without_a_waiver_are_untouched(tmp_path) -> None:
    report = _report("failed")
    apply_waiver(report, _cfg(_matrix(tmp_path, {"TP2_auto": _waiver()})), {"error_type": "Crash"}, today=TODAY)
    assert report.outcome == "failed" and not report.sections


def test_check_outcome_verdicts_and_the_expiry_day_itself(tmp_path) -> None:
    path = _matrix(tmp_path, {"TP1_auto": _waiver("Crash", expires=FUTURE)})
    cfg = _cfg(path)
    assert check_outcome(_cfg(path, "TP2_auto"), "Crash", passed=False, today=TODAY) is None  # no waiver
    assert check_outcome(cfg, "Crash", passed=False, today=TODAY).verdict is Verdict.XFAIL
    assert check_outcome(cfg, "Crash", passed=False, today=FUTURE).verdict is Verdict.XFAIL  # "expires" is its last day
    assert check_outcome(cfg, "Crash", passed=False, today=FUTURE + timedelta(days=1)).verdict is Verdict.FAIL
    assert check_outcome(cfg, None, passed=True, today=TODAY).verdict is Verdict.FAIL
    assert check_outcome(cfg, "OOM", passed=False, today=TODAY).verdict is Verdict.FAIL


def test_apply_waiver_judges_by_the_day_it_is_given(tmp_path) -> None:
    """The day passed in (the run's date), not the clock: a waiver expiring in 2099 has expired on 2100-01-01."""
    report, entry = _report("failed"), {"error_type": "Crash", "status": "failed"}
    apply_waiver(report, _cfg(_matrix(tmp_path, {"TP1_auto": _waiver(expires=date(2099, 1, 1))})), entry,
                 today=date(2100, 1, 1))
    assert report.outcome == "failed"
    assert dict(report.sections)["pytest-moe"].startswith("waiver for M::TP1_auto expired on 2099-01-01")


# --- python -m pytest_moe waivers ---------------------------------------------------------------


def _results(tmp_path: Path, successes: dict, failures: dict) -> Path:
    out = tmp_path / "results"
    out.mkdir()
    (out / "success_results.json").write_text(json.dumps(successes))
    (out / "failure_results.json").write_text(json.dumps(failures))
    return out


def test_waivers_lists_every_waiver_and_flags_the_expired_and_the_passing(tmp_path, capsys) -> None:
    path = _matrix(tmp_path, {"TP1_auto": _waiver(expires=PAST), "TP2_auto": _waiver()})
    results = _results(tmp_path, {"M::TP2_auto": {"status": "success", "last_updated": "2026-11-24T01:00:00"}},
                       {"M::TP2_auto": {"status": "xfailed", "error_type": "Crash", "last_updated": "2026-11-20T01:00:00"},
                        "M::TP1_auto": {"status": "failed", "error_type": "Crash", "last_updated": "2026-11-24T01:00:00"}})
    code = cli.main(["waivers", "--moe-matrix", str(path), "--moe-results-dir", str(results)])
    out = capsys.readouterr().out
    assert code == 1
    tp1 = next(line for line in out.splitlines() if line.startswith("M::TP1_auto"))
    tp2 = next(line for line in out.splitlines() if line.startswith("M::TP2_auto"))
    assert "https://github.com/vllm-project/vllm/issues/57837" in tp1 and "failed: Crash" in tp1
    assert "expired on 2020-01-01" in tp1
    assert "passed" in tp2 and f"no longer fails: delete {path}:{_line_of(path, 'TP2_auto:')}" in tp2
    assert "2 waiver(s), 2 need attention" in out
    # a table: each column starts where its header does, and no line trails blanks
    header = out.splitlines()[0]
    assert header.split() == ["config", "waived", "type", "issue", "age", "expires", "last", "outcome", "state"]
    assert tp1.index("https://") == tp2.index("https://") == header.index("issue")
    assert tp1.index("failed: Crash") == header.index("last outcome")
    assert all(line == line.rstrip() for line in out.splitlines())


def test_waivers_exit_zero_when_every_waiver_is_current_and_still_failing(tmp_path, capsys) -> None:
    path = _matrix(tmp_path, {"TP1_auto": _waiver(expires=date.today() + timedelta(days=30))})
    results = _results(tmp_path, {}, {"M::TP1_auto": {"status": "xfailed", "error_type": "Crash", "last_updated": "2026-11-24T01:00:00"}})
    assert cli.main(["waivers", "--moe-matrix", str(path), "--moe-results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert "xfailed: Crash" in out and "1 waiver(s), 0 need attention" in out
    assert f"{(date.today() - date(2026, 10, 26)).days} d" in out


def test_a_waiver_without_its_added_date_shows_an_unknown_age(tmp_path, capsys) -> None:
    body = _waiver(expires=date.today() + timedelta(days=30)).replace("added: 2026-10-26\n", "")
    path = _matrix(tmp_path, {"TP1_auto": body})
    results = _results(tmp_path, {}, {"M::TP1_auto": {"status": "xfailed", "error_type": "Crash", "last_updated": "2026-11-24T01:00:00"}})
    assert cli.main(["waivers", "--moe-matrix", str(path), "--moe-results-dir", str(results)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("M::TP1_auto"))
    assert row.split()[3] == "?"  # config, type, issue, age


def test_waivers_on_a_bad_matrix_is_a_usage_error(tmp_path, capsys) -> None:
    path = _matrix(tmp_path, {"TP1_auto": "error_type: Crash\nreason: r\n"})
    assert cli.main(["waivers", "--moe-matrix", str(path)]) == 2
    assert "required key is missing" in capsys.readouterr().err


@pytest.mark.parametrize(("success", "failure", "expected"), [
    (None, None, "no result"),
    ({"last_updated": "2026-11-24T01:00:00"}, None, "passed"),
    (None, {"error_type": "Crash"}, "failed: Crash"),  # an entry written before status was kept
    (None, {"status": "xfailed"}, "xfailed: ?"),
    ({"last_updated": "2026-11-24T01:00:00"}, {"status": "failed", "error_type": "OOM", "last_updated": "2026-11-25T01:00:00"},
     "failed: OOM"),                                  # the newer entry wins
    ({"last_updated": "2026-11-24T01:00:00"}, {"status": "failed", "error_type": "OOM"}, "passed"),  # an undated failure
    ({"status": "success"}, {"status": "failed", "error_type": "OOM", "last_updated": "2026-11-25T01:00:00"}, "failed: OOM"),  # an undated success
])
def test_the_last_outcome_is_the_newer_entry(tmp_path, success, failure, expected) -> None:
    from pytest_moe.waivers import list_waivers

    path = _matrix(tmp_path, {"TP1_auto": _waiver()})
    results = _results(tmp_path, {"M::TP1_auto": success} if success else {}, {"M::TP1_auto": failure} if failure else {})
    [waiver] = list_waivers(load_matrix(path), results)
    assert waiver.last_outcome == expected
    [unrun] = list_waivers(load_matrix(path), tmp_path / "never-written")
    assert unrun.last_outcome == "no result"
