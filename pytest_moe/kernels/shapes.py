"""The fused-MoE shape a matrix config runs on one rank, from the model's ``config.json``.

Why from our model inspection: the shape (local experts, per-rank intermediate size, hidden size,
top-k, dtype, FP8 block) is exactly what ``benchmark_moe.py`` derives from a model, and it decides
both which tuned file the engine reads and what the kernel check times. Parallel splits follow the
engine (``preflight.moe_tp_size``): SGLang splits the intermediate size over ``tp / ep`` ranks, vLLM's
expert parallelism gives whole experts to ranks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pytest_moe.kernels.naming import KernelShape, kernel_data, naming_for, refined_block
from pytest_moe.models import ModelSpec
from pytest_moe.preflight import moe_tp_size, plan_for

if TYPE_CHECKING:
    from pytest_moe.configs import ServerConfig


def kernel_dtype(spec: ModelSpec, launch_quantization: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """The tuned file's dtype selector and block shape for this model and ``--quantization``."""
    data = kernel_data()
    quant = spec.quantization
    method = quant.method if quant is not None else launch_quantization
    if method is None:
        return data.unquantized_dtypes.get(spec.dtype), None
    bits = quant.bits if quant is not None and quant.method == method else None
    for rule in data.dtypes:
        if rule.method == method and (rule.bits is None or rule.bits == bits):
            block = quant.weight_block_size if rule.block_shape and quant is not None else None
            return rule.dtype, block
    return None, None


def shape_for(cfg: ServerConfig, spec: ModelSpec) -> KernelShape:
    """The shape one rank of ``cfg`` runs (raises ValueError when the split does not divide)."""
    moe_tp = moe_tp_size(plan_for(cfg))
    if spec.num_experts % cfg.ep:
        raise ValueError(f"{cfg.id}: EP {cfg.ep} does not divide the {spec.num_experts} experts of {spec.name}")
    if spec.moe_intermediate_size % moe_tp:
        raise ValueError(f"{cfg.id}: the MoE TP size {moe_tp} does not divide the expert intermediate size "
                         f"{spec.moe_intermediate_size} of {spec.name}")
    n = spec.moe_intermediate_size // moe_tp
    dtype, block = kernel_dtype(spec, cfg.quantization)
    _, facts = naming_for(cfg.engine)
    if block is not None and facts.refines_fp8_blocks:
        block = refined_block(block, n, spec.hidden_size, moe_tp)
    return KernelShape(
        experts=spec.num_experts // cfg.ep,
        global_experts=spec.num_experts,
        n=n,
        hidden=spec.hidden_size,
        top_k=spec.experts_per_token,
        dtype=dtype,
        block_shape=block,
        activation_dtype=spec.dtype if spec.dtype in ("bfloat16", "float16", "float32") else "bfloat16",
    )
