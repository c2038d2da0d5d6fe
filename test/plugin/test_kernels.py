"""Kernel shapes, tuned-config naming and coverage, and the kernel check on the real vLLM CPU op."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_moe.kernels.check import KernelResult, KernelRow, KernelSettings, run_kernel_check
from pytest_moe.kernels.naming import (
    Coverage,
    KernelShape,
    engine_naming_function,
    naming_for,
    rule_file_name,
    shipped_dir,
)
from pytest_moe.kernels.shapes import shape_for
from pytest_moe.matrix import MatrixError, load_matrix
from pytest_moe.models import inspect_model

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "test" / "plugin" / "data" / "configs"
FILE_NAME = re.compile(
    r"^E=(?P<e>\d+),N=(?P<n>\d+),device_name=(?P<device>.+?)(?:,dtype=(?P<dtype>\w+))?"
    r"(?:,block_shape=\[(?P<bn>\d+), ?(?P<bk>\d+)\])?\.json$"
)


def _shipped(engine):
    folder = shipped_dir(engine)
    if folder is None:
        pytest.skip(f"{naming_for(engine)[1].package} is not installed")
    return sorted({p.name for p in folder.rglob("E=*.json")})


def _parsed(name):
    m = FILE_NAME.match(name)
    block = (int(m["bn"]), int(m["bk"])) if m["bn"] else None
    return KernelShape(int(m["e"]), int(m["e"]), int(m["n"]), 1, 1, m["dtype"], block, "bfloat16"), m["device"]


def test_vllm_own_naming_and_the_recorded_rule_both_give_every_shipped_file_name():
    names = _shipped("vllm")
    assert len(names) > 300  # the wheel ships 338; a wrong folder would find none
    engine = engine_naming_function("vllm")
    assert engine is not None, "vLLM's get_config_file_name did not import"
    for name in names:
        shape, device = _parsed(name)
        assert engine(shape, device) == name
        assert rule_file_name("vllm", shape, device) == name


def test_vllm_names_every_h200_family_device_as_nvidia_h200():
    shape = KernelShape(8, 8, 7168, 4096, 2, None, None, "bfloat16")
    expected = "E=8,N=7168,device_name=NVIDIA_H200.json"
    assert engine_naming_function("vllm")(shape, "NVIDIA_H200_NVL") == expected
    assert rule_file_name("vllm", shape, "NVIDIA_H200_NVL") == expected


def test_the_sglang_rule_gives_every_shipped_sglang_file_name():
    # SGLang's own function does not import here (it needs torchvision); its rule keeps the space
    # in "block_shape=[128, 128]" and has no H200 family rename.
    names = [n for n in _shipped("sglang") if not n.endswith("_down.json") and "per_channel" not in n]
    assert len(names) > 100
    for name in names:
        shape, device = _parsed(name)
        assert rule_file_name("sglang", shape, device) == name


def _cfg(tmp_path, model_config, engine, tp, ep=None, extra=""):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(model_config))
    ep_line = f", configs: [{{tp: {tp}, ep: {ep}}}]" if ep else f", tp: [{tp}]"
    (tmp_path / "m.yaml").write_text(
        f"defaults: {{engine: {engine}, moe_backends: [auto]{extra}}}\n"
        f"models:\n  M: {{path: {model}{ep_line}}}\n"
    )
    matrix = load_matrix(tmp_path / "m.yaml")
    return matrix.configs[0], inspect_model(model)


def test_shape_under_sglang_ep_splits_experts_and_the_intermediate_size_over_tp_over_ep(tmp_path):
    raw = json.loads((CONFIGS / "deepseek-v3.json").read_text())
    cfg, spec = _cfg(tmp_path, raw, "sglang", 8, ep=2)
    shape = shape_for(cfg, spec)
    assert (shape.experts, shape.global_experts) == (raw["n_routed_experts"] // 2, raw["n_routed_experts"])
    assert shape.n == raw["moe_intermediate_size"] // (8 // 2)
    assert (shape.hidden, shape.top_k) == (raw["hidden_size"], raw["num_experts_per_tok"])
    assert shape.dtype == "fp8_w8a8"
    assert shape.block_shape == tuple(raw["quantization_config"]["weight_block_size"])


def test_vllm_refines_an_fp8_block_that_does_not_divide_the_tp_shard(tmp_path):
    raw = json.loads((CONFIGS / "qwen3-235b-a22b-instruct-2507-fp8.json").read_text())
    cfg, spec = _cfg(tmp_path, raw, "vllm", 8)
    shape = shape_for(cfg, spec)
    n = raw["moe_intermediate_size"] // 8
    assert n % 128 and shape.n == n  # 192: the [128, 128] checkpoint block does not divide it
    assert shape.block_shape == (64, 64)  # gcd(128, 128, 192, 4096), as refine_fp8_moe_block_shape computes


TINY_QWEN3 = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 128,
              "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
              "num_experts_per_tok": 2, "vocab_size": 512, "torch_dtype": "bfloat16"}


def _kernels_cli(matrix, gpu):
    return subprocess.run([sys.executable, "-m", "pytest_moe", "kernels", "--moe-matrix", str(matrix), "--gpu", gpu],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTEST_MOE_KERNEL_NAMING": "rule"})


def test_a_tuned_file_in_a_folder_named_by_the_matrix_is_reported_covered(tmp_path):
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    # E=8 experts, N = moe_intermediate_size / TP 2 = 32, vLLM's name for an H200 and bf16.
    (tuned / "E=8,N=32,device_name=NVIDIA_H200.json").write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    _cfg(tmp_path, TINY_QWEN3, "vllm", 2, extra=", kernel: {tuned_config_dirs: [tuned]}")
    out = _kernels_cli(tmp_path / "m.yaml", "H200")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("| M::TP2_auto"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[8:10] == ["E=8,N=32,device_name=NVIDIA_H200.json", "yes"]
    assert cells[10] == str(tuned / "E=8,N=32,device_name=NVIDIA_H200.json")
    assert "0 of 1 checked configs have no tuned config on H200" in out.stdout

    out = _kernels_cli(tmp_path / "m.yaml", "H100")
    row = next(line for line in out.stdout.splitlines() if line.startswith("| M::TP2_auto"))
    assert "| E=8,N=32,device_name=NVIDIA_H100_80GB_HBM3.json | NO |" in row
    assert "1 of 1 checked configs have no tuned config on H100: M::TP2_auto" in out.stdout


def test_nvml_gpu_names_map_to_the_engines_device_names():
    from pytest_moe.kernels.naming import kernel_device_name

    assert kernel_device_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3"  # NVML's name on the lent H100s
    assert kernel_device_name("H200") == kernel_device_name("NVIDIA H200") == "NVIDIA_H200"


def test_kernels_cli_rejects_an_unknown_gpu_as_a_usage_error(tmp_path):
    _cfg(tmp_path, TINY_QWEN3, "vllm", 1)
    out = _kernels_cli(tmp_path / "m.yaml", "H900")
    assert out.returncode == 2
    assert "unknown GPU 'H900'" in out.stderr and "Traceback" not in out.stderr


def test_matrix_rejects_a_zero_kernel_batch_size(tmp_path):
    (tmp_path / "m.yaml").write_text("defaults: {kernel: {batch_sizes: [1, 0]}}\nmodels:\n  M: {path: x, tp: [1]}\n")
    with pytest.raises(MatrixError, match=r"defaults\.kernel\.batch_sizes"):
        load_matrix(tmp_path / "m.yaml")


def test_an_untuned_gpu_shape_carries_a_warning_in_its_record():
    shape = KernelShape(8, 8, 32, 128, 2, None, None, "bfloat16")
    missing = Coverage("E=8,N=32,device_name=NVIDIA_H200.json", "engine", None, ("/shipped",))
    record = KernelResult("M::TP2_auto", shape, "H200", "op", (KernelRow(1, 3.0),), missing).record()
    assert record["tuned_config"] is None
    assert "E=8,N=32,device_name=NVIDIA_H200.json" in record["warning"] and "/shipped" in record["warning"]
    found = Coverage(missing.file_name, "engine", "/t/" + missing.file_name, ("/t",))
    record = KernelResult("M::TP2_auto", shape, "H200", "op", (KernelRow(1, 3.0),), found).record()
    assert record["tuned_config"] == "/t/" + missing.file_name and "warning" not in record


def test_nightly_kernel_check_runs_vllm_cpu_moe_op_and_records_it(pytester, tmp_path):
    """The real vLLM CPU op through the nightly test: two batch sizes, three repeats (a few seconds of op time)."""
    (tmp_path / "m.yaml").write_text(
        "defaults: {engine: vllm-cpu, moe_backends: [auto], kernel: {batch_sizes: [1, 16], warmup: 1, repeats: 3}}\n"
        "models:\n  tiny-mixtral: {path: 'tiny:tiny-mixtral', tp: [1]}\n"
    )
    results = tmp_path / "results"
    out = pytester.runpytest_subprocess(
        str(ROOT / "test" / "nightly" / "test_moe_kernels.py"), "-m", "kernel", "--moe-matrix", str(tmp_path / "m.yaml"),
        "--moe-results-dir", str(results), "-p", "no:cacheprovider", timeout=600,
    )
    out.assert_outcomes(passed=1)
    out.stdout.fnmatch_lines(["*pytest-moe kernels*", "*Kernel check: µs per call by batch size*",
                              "| config | device | tuned config | 1 | 16 |", "| tiny-mixtral::TP1_auto | cpu | - | * | * |"])
    entry = json.loads((results / "success_results.json").read_text())["tiny-mixtral::TP1_auto"]
    block = entry["checks"]["kernel"]
    assert block["status"] == "passed" and "cpu_fused_moe" in block["op"]
    assert [row["batch_size"] for row in block["rows"]] == [1, 16]
    assert all(row["us_per_call"] > 0 for row in block["rows"])
    assert block["tuned_config"] is None  # CPU: Triton tuned configs do not apply
    # tiny-mixtral: 8 experts, top-2, hidden 128, intermediate 64 (pytest_moe/data/tiny_models.yaml)
    assert (block["shape"]["experts"], block["shape"]["top_k"], block["shape"]["hidden"], block["shape"]["n"]) == (8, 2, 128, 64)


def test_a_quantized_shape_on_cpu_is_unsupported_not_faked(tmp_path):
    raw = {**TINY_QWEN3, "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}}
    cfg, _ = _cfg(tmp_path, raw, "vllm-cpu", 1, extra=", kernel: {batch_sizes: [1], warmup: 0, repeats: 1}")
    from pytest_moe.kernels.check import KernelUnsupported

    with pytest.raises(KernelUnsupported, match="no fp8_w8a8 MoE op to time on cpu"):
        run_kernel_check(cfg, KernelSettings.from_spec(load_matrix(cfg.matrix_path).kernel, cfg.matrix_path))


def test_a_check_goes_into_the_configs_existing_entry_or_starts_one_in_the_file_of_its_status(tmp_path):
    from pytest_moe.results import ResultsStore

    store = ResultsStore(tmp_path)
    store.record_success("A::TP1_auto", {"model": "A", "config": "TP1_auto", "latency_s": 1.5})
    store.record_check("A::TP1_auto", "kernel", {"status": "passed", "rows": []}, {"status": "success"})
    store.record_check("B::TP1_auto", "kernel", {"status": "failed", "rows": []},
                       {"model": "B", "config": "TP1_auto", "status": "failed", "error_type": "Crash"})
    successes, failures = store.load()
    assert successes["A::TP1_auto"]["latency_s"] == 1.5  # the serving fields stay as they were
    assert successes["A::TP1_auto"]["checks"]["kernel"]["status"] == "passed"
    assert "B::TP1_auto" not in successes
    assert (failures["B::TP1_auto"]["error_type"], failures["B::TP1_auto"]["checks"]["kernel"]["status"]) == ("Crash", "failed")
