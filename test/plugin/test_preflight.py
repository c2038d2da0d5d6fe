"""Preflight on the real seed model configs: the arithmetic, seed 000's matrix, and every
predictable seed 000 error caught by a named rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_moe.datafiles import load_yaml
from pytest_moe.models import inspect_model
from pytest_moe.preflight import (
    ERROR_TYPES,
    LaunchPlan,
    check,
    gpu_spec,
    moe_tp_size,
    plan_table,
    render_plan,
    rules,
    verdict,
)

CONFIGS = Path(__file__).parent / "data" / "configs"
SEED = json.loads((CONFIGS / "seed000_matrix.json").read_text())
PLAN_KEYS = ("tp", "ep", "quantization", "moe_backend", "mem_fraction")
H200x8 = gpu_spec("H200", 8)


def model(name: str):
    return inspect_model(CONFIGS / name)


def seed_plan(entry: dict) -> LaunchPlan:
    return LaunchPlan(engine=SEED["engine"], trust_remote_code=True,
                      **{k: entry[k] for k in PLAN_KEYS if k in entry})


def ids(problems) -> list[str]:
    return [p.rule_id for p in problems]


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("tp, ep, engine, expected", [
    (8, 1, "sglang", 8), (8, 2, "sglang", 4), (8, 8, "sglang", 1), (4, 1, "sglang", 4),
    (8, 1, "vllm", 8), (8, 8, "vllm", 1),
])
def test_moe_tp_size(tp, ep, engine, expected):
    assert moe_tp_size(LaunchPlan(engine=engine, tp=tp, ep=ep)) == expected


def test_qwen3_235b_fp8_tp8_needs_ep2():
    """1536 / 8 = 192, 192 % 128 = 64 -> rejected with the fix; 1536 / 4 = 384 = 3 x 128 -> ok."""
    qwen = model("qwen3-235b-a22b-instruct-2507-fp8.json")
    [problem] = check(qwen, LaunchPlan(tp=8, ep=1, quantization="fp8"), None)
    assert (problem.rule_id, problem.prevents) == ("fp8-block-alignment", "QuantBlockAlignment")
    assert "1536 / moe_tp_size 8 = 192" in problem.message and "use --ep 2" in problem.message
    assert check(qwen, LaunchPlan(tp=8, ep=2, quantization="fp8"), None) == []
    assert check(qwen, LaunchPlan(tp=4, ep=1), None) == []  # 1536 / 4 = 384


def test_alignment_on_the_other_fp8_seed_models():
    # DeepSeek-V3: 2048/8 = 256 fits even without EP; Qwen3-Coder: 2560/8 = 320 does not, 2560/4 = 640 does.
    assert check(model("deepseek-v3.json"), LaunchPlan(tp=8), None) == []
    coder = model("qwen3-coder-480b-a35b-instruct-fp8.json")
    assert ids(check(coder, LaunchPlan(tp=8), None)) == ["fp8-block-alignment"]
    assert check(coder, LaunchPlan(tp=8, ep=2), None) == []


def test_vllm_expert_parallel_removes_the_tp_split():
    qwen = model("qwen3-235b-a22b-instruct-2507-fp8.json")
    [problem] = check(qwen, LaunchPlan(engine="vllm", tp=8), None)
    assert "use --enable-expert-parallel" in problem.message
    assert check(qwen, LaunchPlan(engine="vllm", tp=8, ep=8), None) == []


def test_glm_memory_on_h200_and_h100():
    glm = model("glm-4.6.json")
    [oom] = check(glm, LaunchPlan(tp=4, trust_remote_code=True), H200x8)
    assert (oom.rule_id, oom.prevents) == ("weights-fit-memory", "OOM")
    assert "use --tp 8" in oom.message and "activations and CUDA graphs" in oom.message
    assert check(glm, LaunchPlan(tp=8, ep=2), H200x8) == []
    [h100] = check(glm, LaunchPlan(tp=8, ep=2), gpu_spec("H100", 8))
    assert "more than the 8 GPUs here" in h100.message


def test_mem_fraction_changes_the_budget():
    minimax = model("minimax-m2.json")
    assert check(minimax, LaunchPlan(tp=2, trust_remote_code=True), H200x8) == []
    plan = LaunchPlan(tp=2, trust_remote_code=True, mem_fraction=0.7)
    assert ids(check(minimax, plan, H200x8)) == ["weights-fit-memory"]


def test_backends_follow_the_gpu_and_the_quantization():
    deepseek = model("deepseek-v3.json")
    trtllm = LaunchPlan(tp=8, ep=2, quantization="fp8", moe_backend="flashinfer_trtllm")
    assert ids(check(deepseek, trtllm, H200x8)) == ["trtllm-needs-blackwell"]
    assert check(deepseek, trtllm, gpu_spec("B200", 8)) == []
    assert check(deepseek, trtllm, None) == []  # GPU unknown: GPU rules are skipped
    cutlass = LaunchPlan(tp=1, moe_backend="flashinfer_cutlass")
    assert check(model("qwen3-30b-a3b.json"), cutlass, H200x8) == []  # bf16 model: accepted
    assert ids(check(model("qwen3-30b-a3b.json"), LaunchPlan(tp=1, quantization="fp8",
                                                         moe_backend="flashinfer_cutlass"), H200x8)) == [
        "cutlass-needs-fp4-or-bf16"]


def test_ep_must_divide_tp_and_experts():
    qwen = model("qwen3-30b-a3b.json")
    assert ids(check(qwen, LaunchPlan(tp=8, ep=3), None)) == ["ep-must-divide"]
    assert ids(check(model("deepseek-v2-lite.json"), LaunchPlan(tp=4, ep=4), None)) == []
    [bad] = check(qwen, LaunchPlan(engine="vllm", tp=8, ep=2), None)
    assert bad.rule_id == "ep-must-divide" and "use EP in [1, 8]" in bad.message
    # Qwen2-57B-A14B has 28 attention heads: TP 4 divides them, TP 8 does not.
    assert ids(check(model("qwen2-57b-a14b.json"), LaunchPlan(tp=4), None)) == []
    [heads] = check(model("qwen2-57b-a14b.json"), LaunchPlan(tp=8), None)
    assert heads.rule_id == "tp-must-divide-heads" and "[1, 2, 4]" in heads.message


def test_trust_remote_code_and_gpu_count():
    [trust] = check(model("minimax-m2.json"), LaunchPlan(tp=8, ep=2), H200x8)
    assert (trust.rule_id, trust.prevents) == ("trust-remote-code", "TrustRemoteCode")
    assert ids(check(model("qwen3-30b-a3b.json"), LaunchPlan(tp=8), gpu_spec("H100", 4))) == ["enough-gpus"]


# --------------------------------------------------------------------------- seed 000


@pytest.mark.parametrize("entry", SEED["matrix"], ids=lambda e: f"{e['model']}-tp{e['tp']}-ep{e['ep']}")
def test_seed_000_matrix(entry):
    assert ids(check(model(entry["model"]), seed_plan(entry), gpu_spec(SEED["gpu"], SEED["gpus"]))) == entry["expect"]


@pytest.mark.parametrize("entry", SEED["seed_errors"], ids=lambda e: e["rule"] + "-" + e["model"])
def test_each_predictable_seed_error_is_caught_by_a_named_rule(entry):
    problems = check(model(entry["model"]), seed_plan(entry), H200x8)
    assert entry["rule"] in ids(problems)
    rule = next(r for r in rules() if r.id == entry["rule"])
    # The rule records the seed's own error text, so the link is checkable.
    assert " ".join(entry["error"].split()) in rule.seed_errors


# --------------------------------------------------------------------------- plan table & data


def test_plan_table_for_qwen3_235b_on_h200():
    rows = plan_table(model("qwen3-235b-a22b-instruct-2507-fp8.json"), H200x8)
    passing = {(p.tp, p.ep, p.quantization, p.backend) for p, problems in rows if not problems}
    assert (8, 2, "fp8", "auto") in passing and (4, 1, None, "triton") in passing
    assert not any(backend == "flashinfer_trtllm" for *_, backend in passing)
    assert not any(tp == 8 and ep == 1 for tp, ep, *_ in passing)
    assert all(tp >= 2 for tp, *_ in passing)  # 236 GB does not fit one H200
    text = render_plan(rows)
    assert text.startswith("| TP | EP |") and "`fp8-block-alignment` (QuantBlockAlignment)" in text
    assert text.index("passes") < text.index("fails")


def test_verdict_is_json_able():
    problems = check(model("kimi-k2-thinking.json"), LaunchPlan(tp=1, quantization="fp8"), H200x8)
    result = json.loads(json.dumps(verdict(problems)))
    assert result["ok"] is False
    assert {p["rule_id"] for p in result["problems"]} == {
        "quantization-conflict", "weights-fit-memory", "trust-remote-code"}
    assert verdict([]) == {"ok": True, "problems": []}


def test_rules_data_is_complete_and_consistent():
    loaded = rules()
    assert len({r.id for r in loaded}) == len(loaded)
    assert all(r.prevents in ERROR_TYPES and r.seed_errors and r.message for r in loaded)
    raw_ids = [r["id"] for r in load_yaml("preflight_rules.yaml")["rules"]]
    docs = (Path(__file__).parents[2] / "docs" / "preflight.md").read_text()
    assert all(f"`{rule_id}`" in docs for rule_id in raw_ids)


def test_gpu_catalog_lookup():
    assert gpu_spec("NVIDIA H200", 8).compute_capability == (9, 0)
    assert gpu_spec("h100 80gb hbm3", 1).memory_bytes == 81559 * 1024**2
    with pytest.raises(ValueError, match="known: H100"):
        gpu_spec("RTX 9090", 1)
