"""Plugin behaviour through pytester: collection, markers, -k, --moe-config, GPU skips, usage errors."""

import json
import sys

import pytest

MATRIX = """\
defaults: {engine: sglang, moe_backends: [auto]}
rules:
  - {id: tp8-ep2, when: {tp: [8]}, then: {ep: 2}}
  - {id: fp8, when: {precision: [fp8]}, then: {quantization: fp8}}
models:
  Big:
    path: org/big
    precision: fp8
    tp: [4, 8]
  Small:
    path: org/small
    tp: [1, 2]
    moe_backends: [auto, triton]
"""

TEST_FILE = """\
def test_benchmark(moe_config):
    print("RAN", moe_config.id)
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    pytester.makefile(".yaml", model_matrix=MATRIX)
    pytester.makepyfile(test_nightly=TEST_FILE)
    return pytester


def _ids(result):
    return sorted(line.split("RAN ")[1].strip() for line in result.outlines if "RAN " in line)


def test_one_test_per_config_with_seed_ids(suite):
    result = suite.runpytest("-s", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=6)
    assert set(_ids(result)) == {"Big::TP4_auto", "Big::TP8_EP2_auto", "Small::TP1_auto", "Small::TP1_triton",
                                 "Small::TP2_auto", "Small::TP2_triton"}


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("tp8", {"Big::TP8_EP2_auto"}),
        ("gpus2", {"Small::TP2_auto", "Small::TP2_triton"}),
        ("fp8 and tp4", {"Big::TP4_auto"}),
        ("native and not tp2", {"Small::TP1_auto", "Small::TP1_triton"}),
        ("sglang and tp1", {"Small::TP1_auto", "Small::TP1_triton"}),
    ],
)
def test_markers_select_under_strict_markers(suite, expr, expected):
    result = suite.runpytest("-s", "--strict-markers", "-m", expr)
    assert set(_ids(result)) == expected
    assert result.ret == 0


def test_k_selects_by_config_id(suite):
    result = suite.runpytest("-s", "-k", "Small::TP2_triton")
    assert _ids(result) == ["Small::TP2_triton"]


def test_moe_config_selects_exactly_and_unknown_id_is_a_usage_error(suite):
    result = suite.runpytest("-s", "--moe-config", "Small::TP1_auto")
    assert _ids(result) == ["Small::TP1_auto"]
    bad = suite.runpytest("--moe-config", "Small::TP3_auto")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --moe-config 'Small::TP3_auto' is not a config of *model_matrix.yaml*"])


def test_configs_needing_more_gpus_than_found_are_skipped_with_needed_vs_found(suite, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    result = suite.runpytest("-rs")
    result.assert_outcomes(passed=4, skipped=2)
    result.stdout.fnmatch_lines(["*Big::TP8_EP2_auto needs 8 GPUs, found 2 (CUDA_VISIBLE_DEVICES='0,1')*"])


def test_agreement_references_first_then_largest_configs(suite):
    result = suite.runpytest("-s", "-v")
    order = [line.split("RAN ")[1].strip() for line in result.outlines if "RAN " in line]
    # References: each model's smallest-TP auto config (Big::TP4_auto, Small::TP1_auto), in matrix order.
    assert order[:2] == ["Big::TP4_auto", "Small::TP1_auto"]
    assert order[2] == "Big::TP8_EP2_auto"


@pytest.mark.parametrize(
    "edit, message",
    [
        (("tp: [4, 8]", "tp: [4, 6]"), "ERROR: *model_matrix.yaml:9: models.Big.tp[[]1[]]: TP 6 is not a positive power of two*"),
        (("    precision: fp8", "    precison: fp8"), "ERROR: *model_matrix.yaml:8: models.Big.precison: unknown key 'precison' (allowed: *"),
        (("engine: sglang", "engine: tgi"), "ERROR: *model_matrix.yaml:1: defaults.engine: unknown engine 'tgi' (allowed: sglang, vllm, vllm-cpu)*"),
        (("moe_backends: [auto, triton]", "moe_backends: [auto, fast]"), "ERROR: *unknown MoE backend 'fast' for engine sglang*"),
    ],
    ids=["tp", "unknown-key", "engine", "backend"],
)
def test_invalid_matrix_stops_pytest_with_exit_4_and_one_sentence(suite, edit, message):
    suite.makefile(".yaml", model_matrix=MATRIX.replace(*edit))
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


def test_moe_matrix_option_names_another_file(suite):
    suite.makefile(".yaml", other=MATRIX.replace("Small:", "Tiny:"))
    result = suite.runpytest("-s", "--moe-matrix", "other.yaml", "-m", "tp1")
    assert _ids(result) == ["Tiny::TP1_auto", "Tiny::TP1_triton"]


def test_list_command_prints_every_config_with_markers_gpus_and_command(suite):
    result = suite.run(sys.executable, "-m", "pytest_moe", "list", "--moe-matrix", "model_matrix.yaml")
    lines = result.outlines
    assert len(lines) == 6
    big8 = next(line for line in lines if line.startswith("Big::TP8_EP2_auto\t"))
    assert "tp8,gpus8,fp8,sglang\tgpus=8\t" in big8
    assert "-m sglang.launch_server --model-path org/big" in big8 and "--tp-size 8 --ep-size 2 --quantization fp8" in big8


LEASE_MATRIX = """\
defaults: {engine: sglang, moe_backends: [auto]}
models:
  A: {path: org/a, tp: [1, 2]}
  B: {path: org/b, tp: [1]}
  C: {path: org/c, tp: [1, 2]}
"""

LEASE_TEST = """\
import time

def test_benchmark(moe_cell):
    env = moe_cell.lease.env()
    assert len(env["CUDA_VISIBLE_DEVICES"].split(",")) == moe_cell.cfg.tp
    assert moe_cell.gpu_indices == list(moe_cell.lease.indices)
    time.sleep(0.5)
"""


def test_xdist_workers_lease_exactly_their_gpus_and_never_share_one(pytester, monkeypatch, tmp_path):
    """Real leases under pytest-xdist on a declared 2-GPU host (no server: the test takes the lease only)."""
    from pytest_moe.gpus import lease_overlaps, read_lease_log

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("PYTEST_MOE_LEASE_DIR", str(tmp_path / "leases"))
    pytester.makefile(".yaml", model_matrix=LEASE_MATRIX)
    pytester.makepyfile(test_nightly=LEASE_TEST)
    result = pytester.runpytest_subprocess("-n", "3", "--maxschedchunk", "1", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    events = read_lease_log(tmp_path / "leases" / "leases.jsonl")
    assert lease_overlaps(events) == []
    acquired = {e["config"]: e["indices"] for e in events if e["event"] == "acquire"}
    assert set(acquired) == {"A::TP1_auto", "A::TP2_auto", "B::TP1_auto", "C::TP1_auto", "C::TP2_auto"}
    assert sorted(acquired["A::TP2_auto"]) == [0, 1] and len(acquired["B::TP1_auto"]) == 1
    assert sum(e["event"] == "release" for e in events) == 5


def test_preflight_skips_a_doomed_config_at_collection_and_records_it(pytester, monkeypatch):
    """Qwen3-235B FP8 at TP8 without EP: 1536/8 = 192 is not a multiple of the 128 block (seed 000)."""
    from pathlib import Path

    model = pytester.path / "qwen235b"
    model.mkdir()
    src = Path(__file__).parent / "data/configs/qwen3-235b-a22b-instruct-2507-fp8.json"
    (model / "config.json").write_text(src.read_text())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    pytester.makefile(".yaml", model_matrix=f"""\
defaults: {{engine: sglang, moe_backends: [auto]}}
models:
  Qwen3-235B:
    path: {model}
    quantization: fp8
    tp: [8]
    configs: [{{tp: 8, ep: 2}}]
""")
    pytester.makepyfile(test_nightly=TEST_FILE)
    result = pytester.runpytest("-s", "-rs", "--moe-results-dir", "res", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=1)
    assert _ids(result) == ["Qwen3-235B::TP8_EP2_auto"]
    result.stdout.fnmatch_lines(["*Qwen3-235B::TP8_auto predicted to fail (QuantBlockAlignment) by preflight rule fp8-block-alignment:*--ep-size 2*"])
    entry = json.loads((pytester.path / "res/failure_results.json").read_text())["Qwen3-235B::TP8_auto"]
    assert (entry["status"], entry["rule_ids"]) == ("predicted", "fp8-block-alignment")
    assert entry["repro_command"].endswith("--moe-config Qwen3-235B::TP8_auto --moe-no-preflight")
    forced = pytester.runpytest("-s", "--moe-no-preflight", "--moe-results-dir", "res2", "-p", "no:cacheprovider")
    assert set(_ids(forced)) == {"Qwen3-235B::TP8_auto", "Qwen3-235B::TP8_EP2_auto"} and forced.ret == 0


def test_each_concern_is_a_plugin_under_its_name_and_history_reads_the_loaded_matrix(pytester):
    """The names are how a user turns one concern off (``-p no:moe-history``) and how fixtures find the recorder;
    the history plugin judges with the thresholds of the matrix the collection loaded, defaults without one."""
    from pytest_moe.configs import HistorySettings
    from pytest_moe.history.plugin import HistoryPlugin
    from pytest_moe.kernels.plugin import KernelPlugin
    from pytest_moe.plugins.collection import MoECollection
    from pytest_moe.plugins.recording import MoERecorder
    from pytest_moe.plugins.summary import MoESummary
    from pytest_moe.shardplugin import ShardPlugin

    pytester.makefile(".yaml", model_matrix="history: {noise_k: 4.5}\n" + MATRIX)
    config = pytester.parseconfigure()
    kinds = {"moe-collection": MoECollection, "moe-recorder": MoERecorder, "moe-summary": MoESummary,
             "moe-kernel": KernelPlugin, "moe-history": HistoryPlugin, "moe-shard": ShardPlugin}
    assert {name: type(config.pluginmanager.get_plugin(name)) for name in kinds} == kinds
    history = config.pluginmanager.get_plugin("moe-history")
    assert history.settings == HistorySettings()  # nothing loaded yet
    assert config.pluginmanager.get_plugin("moe-collection").matrix is not None
    assert history.settings.noise_k == 4.5
    assert pytester.parseconfigure("-p", "no:moe-history").pluginmanager.get_plugin("moe-history") is None


def test_a_matrix_test_without_any_matrix_is_a_usage_error_naming_the_file_looked_for(pytester):
    pytester.makepyfile(test_nightly=TEST_FILE)
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert result.errlines == [f"ERROR: no matrix: model_matrix.yaml is not in {pytester.path} and "
                               "test_nightly.py::test_benchmark needs one; pass --moe-matrix PATH", ""]  # no traceback
    # with --moe-config too: the missing matrix is named first
    selected = pytester.runpytest("-p", "no:cacheprovider", "--moe-config", "M::TP1_auto")
    assert selected.ret == pytest.ExitCode.USAGE_ERROR and "no matrix: model_matrix.yaml" in selected.errlines[0]


def test_an_items_config_and_check_are_its_own_parameters_and_none_for_other_tests():
    """What every hook asks of an item: a matrix test's config and check come from its parameters; any other test
    (no parameters, or parameters of its own) has none, so the plugin leaves it alone."""
    from types import SimpleNamespace

    from pytest_moe.checks import CHECKS
    from pytest_moe.plugins.collection import check_of, config_of

    cfg, check = object(), CHECKS["benchmark"]
    matrix_test = SimpleNamespace(callspec=SimpleNamespace(params={"moe_config": cfg, "moe_check": check}))
    assert config_of(matrix_test) is cfg and check_of(matrix_test) is check
    for other in (SimpleNamespace(), SimpleNamespace(callspec=SimpleNamespace(params={"n": 3}))):
        assert config_of(other) is None and check_of(other) is None
