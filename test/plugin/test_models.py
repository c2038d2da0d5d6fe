"""inspect_model on the real config.json of the seed models and of every family we claim to read.

The configs live in test/plugin/data/configs/ (sources in SOURCES.md there). Published totals are
the model cards' parameter counts; the estimate must land within 5% of them, which only happens
when every expert/shared/dense/layer key of the family is read correctly.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from pytest_moe.models import ModelInspectionError, inspect_model

CONFIGS = Path(__file__).parent / "data" / "configs"

# file: (family, experts, top_k, shared, moe_intermediate, layers, moe_layers, dense_layers,
#        quant method, weight block, published total params in billions)
EXPECTED = {
    "deepseek-v3.json": ("deepseek", 256, 8, 1, 2048, 61, 58, 3, "fp8", (128, 128), 671 + 14),
    "qwen3-235b-a22b-instruct-2507-fp8.json": ("qwen_moe", 128, 8, 0, 1536, 94, 94, 0, "fp8", (128, 128), 235),
    "qwen3-coder-480b-a35b-instruct-fp8.json": ("qwen_moe", 160, 8, 0, 2560, 62, 62, 0, "fp8", (128, 128), 480),
    "minimax-m2.json": ("minimax_m2", 256, 8, 0, 1536, 62, 62, 0, "fp8", (128, 128), 230),
    "kimi-k2-thinking.json": ("kimi", 384, 8, 1, 2048, 61, 60, 1, "compressed-tensors", None, 1040),
    "glm-4.6.json": ("glm4_moe", 160, 8, 1, 1536, 92, 89, 3, None, None, 357),
    "mixtral-8x7b.json": ("mixtral", 8, 2, 0, 14336, 32, 32, 0, None, None, 46.7),
    "qwen2-57b-a14b.json": ("qwen_moe", 64, 8, 1, 2560, 28, 28, 0, None, None, 57.4),
    "qwen3-30b-a3b.json": ("qwen_moe", 128, 8, 0, 768, 48, 48, 0, None, None, 30.5),
    "deepseek-v2-lite.json": ("deepseek", 64, 6, 2, 1408, 27, 26, 1, None, None, 15.7),
    "gpt-oss-20b.json": ("gpt_oss", 32, 4, 0, 2880, 24, 24, 0, "mxfp4", None, 21),
    "gpt-oss-120b.json": ("gpt_oss", 128, 4, 0, 2880, 36, 36, 0, "mxfp4", None, 117),
    "dbrx-instruct.json": ("dbrx", 16, 4, 0, 10752, 40, 40, 0, None, None, 132),
    "jamba-1.5-mini.json": ("jamba", 16, 2, 0, 14336, 32, 16, 16, None, None, 52),
    "llama-4-scout-17b-16e-instruct.json": ("llama4", 16, 1, 1, 8192, 48, 48, 0, None, None, 109),
    "hunyuan-a13b-instruct.json": ("hunyuan_moe", 64, 8, 1, 3072, 32, 32, 0, None, None, 80),
    "nemotron-3-nano-30b-a3b.json": ("nemotron_h", 128, 6, 1, 1856, 52, 23, 0, None, None, 31.6),
}


def test_every_config_file_is_covered():
    assert {p.name for p in CONFIGS.glob("*.json")} - {"seed000_matrix.json"} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_moe_shape_from_real_config(name):
    family, experts, top_k, shared, inter, layers, moe_layers, dense_layers, method, block, _ = EXPECTED[name]
    spec = inspect_model(CONFIGS / name)
    assert (spec.family, spec.num_experts, spec.experts_per_token, spec.num_shared_experts) == (
        family, experts, top_k, shared)
    assert (spec.moe_intermediate_size, spec.num_layers, spec.moe_layers, spec.dense_layers) == (
        inter, layers, moe_layers, dense_layers)
    assert (spec.quantization.method if spec.quantization else None) == method
    assert (spec.quantization.weight_block_size if spec.quantization else None) == block


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parameter_estimate_matches_published_total(name):
    published = EXPECTED[name][-1] * 1e9
    spec = inspect_model(CONFIGS / name)
    assert spec.param_count == pytest.approx(published, rel=0.05)
    assert not spec.weight_bytes_exact


def test_weight_bytes_follow_the_quantization():
    """FP8 ~1 byte/param; Kimi's int4 only on routed experts; gpt-oss's mxfp4 only on experts."""
    qwen = inspect_model(CONFIGS / "qwen3-235b-a22b-instruct-2507-fp8.json")
    assert qwen.weight_bytes / qwen.param_count == pytest.approx(1.0, abs=0.02)
    glm = inspect_model(CONFIGS / "glm-4.6.json")
    assert glm.weight_bytes == pytest.approx(714e9, rel=0.01)  # 357B in bf16, the seed's figure
    kimi = inspect_model(CONFIGS / "kimi-k2-thinking.json")
    assert kimi.quantization.bits == 4 and kimi.quantization.group_size == 32
    assert kimi.quantization.ignores_attention
    assert kimi.weight_bytes == pytest.approx(594e9, rel=0.03)  # HF lists ~594 GB of shards
    oss = inspect_model(CONFIGS / "gpt-oss-120b.json")
    assert oss.weight_bytes == pytest.approx(65e9, rel=0.05)


def test_sub_config_and_list_valued_fields():
    scout = inspect_model(CONFIGS / "llama-4-scout-17b-16e-instruct.json")
    assert (scout.hidden_size, scout.num_attention_heads, scout.num_kv_heads) == (5120, 40, 8)
    hunyuan = inspect_model(CONFIGS / "hunyuan-a13b-instruct.json")
    assert (hunyuan.moe_intermediate_size, hunyuan.experts_per_token) == (3072, 8)
    dbrx = inspect_model(CONFIGS / "dbrx-instruct.json")
    assert (dbrx.hidden_size, dbrx.num_kv_heads) == (6144, 8)


def test_hybrid_layers_are_counted_from_the_config():
    nemotron = inspect_model(CONFIGS / "nemotron-3-nano-30b-a3b.json")
    assert (nemotron.attention_layers, nemotron.mamba_layers, nemotron.moe_layers) == (6, 23, 23)
    jamba = inspect_model(CONFIGS / "jamba-1.5-mini.json")
    assert (jamba.attention_layers, jamba.mamba_layers) == (4, 28)


def test_transformers_5_spelling_of_qwen3_experts(tmp_path):
    config = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    config["num_local_experts"] = config.pop("num_experts")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert inspect_model(tmp_path).num_experts == 128


def test_trust_remote_code_follows_auto_map_and_family():
    needs = {name: inspect_model(CONFIGS / name).needs_trust_remote_code for name in EXPECTED}
    assert needs["kimi-k2-thinking.json"] and needs["minimax-m2.json"]
    assert not needs["deepseek-v3.json"]  # auto_map, but transformers ships DeepseekV3Config
    assert not needs["glm-4.6.json"] and not needs["mixtral-8x7b.json"]


def test_exact_weight_bytes_from_the_safetensors_index(tmp_path):
    (tmp_path / "config.json").write_text((CONFIGS / "glm-4.6.json").read_text())
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 713_000_000_123}, "weight_map": {}}))
    spec = inspect_model(tmp_path)
    assert (spec.weight_bytes, spec.weight_bytes_exact) == (713_000_000_123, True)


def _cache_entry(root: Path, repo: str, revisions: list[str], main: str | None) -> Path:
    entry = root / ("models--" + repo.replace("/", "--"))
    for i, rev in enumerate(revisions):
        snap = entry / "snapshots" / rev
        snap.mkdir(parents=True)
        config = json.loads((CONFIGS / "mixtral-8x7b.json").read_text())
        config["num_hidden_layers"] = 10 + i
        (snap / "config.json").write_text(json.dumps(config))
        os.utime(snap, (time.time() + i, time.time() + i))
    if main:
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text(main + "\n")
    return entry


def test_hf_cache_entry_prefers_refs_main(tmp_path):
    entry = _cache_entry(tmp_path, "mistralai/Mixtral-8x7B-v0.1", ["aaa", "bbb"], main="aaa")
    spec = inspect_model(entry)
    assert spec.num_layers == 10 and spec.name == "mistralai/Mixtral-8x7B-v0.1"


def test_hf_cache_entry_without_ref_takes_newest_snapshot(tmp_path):
    entry = _cache_entry(tmp_path, "mistralai/Mixtral-8x7B-v0.1", ["aaa", "bbb"], main=None)
    assert inspect_model(entry).num_layers == 11


@pytest.mark.parametrize("variable, suffix", [("HF_HUB_CACHE", ""), ("HF_HOME", "hub")])
def test_repo_id_is_found_only_in_the_local_cache(tmp_path, monkeypatch, variable, suffix):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    _cache_entry(tmp_path / "cache" / suffix, "org/model", ["r1"], main="r1")
    monkeypatch.setenv(variable, str(tmp_path / "cache"))
    assert inspect_model("org/model").num_experts == 8
    with pytest.raises(ModelInspectionError, match="never downloads"):
        inspect_model("org/absent")


def test_unknown_architecture_names_the_keys_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096}))
    with pytest.raises(ModelInspectionError) as error:
        inspect_model(tmp_path)
    message = str(error.value)
    assert "config.json" in message and "'llama'" in message
    assert "num_local_experts, n_routed_experts, num_experts, moe_num_experts" in message


def test_missing_field_names_the_family_keys(tmp_path):
    config = json.loads((CONFIGS / "deepseek-v3.json").read_text())
    del config["moe_intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelInspectionError, match="moe_intermediate_size"):
        inspect_model(tmp_path)


def test_missing_path_and_bad_json(tmp_path):
    with pytest.raises(ModelInspectionError, match="does not exist"):
        inspect_model(tmp_path / "nothing-here")
    with pytest.raises(ModelInspectionError, match="no config.json"):
        inspect_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelInspectionError, match="not readable JSON"):
        inspect_model(tmp_path)


def test_to_dict_is_json_able():
    data = inspect_model(CONFIGS / "deepseek-v3.json").to_dict()
    assert json.loads(json.dumps(data))["quantization"]["weight_block_size"] == [128, 128]
    assert data["name"] == "deepseek-v3"
