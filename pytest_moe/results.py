"""``success_results.json`` / ``failure_results.json``: the shared record of every config's last outcome.

Semantics (seed 001), keyed ``model::config``:
* entries persist across runs; re-running a config updates its entry;
* a success removes that config's failure entry;
* a failure never overwrites a success (the success entry stays; the failure is recorded beside it);
* each entry is written the moment its config finishes, so an interrupted run keeps what finished.

Several xdist workers (or several pytest runs) write at once: every update is a read-modify-write under
one ``filelock`` lock, and files are replaced atomically (write to a temp file, ``os.replace``), so a
reader — or a run killed mid-write — never sees a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

SUCCESS_FILE = "success_results.json"
FAILURE_FILE = "failure_results.json"
DEFAULT_RESULTS_DIR = "performance_profiles_neurips_traces"


def now_iso() -> str:
    """The seed's timestamp format: ``2025-11-27T23:45:12``."""
    return datetime.now().isoformat(timespec="seconds")


class ResultsStore:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.dir / ".results.lock"))

    @property
    def success_path(self) -> Path:
        return self.dir / SUCCESS_FILE

    @property
    def failure_path(self) -> Path:
        return self.dir / FAILURE_FILE

    def record_success(self, key: str, entry: dict[str, Any], clear_failure: bool = True) -> None:
        """``clear_failure=False``: only some of the config's checks ran, so its old failure still stands."""
        with self._lock:
            successes, failures = self._read(self.success_path), self._read(self.failure_path)
            successes[key] = {**entry, "last_updated": now_iso()}
            self._write(self.success_path, successes)
            cleared = clear_failure and failures.pop(key, None) is not None
            if cleared or not self.failure_path.exists():
                self._write(self.failure_path, failures)

    def record_failure(self, key: str, entry: dict[str, Any]) -> None:
        with self._lock:
            failures = self._read(self.failure_path)
            failures[key] = {**entry, "last_updated": now_iso()}
            self._write(self.failure_path, failures)
            if not self.success_path.exists():
                self._write(self.success_path, {})

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock:
            return self._read(self.success_path), self._read(self.failure_path)

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        """An absent file is empty; a corrupt one is kept aside rather than silently overwritten."""
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8") or "{}")
        except json.JSONDecodeError:
            path.replace(path.with_suffix(f".corrupt-{datetime.now():%Y%m%d%H%M%S}.json"))
            return {}
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
