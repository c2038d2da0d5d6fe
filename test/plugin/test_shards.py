"""``--moe-shard K/N``: the partition (pure, with fake configs) and the plugin (pytester: shards cover the run)."""

import json
import random
import re
from dataclasses import dataclass, field

import pytest

from pytest_moe.configs import BenchSpec
from pytest_moe.shards import Shard, ShardError, estimate_seconds, params_from_name, parse_shard, partition, select


@dataclass(frozen=True)
class FakeConfig:
    id: str
    gpus_needed: int = 1
    model: str = "m"
    model_path: str = "org/m"
    precision: str = "native"
    bench: BenchSpec = field(default_factory=BenchSpec)


def _costs(costs: dict[str, float]):
    """Configs whose estimate is given directly: cost = the number, one GPU each."""
    return [FakeConfig(cid) for cid in costs], (lambda cfg: costs[cfg.id])


@pytest.mark.parametrize("text, expected", [("1/1", Shard(1, 1)), ("2/4", Shard(2, 4)), (" 4 / 4 ", Shard(4, 4))])
def test_parse_shard(text, expected):
    assert parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "1/0", "a/b", "1-4", "", "1/4/2"])
def test_parse_shard_rejects_with_the_option_named(text):
    with pytest.raises(ShardError, match="--moe-shard"):
        parse_shard(text)


def test_every_config_lands_in_exactly_one_shard_whatever_the_input_order():
    rng = random.Random(7)
    costs = {f"c{i}": rng.uniform(10, 5000) for i in range(57)}
    configs, estimate = _costs(costs)
    shards = partition(configs, 5, estimate=estimate)
    ids = [cfg.id for shard in shards for cfg in shard]
    assert sorted(ids) == sorted(costs)
    shuffled = configs[:]
    rng.shuffle(shuffled)
    assert [[c.id for c in s] for s in partition(shuffled, 5, estimate=estimate)] == [[c.id for c in s] for s in shards]


def test_greedy_spread_is_at_most_the_largest_single_cost():
    rng = random.Random(3)
    costs = {f"c{i}": rng.choice([30, 60, 600, 3000, 9000]) for i in range(40)}
    configs, estimate = _costs(costs)
    loads = [sum(costs[c.id] for c in shard) for shard in partition(configs, 4, estimate=estimate)]
    assert max(loads) - min(loads) <= max(costs.values())


def test_longest_first_example_worked_by_hand():
    # LPT on 2 shards: 7->A, 6->B, 5->B (6<7), 4->A (7<11), 3->A (11=11, lower index) => A={7,4,3}, B={6,5}
    configs, estimate = _costs({"a": 7, "b": 6, "c": 5, "d": 4, "e": 3})
    assert [sorted(c.id for c in s) for s in partition(configs, 2, estimate=estimate)] == [["a", "d", "e"], ["b", "c"]]


def test_measured_durations_win_over_the_estimate():
    configs, estimate = _costs({"a": 100, "b": 100, "c": 100, "d": 100})
    shards = partition(configs, 2, durations={"a": 10_000}, estimate=estimate)
    assert [c.id for c in shards[0]] == ["a"]  # the measured giant sits alone
    assert sorted(c.id for c in shards[1]) == ["b", "c", "d"]


def test_cost_is_gpu_seconds():
    small = [FakeConfig(f"s{i}", gpus_needed=1) for i in range(8)]
    big = FakeConfig("big", gpus_needed=8)
    shards = partition([big, *small], 2, estimate=lambda cfg: 100)
    assert [c.id for c in shards[0]] == ["big"]  # 800 GPU-s balances the eight 100 GPU-s configs


def test_select_keeps_the_input_order_of_its_members():
    configs, estimate = _costs({"a": 1, "b": 9, "c": 2, "d": 8})
    got = [c.id for c in select(configs, Shard(1, 2), estimate=estimate)]
    assert got == [c.id for c in configs if c.id in got]


@pytest.mark.parametrize("names, params", [(("Qwen3-235B",), 235e9), (("x", "Qwen/Qwen3-235B-A22B-Instruct"), 235e9),
                                           (("Mixtral-8x7B",), 56e9), (("DeepSeek-V3", "deepseek-ai/DeepSeek-V3"), None),
                                           (("tiny", "tiny:tiny-qwen3-moe"), None)])
def test_parameter_count_from_names(names, params):
    assert params_from_name(*names) == params


def test_estimate_grows_with_weights_and_shrinks_with_gpus():
    one = FakeConfig("a", gpus_needed=1, model="Big-400B")
    eight = FakeConfig("b", gpus_needed=8, model="Big-400B")
    small = FakeConfig("c", gpus_needed=1, model="Small-10B")
    assert estimate_seconds(one) > estimate_seconds(eight)  # eight GPUs load eight slices at once
    assert estimate_seconds(one) > estimate_seconds(small)
    fp8 = FakeConfig("d", model="Big-400B", precision="fp8")
    assert estimate_seconds(fp8) < estimate_seconds(one)  # FP8 weights: half the bytes to load


# -- the plugin ------------------------------------------------------------------------------------
MATRIX = """\
defaults: {engine: sglang, moe_backends: [auto, triton]}
models:
  Big-400B: {path: org/big-400b, precision: fp8, tp: [4, 8]}
  Mid-100B: {path: org/mid-100b, tp: [2, 4, 8]}
  Small-10B: {path: org/small-10b, tp: [1, 2], moe_backends: [auto, triton, flashinfer_cutlass]}
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


def _ran(result) -> list[str]:
    return [m[1] for line in result.outlines for m in re.finditer(r"RAN (\S+)", line)]


@pytest.mark.parametrize("count, marker", [(3, None), (4, "gpus8 or gpus4")])
def test_shards_together_run_every_selected_config_exactly_once(suite, count, marker):
    select_args = ["-m", marker] if marker else []
    everything = _ran(suite.runpytest("-s", *select_args))
    runs = [_ran(suite.runpytest("-s", *select_args, "--moe-shard", f"{k}/{count}")) for k in range(1, count + 1)]
    assert sorted(cid for run in runs for cid in run) == sorted(everything)
    assert len(everything) == len(set(everything)) > count
    assert all(runs), "every shard got work"


def test_shard_line_and_durations_file(suite):
    durations = suite.path / "durations.json"
    durations.write_text(json.dumps({"Small-10B::TP1_auto": 1e7}))
    result = suite.runpytest("-s", "--moe-shard", "1/2", "--moe-durations", str(durations))
    assert _ran(result) == ["Small-10B::TP1_auto"]  # the measured giant fills shard 1 by itself
    result.stdout.fnmatch_lines(["pytest-moe shard 1/2: 1 of 16 configs, ~2777.8 GPU-hours expected"])


@pytest.mark.parametrize("args, message", [
    (["--moe-shard", "3/2"], "ERROR: --moe-shard '3/2': K must be between 1 and N*"),
    (["--moe-durations", "missing.json"], "ERROR: --moe-durations missing.json: cannot read it*"),
])
def test_bad_shard_options_are_usage_errors(suite, args, message):
    result = suite.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_durations_of_the_wrong_shape_are_a_usage_error(suite):
    (suite.path / "d.json").write_text('{"a": "fast"}')
    result = suite.runpytest("--moe-shard", "1/2", "--moe-durations", "d.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --moe-durations d.json: must be a JSON object of config id -> seconds*"])
