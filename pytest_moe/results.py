"""``success_results.json`` / ``failure_results.json``: the shared record of every config's last outcome.

Semantics (seed 001), keyed ``model::config``:
* entries persist across runs; re-running a config updates its entry;
* a success removes that config's failure entry;
* a failure never overwrites a success (the success entry stays; the failure is recorded beside it);
* each entry is written the moment its config finishes, so an interrupted run keeps what finished.

Several xdist workers (or several pytest runs) write at once: every update is a read-modify-write under
one ``filelock`` lock, and files are replaced atomically (write to a temp file, ``os.replace``), so a
reader — or a run killed mid-write — never sees a half-written file.

Nothing is ever lost (docs/contract.md): the directory is checked before any server boots
(``check``); a file that cannot be read (bad JSON, a JSON list, bad UTF-8) is kept under a unique name
and reported in ``warnings`` instead of being overwritten; a write that fails mid-run is a warning, not
the end of the run; files keep their mode; a temp file left by a killed writer is removed by the next
writer (it holds the lock, so no live writer owns it).
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from pytest_moe.redact import redact_value

SUCCESS_FILE = "success_results.json"
FAILURE_FILE = "failure_results.json"
DEFAULT_RESULTS_DIR = "performance_profiles_neurips_traces"
_LOCK_FILE = ".results.lock"


class ResultsError(ValueError):
    """The results directory cannot be used; the message is the one sentence shown to the user."""


def now_iso() -> str:
    """The seed's timestamp format: ``2025-11-27T23:45:12``."""
    return datetime.now().isoformat(timespec="seconds")


class ResultsStore:
    def __init__(self, directory: str | os.PathLike):
        """No file-system work here: the plugin builds a store for every session, matrix or not."""
        self.dir = Path(directory)
        self._lock = FileLock(str(self.dir / _LOCK_FILE))
        #: One sentence per problem met while reading or writing; shown in the terminal and step summary.
        self.warnings: list[str] = []

    @property
    def success_path(self) -> Path:
        return self.dir / SUCCESS_FILE

    @property
    def failure_path(self) -> Path:
        return self.dir / FAILURE_FILE

    def check(self) -> None:
        """Before any server boots: raise ``ResultsError`` if results could not be written here.

        Creates nothing (a directory still to be made is probed in its nearest existing parent); reads
        both files now, so an unreadable one is set aside, with a warning, before the run.
        """
        existing = next(p for p in (self.dir, *self.dir.absolute().parents) if p.exists())
        if not existing.is_dir():
            raise ResultsError(f"results directory {self.dir} cannot be made: {existing} is a file, not a directory")
        try:
            probe = existing / f".pytest-moe-probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ResultsError(f"results directory {existing} is not writable: {exc.strerror or exc}") from None
        if existing != self.dir:
            return
        for path in (self.success_path, self.failure_path):
            if path.exists() and not path.is_file():
                raise ResultsError(f"results file {path} is not a regular file (a directory?); move it away")
            if path.exists() and not os.access(path, os.R_OK):
                raise ResultsError(f"results file {path} is not readable (mode {path.stat().st_mode & 0o777:o})")
        try:
            self._load()
        except OSError as exc:
            raise ResultsError(f"cannot read the results in {self.dir}: {exc.strerror or exc}") from None

    def record_success(self, key: str, entry: dict[str, Any], clear_failure: bool = True) -> None:
        """``clear_failure=False``: only some of the config's checks ran, so its old failure still stands."""
        entry = redact_value({**entry, "last_updated": now_iso()})
        with self._locked("record the success of " + key):
            successes, failures = self._read(self.success_path), self._read(self.failure_path)
            successes[key] = entry
            self._write(self.success_path, successes)
            cleared = clear_failure and failures.pop(key, None) is not None
            if cleared or not self.failure_path.exists():
                self._write(self.failure_path, failures)

    def record_failure(self, key: str, entry: dict[str, Any]) -> None:
        entry = redact_value({**entry, "last_updated": now_iso()})
        with self._locked("record the failure of " + key):
            failures = self._read(self.failure_path)
            failures[key] = entry
            self._write(self.failure_path, failures)
            if not self.success_path.exists():
                self._write(self.success_path, {})

    def record_check(self, key: str, name: str, block: dict[str, Any], new_entry: dict[str, Any]) -> dict[str, Any]:
        """Put one check's result under ``checks.<name>`` of the config's entry (the success entry first).

        A check that runs without a server (the kernel check) may be the first thing recorded for a
        config: then ``new_entry`` starts the entry, in the file its ``status`` belongs to.  Returns the
        entry as written.
        """
        block, new_entry = redact_value(block), redact_value(new_entry)
        entry = {**new_entry, "checks": {name: block}}  # what the caller gets if the write fails (a warning)
        with self._locked(f"record the {name} check of {key}"):
            successes, failures = self._read(self.success_path), self._read(self.failure_path)
            if key in successes or (key not in failures and new_entry.get("status") == "success"):
                target, path = successes, self.success_path
            else:
                target, path = failures, self.failure_path
            entry = target.setdefault(key, dict(new_entry))
            entry.setdefault("checks", {})[name] = block
            entry["last_updated"] = now_iso()
            self._write(path, target)
            for other in (self.success_path, self.failure_path):
                if not other.exists():
                    self._write(other, {})
        return entry

    def load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Both files; one that cannot be read mid-run (replaced by a directory, permissions changed) reads as
        empty with a warning, as a failed write does: the run goes on (``check`` refuses such files up front)."""
        if not self.dir.is_dir():
            return {}, {}
        try:
            return self._load()
        except OSError as exc:
            self.warnings.append(f"could not read the results in {self.dir}: {exc.strerror or exc}")
            return {}, {}

    def _load(self) -> tuple[dict[str, Any], dict[str, Any]]:
        with self._lock:
            return self._read(self.success_path), self._read(self.failure_path)

    @contextmanager
    def _locked(self, doing: str) -> Iterator[None]:
        """The writer's lock; a write that fails (disk full, permissions changed mid-run) becomes a warning.

        Why not raise: the config's outcome is already decided and reported; aborting the run would lose
        every config still to come as well.
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            with self._lock:
                self._remove_stale_temp_files()
                yield
        except OSError as exc:
            self.warnings.append(f"could not {doing} in {self.dir}: {exc.strerror or exc}")

    def _remove_stale_temp_files(self) -> None:
        for name in (SUCCESS_FILE, FAILURE_FILE):
            for stale in self.dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)

    def _read(self, path: Path) -> dict[str, Any]:
        """An absent file is empty; one that is not a JSON object in UTF-8 is kept aside, never overwritten."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw.decode("utf-8") or "{}")
            problem = None if isinstance(data, dict) else f"holds a JSON {type(data).__name__}, not an object"
        except UnicodeDecodeError as exc:
            problem = f"is not UTF-8 (byte {exc.start})"
        except json.JSONDecodeError as exc:
            problem = f"is not valid JSON (line {exc.lineno}: {exc.msg})"
        except RecursionError:
            problem = "is nested too deeply to be results"
        if problem is None:
            return data
        kept = path.with_name(f"{path.stem}.corrupt-{datetime.now():%Y%m%d%H%M%S}-{secrets.token_hex(4)}{path.suffix}")
        path.replace(kept)
        self.warnings.append(f"{path} {problem}; its content was kept as {kept} and a new file started")
        return {}

    @staticmethod
    def _write(path: Path, data: dict[str, Any]) -> None:
        """Atomic replace; the file keeps its mode (a new one gets the umask's, like any file we create)."""
        try:
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            mode = None
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            if mode is not None:
                os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
