"""Preflight: refuse a launch plan that is bound to fail, before it costs a node.

Why: seed 000's errors (FP8 block misalignment, a quantization flag fighting the checkpoint,
FlashInfer backends on the wrong GPU, out-of-memory at TP4) all surface only after minutes of
weight loading. Each is arithmetic on the model's config.json, the engine flags and the GPU, so
they are checked here in microseconds.

The rules, their messages and the error each prevents are data (``data/preflight_rules.yaml``);
this module holds one small named check function per rule and the engine that runs them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pytest_moe.datafiles import load_yaml
from pytest_moe.errors import ERROR_TYPES
from pytest_moe.gpus import GpuInfo
from pytest_moe.models import ModelInspectionError, ModelSpec, inspect_model
from pytest_moe.tiny import resolve_model_path

if TYPE_CHECKING:
    from pytest_moe.configs import ServerConfig

RULES_FILE = "preflight_rules.yaml"
GPUS_FILE = "gpus.yaml"
GIB = 1024**3



@dataclass(frozen=True)
class GpuSpec:
    """One host's GPUs as preflight sees them."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    count: int


@dataclass(frozen=True)
class LaunchPlan:
    """The flags of one server launch that decide whether it can work.

    ``ep`` is SGLang's ``--ep`` size; on vLLM any ``ep > 1`` means ``--enable-expert-parallel``.
    ``moe_backend`` None or "auto" is the engine's default; ``mem_fraction`` None is its default.
    """

    engine: str = "sglang"
    tp: int = 1
    ep: int = 1
    quantization: str | None = None
    moe_backend: str | None = None
    trust_remote_code: bool = False
    mem_fraction: float | None = None
    dtype: str | None = None

    @property
    def backend(self) -> str:
        return self.moe_backend or "auto"

    def flags(self) -> str:
        """The command-line flags this plan sets, in the engine's spelling."""
        names = _engine(self.engine)["flags"]
        parts = [f"{names['tp']} {self.tp}"]
        if self.ep > 1:
            parts.append(names["ep"] if _engine(self.engine)["ep_style"] == "flag"
                         else f"{names['ep']} {self.ep}")
        if self.quantization:
            parts.append(f"{names['quantization']} {self.quantization}")
        if self.backend != "auto":
            parts.append(f"{names['moe_backend']} {self.backend}")
        if self.mem_fraction is not None:
            parts.append(f"{names['mem_fraction']} {self.mem_fraction}")
        if self.trust_remote_code:
            parts.append(names["trust_remote_code"])
        return " ".join(parts)


@dataclass(frozen=True)
class Problem:
    """Why one plan would fail: the rule, the user-facing sentence, the error it prevents."""

    rule_id: str
    message: str
    prevents: str


@dataclass(frozen=True)
class Rule:
    id: str
    check: Callable[["_Context"], Mapping[str, Any] | None]
    engines: frozenset[str]
    prevents: str
    needs_gpu: bool
    seed_errors: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class _Context:
    model: ModelSpec
    plan: LaunchPlan
    gpu: GpuSpec | None
    engine: Mapping[str, Any]
    params: Mapping[str, Any]


# --------------------------------------------------------------------------- catalog & engines


def _engine(name: str) -> Mapping[str, Any]:
    engines = load_yaml("engines.yaml")
    if name not in engines:
        raise ValueError(f"unknown engine '{name}' in a launch plan; known: {', '.join(engines)}.")
    return engines[name]


def gpu_spec(name: str, count: int) -> GpuSpec:
    """The catalog entry for ``name`` (case-insensitive, 'NVIDIA ' prefix optional), ``count`` of them."""
    wanted = name.strip().lower().removeprefix("nvidia ").strip()
    catalog = load_yaml(GPUS_FILE)["gpus"]
    for key, entry in catalog.items():
        if wanted in {key.lower(), *(a.lower() for a in entry.get("aliases", ()))}:
            major, minor = entry["compute_capability"]
            return GpuSpec(key, int(entry["memory_mib"]) * 1024**2, (int(major), int(minor)), count)
    raise ValueError(f"unknown GPU '{name}' (data/{GPUS_FILE}); known: {', '.join(catalog)}.")


def moe_tp_size(plan: LaunchPlan) -> int:
    """How many ranks split each expert's intermediate dimension.

    SGLang: ``moe_tp_size = tp_size // ep_size``. vLLM's expert parallelism gives whole experts
    to ranks, so the experts are not TP-split at all once it is on.
    """
    if plan.ep <= 1:
        return plan.tp
    return 1 if _engine(plan.engine)["ep_style"] == "flag" else max(plan.tp // plan.ep, 1)


def _ep_choices(plan: LaunchPlan) -> list[int]:
    """EP values the engine accepts for this TP, smallest first."""
    if _engine(plan.engine)["ep_style"] == "flag":
        return [1, plan.tp] if plan.tp > 1 else [1]
    return [ep for ep in range(1, plan.tp + 1) if plan.tp % ep == 0]


# --------------------------------------------------------------------------- checks


def _block_misfit(inter: int, moe_tp: int, block_n: int) -> bool:
    return inter % moe_tp != 0 or (inter // moe_tp) % block_n != 0


def _alignment_fix(ctx: _Context, block_n: int) -> str:
    """The smallest EP that makes the per-rank expert slice a whole number of blocks."""
    names = ctx.engine["flags"]
    for ep in _ep_choices(ctx.plan)[1:]:
        candidate = replace(ctx.plan, ep=ep)
        if (ctx.model.num_experts % ep == 0
                and not _block_misfit(ctx.model.moe_intermediate_size, moe_tp_size(candidate), block_n)):
            return (f"use {names['ep']}" if ctx.engine["ep_style"] == "flag"
                    else f"use {names['ep']} {ep}") + f" (moe_tp_size {moe_tp_size(candidate)})"
    return f"use a smaller {names['tp']}"


def _alignment(ctx: _Context, block_n: int) -> dict[str, Any] | None:
    moe_tp = moe_tp_size(ctx.plan)
    inter = ctx.model.moe_intermediate_size
    if not _block_misfit(inter, moe_tp, block_n):
        return None
    per_rank = inter / moe_tp if inter % moe_tp else inter // moe_tp
    return {"moe_intermediate_size": inter, "moe_tp_size": moe_tp, "per_rank": per_rank,
            "block_n": block_n, "fix": _alignment_fix(ctx, block_n), "dtype": ctx.model.dtype}


def fp8_block_alignment(ctx: _Context) -> dict[str, Any] | None:
    """SGLang check_quantized_moe_compatibility / vLLM fp8 block check on the checkpoint's blocks."""
    quant = ctx.model.quantization
    if quant is None or quant.weight_block_size is None:
        return None
    return _alignment(ctx, quant.weight_block_size[0])


def fp8_requested_unaligned(ctx: _Context) -> dict[str, Any] | None:
    """--quantization fp8 on a 16-bit checkpoint: the same arithmetic with 128-wide blocks."""
    if (ctx.plan.quantization or "").lower() != "fp8" or ctx.model.quantization is not None:
        return None
    return _alignment(ctx, int(ctx.params["online_fp8_block_n"]))


def quantization_conflict(ctx: _Context) -> dict[str, Any] | None:
    requested, own = ctx.plan.quantization, ctx.model.quantization
    if not requested or own is None or requested.lower() == own.method:
        return None
    return {"requested": requested, "method": own.method}


def trtllm_needs_blackwell(ctx: _Context) -> dict[str, Any] | None:
    required = int(ctx.params["trtllm_compute_major"])
    assert ctx.gpu is not None
    if ctx.plan.backend != "flashinfer_trtllm" or ctx.gpu.compute_capability[0] == required:
        return None
    return {"required": required, "capability": "%d.%d" % ctx.gpu.compute_capability}


def cutlass_needs_fp4_or_bf16(ctx: _Context) -> dict[str, Any] | None:
    if ctx.plan.backend != "flashinfer_cutlass":
        return None
    quant = ctx.plan.quantization or (ctx.model.quantization.method if ctx.model.quantization else None)
    if quant is None:
        dtype = ctx.plan.dtype or ctx.model.dtype
        return None if dtype in ctx.params["cutlass_dtypes"] else {"effective": dtype}
    return None if quant in ctx.params["cutlass_quantizations"] else {"effective": quant}


def ep_must_divide(ctx: _Context) -> dict[str, Any] | None:
    plan, experts = ctx.plan, ctx.model.num_experts
    if plan.ep <= 1:
        return None
    if plan.ep not in _ep_choices(plan):
        why = ("vLLM's expert parallelism is a switch, its size is TP x DP"
               if ctx.engine["ep_style"] == "flag" else "EP must divide TP")
    elif experts % plan.ep:
        why = f"{experts} experts do not split evenly over {plan.ep} ranks"
    else:
        return None
    valid = [ep for ep in _ep_choices(plan) if experts % ep == 0]
    return {"experts": experts, "why": why, "fix": f"use EP in {valid}"}


def tp_must_divide_heads(ctx: _Context) -> dict[str, Any] | None:
    heads = ctx.model.num_attention_heads
    if heads % ctx.plan.tp == 0:
        return None
    return {"heads": heads, "valid": [tp for tp in (1, 2, 4, 8, 16) if heads % tp == 0]}


def enough_gpus(ctx: _Context) -> dict[str, Any] | None:
    assert ctx.gpu is not None
    return {"count": ctx.gpu.count} if ctx.plan.tp > ctx.gpu.count else None


def _weights_per_gpu(model: ModelSpec, plan: LaunchPlan, tp: int) -> float:
    """Weight bytes one rank holds; online FP8 of a 16-bit checkpoint halves them."""
    total = model.weight_bytes
    if (plan.quantization or "").lower() == "fp8" and model.quantization is None:
        total /= 2
    return total / tp


def weights_fit_memory(ctx: _Context) -> dict[str, Any] | None:
    gpu, model, plan = ctx.gpu, ctx.model, ctx.plan
    assert gpu is not None
    fraction = plan.mem_fraction or float(ctx.engine["default_mem_fraction"])
    budget = gpu.memory_bytes * fraction
    kv_floor = float(ctx.params["kv_cache_floor_gib"]) * GIB
    per_gpu = _weights_per_gpu(model, plan, plan.tp)
    if per_gpu + kv_floor <= budget:
        return None
    fitting = [tp for tp in (2, 4, 8, 16, 32, 64)
               if tp > plan.tp and _weights_per_gpu(model, plan, tp) + kv_floor <= budget]
    flag = ctx.engine["flags"]["tp"]
    if fitting and fitting[0] <= gpu.count:
        fix = f"use {flag} {fitting[0]}"
    elif fitting:
        fix = f"it needs {flag} {fitting[0]}, more than the {gpu.count} GPUs here"
    else:
        fix = "it does not fit this GPU at any TP"
    return {"per_gpu_gib": f"{per_gpu / GIB:.1f}", "total_gb": f"{model.weight_bytes / 1e9:.0f}",
            "exactness": "" if model.weight_bytes_exact else " estimated",
            "kv_gib": ctx.params["kv_cache_floor_gib"], "fraction": fraction,
            "gpu_gib": f"{gpu.memory_bytes / GIB:.1f}", "budget_gib": f"{budget / GIB:.1f}",
            "headroom_pct": round((1 - fraction) * 100), "fix": fix}


def trust_remote_code(ctx: _Context) -> dict[str, Any] | None:
    if not ctx.model.needs_trust_remote_code or ctx.plan.trust_remote_code:
        return None
    return {"model_type": ctx.model.model_type}


_CHECKS: dict[str, Callable[[_Context], Mapping[str, Any] | None]] = {
    f.__name__: f for f in (
        fp8_block_alignment, fp8_requested_unaligned, quantization_conflict, trtllm_needs_blackwell,
        cutlass_needs_fp4_or_bf16, ep_must_divide, tp_must_divide_heads, enough_gpus,
        weights_fit_memory, trust_remote_code)
}


@lru_cache(maxsize=1)
def rules() -> tuple[Rule, ...]:
    """The rules of data/preflight_rules.yaml, validated once: unknown checks or error types fail loudly."""
    loaded = []
    for raw in load_yaml(RULES_FILE)["rules"]:
        if raw["check"] not in _CHECKS:
            raise ValueError(f"data/{RULES_FILE}: rule '{raw['id']}' names an unknown check '{raw['check']}'.")
        if raw["prevents"] not in ERROR_TYPES:
            raise ValueError(f"data/{RULES_FILE}: rule '{raw['id']}' prevents unknown error type '{raw['prevents']}'.")
        loaded.append(Rule(raw["id"], _CHECKS[raw["check"]], frozenset(raw["engines"]),
                           raw["prevents"], bool(raw["needs_gpu"]),
                           tuple(" ".join(e.split()) for e in raw["seed_errors"]),
                           " ".join(raw["message"].split())))
    return tuple(loaded)


# --------------------------------------------------------------------------- public


def check(model: ModelSpec, plan: LaunchPlan, gpu: GpuSpec | None) -> list[Problem]:
    """Every rule this plan breaks for this model on this GPU (None: unknown GPU, CPU run)."""
    engine = _engine(plan.engine)
    ctx = _Context(model, plan, gpu, engine, load_yaml(RULES_FILE)["params"])
    base = {"model": model.name, "engine": plan.engine, "tp": plan.tp, "ep": plan.ep,
            "gpu": gpu.name if gpu else "no GPU"}
    problems = []
    for rule in rules():
        if plan.engine not in rule.engines or (rule.needs_gpu and gpu is None):
            continue
        fields = rule.check(ctx)
        if fields is not None:
            problems.append(Problem(rule.id, rule.message.format(**base, **fields), rule.prevents))
    return problems


def verdict(problems: list[Problem]) -> dict[str, Any]:
    """JSON-able result for the CLI: ``{"ok": bool, "problems": [{rule_id, message, prevents}]}``."""
    return {"ok": not problems,
            "problems": [{"rule_id": p.rule_id, "message": p.message, "prevents": p.prevents}
                         for p in problems]}


def plan_table(model: ModelSpec, gpu: GpuSpec, engine: str = "sglang") -> list[tuple[LaunchPlan, list[Problem]]]:
    """Every TP (powers of two up to the GPU count) x EP x {none, fp8} x MoE backend, checked."""
    backends = _engine(engine)["plan_backends"]
    rows = []
    tp = 1
    while tp <= gpu.count:
        for ep in _ep_choices(LaunchPlan(engine=engine, tp=tp)):
            for quantization in (None, "fp8"):
                for backend in backends:
                    plan = LaunchPlan(engine=engine, tp=tp, ep=ep, quantization=quantization,
                                      moe_backend=None if backend == "auto" else backend,
                                      trust_remote_code=model.needs_trust_remote_code)
                    rows.append((plan, check(model, plan, gpu)))
        tp *= 2
    return rows


def render_plan(rows: list[tuple[LaunchPlan, list[Problem]]]) -> str:
    """The plan table as markdown: passing configurations first, then each rejection and its rule."""
    lines = ["| TP | EP | --quantization | MoE backend | verdict | rejected by |",
             "|---:|---:|---|---|---|---|"]
    for plan, problems in sorted(rows, key=lambda row: bool(row[1])):
        rejected = "; ".join(f"`{p.rule_id}` ({p.prevents})" for p in problems)
        lines.append(f"| {plan.tp} | {plan.ep} | {plan.quantization or '—'} | {plan.backend} "
                     f"| {'fails' if problems else 'passes'} | {rejected} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- matrix configs


def plan_for(cfg: ServerConfig) -> LaunchPlan:
    """The preflight view of a matrix config: its engine-neutral fields plus the extra flags that matter."""
    args = list(cfg.args)

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    mem = value("--mem-fraction-static") or value("--gpu-memory-utilization")
    return LaunchPlan(
        engine=cfg.engine, tp=cfg.tp, ep=cfg.ep, quantization=cfg.quantization, moe_backend=cfg.moe_backend,
        trust_remote_code="--trust-remote-code" in args, mem_fraction=float(mem) if mem else None,
        dtype=value("--dtype"),
    )


def host_gpu(gpus: list[GpuInfo]) -> GpuSpec | None:
    """The host's GPUs as a catalog entry; None (GPU rules skipped) without GPUs or for an unknown name."""
    if not gpus:
        return None
    try:
        return gpu_spec(gpus[0].name, len(gpus))
    except ValueError:
        return None


@lru_cache(maxsize=None)
def _inspect_cached(path: str) -> ModelSpec | None:
    try:
        return inspect_model(resolve_model_path(path))
    except ModelInspectionError:
        return None


def check_config(cfg: ServerConfig, gpus: list[GpuInfo]) -> list[Problem] | None:
    """Problems of one matrix config on this host; None when the model's config.json is not available here
    (a hub id not yet in the local cache): then nothing can be predicted and the config boots."""
    model = _inspect_cached(cfg.model_path)
    return None if model is None else check(model, plan_for(cfg), host_gpu(gpus))
