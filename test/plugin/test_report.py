"""Reports: seed 001's table, failure lines with a repro and the server command, redaction."""

import os
import shlex

from pytest_moe.redact import redact
from pytest_moe.report import failure_table, failure_text, repro_command, shell_line, success_tables, summary_markdown

SEED_ROW = {"model": "Qwen3-235B", "config": "TP8_EP2_auto", "batch_size": 1, "input_len": 4096, "latency_s": 7.59,
            "input_throughput_tok_per_s": 15933.87, "output_throughput_tok_per_s": 69.81, "itl_ms": 14.32,
            "profile_extend": "traces/q/extend", "profile_decode": None}


def test_seed_table_columns_and_row():
    text = success_tables([SEED_ROW])
    assert text.splitlines()[0] == "### Qwen3-235B"
    assert ("| config | batch size | input len | latency (s) | input throughput (tok/s) | output throughput (tok/s) "
            "| ITL (ms) | profile (extend) | profile (decode) |") in text
    assert "| TP8_EP2_auto | 1 | 4096 | 7.59 | 15933.87 | 69.81 | 14.32 | traces/q/extend | - |" in text


def test_values_from_xdist_workers_arrive_as_strings_and_print_the_same():
    as_strings = {k: str(v) if isinstance(v, float) or v is None else v for k, v in SEED_ROW.items()}
    assert as_strings["profile_decode"] == "None"
    assert success_tables([as_strings]) == success_tables([SEED_ROW])
    flaky = {**SEED_ROW, "flaky": True, "first_attempt_error_type": "PortInUse"}
    assert "| TP8_EP2_auto (flaky: PortInUse) | 1 |" in success_tables([flaky])
    assert success_tables([{**flaky, "flaky": "True"}]) == success_tables([flaky])


def test_failures_show_type_message_repro_and_server_command():
    entry = {"model": "M", "config": "TP4_auto", "error_type": "OOM", "error_message": "CUDA out of memory | x",
             "status": "failed", "repro_command": repro_command("M::TP4_auto", "model_matrix.yaml"),
             "server_command": "python -m sglang.launch_server --tp 4"}
    text = failure_table([entry])
    assert "| M::TP4_auto | OOM | failed | CUDA out of memory \\| x |" in text
    assert "- M::TP4_auto: `pytest test/nightly --moe-matrix model_matrix.yaml --moe-config M::TP4_auto`" in text
    assert "  - server: `python -m sglang.launch_server --tp 4`" in text
    head = summary_markdown([SEED_ROW], [entry, {**entry, "config": "TP8_auto", "status": "predicted"}]).splitlines()[0]
    assert head == "## pytest-moe: 1 succeeded, 2 failed (1 predicted by preflight, not booted)"


def test_repro_command_quotes_what_needs_quoting():
    cmd = repro_command("Odd Model::TP1_auto", "my matrix.yaml")
    assert shlex.split(cmd) == ["pytest", "test/nightly", "--moe-matrix", "my matrix.yaml", "--moe-config", "Odd Model::TP1_auto"]


def test_redaction_by_value_name_flag_and_url(monkeypatch):
    """Each secret reaches the text by one route only, so each pattern is exercised on its own."""
    for name in [n for n in os.environ if n.endswith(("_API_KEY", "_TOKEN", "_SECRET", "_PASSWORD"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")  # by value: the environment holds it
    text = ("loading with hf_secretvalue123; WANDB_API_KEY=abc123 --api-key sk-flagonly1 --hf-token=hf_flagonly2 "
            "https://user:pa55word@example.invalid/repo MY_TOKEN=t0k3n")
    out = redact(text)
    for secret in ("hf_secretvalue123", "abc123", "sk-flagonly1", "hf_flagonly2", "pa55word", "t0k3n"):
        assert secret not in out
    assert "https://***@example.invalid/repo" in out and "WANDB_API_KEY=***" in out
    assert "--api-key ***" in out and "--hf-token=***" in out


def test_a_server_command_with_an_api_key_only_in_its_arguments_is_redacted(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    line = shell_line(["vllm", "serve", "m", "--api-key", "sk-onlyinargv", "--port", "8000"], {"VLLM_X": "1"})
    assert "sk-onlyinargv" not in line
    assert line == "env VLLM_X=1 vllm serve m --api-key *** --port 8000"


def test_shell_line_puts_environment_first_and_quotes():
    line = shell_line(["python", "-m", "x", "--bind", "0|1"], {"B": "2", "A": "1"})
    assert line == "env A=1 B=2 python -m x --bind '0|1'"


def test_a_command_without_environment_is_the_command_alone_and_a_run_without_checks_has_no_tables():
    from pytest_moe.report import checks_table

    assert shell_line(["vllm", "serve", "m"], {}) == shell_line(["vllm", "serve", "m"]) == "vllm serve m"
    bench_only = [{"model": "M", "config": "TP1_auto", "checks": {"benchmark": {"status": "passed", "rows": []}}}]
    assert checks_table(bench_only) == checks_table([]) == ""
    assert summary_markdown([], []) == "## pytest-moe: 0 succeeded, 0 failed\n"


def test_checks_table_shows_verdict_figures_and_bare_failures():
    checks = {
        "benchmark": {"status": "passed", "rows": [{**{k: SEED_ROW[k] for k in ("batch_size", "input_len", "latency_s")}},
                                                   {"batch_size": 8, "input_len": 4096, "latency_s": 9.5}]},
        "accuracy": {"status": "failed", "score": 0.75, "n": 200, "lower_bound": 0.68, "floor": 0.88, "per_question_file": "q.jsonl"},
        "agreement": {"status": "failed"},
    }
    text = success_tables([{"model": "M", "config": "TP8_auto", "checks": checks}])
    assert "| TP8_auto | 1 | 4096 | 7.59 |" in text and "| TP8_auto | 8 | 4096 | 9.50 |" in text
    assert "| TP8_auto | failed: 0.750 / 0.680 / 0.88, 200 | failed |" in text


def test_a_failure_that_never_started_a_server_says_so():
    entry = {"model": "M", "config": "TP1_auto", "error_type": "InvalidArgument", "error_message": "bad --tp",
             "repro_command": "pytest --moe-config 'M::TP1_auto'", "server_command": None, "log_path": "logs/M_TP1_auto.log"}
    assert failure_text(entry) == ("M::TP1_auto failed: InvalidArgument: bad --tp\n"
                                   "reproduce: pytest --moe-config 'M::TP1_auto'\n"
                                   "server command: (not started)\n"
                                   "server log: logs/M_TP1_auto.log\n")


def test_the_whole_summary_of_a_small_night_written_out_by_hand():
    """Every line of the end-of-run summary for four entries: counts, both tables, failures and repro lines."""
    from pytest_moe.report import summary_markdown

    row = {"input_len": 8, "output_len": 4, "latency_s": 1.5, "input_throughput_tok_per_s": 100.0,
           "output_throughput_tok_per_s": 20.25, "itl_ms": 50.0}
    accuracy = {"status": "passed", "score": 0.9, "lower_bound": 0.8123, "floor": 0.75, "n": 20}
    successes = [
        {"model": "M", "config": "TP1_auto", "profile_extend": "t/e.json", "profile_decode": "t/d.json",
         "checks": {"benchmark": {"status": "passed", "rows": [{"batch_size": 1, **row}, {"batch_size": 4, **row}]},
                    "accuracy": accuracy}},
        {"model": "M", "config": "TP2_auto", "flaky": "True", "first_attempt_error_type": "PortInUse",
         "batch_size": 1, **row},
    ]
    failures = [
        {"model": "M", "config": "TP4_auto", "status": "xfailed", "error_type": "OOM",
         "error_message": "CUDA out of memory | at\nload", "repro_command": "pytest t --moe-config M::TP4_auto",
         "server_command": None},
        {"model": "N", "config": "TP8_auto", "status": "predicted", "error_type": "InvalidArgument",
         "error_message": "ep-must-divide: EP 3", "repro_command": "pytest t --moe-config N::TP8_auto",
         "server_command": "python -m sglang.launch_server --tp-size 8"},
    ]
    header = ("| config | batch size | input len | latency (s) | input throughput (tok/s) | output throughput (tok/s) "
              "| ITL (ms) | profile (extend) | profile (decode) |")
    assert summary_markdown(successes, failures) == "\n".join([
        "## pytest-moe: 2 succeeded, 2 failed (1 predicted by preflight, not booted, 1 known failures, 1 flaky)",
        "",
        "### M",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|",
        "| TP1_auto | 1 | 8 | 1.50 | 100.00 | 20.25 | 50.00 | t/e.json | t/d.json |",
        "| TP1_auto | 4 | 8 | 1.50 | 100.00 | 20.25 | 50.00 | - | - |",
        "| TP2_auto (flaky: PortInUse) | 1 | 8 | 1.50 | 100.00 | 20.25 | 50.00 | - | - |",
        "",
        "| config | accuracy (score / bound / floor, N) | agreement (exact / prefix vs reference) |",
        "|---|---|---|",
        "| TP1_auto | passed: 0.900 / 0.812 / 0.75, 20 | - |",
        "",
        "### Failures",
        "",
        "| config | error type | status | message |",
        "|---|---|---|---|",
        "| M::TP4_auto | OOM | xfailed | CUDA out of memory \\| at load |",
        "| N::TP8_auto | InvalidArgument | predicted | ep-must-divide: EP 3 |",
        "",
        "Reproduce one config (then the raw server command):",
        "",
        "- M::TP4_auto: `pytest t --moe-config M::TP4_auto`",
        "  - server: `(not started)`",
        "- N::TP8_auto: `pytest t --moe-config N::TP8_auto`",
        "  - server: `python -m sglang.launch_server --tp-size 8`",
    ]) + "\n"
