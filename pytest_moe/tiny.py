"""Tiny random-weight MoE checkpoints for the CPU smoke matrix.

Why: CI and a developer's laptop have no GPU and no hub access, yet the whole pipeline (launch, readiness,
benchmark, teardown, results) must run against a *real* engine every time.  vLLM's CPU build serves
small MoE checkpoints, so we build them locally with ``transformers`` (random weights) and a tokenizer
trained on the spot with ``tokenizers`` — nothing is ever downloaded.

The shapes are data (``data/tiny_models.yaml``): each entry names a transformers config class and its
keyword arguments.  ``head_dim`` stays 64 because vLLM's CPU attention rejects 16 at the first request.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_moe.datafiles import load_yaml

#: Prefix of a matrix model path that names a tiny checkpoint of ``tiny_models.yaml``.
TINY_PREFIX = "tiny:"
#: Written last, so a directory holding it is a complete checkpoint (a killed build is rebuilt).
_DONE_MARKER = ".pytest-moe-complete"
_VOCAB_SIZE = 512
_TOKENIZER_CORPUS_LINES = 2000


@dataclass(frozen=True)
class TinyModelSpec:
    """One tiny checkpoint recipe from ``tiny_models.yaml``."""

    name: str
    config_class: str
    config: dict[str, Any]


def tiny_model_specs() -> dict[str, TinyModelSpec]:
    """Every recipe in the packaged ``tiny_models.yaml``, by name."""
    raw = load_yaml("tiny_models.yaml")
    return {
        name: TinyModelSpec(name=name, config_class=entry["config_class"], config=dict(entry["config"]))
        for name, entry in raw.items()
    }


def default_models_dir() -> Path:
    """Where tiny checkpoints live: ``$PYTEST_MOE_TINY_DIR`` or ``.tiny-models`` in the working directory."""
    return Path(os.environ.get("PYTEST_MOE_TINY_DIR", ".tiny-models")).resolve()


def resolve_model_path(path: str, build: bool = True) -> str:
    """``tiny:NAME`` is a local tiny checkpoint, built once when ``build``; anything else goes to the engine as is."""
    if not path.startswith(TINY_PREFIX):
        return path
    name = path[len(TINY_PREFIX):]
    return str(ensure_tiny_model(name) if build else default_models_dir() / name)


def ensure_tiny_model(name: str, root: Path | None = None) -> Path:
    """Return the directory of tiny checkpoint ``name``, building it once (safe across xdist workers)."""
    specs = tiny_model_specs()
    if name not in specs:
        raise KeyError(f"unknown tiny model {name!r}; known: {', '.join(sorted(specs))}")
    root = root or default_models_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (target / _DONE_MARKER).exists():
            _build(specs[name], target)
    return target


def _build(spec: TinyModelSpec, target: Path) -> None:
    """Write config, random weights and a locally trained tokenizer into ``target``."""
    import torch
    import transformers

    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config_cls = getattr(transformers, spec.config_class)
    config = config_cls(vocab_size=_VOCAB_SIZE, **spec.config)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(target)
    _train_tokenizer().save_pretrained(target)
    generation = target / "generation_config.json"
    if generation.exists():
        # Random weights would otherwise inherit sampling defaults; the benchmark wants greedy decoding.
        generation.write_text(json.dumps({"do_sample": False}))
    (target / _DONE_MARKER).write_text("ok\n")


def _train_tokenizer():
    """A byte-level BPE tokenizer trained on generated text, so no vocabulary is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["expert", "router", "token", "layer", "tensor", "parallel", "batch", "decode", "prefill", "cache"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i}" for i in range(_TOKENIZER_CORPUS_LINES)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
