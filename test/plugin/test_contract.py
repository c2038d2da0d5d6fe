"""The bad-input contract (docs/contract.md), one test per case of issue 13.

Each case is a concrete hostile input that, before the contract, crashed (INTERNALERROR, a traceback),
was silently coerced, ran unbounded, lost results or leaked a secret.  Expectations are written from the
inputs (the file, line, key or option that a sentence must name), not from the code under test.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_moe import cli
from pytest_moe.matrix import MatrixError, file_stem, load_matrix
from pytest_moe.redact import redact, register_secrets, secret_values_of
from pytest_moe.results import ResultsStore

from fakes.standin import fake_config, fake_engine

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "test/plugin/data/configs"
TEST_FILE = "def test_benchmark(moe_config):\n    pass\n"
GOOD = "models:\n  M:\n    path: org/m\n    tp: [1]\n"


def _one_sentence(text: str) -> str:
    """The error line; asserts there is exactly one and no traceback anywhere."""
    assert "Traceback" not in text and "INTERNALERROR" not in text, text
    lines = [line for line in text.splitlines() if line.lower().startswith("error")]
    assert len(lines) == 1, text
    return lines[0]


# -- the matrix through pytest: exit 4 and one sentence --------------------------------------------
@pytest.fixture
def run_matrix(pytester):
    pytester.makepyfile(test_nightly=TEST_FILE)

    def run(content: bytes | str, *args: str):
        path = pytester.path / "m.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return pytester.runpytest_inprocess("--moe-matrix", str(path), "-p", "no:cacheprovider", *args)

    return run


@pytest.mark.parametrize("content, names", [
    ("models: {}\n", ["m.yaml:1", "models", "at least 1"]),
    (b"models:\n  M:\n    path: org/m\xff\n    tp: [1]\n", ["m.yaml:3", "not UTF-8", "0xff"]),
    ("models: " + "[" * 5000 + "]" * 5000 + "\n", ["m.yaml:1", "nested deeper than 32"]),
    ("models: &a\n  M: *a\n", ["m.yaml:2", "alias *a refers to a node that contains it"]),
    ("models:\n  M:\n    path: tiny:no-such-model\n    tp: [1]\n", ["m.yaml:3", "models.M.path", "unknown tiny model 'tiny:no-such-model'"]),
    ("models:\n  M:\n    path: org/m\n    tp: ['8']\n", ["m.yaml:4", "models.M.tp[0]", "valid integer", "'8'"]),
    ("models:\n  M:\n    path: org/m\n    tp: [8.0]\n", ["m.yaml:4", "models.M.tp[0]", "valid integer", "8.0"]),
    ("models:\n  M:\n    path: org/m\n    tp: [true]\n", ["m.yaml:4", "models.M.tp[0]", "valid integer", "True"]),
    ("models:\n  M:\n    path: org/m\n    timeout_s: .inf\n    tp: [1]\n", ["m.yaml:4", "models.M.timeout_s", "finite"]),
    ("models:\n  M:\n    path: org/m\n    tp: [1]\n    configs: [{tp: 2, ep: -2}]\n", ["m.yaml:5", "models.M.configs[0].ep", "greater than 0"]),
    ("models:\n  \"M\\tX\":\n    path: org/m\n    tp: [1]\n", ["m.yaml:2", "control characters"]),
    ("models:\n  M:\n    path: org/m\n    tp: [1]\n  m:\n    path: org/m\n    tp: [1]\n", ["m.yaml:5", "share the log file name"]),
], ids=["empty-models", "non-utf8", "deep-nesting", "recursive-alias", "unknown-tiny", "tp-string", "tp-float",
        "tp-bool", "timeout-inf", "negative-ep", "control-char-id", "ids-colliding-as-file-names"])
def test_bad_matrix_is_a_usage_error_naming_the_place(run_matrix, content, names):
    result = run_matrix(content)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = _one_sentence(result.stderr.str() + result.stdout.str())
    for name in names:
        assert name in line, line


def test_alias_bomb_and_oversized_matrix_are_rejected_within_bounds(tmp_path):
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\nmodels: {M: {path: org/m, tp: [1]}}\n")
    (tmp_path / "big.yaml").write_bytes(b"# " + b"x" * (50 << 20) + b"\n" + GOOD.encode())
    # A generous subprocess timeout as the bound (no timed assert); memory is printed by scripts/bench_hostile.py.
    for name, expected in (("bomb.yaml", "aliases expand to more than"), ("big.yaml", "larger than 1024 KiB")):
        proc = subprocess.run([sys.executable, "-m", "pytest_moe", "list", "--moe-matrix", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 2 and expected in _one_sentence(proc.stderr), proc.stderr


def test_collect_only_never_builds_a_tiny_checkpoint(run_matrix, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_MOE_TINY_DIR", str(tmp_path / "tiny"))
    result = run_matrix("defaults: {engine: vllm-cpu}\nmodels:\n  T:\n    path: tiny:tiny-mixtral\n    tp: [1]\n",
                        "--collect-only")
    assert result.ret == 0, result.stdout.str()
    assert not (tmp_path / "tiny").exists()


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("num_attention_heads", {"n": 8}),
                                          ("num_experts", -4), ("num_hidden_layers", 10**9)])
def test_hostile_config_json_never_crashes_collection_and_is_one_cli_sentence(pytester, tmp_path, capsys, field, value):
    config = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    config[field] = value
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text(json.dumps(config))
    pytester.makepyfile(test_nightly=TEST_FILE)
    (pytester.path / "m.yaml").write_text(f"defaults: {{engine: vllm-cpu}}\nmodels:\n  L:\n    path: {tmp_path / 'model'}\n    tp: [1]\n")
    result = pytester.runpytest_inprocess("--moe-matrix", str(pytester.path / "m.yaml"), "--collect-only")
    assert result.ret == 0 and "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    assert cli.main(["inspect", str(tmp_path / "model")]) == 2
    err = _one_sentence(capsys.readouterr().err)
    assert str(tmp_path / "model/config.json") in err and field in err


# -- the CLI: exit 2, one line --------------------------------------------------------------------
@pytest.mark.parametrize("args, option", [
    (["preflight", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--tp", "0"], "--tp"),
    (["preflight", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--tp", "-1"], "--tp"),
    (["preflight", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--tp", "2", "--gpus", "0"], "--gpus"),
    (["preflight", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--tp", "2", "--ep", "0"], "--ep"),
    (["preflight", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--tp", "2", "--mem-fraction", "inf"], "--mem-fraction"),
    (["plan", "--model", str(CONFIGS / "qwen3-30b-a3b.json"), "--gpu", "H200", "--gpus", "1000000000"], "--gpus"),
])
def test_cli_rejects_out_of_range_numbers_with_exit_2(capsys, args, option):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    assert option in _one_sentence(capsys.readouterr().err)


# -- results files: nothing lost ------------------------------------------------------------------
EARLIER = {"Earlier::TP1_auto": {"model": "Earlier", "config": "TP1_auto", "latency_s": 1.0}}


@pytest.mark.parametrize("content, problem", [
    (b"[1, 2]", "holds a JSON list"),
    (b"{not json", "not valid JSON"),
    (b'{"A::TP1": "caf\xe9"}', "not UTF-8"),
    (b'{"A": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "is nested too deeply to be results"),
])
def test_unreadable_results_file_is_kept_and_reported(tmp_path, content, problem):
    store = ResultsStore(tmp_path)
    store.success_path.write_bytes(content)
    store.record_success("B::TP1_auto", {"model": "B"})
    kept = list(tmp_path.glob("success_results.corrupt-*.json"))
    assert [p.read_bytes() for p in kept] == [content]
    assert len(store.warnings) == 1 and problem in store.warnings[0] and str(kept[0]) in store.warnings[0]
    assert set(json.loads(store.success_path.read_text())) == {"B::TP1_auto"}


def test_two_corruptions_in_one_second_keep_both_copies(tmp_path):
    store = ResultsStore(tmp_path)
    for content in (b"[1]", b"[2]"):
        store.failure_path.write_bytes(content)
        store.load()
    assert sorted(p.read_bytes() for p in tmp_path.glob("failure_results.corrupt-*.json")) == [b"[1]", b"[2]"]


def test_files_keep_their_mode_and_stale_temp_files_go(tmp_path):
    store = ResultsStore(tmp_path)
    store.success_path.write_text(json.dumps(EARLIER))
    store.success_path.chmod(0o640)  # not what a new file would get under any usual umask
    (tmp_path / ".success_results.json.12345-deadbeef.tmp").write_text("{half")  # a writer SIGKILLed mid-write
    store.record_success("B::TP1_auto", {"model": "B"})
    assert stat.S_IMODE(store.success_path.stat().st_mode) == 0o640
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(store.failure_path.stat().st_mode) == 0o666 & ~umask  # new: rw for whom the umask allows, never x
    assert not list(tmp_path.glob(".*.tmp"))
    assert set(json.loads(store.success_path.read_text())) == {"Earlier::TP1_auto", "B::TP1_auto"}


@pytest.mark.parametrize("layout, expected", [
    ("file", "is a file, not a directory"),
    ("file-parent", "is a file, not a directory"),
    ("results-file-is-dir", "not a regular file"),
    ("unwritable", "not writable"),
])
def test_results_directory_problems_are_usage_errors_before_anything_runs(pytester, layout, expected):
    pytester.makepyfile(test_nightly="def test_benchmark(moe_config):\n    raise AssertionError('must not run')\n")
    (pytester.path / "m.yaml").write_text(GOOD)
    results = pytester.path / "results"
    if layout == "file":
        results.write_text("")
    elif layout == "file-parent":
        (pytester.path / "blocker").write_text("")
        results = pytester.path / "blocker" / "results"
    elif layout == "results-file-is-dir":
        (results / "success_results.json").mkdir(parents=True)
    else:
        results = Path("/proc/pytest-moe-results")  # not writable even for root
    result = pytester.runpytest_inprocess("--moe-matrix", str(pytester.path / "m.yaml"), "--moe-results-dir", str(results))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    line = _one_sentence(result.stderr.str() + result.stdout.str())
    assert "--moe-results-dir" in line and expected in line
    assert "must not run" not in result.stdout.str()


def test_corrupt_results_are_a_warning_in_the_terminal_and_step_summary(pytester, monkeypatch):
    pytester.makepyfile(test_nightly=TEST_FILE)
    (pytester.path / "m.yaml").write_text(GOOD)
    results = pytester.path / "results"
    results.mkdir()
    (results / "failure_results.json").write_text("[]")
    (results / "success_results.json").write_text(json.dumps(EARLIER))
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(pytester.path / "summary.md"))
    result = pytester.runpytest_inprocess("--moe-matrix", str(pytester.path / "m.yaml"), "--moe-results-dir", str(results))
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*warning: *failure_results.json holds a JSON list*kept as*failure_results.corrupt-*"])
    assert "failure_results.json holds a JSON list" in (pytester.path / "summary.md").read_text()
    assert json.loads((results / "success_results.json").read_text()) == EARLIER


# -- secrets ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, secret", [
    ("--api_key sk-live-abcdef", "sk-live-abcdef"),
    ("--api-key=sk-live-abcdef", "sk-live-abcdef"),
    ("Authorization: Bearer eyJhbGciOi.J9.xyz", "eyJhbGciOi.J9.xyz"),
    # an Authorization header without "Bearer" (Basic credentials, a raw token), in any case
    ("authorization: Basic dXNlcjpwYXNzd29yZA==", "dXNlcjpwYXNzd29yZA=="),
    ("headers={'Authorization': 'tok-4f3e2d1c'}", "tok-4f3e2d1c"),
    ("proxy sent BEARER sk-proj-abcd1234 upstream", "sk-proj-abcd1234"),  # a bearer token outside a header
    ("DB_SECRET_KEY=s3cr3t-value", "s3cr3t-value"),
    ("SMTP_PASSWORD=hunter22 ", "hunter22"),
    ("REDIS_PASS=hunter22", "hunter22"),
    ("https://bot:pa/ss@w0rd@git.example.invalid/repo.git", "pa/ss@w0rd"),
])
def test_redaction_covers_flags_bearer_names_and_url_passwords(text, secret):
    assert secret not in redact(text)


def test_values_we_passed_to_the_server_are_masked_wherever_they_appear():
    argv = ["vllm", "serve", "/m", "--api-key", "k-9f8e7d6c5b"]
    register_secrets(secret_values_of(argv, {"MY_SERVICE_TOKEN": "tok-1a2b3c4d"}))
    engine_line = "INFO args: Namespace(api_key='k-9f8e7d6c5b', model='/m') token tok-1a2b3c4d"
    assert "k-9f8e7d6c5b" not in redact(engine_line) and "tok-1a2b3c4d" not in redact(engine_line)
    assert "model='/m'" in redact(engine_line)


# -- log file names ---------------------------------------------------------------------------------
def test_ids_differing_only_in_slash_space_or_colons_get_distinct_log_names():
    ids = ["org/m::TP1_auto", "org m::TP1_auto", "org::m::TP1_auto", "org_m::TP1_auto"]
    assert len({file_stem(i) for i in ids}) == len(ids)
    assert file_stem("Qwen3-235B::TP8_EP2_auto") == "Qwen3-235B_TP8_EP2_auto"  # plain ids keep the seed's name


def test_matrix_with_models_differing_only_in_slash_or_space_loads_with_distinct_logs(tmp_path):
    (tmp_path / "m.yaml").write_text("models:\n  org/m: {path: a, tp: [1]}\n  org m: {path: b, tp: [1]}\n  org_m: {path: c, tp: [1]}\n")
    configs = load_matrix(tmp_path / "m.yaml").configs
    assert len({file_stem(c.id) for c in configs}) == 3
    with pytest.raises(MatrixError, match="'::'"):
        (tmp_path / "n.yaml").write_text("models:\n  'a::b': {path: a, tp: [1]}\n")
        load_matrix(tmp_path / "n.yaml")


def test_secrets_never_reach_terminal_junit_or_results(pytester):
    """A failure whose text carries a flag value, a bearer token and a URL password, end to end through the plugin."""
    secrets = ("sk-flag-7f6e5d4c", "tok.bearer.9a8b7c", "p@ss/w0rd")
    pytester.makepyfile(test_nightly=(
        "def test_benchmark(moe_config, moe_check, moe_cell):\n"
        "    raise RuntimeError('server said: --api_key sk-flag-7f6e5d4c; Authorization: Bearer tok.bearer.9a8b7c; '\n"
        "                       'fetching https://bot:p@ss/w0rd@hub.example.invalid/m')\n"))
    (pytester.path / "m.yaml").write_text("defaults: {engine: vllm-cpu}\n" + GOOD)  # no GPU needed: the test runs
    results = pytester.path / "results"
    result = pytester.runpytest_inprocess("--moe-matrix", str(pytester.path / "m.yaml"), "--moe-results-dir", str(results),
                                          "--junitxml", str(pytester.path / "junit.xml"), "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    written = {
        "terminal": result.stdout.str() + result.stderr.str(),
        "junit": (pytester.path / "junit.xml").read_text(),
        "results": (results / "failure_results.json").read_text(),
    }
    assert "RuntimeError" in written["junit"] and "M::TP1_auto" in written["results"]
    for where, text in written.items():
        for secret in secrets:
            assert secret not in text, f"{secret} leaked into the {where}"


def test_progress_lines_mask_what_we_passed_to_the_server(tmp_path):
    from pytest_moe.server import Server

    engine = fake_engine("--ready-after", "1.5", "--say", "engine config: key=svc-11aa22bb")
    cfg = fake_config(env=(("SERVICE_API_KEY", "svc-11aa22bb"),))
    lines: list[str] = []
    server = Server(engine, cfg, model_path="/m", served_name="ours", log_path=tmp_path / "s.log", timeout_s=30,
                    grace_s=2, progress=lines.append, progress_interval_s=0.2)
    with server:
        pass
    assert any("last log line: engine config: key=***" in line for line in lines), lines
    assert "svc-11aa22bb" not in (tmp_path / "s.log").read_text()


def _schema_classes() -> list[type]:
    """Every pydantic model the package defines (the schemas our YAML, JSON and CLI data go through)."""
    import importlib
    import pkgutil

    from pydantic import BaseModel

    import pytest_moe

    found = []
    for info in pkgutil.walk_packages(pytest_moe.__path__, "pytest_moe."):
        if info.name.endswith(("__main__", "vllm_headless")):
            continue
        module = importlib.import_module(info.name)
        found += [obj for obj in vars(module).values()
                  if isinstance(obj, type) and issubclass(obj, BaseModel) and obj.__module__ == info.name]
    return found


def test_every_schema_is_strict_and_rejects_infinity():
    """One strictness for every schema: a model declared on a bare BaseModel would coerce "8" to 8
    and take .inf where a count is meant, and the contract (docs/contract.md) would hold only in places."""
    from pytest_moe.configs import StrictModel

    schemas = _schema_classes()
    assert len(schemas) >= 30, [s.__name__ for s in schemas]
    lax = [f"{s.__module__}.{s.__qualname__}" for s in schemas
           if not issubclass(s, StrictModel)
           or (s.model_config.get("extra"), s.model_config.get("strict"), s.model_config.get("allow_inf_nan"))
           != ("forbid", True, False)]
    assert lax == []


@pytest.mark.parametrize("argv, env, expected", [
    # "--flag value" and "--flag=value"; a value holding "=" is kept whole (base64 keys end in "=")
    (["serve", "--api-key", "sk-live-1"], {}, {"sk-live-1"}),
    (["serve", "--api-key=sk-live-2=="], {}, {"sk-live-2=="}),
    (["--hf-token=hf_abc=def"], {}, {"hf_abc=def"}),
    # the flag as the last argument has no value: nothing to mask (and no IndexError)
    (["serve", "--model", "m", "--api-key"], {}, set()),
    # a single dash or a name that is no secret: not a secret flag
    (["-api-key", "visible-1", "--model", "org/secret-model"], {}, set()),
    # the value after the flag, not the one before it
    (["before-value", "--api-key", "after-value"], {}, {"after-value"}),
    # environment secrets by name; values shorter than MIN_VALUE_LEN (4) would mask common words
    (["--api-key", "abc"], {"HF_TOKEN": "hf_1234", "MY_PASSWORD": "pwd", "PATH": "/usr/bin"}, {"hf_1234"}),
    (["--api-key", "abcd"], {}, {"abcd"}),
])
def test_secret_values_of_a_servers_arguments_and_environment(argv, env, expected):
    assert secret_values_of(argv, env) == expected


def test_dictionary_keys_are_redacted_too():
    from pytest_moe.redact import redact_value

    register_secrets({"sk-key-as-name"})
    assert redact_value({"sk-key-as-name": {"v": ["sk-key-as-name", 3]}, 7: "x"}) == {"***": {"v": ["***", 3]}, 7: "x"}


def test_a_kept_server_log_is_rewritten_redacted_byte_for_byte_otherwise(tmp_path):
    """What the nightly job uploads: the secret gone, and nothing else changed (bytes that are not UTF-8, CRLF
    line ends, the mode), with no temporary file left beside it."""
    from pytest_moe.redact import redact_file

    register_secrets({"sk-log-secret-9"})
    log = tmp_path / "logs" / "m_TP1_auto.log"
    log.parent.mkdir()
    raw = b"start --api-key sk-log-secret-9\r\nweights \xff\xfe loaded\r\nsk-log-secret-9 again\nend"
    log.write_bytes(raw)
    log.chmod(0o640)
    redact_file(log)
    assert log.read_bytes() == raw.replace(b"sk-log-secret-9", b"***")
    assert stat.S_IMODE(log.stat().st_mode) == 0o640
    assert [p.name for p in log.parent.iterdir()] == ["m_TP1_auto.log"]
    redact_file(tmp_path / "no-such.log")  # a log that was never written: nothing to do, no error
    assert not (tmp_path / "no-such.log").exists()


def test_a_log_is_redacted_through_a_temporary_file_beside_it(tmp_path, monkeypatch):
    """``os.replace`` is atomic only within one filesystem: the rewritten copy must be made in the log's own
    directory, never in the system's temporary one (often another filesystem: the rename then fails)."""
    from pytest_moe import redact as redact_mod

    register_secrets({"sk-log-secret-7"})
    log = tmp_path / "logs" / "x.log"
    log.parent.mkdir()
    log.write_text("--api-key sk-log-secret-7\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(elsewhere))
    moves: list[tuple[str, str]] = []
    real_replace = os.replace
    monkeypatch.setattr(redact_mod.os, "replace", lambda src, dst: (moves.append((str(src), str(dst))), real_replace(src, dst)))
    redact_mod.redact_file(log)
    assert [Path(src).parent for src, _ in moves] == [log.parent] and [dst for _, dst in moves] == [str(log)]
    assert log.read_text() == "--api-key ***\n"


def test_with_no_secret_known_text_without_secret_shapes_is_unchanged(monkeypatch):
    """No registered value and no secret-named variable: nothing to mask by value (an empty pattern would match
    between every two characters)."""
    from pytest_moe import redact as redact_mod

    monkeypatch.setattr(redact_mod, "_registered", set())
    for name in [k for k in os.environ if redact_mod.is_secret_name(k)]:
        monkeypatch.delenv(name)
    assert redact("loading weights took 1.2 s on tp=2") == "loading weights took 1.2 s on tp=2"


def test_registered_values_of_four_characters_are_masked_and_shorter_ones_are_not():
    register_secrets({"Zq9!", "Zq8"})
    assert redact("key Zq9! and Zq8 end") == "key *** and Zq8 end"
