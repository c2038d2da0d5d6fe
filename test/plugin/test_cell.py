"""The cell: one boot per config for all its checks, typed entries, and the accuracy and agreement verdicts.

The plugin runs in pytester against a stand-in engine registered as engine ``fake`` (a new engine needs no edit
of the plugin: its marker comes from the registry).  The stand-in answers arithmetic right or off by one and
returns greedy token ids that are a fixed function of the prompt, with a divergence planted by a server flag,
so every verdict below follows from the test's own inputs, never from random weights.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from scipy.stats import binom

from pytest_moe import engines
from pytest_moe.checks.accuracy import extract_answer, load_questions, verdict
from pytest_moe.configs import AccuracySpec

from fakes.fake_engine_spec import FAKE_ENGINE

NIGHTLY = (Path(__file__).resolve().parents[2] / "test" / "nightly" / "test_moe_matrix.py").read_text()


@pytest.fixture
def fake_engine(monkeypatch):
    """Engine ``fake`` added to the registry the plugin reads (``engines.yaml`` plus this entry)."""
    real = engines.load_yaml
    monkeypatch.setattr(engines, "load_yaml", lambda name: {**real(name), "fake": FAKE_ENGINE} if name == "engines.yaml" else real(name))
    monkeypatch.setitem(engines._ADAPTERS, "fake", engines.Engine)
    engines.forget_tables()
    yield
    engines.forget_tables()


def _run(pytester, matrix: str, *extra: str):
    pytester.makefile(".yaml", matrix=matrix)
    pytester.makepyfile(test_nightly=NIGHTLY)
    results = pytester.path / "results"
    outcome = pytester.runpytest(
        "--moe-matrix", "matrix.yaml", "--moe-results-dir", str(results), "--junitxml", "junit.xml",
        "--moe-cooldown", "0", "--moe-grace", "2", "--moe-no-preflight", "-p", "no:cacheprovider", "-rA", *extra,
    )
    successes = json.loads((results / "success_results.json").read_text())
    failures = json.loads((results / "failure_results.json").read_text())
    return outcome, successes, failures, results


def _launches(log: Path) -> int:
    """Server launches in a config's log: the harness writes one ``$ <command>`` line per launch."""
    return sum(1 for line in log.read_text().splitlines() if line.startswith("$ "))


def _junit_props(path: Path) -> dict[str, dict[str, str]]:
    cases = ET.parse(path).getroot().iter("testcase")
    return {case.get("name"): {p.get("name"): p.get("value") for p in case.iter("property")} for case in cases}


WRONG = """\
defaults:
  engine: fake
  timeout_s: 30
  bench: {batch_sizes: [1, 4], input_len: 16, output_len: 8, warmup: 0}
  accuracy: {n: 20, parallel: 4}
models:
  Wrong:
    path: /m
    tp: [1]
    args: [--arithmetic, wrong]
    accuracy: {floor: 0.8}
"""


def test_failing_accuracy_keeps_the_benchmark_in_both_files_and_junit(pytester, fake_engine):
    outcome, successes, failures, results = _run(pytester, WRONG)
    outcome.assert_outcomes(passed=2, failed=1)
    key = "Wrong::TP1_auto"
    # One boot served all three checks.
    assert _launches(results / "logs" / "Wrong_TP1_auto.log") == 1
    # The success file keeps the seed's flat figures (first batch size) and one row per batch size.
    ok = successes[key]
    assert ok["batch_size"] == 1 and ok["latency_s"] > 0 and ok["output_throughput_tok_per_s"] > 0
    assert [row["batch_size"] for row in ok["checks"]["benchmark"]["rows"]] == [1, 4]
    # The failure entry says why, and still carries the benchmark's block.
    bad = failures[key]
    assert bad["error_type"] == "WrongAnswers" and bad["status"] == "failed"
    assert [row["batch_size"] for row in bad["checks"]["benchmark"]["rows"]] == [1, 4]
    acc = bad["checks"]["accuracy"]
    assert acc["status"] == "failed" and acc["score"] == 0.0 and acc["n"] == 20 and acc["floor"] == 0.8
    # Per-question file: expected answers are the questions' own sums, the server's are one more.
    rows = [json.loads(line) for line in Path(acc["per_question_file"]).read_text().splitlines()]
    assert len(rows) == 20
    for row in rows:
        a, b = map(int, re.fullmatch(r"(\d+)\+(\d+)=", row["question"]).groups())
        assert row["expected"] == a + b and row["extracted"] == a + b + 1
    # JUnit: the failing accuracy test case carries the benchmark rows too.
    props = _junit_props(pytester.path / "junit.xml")
    accuracy_case = props["test_moe[Wrong::TP1_auto-accuracy]"]
    assert float(accuracy_case["benchmark.bs4.latency_s"]) > 0 and accuracy_case["accuracy.score"] == "0.0"
    assert "Wrong::TP1_auto" in outcome.stdout.str() and "| Wrong::TP1_auto | WrongAnswers |" in outcome.stdout.str()


PLANTED = """\
defaults:
  engine: fake
  timeout_s: 30
  bench: {batch_size: 1, input_len: 16, output_len: 8, warmup: 0}
models:
  M:
    path: /m
    tp: [1, 2]
    configs:
      - {tp: 4, args: [--perturb-prompt, "3", --perturb-at, "5"]}
"""


def test_agreement_names_the_prompt_and_position_of_a_planted_divergence(pytester, fake_engine):
    outcome, _, failures, results = _run(pytester, PLANTED, "-m", "agreement")
    outcome.assert_outcomes(passed=2, failed=1)
    assert "M::TP4_auto" in failures and "M::TP2_auto" not in failures
    block = failures["M::TP4_auto"]["checks"]["agreement"]
    assert failures["M::TP4_auto"]["error_type"] == "Disagreement"
    assert block["reference"] == "TP1_auto" and block["exact_match"] == 7 / 8
    assert block["first_divergence"]["prompt"] == 3 and block["first_divergence"]["position"] == 5
    assert "first divergence: prompt 3" in outcome.stdout.str() and "at token 5" in outcome.stdout.str()
    # Rerunning one config compares with the reference's outputs on disk, without booting the reference.
    rerun = pytester.runpytest("--moe-matrix", "matrix.yaml", "--moe-results-dir", str(results), "--moe-cooldown", "0",
                               "--moe-no-preflight", "-p", "no:cacheprovider", "--moe-config", "M::TP4_auto", "-m", "agreement")
    rerun.assert_outcomes(failed=1)
    assert not (results / "logs" / "M_TP1_auto.log").read_text().count("$ ") > 1


def test_moe_config_runs_every_check_of_one_config_on_one_boot(pytester, fake_engine):
    outcome, successes, _, results = _run(pytester, PLANTED, "--moe-config", "M::TP2_auto")
    # Agreement has nothing to compare with: the reference never ran and left no outputs on disk.
    outcome.assert_outcomes(passed=2, skipped=1)
    assert "no outputs of the reference M::TP1_auto" in outcome.stdout.str()
    assert set(successes["M::TP2_auto"]["checks"]) == {"benchmark", "accuracy"}
    assert _launches(results / "logs" / "M_TP2_auto.log") == 1
    assert not (results / "logs" / "M_TP1_auto.log").exists()


def test_report_header_names_matrix_configs_and_gpus(pytester, fake_engine, monkeypatch):
    monkeypatch.setenv("PYTEST_MOE_MATRIX", "matrix.yaml")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    pytester.makefile(".yaml", matrix=PLANTED)
    pytester.makepyfile(test_nightly=NIGHTLY)
    out = pytester.runpytest("--collect-only", "-p", "no:cacheprovider").stdout.str()
    assert re.search(r"pytest-moe: matrix \S*matrix.yaml \(\$PYTEST_MOE_MATRIX\), 3 configs, 9 checks", out)
    assert re.search(r"pytest-moe: 0 GPUs \(none\) from ", out)


GSM8K_OUTPUTS = Path(__file__).parent / "data" / "gsm8k_outputs.jsonl"


@pytest.mark.parametrize("case", [json.loads(line) for line in GSM8K_OUTPUTS.read_text().splitlines()],
                         ids=lambda case: case["output"][:30])
def test_answer_extraction_on_gsm8k_style_outputs(case):
    assert extract_answer(case["output"]) == case["expected"]


def test_packaged_questions_answers_are_their_sums():
    questions = load_questions(None)
    assert len(questions) >= 200
    for q in questions:
        a, b = map(int, q.question.rstrip("=").split("+"))
        assert q.expected == a + b


@pytest.mark.parametrize("n, floor", [(50, 0.9), (200, 0.88), (1319, 0.95)])
def test_a_healthy_server_fails_at_most_one_night_in_a_hundred(n, floor):
    """False-alarm rate: the probability, for a server exactly at the floor, that the verdict fails (exact binomial)."""
    spec = AccuracySpec(floor=floor, n=n, confidence=0.99)
    failing = [k for k in range(n + 1) if not verdict(k, n, spec)[0]]
    assert failing == list(range(len(failing)))  # failing scores are the lowest ones
    assert binom.cdf(failing[-1], n, floor) <= 0.01
    # ...and the bound is not vacuous: a drop of 10 points is caught more often than not at N >= 200.
    if n >= 200:
        assert binom.cdf(failing[-1], n, floor - 0.10) > 0.5


def test_an_old_failure_is_cleared_only_when_every_check_passed(pytester, fake_engine):
    results = pytester.path / "results"
    results.mkdir()
    old = {"M::TP1_auto": {"model": "M", "config": "TP1_auto", "error_type": "OOM", "error_message": "old", "status": "failed"}}
    (results / "failure_results.json").write_text(json.dumps(old))
    outcome, successes, failures, _ = _run(pytester, PLANTED, "--moe-config", "M::TP1_auto", "-m", "accuracy")
    outcome.assert_outcomes(passed=1)
    assert failures["M::TP1_auto"]["error_message"] == "old"  # the benchmark that failed last time did not run
    assert successes["M::TP1_auto"]["checks"]["accuracy"]["status"] == "passed"
    outcome, successes, failures, _ = _run(pytester, PLANTED, "--moe-config", "M::TP1_auto")
    outcome.assert_outcomes(passed=3)
    assert "M::TP1_auto" not in failures


@pytest.mark.parametrize("where", ["ini", "env", "command line"])
def test_matrix_option_precedence_command_line_then_env_then_ini(pytester, fake_engine, monkeypatch, where):
    for name in ("ini", "env", "cli"):
        pytester.makefile(".yaml", **{f"matrix_{name}": PLANTED.replace("M:", f"From{name.capitalize()}:")})
    pytester.makeini("[pytest]\nmoe_matrix = matrix_ini.yaml\n")
    pytester.makepyfile(test_nightly=NIGHTLY)
    args = ["--collect-only", "-q", "-p", "no:cacheprovider"]
    if where != "ini":
        monkeypatch.setenv("PYTEST_MOE_MATRIX", "matrix_env.yaml")
    if where == "command line":
        args += ["--moe-matrix", "matrix_cli.yaml"]
    expected = {"ini": "FromIni", "env": "FromEnv", "command line": "FromCli"}[where]
    out = pytester.runpytest(*args).stdout.str()
    assert f"test_moe[{expected}::TP1_auto-benchmark]" in out
    assert {"FromIni", "FromEnv", "FromCli"} - {expected} & set(re.findall(r"From\w+", out)) == set()


def test_a_bad_server_timeout_from_the_environment_is_a_usage_error(pytester, fake_engine, monkeypatch):
    monkeypatch.setenv("PYTEST_MOE_SERVER_TIMEOUT", "soon")
    pytester.makefile(".yaml", matrix=PLANTED)
    pytester.makepyfile(test_nightly=NIGHTLY)
    result = pytester.runpytest("--moe-matrix", "matrix.yaml", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*$PYTEST_MOE_SERVER_TIMEOUT: server timeout 'soon' is not a finite number of seconds*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


SLOW_START = """\
defaults: {engine: fake, timeout_s: 30, bench: {batch_size: 1, input_len: 8, output_len: 4, warmup: 0}}
models:
  Slow: {path: /m, tp: [1], args: [--ready-after, "1.2"]}
"""


def test_progress_lines_reach_the_terminal_while_output_is_captured(pytester, fake_engine):
    outcome, successes, _, _ = _run(pytester, SLOW_START, "--moe-progress-interval", "0.3", "-m", "benchmark")
    outcome.assert_outcomes(passed=1)
    assert "[pytest-moe] Slow::TP1_auto: waiting for readiness" in outcome.stdout.str()  # no -s given


def test_without_a_terminal_reporter_progress_lines_are_dropped_and_the_run_goes_on(pytester, fake_engine):
    pytester.makefile(".yaml", matrix=SLOW_START)
    pytester.makepyfile(test_nightly=NIGHTLY)
    results = pytester.path / "results"
    outcome = pytester.runpytest("--moe-matrix", "matrix.yaml", "--moe-results-dir", str(results), "--moe-cooldown", "0",
                                 "--moe-progress-interval", "0.3", "-m", "benchmark", "-p", "no:cacheprovider",
                                 "-p", "no:terminal")
    assert outcome.ret == 0
    assert set(json.loads((results / "success_results.json").read_text())) == {"Slow::TP1_auto"}
    assert "waiting for readiness" not in outcome.stdout.str()
