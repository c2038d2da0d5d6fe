"""Seed 003 in the suite: each config's fused-MoE kernel shape, its tuned kernel config, the kernel check.

``naming`` (tuned file names and where engines find them), ``shapes`` (config → shape), ``check`` (the
timed engine op, run by ``worker`` in a child process), ``table`` (the ``kernels`` command), ``plugin``
(the ``moe_kernel`` fixture and its results). See docs/kernels.md.
"""
