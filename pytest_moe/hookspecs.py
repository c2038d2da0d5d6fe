"""Hooks pytest-moe calls, for plugin objects (and users' conftests) that need each recorded entry.

Why a hook rather than a direct call: the history, the kernel check and whatever comes next each want the
entry the moment a config finishes, and the recording code should not know who listens.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.hookspec
def pytest_moe_entry_recorded(config: pytest.Config, key: str, entry: dict[str, Any], outcome: str) -> None:
    """``entry`` for config ``key`` (``Model::Config``) was just written to the results files.

    ``outcome`` is what became of the config's test: ``passed``, ``failed``, ``xfailed`` (a listed known
    failure), ``predicted`` (preflight skipped it), ``interrupted``, ``timeout`` or ``crashed`` (its xdist
    worker died; called in the controller). Called in the process that recorded it (an xdist worker, or
    the controller for a crashed worker).
    """
