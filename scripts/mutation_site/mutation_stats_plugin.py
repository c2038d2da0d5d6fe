"""A pytest plugin for mutation runs (``bench_mutation.sh`` names it in ``PYTEST_PLUGINS``): while mutmut takes its
stats, the environment names the test running now, so a child process it starts can credit that test with the
functions it reaches (``sitecustomize.py`` here).

Why not pytest's own ``PYTEST_CURRENT_TEST``: a test that runs pytest in this process (pytester's in-process
runs) overwrites it with its inner tests' ids, and the servers those start would credit tests that do not exist.
Only the outermost session of the first process sets the name; every other session and process leaves it.
"""

import os

import pytest

VAR = "PYTEST_MOE_MUTATION_TEST"
#: Set here: this process was started by a test of an outer session (a pytester subprocess), not by mutmut.
_INHERITED = VAR in os.environ
_outer: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _outer
    if _outer is None:
        _outer = config


def pytest_unconfigure(config: pytest.Config) -> None:
    global _outer
    if config is _outer:
        _outer = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if not _INHERITED and item.config is _outer and os.environ.get("MUTANT_UNDER_TEST") == "stats":
        os.environ[VAR] = item.nodeid
    try:
        return (yield)
    finally:
        if not _INHERITED and item.config is _outer:
            os.environ.pop(VAR, None)
