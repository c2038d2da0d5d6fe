"""The benchmark sweep: seed 001's measurement at each of the matrix's ``batch_sizes`` on one server."""

from __future__ import annotations

import requests

from pytest_moe.bench import BenchmarkError, profile_stages, run_benchmark
from pytest_moe.checks.base import Check, CheckContext
from pytest_moe.entries import BenchmarkResult, CheckStatus


class BenchmarkCheck(Check):
    name = "benchmark"
    help = "benchmark: the latency/throughput sweep over the matrix's batch sizes"

    def run(self, ctx: CheckContext) -> BenchmarkResult:
        """One row per batch size; the engine's cache is flushed between cases where it has the endpoint.

        Why flush: a later case must not reuse the KV cache of an earlier one (SGLang's bench_one_batch_server
        flushes too); engines without the endpoint get fresh random prompts per case, which no cache can serve.
        """
        # Traces first, from a server that has served one warm-up only: the profiler's export cost grows with
        # what the worker did before (a vLLM CPU TP2 worker profiled after the sweep was OOM-killed exporting).
        profiles = {}
        if ctx.profile_dir is not None:
            profiles = profile_stages(ctx.engine, ctx.base_url, ctx.served_name, ctx.cfg.bench.at(ctx.cfg.bench.sweep[0]),
                                      launch_dir=ctx.launch_profile_dir, out_dir=ctx.profile_dir)
        rows = []
        for batch_size in ctx.cfg.bench.sweep:
            _flush_cache(ctx)
            rows.append(run_benchmark(ctx.base_url, ctx.served_name, ctx.cfg.bench.at(batch_size)).record())
        return BenchmarkResult(status=CheckStatus.PASSED, rows=rows, profiles=profiles)


def _flush_cache(ctx: CheckContext) -> None:
    path = ctx.engine.spec.flush_cache_path
    if path is None:
        return
    try:
        resp = requests.post(ctx.base_url + path, timeout=60)
    except requests.RequestException as exc:
        raise BenchmarkError(f"cache flush {ctx.base_url}{path} failed: {exc}") from exc
    if resp.status_code != 200:
        raise BenchmarkError(f"cache flush {ctx.base_url}{path} answered HTTP {resp.status_code}: {resp.text[:200]}")
