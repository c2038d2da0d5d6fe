"""The benchmark: one batch of random token ids, streamed, measured like SGLang's ``bench_one_batch_server``.

Metric definitions (SGLang ``run_one_case``; seed 001's row 7.59 s / 15933.87 / 69.81 / 14.32 ms comes out of
them, see test_bench.py):
    latency            = wall time of the whole streaming request
    ttft               = time to the first streamed token
    input_throughput   = batch_size * input_len / ttft
    output_throughput  = batch_size * output_len / (latency - ttft)
    itl_ms             = 1000 * batch_size / output_throughput
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from pytest_moe.engines import Engine
from pytest_moe.configs import BenchSpec

#: Token ids are drawn from this range: valid in every vocabulary we serve, tiny test models included.
_TOKEN_RANGE = (10, 500)
#: Decode steps captured in the decode trace: a handful shows the step's kernels; tracing all 512 steps
#: only makes multi-hundred-MB traces (and takes minutes on CPU TP2).
PROFILE_DECODE_STEPS = 16
#: Trace files engines write (torch profiler, gzipped or not).
_TRACE_GLOBS = ("*.json.gz", "*.json", "*.pt.trace.json*", "*.txt")


class BenchmarkError(RuntimeError):
    """The server answered, but not with a complete benchmark run."""


@dataclass(frozen=True)
class BenchResult:
    batch_size: int
    input_len: int
    output_len: int
    latency_s: float
    ttft_s: float
    input_throughput_tok_per_s: float
    output_throughput_tok_per_s: float
    itl_ms: float

    def record(self) -> dict[str, float | int]:
        """The seed's fields, rounded as the seed prints them."""
        return {key: round(value, 4 if key == "ttft_s" else 2) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


def compute_metrics(batch_size: int, input_len: int, output_len: int, latency_s: float, ttft_s: float) -> BenchResult:
    """SGLang's formulas, exactly (see the module docstring)."""
    if not 0 < ttft_s < latency_s:
        raise BenchmarkError(f"impossible timing: ttft {ttft_s:.4f} s, latency {latency_s:.4f} s")
    output_throughput = batch_size * output_len / (latency_s - ttft_s)
    return BenchResult(
        batch_size=batch_size,
        input_len=input_len,
        output_len=output_len,
        latency_s=latency_s,
        ttft_s=ttft_s,
        input_throughput_tok_per_s=batch_size * input_len / ttft_s,
        output_throughput_tok_per_s=output_throughput,
        itl_ms=1000 * batch_size / output_throughput,
    )


def random_prompts(bench: BenchSpec, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(*_TOKEN_RANGE) for _ in range(bench.input_len)] for _ in range(bench.batch_size)]


def stream_completion(base_url: str, served_name: str, prompts: list[list[int]], max_tokens: int,
                      timeout_s: float = 1800) -> tuple[float, float, int]:
    """One streaming ``/v1/completions`` request; returns (latency, ttft, completion tokens)."""
    body = {
        "model": served_name, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        with requests.post(f"{base_url}/v1/completions", json=body, stream=True, timeout=(10, timeout_s)) as resp:
            if resp.status_code != 200:
                raise BenchmarkError(f"HTTP {resp.status_code} from {base_url}/v1/completions: {resp.text[:300]}")
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise BenchmarkError(f"server error mid-stream: {json.dumps(chunk['error'])[:300]}")
                if ttft is None and any(choice.get("text") for choice in chunk.get("choices", [])):
                    ttft = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"].get("completion_tokens", 0)
    except requests.RequestException as exc:
        raise BenchmarkError(f"request to {base_url}/v1/completions failed: {exc}") from exc
    latency = time.perf_counter() - start
    if ttft is None:
        raise BenchmarkError(f"{base_url}/v1/completions streamed no token")
    return latency, ttft, tokens


def run_benchmark(base_url: str, served_name: str, bench: BenchSpec, seed: int = 0) -> BenchResult:
    """Warm up, then measure one batch; fresh random prompts each time so no prefix cache helps."""
    rng = random.Random(seed)
    for _ in range(bench.warmup):
        stream_completion(base_url, served_name, random_prompts(bench, rng), max_tokens=16)
    latency, ttft, tokens = stream_completion(base_url, served_name, random_prompts(bench, rng), bench.output_len)
    expected = bench.batch_size * bench.output_len
    if tokens != expected:
        raise BenchmarkError(f"server produced {tokens} completion tokens, expected {expected} (ignore_eos ignored?)")
    return compute_metrics(bench.batch_size, bench.input_len, bench.output_len, latency, ttft)


def profile_stages(engine: Engine, base_url: str, served_name: str, bench: BenchSpec,
                   launch_dir: Path | None, out_dir: Path, seed: int = 1) -> dict[str, str]:
    """Save an extend (prefill) trace and a decode trace; returns {stage: directory}.

    Extend: one request with ``max_tokens=1``. Decode: the same prompt again with ``PROFILE_DECODE_STEPS`` tokens —
    its prefill hits the prefix cache, so the trace is dominated by decode steps.  Engines that write traces
    where they were told at launch (vLLM) get their new files moved into the stage directory.
    """
    prompts = random_prompts(bench, random.Random(seed))
    saved: dict[str, str] = {}
    for stage, max_tokens in (("extend", 1), ("decode", min(PROFILE_DECODE_STEPS, bench.output_len))):
        stage_dir = out_dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        source = launch_dir or stage_dir
        before = _traces(source)
        engine.start_profile(base_url, stage_dir, num_steps=max_tokens)
        stream_completion(base_url, served_name, prompts, max_tokens)
        engine.stop_profile(base_url)
        new = _wait_for_new_traces(source, before)
        if source != stage_dir:
            for path in new:
                shutil.move(str(path), stage_dir / path.name)
        saved[stage] = str(stage_dir)
    return saved


def _traces(directory: Path) -> set[Path]:
    return {p for pattern in _TRACE_GLOBS for p in directory.glob(pattern)} if directory.exists() else set()


def _wait_for_new_traces(directory: Path, before: set[Path], timeout_s: float = 120) -> list[Path]:
    """Traces are written after ``stop_profile`` returns on some engines: wait until the set stops growing."""
    deadline = time.monotonic() + timeout_s
    last: set[Path] = set()
    while time.monotonic() < deadline:
        new = _traces(directory) - before
        if new and new == last:
            return sorted(new)
        last = new
        time.sleep(1.0)
    if not last:
        raise BenchmarkError(f"profiling wrote no trace into {directory} within {timeout_s:g} s")
    return sorted(last)
