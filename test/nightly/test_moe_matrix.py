"""The nightly MoE serving suite: one benchmark test per matrix config.

The configs come from ``model_matrix.yaml`` (or ``--moe-matrix PATH``); the plugin parametrizes
``moe_config``, boots the server (``moe_server``), and records every outcome in the results files.
Select with markers (``-m tp8``), ``-k``, or exactly with ``--moe-config 'Qwen3-235B::TP8_EP2_auto'``.
"""


def test_benchmark(moe_config, moe_bench):
    result = moe_bench()
    assert result.batch_size == moe_config.bench.batch_size
    assert result.output_len == moe_config.bench.output_len
    assert result.output_throughput_tok_per_s > 0
