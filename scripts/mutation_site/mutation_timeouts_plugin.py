"""A pytest plugin for mutant runs (``mutation_report.py run`` loads it with ``-p``): each test gets a time limit of
its own, three times what its call took unmutated (mutmut's stats) plus 30 s.

Why: a mutant that makes one test hang (a teardown that waits for a process forever) used to hold its whole run
until the run's cap, which counts as survived; failed at its own limit, the test fails and the run goes on to a
verdict (a timeout is a kill, as mutmut counts it).  The thread method, because tests run pytest in-process and
pytest-timeout's signal method there would cancel this outer alarm.  The call only (``func_only``): the stats time
calls, not fixtures, and a module's shared fixture (a stand-in run, a Slurm cluster) can take longer than 30 s to set
up on a loaded machine, which would be a kill no mutant caused.
"""

import json
import os
from pathlib import Path

import pytest

STATS = "PYTEST_MOE_MUTATION_STATS"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    durations = json.loads(Path(os.environ[STATS]).read_text(encoding="utf-8"))["duration_by_test"]
    for item in items:
        limit = 30 + 3 * durations.get(item.nodeid, 0)
        item.add_marker(pytest.mark.timeout(limit, method="thread", func_only=True))
