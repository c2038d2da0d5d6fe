"""Selection before boot (``selection.decide``): node shortfall, GPU shortfall per node, then preflight on the
host's GPUs, with the reasons a user reads in the skip line."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_moe.configs import BenchSpec, ServerConfig
from pytest_moe.gpus import GpuInfo
from pytest_moe.selection import decide

CONFIGS = Path(__file__).parent / "data" / "configs"
H100 = "NVIDIA H100 80GB HBM3"


def _gpus(count: int) -> list[GpuInfo]:
    return [GpuInfo(index=i, name=H100, memory_total_bytes=80 * 1024**3, compute_capability=(9, 0), uuid=f"GPU-{i}")
            for i in range(count)]


def _cfg(tp: int, nodes: int = 1, model_file: str = "deepseek-v3.json") -> ServerConfig:
    return ServerConfig(
        model="DeepSeek-V3", name=f"TP{tp}_N{nodes}_auto", model_path=str(CONFIGS / model_file), engine="sglang", tp=tp,
        ep=1, precision="native", quantization=None, moe_backend="auto", args=(), env=(), timeout_s=30,
        host="127.0.0.1", bench=BenchSpec(), known_failure=None, matrix_path="m.yaml", nodes=nodes,
    )


def test_more_nodes_than_the_executor_offers_is_the_first_reason():
    decision = decide(_cfg(16, nodes=2), _gpus(0), preflight=True, nodes_offered=1)
    assert decision.skip_reason == "DeepSeek-V3::TP16_N2_auto needs 2 nodes, the executor offers 1"
    assert decide(_cfg(16, nodes=2), _gpus(8), preflight=False, nodes_offered=2).skip_reason is None


@pytest.mark.parametrize("tp, nodes, suffix", [(8, 1, ""), (16, 2, " per node")])
def test_a_gpu_shortfall_names_the_count_and_per_node_only_for_several_nodes(tp, nodes, suffix):
    decision = decide(_cfg(tp, nodes=nodes), _gpus(4), preflight=False, nodes_offered=nodes)
    assert decision.skip_reason is not None
    assert decision.skip_reason.startswith(f"DeepSeek-V3::TP{tp}_N{nodes}_auto needs 8 GPUs, found 4 (")
    assert decision.skip_reason.endswith(")" + suffix)


def test_preflight_sees_the_hosts_gpus_times_the_nodes():
    # DeepSeek-V3's FP8 weights (about 671 GB) do not fit 8 x 80 GB with room for the KV cache, and do on
    # 2 nodes of 8: the same host GPUs, counted once per node.
    one_node = decide(_cfg(8), _gpus(8), preflight=True, nodes_offered=1)
    assert one_node.skip_reason is not None and "predicted to fail (OOM)" in one_node.skip_reason
    assert [p.prevents for p in one_node.predicted] == ["OOM"]
    assert decide(_cfg(16, nodes=2), _gpus(8), preflight=True, nodes_offered=2).skip_reason is None
    assert decide(_cfg(8), _gpus(8), preflight=False, nodes_offered=1).skip_reason is None


def test_an_unknown_moe_config_is_named_with_three_known_ids_or_the_missing_matrix(tmp_path):
    from pytest_moe.matrix import load_matrix
    from pytest_moe.selection import unknown_config_ids

    path = tmp_path / "m.yaml"
    path.write_text("defaults: {engine: sglang, moe_backends: [auto]}\nmodels:\n  B: {path: org/b, tp: [2, 1]}\n"
                    "  A: {path: org/a, tp: [1]}\n")
    matrix = load_matrix(path)
    assert unknown_config_ids(["A::TP1_auto", "B::TP2_auto"], matrix) is None
    # the first unknown id in sorted order; the known ids sorted, three of them
    assert unknown_config_ids(["Z::TP1_auto", "C::TP8_auto", "A::TP1_auto"], matrix) == (
        f"--moe-config 'C::TP8_auto' is not a config of {path} (e.g. A::TP1_auto, B::TP1_auto, B::TP2_auto)")
    assert unknown_config_ids(["A::TP1_auto"], None) == (
        "--moe-config 'A::TP1_auto': no matrix is loaded to select it from; pass --moe-matrix PATH")


def test_run_order_puts_references_first_then_the_most_gpus_and_other_tests_among_the_gpu_free():
    """Items are sorted once (stably) by this key: an agreement reference runs first, then the configs needing most
    GPUs; a test that is no matrix cell needs no GPU, so it keeps its place among the configs that need none."""
    from dataclasses import replace

    from pytest_moe.configs import AgreementSpec
    from pytest_moe.selection import run_order

    ref = replace(_cfg(2), name="TP2_N1_auto", agreement=AgreementSpec(reference="TP2_N1_auto"))
    cpu = replace(_cfg(1), engine="vllm-cpu", uses_gpus=False)
    items = [("cpu-first", cpu), ("plain", None), ("tp8", _cfg(8)), ("ref", ref), ("tp4", _cfg(4)), ("cpu-last", cpu)]
    assert cpu.gpus_needed == 0 and ref.is_reference
    ordered = [name for name, cfg in sorted(items, key=lambda item: run_order(item[1]))]
    assert ordered == ["ref", "tp8", "tp4", "cpu-first", "plain", "cpu-last"]
