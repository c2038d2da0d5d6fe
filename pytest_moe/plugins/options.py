"""Options with pytest-timeout's precedence: command line > environment variable > ini file > default.

Why three sources: a nightly job sets the matrix once in ``pytest.ini``, CI overrides the results directory
through the environment, and a developer reruns one config from the command line.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_moe.args import MAX_SECONDS, bounded_int, seconds
from pytest_moe.history.plugin import add_history_options
from pytest_moe.matrix import MAX_NODES
from pytest_moe.results import DEFAULT_RESULTS_DIR
from pytest_moe.retries import MAX_RETRIES
from pytest_moe.runner import RunOptions

DEFAULT_MATRIX = "model_matrix.yaml"


@dataclass(frozen=True)
class Setting:
    """One option that may come from the command line, the environment or the ini file."""

    dest: str
    env: str
    ini: str
    help: str


MATRIX = Setting("moe_matrix", "PYTEST_MOE_MATRIX", "moe_matrix", f"matrix file (default: {DEFAULT_MATRIX} in the rootdir)")
RESULTS_DIR = Setting("moe_results_dir", "PYTEST_MOE_RESULTS_DIR", "moe_results_dir",
                      f"where results JSON, logs and traces go (default: {DEFAULT_RESULTS_DIR})")
SERVER_TIMEOUT = Setting("moe_server_timeout", "PYTEST_MOE_SERVER_TIMEOUT", "moe_server_timeout",
                         "server launch timeout in seconds for every config (default: the matrix's, 2000)")


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe", "pytest-moe: MoE serving matrix")
    group.addoption("--moe-matrix", metavar="PATH", help=MATRIX.help + f"; env {MATRIX.env}, ini {MATRIX.ini}")
    group.addoption("--moe-config", metavar="ID", action="append", default=[],
                    help="run only this config id, all its checks, e.g. 'Qwen3-235B::TP8_EP2_auto' (repeatable)")
    group.addoption("--moe-results-dir", metavar="DIR", help=RESULTS_DIR.help + f"; env {RESULTS_DIR.env}, ini {RESULTS_DIR.ini}")
    group.addoption("--moe-server-timeout", metavar="S", type=seconds(0, allow_zero=False), default=None,
                    help=SERVER_TIMEOUT.help + f"; env {SERVER_TIMEOUT.env}, ini {SERVER_TIMEOUT.ini}")
    group.addoption("--moe-profile", action="store_true", help="save extend and decode traces per config")
    group.addoption("--moe-cooldown", metavar="S", type=seconds(), default=None,
                    help="minimum pause after each teardown (default: 0 after an NVML memory wait, else 5)")
    group.addoption("--moe-grace", metavar="S", type=seconds(), default=10.0,
                    help="seconds between SIGTERM and SIGKILL at teardown (default: 10)")
    group.addoption("--moe-no-preflight", action="store_true",
                    help="boot configs that preflight predicts to fail (to check a rule against the engine)")
    group.addoption("--moe-progress-interval", metavar="S", type=seconds(0, allow_zero=False), default=30.0,
                    help="seconds between progress lines while a server loads (default: 30)")
    group.addoption("--moe-retries", metavar="N", type=bounded_int(0, MAX_RETRIES), default=None,
                    help="retries of a failed launch, for the types the retry policy retries (default: the policy's)")
    group.addoption("--moe-shard", metavar="K/N", default=None,
                    help="run only shard K of N, balanced by expected GPU-seconds (e.g. 1/4)")
    group.addoption("--moe-durations", metavar="JSON", default=None,
                    help="measured seconds per config id ({id: seconds}, e.g. history medians) for --moe-shard")
    group.addoption("--moe-nodes", metavar="N", type=bounded_int(1, MAX_NODES), default=None,
                    help="nodes a server may span (default: the Slurm allocation's, else 1); "
                         "without Slurm, N>1 runs the members as local processes")
    add_history_options(parser, group)
    for setting in (MATRIX, RESULTS_DIR, SERVER_TIMEOUT):
        parser.addini(setting.ini, setting.help)


def resolve(config: pytest.Config, setting: Setting) -> tuple[str | None, str]:
    """The value and where it came from (for the report header and error messages)."""
    given = getattr(config.option, setting.dest)
    if given is not None:
        return str(given), "--" + setting.dest.replace("_", "-")
    if os.environ.get(setting.env):
        return os.environ[setting.env], f"${setting.env}"
    if config.getini(setting.ini):
        return str(config.getini(setting.ini)), f"ini {setting.ini}"
    return None, "default"


def matrix_path(config: pytest.Config) -> tuple[Path, str, bool]:
    """(path, source, explicit): a default path that does not exist means "no matrix", not an error."""
    value, source = resolve(config, MATRIX)
    if value is None:
        return config.rootpath / DEFAULT_MATRIX, source, False
    path = Path(value)
    if source.startswith("ini") and not path.is_absolute() and config.inipath is not None:
        path = config.inipath.parent / path  # ini paths are relative to the ini file, as pytest's own are
    return path, source, True


def run_options(config: pytest.Config, matrix: str) -> RunOptions:
    """Every cell's run options, once per session; a bad timeout value is a usage error naming its source."""
    timeout, source = resolve(config, SERVER_TIMEOUT)
    try:
        timeout_s = seconds(0, allow_zero=False)(timeout) if timeout is not None else None
    except argparse.ArgumentTypeError:
        raise pytest.UsageError(f"{source}: server timeout {timeout!r} is not a finite number of seconds "
                                f"> 0 and <= {MAX_SECONDS:g}") from None
    results_dir, _ = resolve(config, RESULTS_DIR)
    opt = config.option
    return RunOptions(
        matrix_path=matrix,
        results_dir=Path(results_dir or DEFAULT_RESULTS_DIR),
        timeout_override_s=timeout_s,
        profile=opt.moe_profile,
        cooldown_s=opt.moe_cooldown,
        grace_s=opt.moe_grace,
        progress_interval_s=opt.moe_progress_interval,
        retries=opt.moe_retries,
    )
