"""The nightly MoE serving suite: one test per matrix config and check, one server boot per config.

The configs come from ``model_matrix.yaml`` (or ``--moe-matrix PATH``); the plugin parametrizes
``moe_config`` × ``moe_check`` (benchmark, accuracy, agreement), boots each config's server once
(``moe_server``), and records every outcome in the results files.  Select with markers (``-m accuracy``,
``-m tp8``), ``-k``, or one config with all its checks: ``--moe-config 'Qwen3-235B::TP8_EP2_auto'``.
"""


def test_moe(moe_run):
    result = moe_run()
    assert result.passed, result.verdict
