"""What a check is: a name (its marker and test id), its marker text, and how it runs against a live server.

Why a base class and not a function table: each check carries its marker text and its failure type next to its
``run``, so adding a check is one module plus one line in ``checks/__init__.py`` (and its schema block in
the matrix and its columns in ``report.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pytest_moe.engines import Engine
from pytest_moe.entries import CheckFailure, CheckResult
from pytest_moe.matrix import ServerConfig


@dataclass(frozen=True)
class CheckContext:
    """A check's view of its cell: the config, the running server, and where it may write files."""

    cfg: ServerConfig
    engine: Engine
    base_url: str
    served_name: str
    #: Directory for this config's per-check files (per-question answers, generated token ids).
    out_dir: Path
    #: The results directory of the whole run (agreement reads other configs' outputs there).
    results_dir: Path
    #: Where ``--moe-profile`` traces go (None: no profiling) and where the engine was told to write them.
    profile_dir: Path | None = None
    launch_profile_dir: Path | None = None


class CheckSkipped(Exception):
    """The check cannot judge this config now (e.g. no reference outputs yet); the test is skipped with this text."""


class Check(abc.ABC):
    name: ClassVar[str]
    #: The marker's description (``pytest --markers``).
    help: ClassVar[str]
    #: The entry's ``error_type`` when this check's verdict (not the engine) fails; None: it only raises.
    failure_type: ClassVar[CheckFailure | None] = None

    @abc.abstractmethod
    def run(self, ctx: CheckContext) -> CheckResult:
        """Judge the server in ``ctx``; raise (``BenchmarkError``, ``CheckSkipped``) when it cannot."""
