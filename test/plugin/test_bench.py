"""The benchmark formulas are SGLang's bench_one_batch_server's; seed 001's row must come out of them."""

import pytest

from pytest_moe.bench import BenchmarkError, compute_metrics


def test_seed_001_row_comes_out_of_the_formulas():
    # Seed 001: latency 7.59 s, input throughput 15933.87, output throughput 69.81, ITL 14.32 ms (bs 1, 4096 in, 512 out).
    # Invert two of them to get the raw timings, then every printed figure must round to the seed's.
    ttft = 4096 / 15933.87
    latency = ttft + 512 / 69.81
    result = compute_metrics(1, 4096, 512, latency, ttft)
    record = result.record()
    assert record["latency_s"] == 7.59
    assert record["input_throughput_tok_per_s"] == 15933.87
    assert record["output_throughput_tok_per_s"] == 69.81
    assert record["itl_ms"] == 14.32


def test_batch_size_scales_throughput_and_itl():
    one = compute_metrics(1, 100, 10, latency_s=2.0, ttft_s=1.0)
    four = compute_metrics(4, 100, 10, latency_s=2.0, ttft_s=1.0)
    assert four.input_throughput_tok_per_s == 4 * one.input_throughput_tok_per_s
    assert four.output_throughput_tok_per_s == 40.0
    assert four.itl_ms == pytest.approx(100.0)  # 1000 * bs / output_throughput


@pytest.mark.parametrize("latency, ttft", [(1.0, 1.0), (1.0, 0.0), (1.0, 2.0)])
def test_impossible_timings_are_rejected(latency, ttft):
    with pytest.raises(BenchmarkError, match="impossible timing"):
        compute_metrics(1, 10, 10, latency, ttft)
