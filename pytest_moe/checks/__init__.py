"""The checks a config's server answers, registered here in run order (benchmark first: its figures are the seed's).

Adding a check: a module with a ``Check`` subclass, one line below, its schema block in ``matrix.py`` and its
columns in ``report.py``.
"""

from __future__ import annotations

from pytest_moe.checks.accuracy import AccuracyCheck
from pytest_moe.checks.agreement import AgreementCheck
from pytest_moe.checks.base import Check, CheckContext, CheckSkipped
from pytest_moe.checks.benchmark import BenchmarkCheck

CHECKS: dict[str, Check] = {check.name: check for check in (BenchmarkCheck(), AccuracyCheck(), AgreementCheck())}

__all__ = ["CHECKS", "Check", "CheckContext", "CheckSkipped"]
