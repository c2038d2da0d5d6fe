"""Agreement (seed 004's oracle): every config of a model must answer fixed greedy prompts like its reference.

Why token ids and not text: two kernels can differ in one token whose text is the same (or empty, for a
byte-level piece the detokenizer holds back); ids show it.  Why greedy with ``ignore_eos``: every config then
generates the same number of tokens, so "first divergence at position p" is comparable across configs.

The reference's outputs are files under ``<results>/agreement/<model>/<config>.json``, written whenever the
reference config's check runs, so ``--moe-config`` on one config compares with the last good reference run.
"""

from __future__ import annotations

import json
from pathlib import Path

import requests

from pytest_moe.bench import BenchmarkError
from pytest_moe.checks.base import Check, CheckContext, CheckSkipped
from pytest_moe.entries import AgreementResult, CheckFailure, CheckStatus, Divergence
from pytest_moe.matrix import file_stem
from pytest_moe.results import now_iso

#: Fixed prompts: plain text every tokenizer handles, mixing prose, code and numbers so different experts route.
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Mixture-of-experts models route each token to",
    "1, 1, 2, 3, 5, 8, 13,",
    "Once upon a time, in a small village,",
    "The tensor parallel size and the expert parallel size",
    "SELECT name FROM users WHERE",
    "Water boils at a temperature of",
)


def outputs_path(results_dir: Path, model: str, config: str) -> Path:
    return results_dir / "agreement" / file_stem(model) / f"{file_stem(config)}.json"


def compare(reference: list[list[int]], got: list[list[int]]) -> tuple[float, float, Divergence | None]:
    """Exact-match share, mean matching-prefix length (tokens), and the first divergence (lowest prompt)."""
    prefixes, first = [], None
    for index, (ref, out) in enumerate(zip(reference, got)):
        prefix = next((i for i, (a, b) in enumerate(zip(ref, out)) if a != b), min(len(ref), len(out)))
        prefixes.append(prefix)
        if first is None and (prefix < len(ref) or len(ref) != len(out)):
            first = Divergence(
                prompt=index, prompt_text=PROMPTS[index], position=prefix,
                expected_token=ref[prefix] if prefix < len(ref) else None,
                got_token=out[prefix] if prefix < len(out) else None,
            )
    exact = sum(1 for ref, out in zip(reference, got) if ref == out) / len(reference)
    return exact, sum(prefixes) / len(prefixes), first


class AgreementCheck(Check):
    name = "agreement"
    help = "agreement: same greedy token ids as the model's reference config (seed 004's oracle)"
    failure_type = CheckFailure.DISAGREEMENT

    def run(self, ctx: CheckContext) -> AgreementResult:
        spec = ctx.cfg.agreement
        tokens = generate(ctx, spec.max_tokens)
        own = outputs_path(ctx.results_dir, ctx.cfg.model, ctx.cfg.name)
        own.parent.mkdir(parents=True, exist_ok=True)
        own.write_text(json.dumps({"config": ctx.cfg.id, "written": now_iso(), "prompts": list(PROMPTS),
                                   "token_ids": tokens}, indent=1) + "\n", encoding="utf-8")
        reference = outputs_path(ctx.results_dir, ctx.cfg.model, spec.reference)
        if ctx.cfg.is_reference:
            ref_tokens = tokens
        elif not reference.exists():
            raise CheckSkipped(f"no outputs of the reference {ctx.cfg.model}::{spec.reference} in {reference.parent} "
                               f"(run it first: it sets what {ctx.cfg.id} is compared with)")
        else:
            ref_data = json.loads(reference.read_text(encoding="utf-8"))
            if ref_data.get("prompts") != list(PROMPTS):
                raise CheckSkipped(f"the reference outputs in {reference} answer other prompts: rerun the reference")
            ref_tokens = ref_data["token_ids"]
        exact, prefix, first = compare(ref_tokens, tokens)
        passed = exact >= spec.threshold
        text = f"{exact:.0%} of {len(PROMPTS)} prompts match {ctx.cfg.model}::{spec.reference} exactly (threshold {spec.threshold:.0%})"
        if first is not None:
            text += (f"; first divergence: prompt {first.prompt} ({first.prompt_text!r}) at token {first.position}: "
                     f"expected {first.expected_token}, got {first.got_token}")
        return AgreementResult(
            status=CheckStatus.PASSED if passed else CheckStatus.FAILED, reference=spec.reference,
            exact_match=round(exact, 4), mean_prefix=round(prefix, 2), first_divergence=first,
            threshold=spec.threshold, outputs_file=str(own), verdict=text,
        )


def generate(ctx: CheckContext, max_tokens: int) -> list[list[int]]:
    """Greedy token ids per prompt (vLLM's ``return_token_ids``; SGLang returns them the same way)."""
    body = {"model": ctx.served_name, "prompt": list(PROMPTS), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    try:
        resp = requests.post(f"{ctx.base_url}/v1/completions", json=body, timeout=(10, 600))
    except requests.RequestException as exc:
        raise BenchmarkError(f"agreement request to {ctx.base_url}/v1/completions failed: {exc}") from exc
    if resp.status_code != 200:
        raise BenchmarkError(f"HTTP {resp.status_code} from {ctx.base_url}/v1/completions: {resp.text[:300]}")
    choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
    if any(c.get("token_ids") is None for c in choices):
        raise BenchmarkError(f"{ctx.base_url}/v1/completions returned no token_ids (engine ignores return_token_ids)")
    return [list(c["token_ids"]) for c in choices]
