"""Backstop that kills a server's process group when the pytest process that owns it dies.

Why a separate process: fixture teardown never runs when pytest-timeout's ``thread`` method calls
``os._exit``, when an xdist worker is SIGKILLed, or when a CI runner kills pytest hard.  The janitor
lives in its own session, watches the owner pid, and exits quietly once the server group is gone.

Usage (started by ``server.Server``): ``python -m pytest_moe.janitor OWNER_PID LEADER_PID GRACE_S``.
"""

from __future__ import annotations

import sys
import time

import psutil

from pytest_moe.server import _members, kill_tree

_POLL_S = 0.5


def watch(owner: int, leader: int, grace_s: float) -> int:
    while True:
        if not _members(leader):
            return 0
        if _gone(owner):
            kill_tree(leader, grace_s)
            return 1
        time.sleep(_POLL_S)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
