"""Preflight: refuse a launch plan that is bound to fail, before it costs a node.

Why: seed 000's errors (FP8 block misalignment, a quantization flag fighting the checkpoint,
FlashInfer backends on the wrong GPU, out-of-memory at TP4) all surface only after minutes of
weight loading. Each is arithmetic on the model's config.json, the engine flags and the GPU, so
they are checked here in microseconds.

The rules, their messages and the error each prevents are data (``data/preflight_rules.yaml``);
this module holds one small named check function per rule and the engine that runs them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, Callable, Mapping

from pydantic import Field, StrictBool, StrictStr, ValidationError

from pytest_moe.configs import FrozenModel, ServerConfig
from pytest_moe.datafiles import load_yaml
from pytest_moe.engines import Engine, get_engine
from pytest_moe.engines.base import Checked
from pytest_moe.errors import ERROR_TYPES
from pytest_moe.gpus import GpuInfo
from pytest_moe.models import ModelInspectionError, ModelSpec, inspect_model
from pytest_moe.tiny import resolve_model_path

RULES_FILE = "preflight_rules.yaml"
GPUS_FILE = "gpus.yaml"
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class GpuSpec:
    """One host's GPUs as preflight sees them."""

    name: str
    memory_bytes: int
    compute_capability: tuple[int, int]
    count: int


@dataclass(frozen=True)
class LaunchPlan:
    """The engine-neutral fields of one server launch that decide whether it can work.

    ``ep`` is the expert-parallel size (on a ``switch`` engine any ``ep > 1`` is the switch);
    ``moe_backend`` None or "auto" is the engine's default; ``mem_fraction`` None is its default.
    The engine's adapter renders them as flags (``flags_of``); preflight never spells a flag itself.
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


def flags_of(plan: LaunchPlan) -> str:
    """The plan as its engine's adapter renders it on the command line."""
    return " ".join(get_engine(plan.engine).launch_flags(
        tp=plan.tp, ep=plan.ep, quantization=plan.quantization, moe_backend=plan.moe_backend,
        mem_fraction=plan.mem_fraction, trust_remote_code=plan.trust_remote_code))


@dataclass(frozen=True)
class Problem:
    """Why one plan would fail: the rule, the user-facing sentence, the error it prevents.

    ``version_note`` is set when the installed engine is outside the versions the rule was checked against.
    """

    rule_id: str
    message: str
    prevents: str
    version_note: str | None = None


class CapabilityRange(FrozenModel):
    """Compute capabilities as ``major * 10 + minor`` (90 = Hopper); ``highest`` None = no upper bound."""

    lowest: int
    highest: int | None = None

    def covers(self, capability: tuple[int, int]) -> bool:
        value = capability[0] * 10 + capability[1]
        return value >= self.lowest and (self.highest is None or value <= self.highest)


class RuleParams(FrozenModel):
    kv_cache_floor_gib: float = Field(gt=0)
    trtllm_compute_major: int
    vllm_fp8_min_refined_block: int = Field(gt=0)
    sglang_cutlass_quantizations: tuple[StrictStr, ...]
    sglang_cutlass_dtypes: tuple[StrictStr, ...]
    vllm_cutlass_schemes: dict[StrictStr, CapabilityRange]
    quantization_compatible: dict[StrictStr, dict[StrictStr, tuple[StrictStr, ...]]]
    requantization_methods: dict[StrictStr, tuple[StrictStr, ...]]


class RuleData(FrozenModel):
    id: StrictStr
    check: StrictStr
    prevents: StrictStr
    needs_gpu: StrictBool
    #: Per engine family: the version and source file the rule was checked against; the rule applies to
    #: the engines of exactly these families.
    checked: dict[StrictStr, Checked] = Field(min_length=1)
    seed_errors: tuple[StrictStr, ...] = Field(min_length=1)
    message: StrictStr


class RulesFile(FrozenModel):
    params: RuleParams
    rules: tuple[RuleData, ...]


@dataclass(frozen=True)
class Rule:
    id: str
    check: Callable[["_Context"], Mapping[str, Any] | None]
    prevents: str
    needs_gpu: bool
    checked: Mapping[str, Checked]
    seed_errors: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class _Context:
    model: ModelSpec
    plan: LaunchPlan
    gpu: GpuSpec | None
    engine: Engine
    params: RuleParams


# --------------------------------------------------------------------------- catalog & engines


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
    """How many ranks split each expert's intermediate dimension (the engine's EP style decides)."""
    return get_engine(plan.engine).spec.ep_style.moe_tp_size(plan.tp, plan.ep)


def _ep_choices(plan: LaunchPlan) -> list[int]:
    """EP values the engine accepts for this TP, smallest first."""
    return get_engine(plan.engine).spec.ep_style.choices(plan.tp)


# --------------------------------------------------------------------------- checks


def _block_misfit(inter: int, moe_tp: int, block_n: int) -> bool:
    return inter % moe_tp != 0 or (inter // moe_tp) % block_n != 0


def _tp_text(ctx: _Context, tp: int) -> str:
    return " ".join(ctx.engine.launch_flags(tp=tp)[:2])


def _alignment_fix(ctx: _Context, fits: Callable[[LaunchPlan], bool]) -> str:
    """The smallest EP with which ``fits``, rendered by the engine's adapter; else a smaller TP."""
    for ep in _ep_choices(ctx.plan)[1:]:
        candidate = replace(ctx.plan, ep=ep)
        if ctx.model.num_experts % ep == 0 and fits(candidate):
            return f"use {' '.join(ctx.engine.ep_args(ep))} (moe_tp_size {moe_tp_size(candidate)})"
    return f"use a smaller {ctx.engine.spec.flags.tp}"


def fp8_block_alignment(ctx: _Context) -> dict[str, Any] | None:
    """SGLang: each rank's slice of a block-quantized expert must be whole blocks (no refinement)."""
    quant = ctx.model.quantization
    if quant is None or quant.weight_block_size is None:
        return None
    block_n, inter = quant.weight_block_size[0], ctx.model.moe_intermediate_size
    moe_tp = moe_tp_size(ctx.plan)
    if not _block_misfit(inter, moe_tp, block_n):
        return None
    per_rank = inter / moe_tp if inter % moe_tp else inter // moe_tp
    fix = _alignment_fix(ctx, lambda plan: not _block_misfit(inter, moe_tp_size(plan), block_n))
    return {"moe_intermediate_size": inter, "moe_tp_size": moe_tp, "per_rank": per_rank, "block_n": block_n,
            "fix": fix}


def _vllm_block_ok(ctx: _Context, plan: LaunchPlan) -> tuple[bool, int, int]:
    """vLLM's ``resolve_fp8_moe_weight_block_shape``: (loads, per-rank columns, refined block)."""
    quant = ctx.model.quantization
    assert quant is not None and quant.weight_block_size is not None
    block_n, block_k = quant.weight_block_size
    inter, hidden, moe_tp = ctx.model.moe_intermediate_size, ctx.model.hidden_size, moe_tp_size(plan)
    if inter % moe_tp:
        return True, 0, 0  # not a block question: vLLM's own sharding check speaks first
    ispp = inter // moe_tp
    if ispp % block_n == 0 and (plan.tp == 1 or ispp % block_k == 0):
        return True, ispp, block_n
    refine = math.gcd(block_n, block_k, ispp, hidden)
    if refine >= ctx.params.vllm_fp8_min_refined_block:
        return True, ispp, refine
    # With an explicit backend and pure TP, vLLM pads the shard to whole blocks instead.
    paddable = (plan.backend != "auto" and block_n == block_k and plan.tp > 1 and plan.ep <= 1
                and inter % block_n == 0 and hidden % block_n == 0)
    return paddable, ispp, refine


def fp8_block_unrefinable(ctx: _Context) -> dict[str, Any] | None:
    """vLLM: a misfit shard only fails when the block cannot be refined (gcd < 32) or padded."""
    quant = ctx.model.quantization
    if quant is None or quant.weight_block_size is None:
        return None
    loads, per_rank, refine = _vllm_block_ok(ctx, ctx.plan)
    if loads:
        return None
    return {"per_rank": per_rank, "block": "x".join(map(str, quant.weight_block_size)), "refined": refine,
            "hidden": ctx.model.hidden_size, "min_block": ctx.params.vllm_fp8_min_refined_block,
            "fix": _alignment_fix(ctx, lambda plan: _vllm_block_ok(ctx, plan)[0])}


def quantization_conflict(ctx: _Context) -> dict[str, Any] | None:
    """A requested method other than the checkpoint's, unless the engine accepts the pair or re-quantizes."""
    requested, own = ctx.plan.quantization, ctx.model.quantization
    if not requested or own is None or requested.lower() == own.method:
        return None
    family = ctx.engine.spec.family
    if own.method in ctx.params.quantization_compatible.get(family, {}).get(requested.lower(), ()):
        return None
    if requested.lower() in ctx.params.requantization_methods.get(family, ()):
        return None
    return {"requested": requested, "method": own.method}


def trtllm_needs_blackwell(ctx: _Context) -> dict[str, Any] | None:
    required = ctx.params.trtllm_compute_major
    assert ctx.gpu is not None
    if ctx.plan.backend != "flashinfer_trtllm" or ctx.gpu.compute_capability[0] == required:
        return None
    return {"required": required, "capability": "%d.%d" % ctx.gpu.compute_capability}


def _effective_quantization(ctx: _Context) -> str | None:
    return ctx.plan.quantization or (ctx.model.quantization.method if ctx.model.quantization else None)


def cutlass_needs_fp4_or_bf16(ctx: _Context) -> dict[str, Any] | None:
    """SGLang's flashinfer_cutlass: modelopt FP4/FP8/mixed or 16-bit weights, and EP 1 or TP."""
    if ctx.plan.backend != "flashinfer_cutlass":
        return None
    quant = _effective_quantization(ctx)
    if quant is None:
        effective = ctx.plan.dtype or ctx.model.dtype
        ok = effective in ctx.params.sglang_cutlass_dtypes
    else:
        effective, ok = quant, quant in ctx.params.sglang_cutlass_quantizations
    if not ok:
        return {"why": f"it needs modelopt_fp4, modelopt_fp8, modelopt_mixed or bf16 weights and {ctx.model.name} "
                       f"would run as {effective}", "fix": "use auto or triton"}
    if ctx.plan.ep not in (1, ctx.plan.tp):
        return {"why": f"it needs EP 1 or EP = TP ({ctx.plan.tp}), not EP {ctx.plan.ep}",
                "fix": f"use {' '.join(ctx.engine.ep_args(ctx.plan.tp))} or no EP"}
    return None


def _vllm_cutlass_scheme(ctx: _Context) -> str | None:
    """The FlashInfer CUTLASS weight scheme this launch would use on vLLM; None when preflight cannot tell."""
    quant = _effective_quantization(ctx)
    own = ctx.model.quantization
    if quant is None:
        return "bf16" if (ctx.plan.dtype or ctx.model.dtype) in ("bfloat16", "float16", "auto") else None
    if quant == "fp8":
        block = own.weight_block_size if own is not None and own.method == "fp8" else None
        return "fp8-block" if block == (128, 128) else ("fp8-tensor" if block is None else None)
    return {"modelopt_fp4": "nvfp4", "mxfp4": "mxfp4"}.get(quant)


def flashinfer_cutlass_scheme(ctx: _Context) -> dict[str, Any] | None:
    """vLLM's FlashInfer CUTLASS experts: each weight scheme runs on its own range of GPUs."""
    if ctx.plan.backend != "flashinfer_cutlass":
        return None
    assert ctx.gpu is not None
    scheme = _vllm_cutlass_scheme(ctx)
    if scheme is None:
        return None  # a scheme we cannot classify: predict nothing rather than something wrong
    supported = ctx.params.vllm_cutlass_schemes.get(scheme)
    if supported is not None and supported.covers(ctx.gpu.compute_capability):
        return None
    where = ("no GPU" if supported is None else
             f"compute capability {supported.lowest / 10:.1f}" + (
                 f" to {supported.highest / 10:.1f}" if supported.highest else " or newer"))
    return {"scheme": scheme, "supported": where, "capability": "%d.%d" % ctx.gpu.compute_capability}


def ep_must_divide(ctx: _Context) -> dict[str, Any] | None:
    plan, experts = ctx.plan, ctx.model.num_experts
    if plan.ep <= 1:
        return None
    if plan.ep not in _ep_choices(plan):
        why = (f"{ctx.engine.spec.flags.ep} is a switch, its size is TP x DP"
               if plan.tp % plan.ep == 0 else "EP must divide TP")
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
    memory = ctx.engine.spec.default_mem_fraction
    fraction = plan.mem_fraction or memory.for_gpu(gpu.memory_bytes // MIB, plan.tp)
    budget = gpu.memory_bytes * fraction
    kv_floor = ctx.params.kv_cache_floor_gib * GIB
    per_gpu = _weights_per_gpu(model, plan, plan.tp)
    if per_gpu + kv_floor <= budget:
        return None

    def fits(tp: int) -> bool:
        share = plan.mem_fraction or memory.for_gpu(gpu.memory_bytes // MIB, tp)
        return _weights_per_gpu(model, plan, tp) + kv_floor <= gpu.memory_bytes * share

    fitting = [tp for tp in (2, 4, 8, 16, 32, 64) if tp > plan.tp and fits(tp)]
    if fitting and fitting[0] <= gpu.count:
        fix = f"use {_tp_text(ctx, fitting[0])}"
    elif fitting:
        fix = f"it needs {_tp_text(ctx, fitting[0])}, more than the {gpu.count} GPUs here"
    else:
        fix = "it does not fit this GPU at any TP"
    return {"per_gpu_gib": f"{per_gpu / GIB:.1f}", "total_gb": f"{model.weight_bytes / 1e9:.0f}",
            "exactness": "" if model.weight_bytes_exact else " estimated",
            "kv_gib": f"{ctx.params.kv_cache_floor_gib:g}", "fraction": fraction,
            "gpu_gib": f"{gpu.memory_bytes / GIB:.1f}", "budget_gib": f"{budget / GIB:.1f}",
            "headroom_pct": round((1 - fraction) * 100), "fix": fix}


def trust_remote_code(ctx: _Context) -> dict[str, Any] | None:
    if not ctx.model.needs_trust_remote_code or ctx.plan.trust_remote_code:
        return None
    return {"model_type": ctx.model.model_type, "flag": ctx.engine.spec.flags.trust_remote_code}


_CHECKS: dict[str, Callable[[_Context], Mapping[str, Any] | None]] = {
    f.__name__: f for f in (
        fp8_block_alignment, fp8_block_unrefinable, quantization_conflict, trtllm_needs_blackwell,
        cutlass_needs_fp4_or_bf16, flashinfer_cutlass_scheme, ep_must_divide, tp_must_divide_heads, enough_gpus,
        weights_fit_memory, trust_remote_code)
}


class RulesError(ValueError):
    """``preflight_rules.yaml`` is malformed; the message names the rule and key."""


@lru_cache(maxsize=1)
def _rules_file() -> RulesFile:
    try:
        return RulesFile.model_validate_json(json.dumps(load_yaml(RULES_FILE)))  # strict, JSON mode (see EngineSpec)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise RulesError(f"data/{RULES_FILE}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None


@lru_cache(maxsize=1)
def rules() -> tuple[Rule, ...]:
    """The rules of data/preflight_rules.yaml, validated once: unknown checks or error types fail loudly
    (the schema already requires the versions each rule was checked against)."""
    loaded = []
    for raw in _rules_file().rules:
        where = f"data/{RULES_FILE}: rule '{raw.id}'"
        if raw.check not in _CHECKS:
            raise RulesError(f"{where} names an unknown check '{raw.check}'.")
        if raw.prevents not in ERROR_TYPES:
            raise RulesError(f"{where} prevents unknown error type '{raw.prevents}'.")
        loaded.append(Rule(raw.id, _CHECKS[raw.check], raw.prevents, raw.needs_gpu,
                           dict(raw.checked), tuple(" ".join(e.split()) for e in raw.seed_errors),
                           " ".join(raw.message.split())))
    return tuple(loaded)


# --------------------------------------------------------------------------- versions


@lru_cache(maxsize=None)
def installed_version(engine: str) -> str | None:
    """The engine's version in this interpreter (None when it is not installed here)."""
    found = get_engine(engine).installed_version()
    return found[1] if found else None


def applies(rule: Rule, engine: str) -> bool:
    """A rule applies to the engines of the families it was checked against."""
    return get_engine(engine).spec.family in rule.checked


def version_note(rule: Rule, engine: str) -> str | None:
    """"checked against SGLang 0.5.x, you run 0.6.1" when the installed engine is outside the rule's series."""
    spec = get_engine(engine).spec
    checked = rule.checked.get(spec.family)
    running = installed_version(engine)
    if checked is None or running is None or checked.covers(running):
        return None
    return f"checked against {spec.family_title} {checked.series}, you run {running}"


def version_notes(engine: str) -> list[str]:
    """One line per distinct note over the rules that apply to ``engine``: what `plan` and `preflight` print."""
    by_note: dict[str, list[str]] = {}
    for rule in rules():
        note = version_note(rule, engine) if applies(rule, engine) else None
        if note:
            by_note.setdefault(note, []).append(rule.id)
    return [f"preflight rules {', '.join(ids)}: {note}" for note, ids in by_note.items()]


# --------------------------------------------------------------------------- public


def check(model: ModelSpec, plan: LaunchPlan, gpu: GpuSpec | None) -> list[Problem]:
    """Every rule this plan breaks for this model on this GPU (None: unknown GPU, CPU run)."""
    engine = get_engine(plan.engine)
    ctx = _Context(model, plan, gpu, engine, _rules_file().params)
    base = {"model": model.name, "engine": plan.engine, "tp": plan.tp, "ep": plan.ep,
            "gpu": gpu.name if gpu else "no GPU"}
    problems = []
    for rule in rules():
        if not applies(rule, plan.engine) or (rule.needs_gpu and (gpu is None or not engine.spec.uses_gpus)):
            continue
        fields = rule.check(ctx)
        if fields is not None:
            note = version_note(rule, plan.engine)
            message = rule.message.format(**base, **fields) + (f" ({note})" if note else "")
            problems.append(Problem(rule.id, message, rule.prevents, note))
    return problems


def verdict(problems: list[Problem], engine: str | None = None) -> dict[str, Any]:
    """JSON-able result for the CLI: ``{"ok", "problems": [{rule_id, message, prevents}]}``, plus
    ``"version_notes"`` when the installed ``engine`` is outside the versions some rule was checked against."""
    result: dict[str, Any] = {
        "ok": not problems,
        "problems": [{"rule_id": p.rule_id, "message": p.message, "prevents": p.prevents} for p in problems]}
    notes = version_notes(engine) if engine is not None else []
    if notes:
        result["version_notes"] = notes
    return result


def plan_table(model: ModelSpec, gpu: GpuSpec, engine: str = "sglang") -> list[tuple[LaunchPlan, list[Problem]]]:
    """Every TP (powers of two up to the GPU count) x EP x {none, fp8} x MoE backend, checked."""
    backends = get_engine(engine).spec.plan_backends
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
    """The plan table as markdown: passing configurations first, then each rejection and its rule.

    The flags column is the adapter's rendering; version notes, if any, come first.
    """
    engines = sorted({plan.engine for plan, _ in rows})
    notes = [f"> {engine}: {note}" for engine in engines for note in version_notes(engine)]
    lines = [*notes, *([""] if notes else []),
             "| TP | EP | --quantization | MoE backend | flags | verdict | rejected by |",
             "|---:|---:|---|---|---|---|---|"]
    for plan, problems in sorted(rows, key=lambda row: bool(row[1])):
        rejected = "; ".join(f"`{p.rule_id}` ({p.prevents})" for p in problems)
        lines.append(f"| {plan.tp} | {plan.ep} | {plan.quantization or '—'} | {plan.backend} | `{flags_of(plan)}` "
                     f"| {'fails' if problems else 'passes'} | {rejected} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- matrix configs


def plan_for(cfg: ServerConfig) -> LaunchPlan:
    """The preflight view of a matrix config: its engine-neutral fields plus the extra flags that matter,
    found in ``args`` under the engine's own spelling."""
    args = list(cfg.args)
    flags = get_engine(cfg.engine).spec.flags

    def value(flag: str) -> str | None:
        return args[args.index(flag) + 1] if flag in args[:-1] else None

    mem = value(flags.mem_fraction)
    return LaunchPlan(
        engine=cfg.engine, tp=cfg.tp, ep=cfg.ep, quantization=cfg.quantization, moe_backend=cfg.moe_backend,
        trust_remote_code=flags.trust_remote_code in args, mem_fraction=float(mem) if mem else None,
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
        return inspect_model(resolve_model_path(path, build=False))  # collection never builds a checkpoint
    except ModelInspectionError:
        return None


def check_config(cfg: ServerConfig, gpus: list[GpuInfo]) -> list[Problem] | None:
    """Problems of one matrix config on this host; None when the model's config.json is not available here
    (a hub id not yet in the local cache): then nothing can be predicted and the config boots."""
    model = _inspect_cached(cfg.model_path)
    return None if model is None else check(model, plan_for(cfg), host_gpu(gpus))
