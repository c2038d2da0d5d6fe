"""Child process of the kernel check: time the engine's own MoE op for one shape, print JSON.

Why a child process: importing vLLM takes seconds and sets process-wide threading state, the
GPU it should use is given by ``CUDA_VISIBLE_DEVICES`` from a lease, and a kernel that crashes or
hangs must take down only the child (the parent kills it at its timeout). Read a JSON request on
stdin (see :func:`pytest_moe.kernels.check.run_kernel_check`) and write one JSON object to the file it
names (stdout belongs to the engine's logger).

What is timed, per call, as ``benchmark_moe.py`` times it: routing (the engine's top-k) plus the
fused experts (gate-up GEMM, activation, down GEMM, weighted sum). On CPU that is vLLM's
``cpu_fused_moe`` op on weights pre-packed the way ``CPUUnquantizedExperts`` packs them, on the ISA
class vLLM itself would pick; on CUDA it is vLLM's Triton ``fused_experts``.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from typing import Any

#: Exit status for a shape the op cannot run here (e.g. a quantized dtype on CPU).
UNSUPPORTED_EXIT = 3
#: The tuned-file dtypes (None: bf16/fp16) whose weights this worker builds, per device.
DTYPES = {"cpu": (None,), "cuda": (None, "fp8_w8a8")}


class Unsupported(Exception):
    """The engine's op has no path for this shape on this device."""


def _cpu_runner(shape: dict[str, Any]):
    import torch
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts

    if shape["dtype"] not in DTYPES["cpu"]:
        raise Unsupported(f"the vLLM CPU MoE op in this check runs unquantized weights only, not {shape['dtype']}")
    # Most specific first: the order in which vLLM's oracle would accept them on this CPU.
    classes = [cpu_moe.X86CPUUnquantizedExperts, cpu_moe.ArmCPUUnquantizedExperts,
               cpu_moe.PowerCPUUnquantizedExperts, cpu_moe.CPUUnquantizedExperts]
    cls = next(c for c in classes if c._supports_current_device())
    align = math.lcm(cls.output_alignment, cls.reduction_alignment)
    experts, hidden, top_k = shape["experts"], shape["hidden"], shape["top_k"]
    n = -(-shape["n"] // align) * align  # vLLM zero-pads the intermediate size the same way
    if hidden % align:
        raise Unsupported(f"vLLM's CPU MoE op ({cls.__name__}) needs the hidden size divisible by {align}, got {hidden}")
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    w13 = cpu_prepack_moe_weight((torch.randn(experts, 2 * n, hidden, generator=gen) / hidden**0.5).to(dtype), cls.isa)
    w2 = cpu_prepack_moe_weight((torch.randn(experts, hidden, n, generator=gen) / n**0.5).to(dtype), cls.isa)

    def make(m: int):
        x = torch.randn(m, hidden, generator=gen).to(dtype)
        logits = torch.randn(m, experts, generator=gen)
        out = torch.empty_like(x)

        def call() -> None:
            weights, ids = select_experts(x, logits, top_k, False, True)
            cpu_fused_moe(out, x, w13, w2, None, None, weights, ids, "silu", cls.isa, False)

        return call

    def timed(call, repeats: int) -> float:
        # The median call: a CPU shared with other work stalls an OpenMP op for whole scheduler
        # slices now and then, and one such stall would dominate a mean of microsecond calls.
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return make, timed, f"vllm._custom_ops.cpu_fused_moe ({cls.__name__}, isa={cls.isa}), median of calls"


def _cuda_runner(shape: dict[str, Any]):
    import torch
    from vllm.model_executor.layers.fused_moe import fused_experts, fused_topk
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config

    experts, hidden, n, top_k = shape["experts"], shape["hidden"], shape["n"], shape["top_k"]
    dtype = getattr(torch, shape["activation_dtype"])
    device = torch.device("cuda")
    w13 = torch.randn(experts, 2 * n, hidden, device=device, dtype=dtype) / hidden**0.5
    w2 = torch.randn(experts, hidden, n, device=device, dtype=dtype) / n**0.5
    quant_config = None
    if shape["dtype"] == "fp8_w8a8":
        block = shape["block_shape"]
        fp8 = torch.float8_e4m3fn
        if block:
            bn, bk = block
            s13 = torch.ones(experts, -(-2 * n // bn), -(-hidden // bk), device=device, dtype=torch.float32)
            s2 = torch.ones(experts, -(-hidden // bn), -(-n // bk), device=device, dtype=torch.float32)
        else:
            s13 = torch.ones(experts, device=device, dtype=torch.float32)
            s2 = torch.ones(experts, device=device, dtype=torch.float32)
        w13, w2 = w13.to(fp8), w2.to(fp8)
        quant_config = fp8_w8a8_moe_quant_config(w1_scale=s13, w2_scale=s2, block_shape=list(block) if block else None)
    elif shape["dtype"] not in DTYPES["cuda"]:
        raise Unsupported(f"the kernel check builds unquantized and fp8_w8a8 weights only, not {shape['dtype']}")

    def make(m: int):
        x = torch.randn(m, hidden, device=device, dtype=dtype)
        logits = torch.randn(m, experts, device=device, dtype=torch.float32)

        def call() -> None:
            weights, ids, _ = fused_topk(x, logits, top_k, renormalize=True)
            fused_experts(x, w13, w2, weights, ids, quant_config=quant_config)

        return call

    def timed(call, repeats: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / repeats

    return make, timed, "vllm fused_moe.fused_experts (Triton), mean of calls (CUDA events)"


def run(request: dict[str, Any]) -> dict[str, Any]:
    shape = request["shape"]
    runner = _cuda_runner if request["device"] == "cuda" else _cpu_runner
    make, timed, op = runner(shape)
    calls = {batch_size: make(batch_size) for batch_size in request["batch_sizes"]}
    # Warm every size before timing any: the op's first calls pay one-time costs (thread pools,
    # Triton compilation per block config) that would otherwise land on the first size timed.
    for call in calls.values():
        for _ in range(request["warmup"]):
            call()
    rows = [{"batch_size": size, "us_per_call": timed(call, request["repeats"]) * 1e6} for size, call in calls.items()]
    return {"op": op, "rows": rows}


def main() -> int:
    request = json.loads(sys.stdin.read())
    status = 0
    try:
        result = run(request)
    except Unsupported as exc:
        result, status = {"unsupported": str(exc)}, UNSUPPORTED_EXIT
    with open(request["output"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    return status


if __name__ == "__main__":
    sys.exit(main())
