"""Generated hostile input against every entry point (docs/contract.md), with Hypothesis.

Each property calls the entry point the way the plugin or ``python -m pytest_moe`` does, in process
(fast enough for the README's test command), and asserts the contract: the documented exit code or
error class, exactly one ``error`` sentence naming the file or option, no traceback, and — for results —
that every entry written before is still readable afterwards.  The time bound is a generous watchdog
(``_hang_guard``: an example still running after ``HANG_S`` fails as hung), not a performance assert;
``scripts/bench_hostile.py`` prints the worst time and memory instead.

Examples per property: 60 + 40 + 60 + 80 + 60 = 300 in total, derandomized (the same examples on every
run, so a CI failure reproduces on a laptop).
"""

from __future__ import annotations

import contextlib
import io
import json
import signal
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_moe import cli
from pytest_moe.matrix import MatrixError, load_matrix
from pytest_moe.models import ModelInspectionError, inspect_model
from pytest_moe.results import ResultsStore

ROOT = Path(__file__).resolve().parents[2]
CONFIG = json.loads((ROOT / "test/plugin/data/configs/qwen3-30b-a3b.json").read_text())
HANG_S = 30
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: Values a hostile user puts where a number, a string or a list belongs.
hostile_scalar = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2, 3, 6, 8, 1024, 2048, 2**31, 2**63]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["8", "8.0", "true", "\x00", "a\nb", "tiny:nope", "::", "a/b c"]),
)
hostile_value = st.recursive(hostile_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)), max_leaves=6)


@contextlib.contextmanager
def _hang_guard():
    """Fail an example that runs past ``HANG_S`` (a hang, as a subprocess timeout would catch it)."""
    def hung(signum, frame):
        raise AssertionError(f"still running after {HANG_S} s: unbounded work")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _assert_one_sentence(message: str, names: str) -> None:
    assert "Traceback" not in message and "\n" not in message.strip(), message
    assert names in message, (names, message)


# -- matrices ---------------------------------------------------------------------------------------
BASE = {
    "defaults": {"engine": "sglang", "timeout_s": 600, "moe_backends": ["auto"], "args": ["--x"], "env": {"A": "1"},
                 "bench": {"batch_size": 1, "input_len": 16, "output_len": 8, "warmup": 0}},
    "rules": [{"id": "r", "when": {"tp": [8]}, "then": {"ep": 2}}],
    "models": {"M": {"path": "org/m", "tp": [1, 2], "configs": [{"tp": 2, "ep": 2}]}},
}
PATHS = [("defaults", "timeout_s"), ("defaults", "moe_backends"), ("defaults", "args"), ("defaults", "env"),
         ("defaults", "bench", "batch_size"), ("rules", 0, "then", "ep"), ("rules", 0, "when", "tp"),
         ("models",), ("models", "M"), ("models", "M", "path"), ("models", "M", "tp"), ("models", "M", "tp", 0),
         ("models", "M", "configs", 0, "ep"), ("models", "M", "timeout_s"), ("models", "M", "engine"),
         ("models", "M", "known_failures")]


def _put(data, path, value):
    for key in path[:-1]:
        data = data[key]
    data[path[-1]] = value


#: Raw texts YAML-level attacks are made of (the dict strategy above cannot express them).
yaml_attacks = st.one_of(
    st.integers(1, 200).map(lambda n: "models: " + "[" * n + "]" * n + "\n"),
    st.integers(1, 12).map(lambda n: "\n".join(
        ["a0: &a0 [x, x, x, x, x, x, x, x]"]
        + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 8) + "]" for i in range(1, n)]) + "\nmodels: {}\n"),
    st.sampled_from(["models: &a\n  M: *a\n", "models: *nope\n", "!!python/object:os.system {}\n", "- 1\n- 2\n",
                     "models:\n  M: {path: a, tp: [1]}\n  M: {path: b, tp: [1]}\n", "", "\t", "models:\n\tM: 1\n"]),
    st.binary(max_size=64).map(lambda b: b"models:\n  M:\n    path: " + b + b"\n    tp: [1]\n"),
)


@SETTINGS
@example(edits=[(("models", "M", "tp", 0), True)])  # the cases, always among the examples
@example(edits=[(("models", "M", "tp", 0), "8")])
@example(edits=[(("models", "M", "tp", 0), 8.0)])
@example(edits=[(("models", "M", "timeout_s"), float("inf"))])
@example(edits=[(("models",), {})])
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), st.one_of(hostile_scalar, hostile_value)), min_size=1, max_size=3))
def test_generated_matrices_load_or_give_one_sentence(edits):
    data = json.loads(json.dumps(BASE))
    for path, value in edits:
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _put(data, path, value)
    text = yaml.safe_dump(data, allow_unicode=True)
    loaded = _check_matrix(text.encode("utf-8", "surrogatepass"))
    coerced = [(path, value) for path, value in _numbers(data) if isinstance(value, (bool, str, float))]
    assert not (loaded and coerced), f"accepted {coerced} where a number belongs (silent coercion)"


NUMERIC = [("defaults", "timeout_s"), ("defaults", "bench", "batch_size"), ("rules", 0, "then", "ep"),
           ("models", "M", "timeout_s"), ("models", "M", "configs", 0, "ep"), ("models", "M", "configs", 0, "tp")]


def _numbers(data):
    """The values at places that take a whole number (timeouts: any finite number, so floats are fine there)."""
    for path in NUMERIC + [("models", "M", "tp", i) for i in range(3)]:
        node = data
        try:
            for key in path:
                node = node[key]
        except (KeyError, IndexError, TypeError):
            continue
        if path[-1] == "timeout_s" and isinstance(node, float) and node == node and abs(node) != float("inf"):
            continue
        yield path, node


@settings(SETTINGS, max_examples=40)
@given(content=yaml_attacks)
def test_generated_yaml_attacks_give_one_sentence(content):
    _check_matrix(content if isinstance(content, bytes) else content.encode())


def _check_matrix(content: bytes) -> bool:
    """True when the matrix loaded (and holds only what the contract allows), False on a clean error."""
    with tempfile.TemporaryDirectory() as tmp, _hang_guard():
        path = Path(tmp) / "m.yaml"
        path.write_bytes(content)
        try:
            matrix = load_matrix(path)
        except MatrixError as exc:
            _assert_one_sentence(str(exc), str(path))
            return False
        for cfg in matrix.configs:  # what loads is what the contract promises: strict, bounded, printable
            assert type(cfg.tp) is int and 1 <= cfg.tp <= 1024 and cfg.tp % cfg.ep == 0
            assert 0 < cfg.timeout_s < float("inf")
            assert cfg.id.isprintable()
        return True


# -- config.json ------------------------------------------------------------------------------------
FIELDS = ["num_attention_heads", "num_hidden_layers", "num_experts", "num_experts_per_tok", "hidden_size",
          "moe_intermediate_size", "num_key_value_heads", "head_dim", "vocab_size", "model_type", "architectures",
          "quantization_config", "mlp_only_layers", "decoder_sparse_step", "torch_dtype"]


@SETTINGS
@given(edits=st.dictionaries(st.sampled_from(FIELDS), hostile_value, min_size=1, max_size=4),
       wrapper=st.sampled_from(["object", "list", "deep", "bytes"]))
def test_generated_config_json_is_inspected_or_one_sentence(edits, wrapper):
    config = {**CONFIG, **edits}
    with tempfile.TemporaryDirectory() as tmp, _hang_guard():
        path = Path(tmp) / "config.json"
        if wrapper == "list":
            path.write_text(json.dumps([config]))
        elif wrapper == "deep":
            path.write_text("[" * 100_000 + "]" * 100_000)
        elif wrapper == "bytes":
            path.write_bytes(json.dumps(config).encode()[:50] + b"\xff\xfe")
        else:
            path.write_text(json.dumps(config, allow_nan=True))
        try:
            spec = inspect_model(tmp)
        except ModelInspectionError as exc:
            _assert_one_sentence(str(exc), str(path))
            return
        assert spec.num_attention_heads >= 1 and 1 <= spec.num_layers <= 10_000 and spec.num_experts >= 1


# -- CLI arguments ----------------------------------------------------------------------------------
number_text = st.one_of(st.integers(-(2**64), 2**64).map(str), st.floats().map(str),
                        st.sampled_from(["0", "-1", "1e9", "nan", "inf", "", "8.0", "true", "0x10", "1_000"]))
hostile_text = st.one_of(st.text(max_size=20).filter(lambda t: "\x00" not in t), number_text)


@st.composite
def cli_argv(draw):
    model = draw(st.sampled_from([str(ROOT / "test/plugin/data/configs/qwen3-30b-a3b.json"), "/nonexistent", "", "org/none"]))
    command = draw(st.sampled_from(["preflight", "plan", "inspect", "classify", "list", "nope"]))
    argv = [command]
    if command == "preflight":
        argv += ["--model", model, "--tp", draw(number_text)]
        for option in draw(st.lists(st.sampled_from(["--ep", "--gpus", "--mem-fraction", "--gpu", "--engine",
                                                     "--backend", "--quantization"]), max_size=3, unique=True)):
            argv += [option, draw(hostile_text)]
    elif command == "plan":
        argv += ["--model", model, "--gpu", draw(st.sampled_from(["H200", "h100", "Z9", ""])), "--gpus", draw(number_text)]
    elif command in ("inspect", "classify"):
        argv += [draw(st.one_of(st.just(model), hostile_text))]
    elif command == "list":
        argv += ["--moe-matrix", draw(st.one_of(st.just("/nonexistent.yaml"), st.just(str(ROOT / "pyproject.toml")), hostile_text))]
    return argv + draw(st.lists(hostile_text, max_size=1))


@settings(SETTINGS, max_examples=80)
@given(argv=cli_argv())
def test_generated_cli_arguments_exit_0_1_or_2_with_one_error_line(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _hang_guard():
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code
    assert code in (0, 1, 2), (argv, code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    if code == 2:
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())
    if code == 1:
        assert argv[0] == "preflight" and json.loads(out.getvalue())["ok"] is False


# -- results files ----------------------------------------------------------------------------------
entry = st.dictionaries(st.sampled_from(["model", "config", "latency_s", "status", "error_message"]),
                        st.one_of(st.text(max_size=8), st.floats(allow_nan=False), st.integers()), max_size=4)
hostile_file = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), hostile_value),
    st.sampled_from([b"[]", b"null", b"\"x\"", b"{", b"{\"a\": 1}\xff", b"[" * 5000, b"\xef\xbb\xbf{}", b""]),
)


@settings(SETTINGS, max_examples=60)
@given(earlier=st.dictionaries(st.text(min_size=1, max_size=8), entry, max_size=3), hostile=hostile_file,
       target=st.sampled_from(["success", "failure"]), outcome=st.sampled_from(["success", "failure"]))
def test_generated_results_files_never_lose_an_entry(earlier, hostile, target, outcome):
    with tempfile.TemporaryDirectory() as tmp, _hang_guard():
        store = ResultsStore(tmp)
        other = store.failure_path if target == "success" else store.success_path
        other.write_text(json.dumps(earlier))
        hit = store.success_path if target == "success" else store.failure_path
        hit.write_bytes(hostile)
        try:
            before = json.loads(hostile.decode("utf-8") or "{}")
        except (UnicodeDecodeError, ValueError, RecursionError):
            before = None
        getattr(store, f"record_{outcome}")("New::TP1_auto", {"model": "New"})
        successes, failures = store.load()
        after_other = failures if target == "success" else successes
        after_hit = successes if target == "success" else failures
        # Entries of the untouched file survive (a success removes only its own failure entry).
        assert {k: v for k, v in after_other.items() if k != "New::TP1_auto"} == earlier
        if isinstance(before, dict):  # a readable file keeps every entry it had
            assert all(k in after_hit for k in before)
            assert not store.warnings
        else:  # an unreadable one is kept byte for byte under a unique name, and said so in one sentence
            kept = list(Path(tmp).glob(f"{hit.stem}.corrupt-*.json"))
            assert [p.read_bytes() for p in kept] == [hostile]
            assert len(store.warnings) == 1 and "\n" not in store.warnings[0] and str(kept[0]) in store.warnings[0]
        assert not list(Path(tmp).glob(".*.tmp"))
