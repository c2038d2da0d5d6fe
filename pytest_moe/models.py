"""Know a Mixture-of-Experts model from its ``config.json`` before booting it.

Why: a launch that is bound to fail (FP8 blocks that do not divide, weights that do not fit, a
quantization flag that fights the checkpoint's own) costs up to 2000 s of an 8-GPU node before the
engine says so. Everything those failures depend on is written in the model's ``config.json``; this
module reads it — from a local folder, a file, or the local Hugging Face cache, never the network —
into one typed :class:`ModelSpec` that :mod:`pytest_moe.preflight` checks launch plans against.

Every MoE family stores its expert count and sizes under different keys (``num_local_experts``,
``n_routed_experts``, ``num_experts``, DBRX's ``ffn_config``, Llama-4's ``text_config``, HunYuan's
per-layer lists...). Those facts live in ``data/model_families.yaml``; this code only interprets
that table.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pytest_moe.datafiles import load_yaml

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_WEIGHTS_NAME = "model.safetensors"
FAMILIES_FILE = "model_families.yaml"

# Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) is recognised by a non-null kv_lora_rank;
# the key names are shared by every MLA family, so they are not per-family data.
_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: Bounds on what a config.json may claim (docs/contract.md): far beyond any real model, yet small
#: enough that the per-layer work below stays instant; a hostile file gets one sentence, not a hang.
MAX_CONFIG_BYTES = 16 << 20
MAX_LAYERS = 10_000
MAX_SIZE = 1 << 40


class ModelInspectionError(ValueError):
    """A model's config.json cannot be found or does not describe a MoE model we can read."""


@dataclass(frozen=True)
class QuantSpec:
    """The checkpoint's own quantization, from ``quantization_config``.

    ``weight_block_size`` is what SGLang's ``check_quantized_moe_compatibility`` and the FP8
    linear layers divide by; ``ignores_attention`` tells whether only the routed experts are
    quantized (Kimi-K2's int4, gpt-oss's mxfp4), which changes the weight bytes by hundreds of GB.
    """

    method: str
    fmt: str | None
    weight_block_size: tuple[int, int] | None
    bits: int | None
    group_size: int | None
    scheme: str | None
    ignores_attention: bool


@dataclass(frozen=True)
class ModelSpec:
    """One MoE model as preflight needs it: shapes, quantization, size, trust needs."""

    source: str
    family: str
    model_type: str
    architecture: str
    num_experts: int
    experts_per_token: int
    num_shared_experts: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    dense_intermediate_size: int
    hidden_size: int
    num_layers: int
    moe_layers: int
    dense_layers: int
    attention_layers: int
    mamba_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    dtype: str
    quantization: QuantSpec | None
    param_count: int
    weight_bytes: int
    weight_bytes_exact: bool
    needs_trust_remote_code: bool

    @property
    def name(self) -> str:
        """A short name for messages: ``org/name`` inside an HF cache, else the folder or file."""
        path = Path(self.source)
        for parent in path.parents:
            if parent.name.startswith("models--"):
                return parent.name[len("models--"):].replace("--", "/")
        return path.parent.name if path.name == CONFIG_NAME else path.stem

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view for the CLI (tuples become lists)."""
        return {"name": self.name, **json.loads(json.dumps(asdict(self)))}


# --------------------------------------------------------------------------- locating config.json


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache, resolved the way ``huggingface_hub`` resolves it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _snapshot_config(entry: Path) -> Path:
    """config.json of a ``models--org--name`` cache entry: refs/main first, else newest snapshot."""
    snapshots = entry / "snapshots"
    candidates: list[Path] = []
    ref = entry / "refs" / "main"
    if ref.is_file():
        candidates.append(snapshots / ref.read_text(encoding="utf-8").strip())
    if snapshots.is_dir():
        candidates += sorted((d for d in snapshots.iterdir() if d.is_dir()),
                             key=lambda d: d.stat().st_mtime, reverse=True)
    for snapshot in candidates:
        if (snapshot / CONFIG_NAME).is_file():
            return snapshot / CONFIG_NAME
    raise ModelInspectionError(
        f"{entry} has no snapshot holding a {CONFIG_NAME} (looked at refs/main and every folder "
        f"under snapshots/)."
    )


def resolve_config_path(path: str | os.PathLike[str]) -> Path:
    """Find the config.json meant by a folder, a file, a cache entry or an ``org/name`` repo id.

    A repo id is looked up only in the local cache: pytest-moe never downloads.
    """
    candidate = Path(path).expanduser()
    if candidate.is_file():
        return candidate
    if candidate.is_dir():
        if (candidate / CONFIG_NAME).is_file():
            return candidate / CONFIG_NAME
        if (candidate / "snapshots").is_dir():
            return _snapshot_config(candidate)
        raise ModelInspectionError(
            f"{candidate} has no {CONFIG_NAME} and is not a Hugging Face cache entry "
            f"(no snapshots/ folder)."
        )
    if _REPO_ID.match(str(path)):
        entry = hf_hub_cache() / ("models--" + str(path).replace("/", "--"))
        if entry.is_dir():
            return _snapshot_config(entry)
        raise ModelInspectionError(
            f"{path} is not in the local Hugging Face cache ({entry} does not exist) and "
            f"pytest-moe never downloads, so fetch it first (huggingface-cli download {path})."
        )
    raise ModelInspectionError(f"{path} does not exist.")


# --------------------------------------------------------------------------- reading fields


def _dig(mapping: Mapping[str, Any], dotted: str) -> Any:
    """``ffn_config.moe_num_experts`` style lookup; None when any step is missing."""
    value: Any = mapping
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or value.get(part) is None:
            return None
        value = value[part]
    return value


class _Fields:
    """Field lookup over a family's key lists, in the sub-config first, then the top level."""

    def __init__(self, config: Mapping[str, Any], family: Mapping[str, Any], source: Path):
        sub = family["sub_config"]
        self.scopes: list[Mapping[str, Any]] = [config]
        if sub and isinstance(config.get(sub), Mapping):
            self.scopes.insert(0, config[sub])
        self.family = family
        self.source = source
        self.model_type = str(config.get("model_type") or "?")

    def raw(self, key: str) -> Any:
        for scope in self.scopes:
            value = _dig(scope, key)
            if value is not None:
                return value
        return None

    def first(self, keys: Sequence[str]) -> Any:
        """The first key present; per-layer lists (HunYuan) reduce to their maximum."""
        for key in keys:
            value = self.raw(key)
            if value is not None:
                if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
                    return max(value)
                return value
        return None

    def get(self, field: str, default: Any = None) -> Any:
        value = self.first(self.family[field])
        return default if value is None else value

    def need(self, field: str) -> int:
        value = self.first(self.family[field])
        if value is None:
            keys = ", ".join(self.family[field])
            raise ModelInspectionError(
                f"{self.source}: model_type '{self.model_type}' has none of the keys "
                f"{keys} that hold its {field.replace('_', ' ')}."
            )
        return self._whole(field, value, low=1)

    def count(self, field: str, default: int, low: int = 0) -> int:
        """An optional whole-number field: ``default`` when absent, else checked like ``need``."""
        value = self.first(self.family[field])
        return default if value is None else self._whole(field, value, low)

    def _whole(self, field: str, value: Any, low: int) -> int:
        """Strict: ``true``, ``"8"``, ``8.5``, a dict or a number out of range is an error naming the field."""
        high = MAX_LAYERS if field == "layers" else MAX_SIZE
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = repr(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise ModelInspectionError(
                f"{self.source}: the {field.replace('_', ' ')} ({', '.join(self.family[field])}) is {shown}, "
                f"not a whole number from {low} to {high}."
            )
        return value


def _family(config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The family entry for this config, merged over the defaults ('unknown' when none matches).

    model_type wins over architecture names, because Kimi-K2 reuses DeepSeek's architecture.
    """
    table = load_yaml(FAMILIES_FILE)
    model_types = {str(config.get("model_type") or "")}
    for value in config.values():
        if isinstance(value, Mapping) and value.get("model_type"):
            model_types.add(str(value["model_type"]))
    architectures = set(config.get("architectures") or ())
    families: dict[str, Any] = table["families"]
    match = next((n for n, f in families.items() if model_types & set(f["model_types"])), None)
    if match is None:
        match = next((n for n, f in families.items() if architectures & set(f["architectures"])),
                     None)
    if match is None:
        return "unknown", dict(table["defaults"])
    return match, {**table["defaults"], **families[match]}


# --------------------------------------------------------------------------- layers


def _holds(constraint: Mapping[str, Any], layer: int, fields: _Fields, layers: int) -> bool | None:
    """Whether one layer-selector constraint holds for ``layer``; None when its key is absent."""
    if "first_k_dense" in constraint:
        first_k = fields.raw(constraint["first_k_dense"])
        return None if first_k is None else layer >= int(first_k)
    if "not_in" in constraint:
        listed = fields.raw(constraint["not_in"])
        return None if listed is None else layer not in set(listed)
    if "every" in constraint:
        period = fields.raw(constraint["every"])
        if not period:
            return None
        offset = constraint.get("offset", 0)
        offset = int(fields.raw(offset) or 0) if isinstance(offset, str) else int(offset)
        return layer % int(period) == offset % int(period)
    if "pattern" in constraint:
        pattern = fields.raw(constraint["pattern"])
        if pattern is None:
            return None
        if len(pattern) != layers:
            raise ModelInspectionError(
                f"{fields.source}: {constraint['pattern']} has {len(pattern)} characters but "
                f"the model has {layers} layers."
            )
        return pattern[layer] == constraint["char"]
    raise ModelInspectionError(f"{FAMILIES_FILE}: unknown layer constraint {dict(constraint)}.")


def _select(name: str, fields: _Fields, layers: int,
            otherwise: Callable[[int], bool]) -> set[int]:
    """Layers satisfying every constraint of selector ``name``; ``otherwise`` when none applies."""
    constraints = fields.family.get(name) or []
    chosen = set()
    for layer in range(layers):
        verdicts = [v for v in (_holds(c, layer, fields, layers) for c in constraints)
                    if v is not None]
        if all(verdicts) if verdicts else otherwise(layer):
            chosen.add(layer)
    return chosen


# --------------------------------------------------------------------------- quantization & size


def _quant_spec(config: Mapping[str, Any], fields: _Fields) -> QuantSpec | None:
    raw = fields.raw("quantization_config")
    if not isinstance(raw, Mapping):
        return None
    groups = raw.get("config_groups") or {}
    weights = next((g.get("weights") for g in groups.values()
                    if isinstance(g, Mapping) and g.get("weights")), None) or {}
    block = raw.get("weight_block_size") or weights.get("block_structure")
    ignored = raw.get("ignore") or raw.get("modules_to_not_convert") or []
    weight_type = weights.get("type")
    bits = weights.get("num_bits") or raw.get("bits")
    return QuantSpec(
        method=str(raw.get("quant_method") or raw.get("quant_algo") or "unknown").lower(),
        fmt=raw.get("fmt"),
        weight_block_size=tuple(int(b) for b in block) if block else None,  # type: ignore[arg-type]
        bits=int(bits) if bits else None,
        group_size=int(weights.get("group_size") or raw.get("group_size") or 0) or None,
        scheme=(f"{raw.get('format')}:{weight_type}{bits}" if weight_type else raw.get("format")),
        ignores_attention=any("attn" in str(name) for name in ignored),
    )


def _widths(quant: QuantSpec | None, dtype_bytes: float) -> tuple[float, float]:
    """Bytes per weight of (routed experts, other projections) under the checkpoint's scheme."""
    if quant is None:
        return dtype_bytes, dtype_bytes
    table = load_yaml(FAMILIES_FILE)["quantization_widths"]
    row = table.get(quant.method, {"bytes": None, "covers_non_experts": True})
    width = row["bytes"]
    if width is None:
        width = (quant.bits or dtype_bytes * 8) / 8 + (2 / quant.group_size if quant.group_size else 0)
    covers = row["covers_non_experts"]
    if covers == "unless_ignored":
        covers = not quant.ignores_attention
    return width, width if covers else dtype_bytes


def _exact_weight_bytes(config_path: Path) -> int | None:
    """Checkpoint bytes from the safetensors index (or the single shard), when present."""
    index = config_path.parent / INDEX_NAME
    if index.is_file():
        total = json.loads(index.read_text(encoding="utf-8")).get("metadata", {}).get("total_size")
        if total:
            return int(total)
    single = config_path.parent / SINGLE_WEIGHTS_NAME
    return single.stat().st_size if single.is_file() else None


def _attention_params(fields: _Fields, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    kv_lora, q_lora, nope, rope, v_dim = (fields.raw(k) for k in _MLA_KEYS)
    if kv_lora:
        qk = int(nope) + int(rope)
        q = hidden * q_lora + q_lora * heads * qk if q_lora else hidden * heads * qk
        kv = hidden * (kv_lora + rope) + kv_lora * heads * (nope + v_dim)
        return int(q + kv + heads * v_dim * hidden)
    return 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim


# --------------------------------------------------------------------------- public


def inspect_config(config: Mapping[str, Any], source: Path) -> ModelSpec:
    """Build a :class:`ModelSpec` from an already-parsed config (``source`` names it in errors)."""
    family_name, family = _family(config)
    fields = _Fields(config, family, source)
    if family_name == "unknown" and fields.first(family["experts"]) is None:
        raise ModelInspectionError(
            f"{source}: model_type '{fields.model_type}' (architectures "
            f"{config.get('architectures')}) is not a known MoE family and has none of the "
            f"expert-count keys {', '.join(family['experts'])}."
        )
    hidden, layers, heads = fields.need("hidden"), fields.need("layers"), fields.need("heads")
    experts, top_k = fields.need("experts"), fields.need("top_k")
    moe_inter = fields.need("moe_intermediate")
    dense_inter = fields.count("dense_intermediate", moe_inter)
    kv_heads = fields.count("kv_heads", heads, low=1)
    head_dim = fields.count("head_dim", hidden // heads, low=1)
    vocab = fields.count("vocab", 0)
    shared_inter = (fields.count("shared_intermediate", 0)
                    or fields.count(family["shared_intermediate_fallback"], 0))
    shared = family["shared_experts_fixed"]
    if shared is None:
        shared = fields.get("shared_experts", 1 if fields.first(family["shared_intermediate"]) else 0)
    shared = int(shared) if shared_inter else 0

    moe = _select("moe_layers", fields, layers, lambda i: True)
    attention = _select("attention_layers", fields, layers, lambda i: True)
    dense = _select("dense_layers", fields, layers, lambda i: i not in moe)
    mamba = _select("mamba_layers", fields, layers,
                    lambda i: bool(family["hybrid"]) and i not in attention)
    extra = fields.count("extra_layers", 0)

    dtype = str(fields.get("dtype", "bfloat16"))
    dtype_bytes = float(load_yaml(FAMILIES_FILE)["dtype_bytes"].get(dtype, 2))
    quant = _quant_spec(config, fields)
    matrices = int(family["ffn_matrices"])
    d_inner = (int(fields.get("mamba_heads", 0)) * int(fields.get("mamba_head_dim", 0))
               or int(fields.get("mamba_expand", 2)) * hidden)

    routed = (len(moe) + extra) * experts * matrices * hidden * moe_inter
    projections = ((len(attention) + extra) * _attention_params(fields, hidden, heads, kv_heads, head_dim)
                   + (len(moe) + extra) * shared * matrices * hidden * shared_inter
                   + len(dense) * matrices * hidden * dense_inter
                   + len(mamba) * 3 * hidden * d_inner)
    tied = bool(fields.raw("tie_word_embeddings"))
    unquantized = vocab * hidden * (1 if tied else 2) + (len(moe) + extra) * hidden * experts
    expert_width, other_width = _widths(quant, dtype_bytes)
    estimate = int(routed * expert_width + projections * other_width + unquantized * dtype_bytes)
    exact = _exact_weight_bytes(source)

    auto_map = "auto_map" in config or any(
        isinstance(v, Mapping) and "auto_map" in v for v in config.values())
    return ModelSpec(
        source=str(source),
        family=family_name,
        model_type=fields.model_type,
        architecture=str((config.get("architectures") or [""])[0]),
        num_experts=experts,
        experts_per_token=top_k,
        num_shared_experts=shared,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter if shared else 0,
        dense_intermediate_size=dense_inter if dense else 0,
        hidden_size=hidden,
        num_layers=layers,
        moe_layers=len(moe),
        dense_layers=len(dense),
        attention_layers=len(attention),
        mamba_layers=len(mamba),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        dtype=dtype,
        quantization=quant,
        param_count=routed + projections + unquantized,
        weight_bytes=exact if exact is not None else estimate,
        weight_bytes_exact=exact is not None,
        needs_trust_remote_code=auto_map and (family_name == "unknown"
                                              or not family["config_in_transformers"]),
    )


def inspect_model(path: str | os.PathLike[str]) -> ModelSpec:
    """Read the model at ``path`` (folder, config.json, HF cache entry or cached ``org/name``)."""
    config_path = resolve_config_path(path)
    try:
        with open(config_path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise ModelInspectionError(f"{config_path} is larger than {MAX_CONFIG_BYTES >> 20} MiB, too large for a config.json.")
        config = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInspectionError(f"{config_path} is not readable JSON ({exc}).") from None
    except RecursionError:
        raise ModelInspectionError(f"{config_path} is nested too deeply to be a config.json.") from None
    if not isinstance(config, Mapping):
        raise ModelInspectionError(f"{config_path} holds a JSON {type(config).__name__}, not an object.")
    try:
        return inspect_config(config, config_path)
    except ModelInspectionError:
        raise
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        # The strict readers above cover the fields every family has; the family-specific extras (MLA
        # ranks, layer patterns, quantization blocks) are used as they come, so a wrong type there is
        # reported here, naming the file, instead of surfacing as a traceback.
        raise ModelInspectionError(f"{config_path}: a field holds a value of the wrong type or range ({exc}).") from None
