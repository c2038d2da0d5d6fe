"""Matrix loading: the seeds' configs come out, the rules apply once, bad files get one clear sentence."""

from pathlib import Path

import pytest

from pytest_moe.matrix import MAX_YAML_ALIASES, MatrixError, file_stem, load_matrix

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """\
defaults:
  engine: sglang
models:
  M:
    path: org/m
    tp: [1, 8]
"""


def _write(tmp_path, text):
    path = tmp_path / "matrix.yaml"
    path.write_text(text)
    return path


def test_seed_matrix_has_every_seed_model_and_the_seed_ids():
    matrix = load_matrix(ROOT / "model_matrix.yaml")
    by_id = matrix.by_id()
    models = {cfg.model for cfg in matrix.configs}
    assert models == {"DeepSeek-V3", "DeepSeek-V3.1", "Qwen3-235B", "Qwen3-Coder-480B", "MiniMax-M2", "Kimi-K2-Thinking", "GLM-4.6"}
    assert "Qwen3-235B::TP8_EP2_auto" in by_id and "DeepSeek-V3.1::TP4_auto" in by_id
    # Rules: TP8 gets EP2; FP8 models get --quantization fp8; native ones none; Qwen235B TP4 gets mem fraction.
    assert all(cfg.ep == (2 if cfg.tp == 8 else 1) for cfg in matrix.configs)
    assert all((cfg.quantization == "fp8") == (cfg.precision == "fp8") for cfg in matrix.configs)
    assert by_id["Kimi-K2-Thinking::TP1_auto"].quantization is None
    assert "--mem-fraction-static" in by_id["Qwen3-235B::TP4_auto"].args
    assert "--mem-fraction-static" not in by_id["Qwen3-235B::TP8_EP2_auto"].args
    assert "--mem-fraction-static" not in by_id["Qwen3-Coder-480B::TP4_auto"].args
    assert by_id["DeepSeek-V3::TP4_flashinfer_trtllm"].moe_backend == "flashinfer_trtllm"
    assert [cfg.name for cfg in matrix.configs if cfg.model == "GLM-4.6"] == ["TP8_EP2_auto", "TP8_EP2_triton"]
    assert all(cfg.timeout_s == 2000 for cfg in matrix.configs)
    assert by_id["GLM-4.6::TP8_EP2_auto"].markers == ["tp8", "gpus8", "native", "sglang"]


def test_smoke_matrix_has_two_architectures_tp1_tp2_and_the_crashing_ep_config():
    matrix = load_matrix(ROOT / "test/nightly/smoke_matrix.yaml")
    ids = set(matrix.by_id())
    assert {"tiny-qwen3-moe::TP1_auto", "tiny-qwen3-moe::TP2_auto", "tiny-mixtral::TP1_auto", "tiny-mixtral::TP2_auto"} <= ids
    crash = matrix.by_id()["tiny-qwen3-moe::TP2_EP2_auto"]
    assert crash.known_failure.error_type == "Crash"
    assert all(cfg.gpus_needed == 0 for cfg in matrix.configs)


@pytest.mark.parametrize(
    "text, expected",
    [
        (MINIMAL.replace("tp: [1, 8]", "tp: [1, 6]"), r"matrix.yaml:6: models.M.tp\[1\]: TP 6 is not a positive power of two"),
        (MINIMAL.replace("tp: [1, 8]", "tp: [0]"), r"TP 0 is not a positive power of two"),
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [1, 8]\n    colour: red"),
         r"matrix.yaml:7: models.M.colour: unknown key 'colour' \(allowed: path, engine, precision, quantization, tp,"),
        # an unknown key inside a list: the allowed keys are those of the list's elements
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [1]\n    configs: [{tp: 2, bogus: 2}]"),
         r"matrix.yaml:7: models.M.configs\[0\].bogus: unknown key 'bogus' \(allowed: tp, nodes, ep, moe_backend, args\)$"),
        (MINIMAL.replace("engine: sglang", "engine: trtllm"), r"matrix.yaml:2: defaults.engine: unknown engine 'trtllm' \(allowed: sglang, vllm, vllm-cpu\)"),
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [4]\n    configs: [{tp: 4, ep: 3}]"), r"EP 3 does not divide TP 4"),
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [2]\n    moe_backends: [warp9]"), r"matrix.yaml:7: models.M.moe_backends\[0\]: unknown MoE backend 'warp9' for engine sglang \(allowed: auto,"),
        (MINIMAL.replace("path: org/m", "path: org/m\n    path: org/n"), r"matrix.yaml:6: models.M.path: key appears twice"),
        ("models: [1, 2", r"matrix.yaml:1: not valid YAML"),
        ("defaults: {}\n", r"matrix.yaml:?\d*: models: required key is missing"),
        (MINIMAL.replace("engine: sglang", "engine: vllm").replace("    tp: [1, 8]", "    configs: [{tp: 4, ep: 2}]"),
         r"engine vllm takes expert parallelism as a switch \(EP size = TP\), so EP must be 1 or 4, not 2"),
        (MINIMAL + "    known_failures: {TP2_auto: {error_type: Crash, reason: r, issue: https://x/1, expires: 2030-01-01}}\n", r"known_failures names 'TP2_auto', which is not a config of M"),
        (MINIMAL + "    known_failures: {TP1_auto: {error_type: Melted, reason: r, issue: https://x/1, expires: 2030-01-01}}\n", r"matrix.yaml:7: models.M.known_failures.TP1_auto.error_type: unknown error_type 'Melted' \(allowed: OOM, Timeout,"),
        # the same cell twice: once from tp, once from configs; the second one's line and key are named
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [1]\n    configs:\n      - {tp: 1}"),
         r"matrix.yaml:8: models.M.configs\[0\]: config M::TP1_auto is defined twice$"),
        # a backend in the defaults is reported at the defaults' line, a backend in one config at that config
        (MINIMAL.replace("engine: sglang", "engine: sglang\n  moe_backends: [warp9]"),
         r"matrix.yaml:3: defaults.moe_backends\[0\]: unknown MoE backend 'warp9' for engine sglang"),
        (MINIMAL.replace("    tp: [1, 8]", "    configs:\n      - {tp: 2, moe_backend: warp9}"),
         r"matrix.yaml:7: models.M.configs\[0\].moe_backend: unknown MoE backend 'warp9' for engine sglang"),
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [1]\n    engine: trtllm"),
         r"matrix.yaml:7: models.M.engine: unknown engine 'trtllm' \(allowed: sglang, vllm, vllm-cpu\)$"),
        (MINIMAL.replace("    tp: [1, 8]", "    precision: native"), r"matrix.yaml:4: models.M: model 'M' lists no 'tp' sizes"),
        (MINIMAL.replace("    tp: [1, 8]", "    tp: [1]\n    agreement: {reference: TP9_auto}"),
         r"matrix.yaml:7: models.M.agreement.reference: reference 'TP9_auto' is not a config of M \(configs: TP1_auto\)$"),
        ("history:\n  relative: {speed: 0.1}\n" + MINIMAL, r"matrix.yaml:2: history.relative.speed: unknown metric 'speed'"),
        ("history:\n  models: {M: {itl_ms: 0.1}, N: {speed: 0.1}}\n" + MINIMAL,
         r"matrix.yaml:2: history.models.N.speed: unknown metric 'speed'"),
        # a rejected value is quoted whole up to 80 characters of its repr, cut to 77 and "..." past that
        (MINIMAL.replace("path: org/m", "path: org/m\n    timeout_s: '" + "x" * 78 + "'"), r"\(got '" + "x" * 78 + r"'\)$"),
        (MINIMAL.replace("path: org/m", "path: org/m\n    timeout_s: '" + "x" * 79 + "'"), r"\(got '" + "x" * 76 + r"\.\.\.\)$"),
    ],
    ids=["tp-not-power-of-two", "tp-zero", "unknown-key", "unknown-key-in-a-list", "unknown-engine", "ep-not-dividing-tp", "unknown-backend",
         "duplicate-key", "bad-yaml", "missing-models", "vllm-ep-switch", "known-failure-unknown-config",
         "known-failure-unknown-type", "cell-defined-twice", "unknown-default-backend", "unknown-config-backend",
         "unknown-model-engine", "no-cells", "unknown-reference", "unknown-relative-metric", "unknown-model-metric",
         "value-quoted-whole", "value-cut"],
)
def test_bad_matrix_gives_one_sentence_with_file_line_and_key(tmp_path, text, expected):
    with pytest.raises(MatrixError, match=expected) as info:
        load_matrix(_write(tmp_path, text))
    assert "\n" not in str(info.value)


def test_alias_limits_name_the_line_where_they_were_passed(tmp_path):
    # nine levels of nine aliases each: the expansion passes 100 000 values in the line of the sixth level
    bomb = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    bomb += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    with pytest.raises(MatrixError, match=r"matrix.yaml:6: not valid YAML \(aliases expand to more than 100000 values\)$"):
        load_matrix(_write(tmp_path, "\n".join(bomb) + "\n" + MINIMAL))
    many = "a: &a x\nb: [" + ", ".join(["*a"] * (MAX_YAML_ALIASES + 1)) + "]\n" + MINIMAL
    with pytest.raises(MatrixError, match=rf"matrix.yaml:2: not valid YAML \(more than {MAX_YAML_ALIASES} aliases \(\*name\)\)$"):
        load_matrix(_write(tmp_path, many))


@pytest.mark.parametrize("name", ["a::b", "M[1]", " "])
def test_a_model_name_that_cannot_be_an_id_is_refused(tmp_path, name):
    with pytest.raises(MatrixError, match=r"matrix.yaml:4: models\..*\[key\]: a model name must be non-empty and hold no "
                                          r"'::', '\[' or '\]' \(got '.*'\)$"):
        load_matrix(_write(tmp_path, MINIMAL.replace("  M:", f"  {name!r}:")))


def test_file_stems_keep_the_letters_at_the_ends_of_an_id():
    assert file_stem("X::TP1_X") == "X_TP1_X"
    assert file_stem("M::TP1_auto.") == "M_TP1_auto"  # only dots, underscores go from the ends


def test_missing_file_is_named(tmp_path):
    with pytest.raises(MatrixError, match=r"cannot read matrix file .*nope.yaml"):
        load_matrix(tmp_path / "nope.yaml")


def test_explicit_configs_override_rules_and_model_fields_win_over_defaults(tmp_path):
    text = """\
defaults: {engine: sglang, timeout_s: 100, args: [--a]}
rules:
  - {id: r, when: {tp: [8]}, then: {ep: 2, args: [--r], timeout_s: 50}}
models:
  M:
    path: org/m
    tp: [8]
    timeout_s: 10
    configs: [{tp: 8, ep: 4, moe_backend: triton, args: [--x]}]
"""
    cfgs = load_matrix(_write(tmp_path, text)).by_id()
    assert cfgs["M::TP8_EP2_auto"].args == ("--a", "--r")
    assert cfgs["M::TP8_EP2_auto"].timeout_s == 10
    assert cfgs["M::TP8_EP4_triton"].args == ("--a", "--r", "--x")


def test_a_models_bench_accuracy_and_agreement_override_the_defaults_key_by_key(tmp_path):
    text = """\
defaults:
  engine: sglang
  bench: {input_len: 16, output_len: 8, warmup: 0}
  accuracy: {n: 20, shots: 2}
  agreement: {threshold: 0.9}
models:
  Own:
    path: org/own
    tp: [1]
    bench: {batch_sizes: [1, 4]}
    accuracy: {floor: 0.8}
    agreement: {max_tokens: 16}
  Plain:
    path: org/plain
    tp: [1]
"""
    cfgs = load_matrix(_write(tmp_path, text)).by_id()
    own, plain = cfgs["Own::TP1_auto"], cfgs["Plain::TP1_auto"]
    assert (own.bench.batch_sizes, own.bench.input_len, own.bench.output_len, own.bench.warmup) == ([1, 4], 16, 8, 0)
    assert (own.accuracy.floor, own.accuracy.n, own.accuracy.shots) == (0.8, 20, 2)
    assert (own.agreement.max_tokens, own.agreement.threshold) == (16, 0.9)
    # a model with no block of its own has the defaults' blocks, and the seed's values where they say nothing
    assert (plain.bench.batch_sizes, plain.bench.input_len, plain.bench.batch_size) == (None, 16, 1)
    assert (plain.accuracy.floor, plain.accuracy.n, plain.agreement.max_tokens) == (None, 20, 32)


def _read(tmp_path, text: str):
    from pytest_moe.matrix import read_yaml

    path = tmp_path / "limits.yaml"
    path.write_text(text)
    return read_yaml(path, MatrixError)[1]


def test_the_yaml_limits_hold_exactly_at_their_bounds(tmp_path):
    """Each limit is reached and passed by one: 100 000 values with aliases expanded, 32 levels, 100 aliases."""
    l1 = "&l1 [" + ", ".join(["x"] * 199) + "]"                   # 1 + 199 = 200 values
    l2 = "&l2 [" + ", ".join([l1] + ["*l1"] * 48) + "]"           # 1 + 200 + 48 x 200 = 9801
    def doc(scalars: int) -> str:                                 # 1 + 9801 + 9 x 9801 + scalars
        return "[" + ", ".join([l2] + ["*l2"] * 9 + ["x"] * scalars) + "]\n"
    assert len(_read(tmp_path, doc(1989))) == 1 + 9 + 1989      # 100 000 values: loads
    with pytest.raises(MatrixError, match=r"limits.yaml:1: not valid YAML \(aliases expand to more than 100000 values\)$"):
        _read(tmp_path, doc(1990))
    # 31 lists around a scalar: 32 levels
    nested = "x"
    for _ in range(31):
        nested = [nested]
    assert _read(tmp_path, "[" * 31 + "x" + "]" * 31 + "\n") == nested
    with pytest.raises(MatrixError, match=r"limits.yaml:1: not valid YAML \(nested deeper than 32 levels\)$"):
        _read(tmp_path, "[" * 32 + "x" + "]" * 32 + "\n")
    assert len(_read(tmp_path, "a: &a x\nb: [" + ", ".join(["*a"] * MAX_YAML_ALIASES) + "]\n")["b"]) == MAX_YAML_ALIASES


def test_aliases_that_nest_deeper_than_the_limit_once_expanded_are_refused(tmp_path):
    # a: 20 lists around a scalar (21 levels); b's 12 lists around *a hold 12 + 21 = 33 levels, never composed as such;
    # with 10 lists, b holds 31 and the document's mapping 32
    text = "a: &a " + "[" * 20 + "x" + "]" * 20 + "\nb: " + "[" * 12 + "*a" + "]" * 12 + "\n"
    with pytest.raises(MatrixError, match=r"limits.yaml:2: not valid YAML \(aliases nest deeper than 32 levels\)$"):
        _read(tmp_path, text)
    assert _read(tmp_path, text.replace("[" * 12 + "*a" + "]" * 12, "[" * 10 + "*a" + "]" * 10))  # 32 levels: loads
    with pytest.raises(MatrixError, match=r"limits.yaml:1: not valid YAML \(aliases nest deeper than 32 levels\)$"):
        _read(tmp_path, text.replace("[" * 12 + "*a" + "]" * 12, "[" * 11 + "*a" + "]" * 11))  # 33 with the mapping


def test_a_control_character_is_reported_on_its_own_line(tmp_path):
    with pytest.raises(MatrixError, match=r"limits.yaml:3: not valid YAML \(character 0x0001 is not allowed\)$"):
        _read(tmp_path, "defaults:\n  engine: sglang\nmodels: \x01\n")
