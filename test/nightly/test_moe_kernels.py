"""The nightly kernel check (seed 003): one test per matrix config, no server.

Times the engine's own fused-MoE op for the config's shape at the matrix's ``defaults.kernel``
batch sizes and records µs per call under ``checks.kernel`` of the config's results entry; a GPU
config without a tuned kernel config gets a warning in its entry and in the end-of-run summary.
Select with ``-m kernel`` (or leave it out with ``-m 'not kernel'``).
"""

import pytest

pytestmark = pytest.mark.kernel


def test_kernel(moe_config, moe_kernel):
    result = moe_kernel()
    assert [row.batch_size for row in result.rows] == list(result_batch_sizes(moe_config))
    assert all(row.us_per_call > 0 for row in result.rows)


def result_batch_sizes(moe_config):
    from pytest_moe.kernels.check import KernelSettings
    from pytest_moe.matrix import load_matrix

    return KernelSettings.from_spec(load_matrix(moe_config.matrix_path).kernel, moe_config.matrix_path).batch_sizes
