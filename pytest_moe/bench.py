"""The benchmark: one batch of random token ids, streamed, measured like SGLang's ``bench_one_batch_server``.

Metric definitions (SGLang 0.5.23 ``sglang/benchmark/one_batch_server.py``, ``run_one_case`` with ``ignore_eos``,
the formulas behind seed 001's row; test_bench.py checks them from raw timestamps):
    latency            = wall time of the whole streaming request
    ttft               = time to the first streamed token of the request that started last (``last_ttft``)
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
from typing import Callable

import requests

from pytest_moe.configs import BenchSpec
from pytest_moe.engines import Engine

#: Token ids are drawn from this range: valid in every vocabulary we serve, tiny test models included.
_TOKEN_RANGE = (10, 500)
#: Tokens of each warm-up request: enough to run the decode path once before measuring.
_WARMUP_TOKENS = 16
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


@dataclass(frozen=True)
class StreamTiming:
    """What one streamed batch looked like, per request (the choice ``index``), from raw chunk arrivals.

    Why per request and per token: text is not a token count (a token may decode to nothing: special
    tokens, half a UTF-8 character, random weights), and the batch's TTFT is the first token of the
    request that started last (SGLang ``bench_one_batch_server``: ``last_ttft``).
    """

    latency_s: float
    first_token_s: tuple[float, ...]
    tokens: tuple[int, ...]
    first_chunk_tokens: tuple[int, ...]
    largest_later_chunk: tuple[int, ...]
    usage_completion_tokens: int | None

    @property
    def ttft_s(self) -> float:
        return max(self.first_token_s)


def stream_completion(base_url: str, served_name: str, prompts: list[list[int]], max_tokens: int,
                      timeout_s: float = 1800, clock: Callable[[], float] = time.perf_counter) -> StreamTiming:
    """One streaming ``/v1/completions`` request, counting tokens per chunk.

    ``return_token_ids`` makes both engines put each chunk's new token ids in its choice (vLLM 0.32
    ``entrypoints/openai/completion/serving.py``, SGLang 0.5.23 ``srt/entrypoints/openai/serving_completions.py``).
    ``clock`` is read once at the start, once per chunk and once at the end, so a test can replay a stream
    on a deterministic clock.
    """
    body = {
        "model": served_name, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True,
    }
    url = f"{base_url}/v1/completions"
    first: dict[int, float] = {}
    tokens: dict[int, int] = {}
    first_chunk: dict[int, int] = {}
    later_chunk: dict[int, int] = {}
    usage = None
    start = clock()
    try:
        with requests.post(url, json=body, stream=True, timeout=(10, timeout_s)) as resp:
            if resp.status_code != 200:
                raise BenchmarkError(f"HTTP {resp.status_code} from {url}: {resp.text[:300]}")
            for line in resp.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = clock() - start
                try:
                    chunk = json.loads(line[6:])
                except ValueError:
                    raise BenchmarkError(f"{url} streamed a line that is not JSON: {line[:200]!r}") from None
                if "error" in chunk:
                    raise BenchmarkError(f"server error mid-stream from {url}: {json.dumps(chunk['error'])[:300]}")
                for choice in chunk.get("choices") or ():
                    index, ids = choice.get("index", 0), choice.get("token_ids")
                    if ids is None:
                        raise BenchmarkError(f"{url} streamed a chunk without token_ids (return_token_ids ignored?): "
                                             "tokens cannot be counted, so no figure would be right")
                    if not ids:
                        continue
                    if index not in first:
                        first[index], first_chunk[index], later_chunk[index] = now, len(ids), 0
                    else:
                        later_chunk[index] = max(later_chunk[index], len(ids))
                    tokens[index] = tokens.get(index, 0) + len(ids)
                if chunk.get("usage"):
                    usage = chunk["usage"].get("completion_tokens")
    except requests.RequestException as exc:
        raise BenchmarkError(f"request to {url} failed: {exc}") from exc
    latency = clock() - start
    if not first:
        raise BenchmarkError(f"{url} streamed no token")
    order = sorted(first)
    return StreamTiming(
        latency_s=latency,
        first_token_s=tuple(first[i] for i in order),
        tokens=tuple(tokens[i] for i in order),
        first_chunk_tokens=tuple(first_chunk[i] for i in order),
        largest_later_chunk=tuple(later_chunk[i] for i in order),
        usage_completion_tokens=usage,
    )


def check_stream(timing: StreamTiming, batch_size: int, output_len: int) -> None:
    """Refuse a stream whose figures cannot be right, with the reason; a wrong figure must not be a success.

    * every one of ``batch_size`` requests streamed exactly ``output_len`` tokens (``ignore_eos``), and the
      final usage agrees;
    * the decode window holds the decode: a request's first chunk may carry no more tokens than its later
      chunks do (the engine's stream interval), else the stream was buffered (a proxy, a non-streaming
      server) and "latency - TTFT" would credit the whole decode to an instant.
    """
    expected = batch_size * output_len
    if len(timing.tokens) != batch_size:
        raise BenchmarkError(f"the stream carried tokens for {len(timing.tokens)} requests, expected {batch_size}")
    wrong = [(i, n) for i, n in enumerate(timing.tokens) if n != output_len]
    if wrong:
        raise BenchmarkError(f"request {wrong[0][0]} streamed {wrong[0][1]} tokens, expected {output_len} "
                             "(ignore_eos ignored, or chunks lost)")
    if timing.usage_completion_tokens is not None and timing.usage_completion_tokens != expected:
        raise BenchmarkError(f"the server reports {timing.usage_completion_tokens} completion tokens, "
                             f"the stream carried {expected}")
    for i, (head, later) in enumerate(zip(timing.first_chunk_tokens, timing.largest_later_chunk)):
        if head > max(later, 1):
            window_ms = 1000 * (timing.latency_s - timing.ttft_s)
            raise BenchmarkError(
                f"request {i} got {head} of its {output_len} tokens in its first chunk, more than one chunk of the "
                f"stream carries ({max(later, 1)}): the decode window ({window_ms:.2f} ms) does not hold the decode "
                "(is the stream buffered?)")


def run_benchmark(base_url: str, served_name: str, bench: BenchSpec, seed: int = 0) -> BenchResult:
    """Warm up, then measure one batch; fresh random prompts each time so no prefix cache helps.

    Raises ``BenchmarkError`` (recorded as the config's failure) when the stream's figures cannot be right.
    """
    rng = random.Random(seed)
    for _ in range(bench.warmup):
        warm = stream_completion(base_url, served_name, random_prompts(bench, rng), max_tokens=_WARMUP_TOKENS)
        check_stream(warm, bench.batch_size, _WARMUP_TOKENS)
    timing = stream_completion(base_url, served_name, random_prompts(bench, rng), bench.output_len)
    check_stream(timing, bench.batch_size, bench.output_len)
    return compute_metrics(bench.batch_size, bench.input_len, bench.output_len, timing.latency_s, timing.ttft_s)


def profile_stages(engine: Engine, base_url: str, served_name: str, bench: BenchSpec,
                   launch_dir: Path | None, out_dir: Path, seed: int = 1, trace_timeout_s: float = 120) -> dict[str, str]:
    """Save an extend (prefill) trace and a decode trace; returns {stage: directory}.

    Extend: one request with ``max_tokens=1``. Decode: the same prompt again with ``PROFILE_DECODE_STEPS`` tokens —
    its prefill hits the prefix cache, so the trace is dominated by decode steps.  The engine says where its
    traces land (``Engine.trace_dir``): files written where it was told at launch (vLLM) are moved into the
    stage directory; SGLang writes into the stage directory itself.
    """
    prompts = random_prompts(bench, random.Random(seed))
    saved: dict[str, str] = {}
    for stage, max_tokens in (("extend", 1), ("decode", min(PROFILE_DECODE_STEPS, bench.output_len))):
        stage_dir = out_dir / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        source = engine.trace_dir(launch_dir, stage_dir)
        before = _traces(source)
        engine.start_profile(base_url, stage_dir, num_steps=max_tokens)
        stream_completion(base_url, served_name, prompts, max_tokens)
        engine.stop_profile(base_url)
        new = _wait_for_new_traces(source, before, trace_timeout_s)
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
