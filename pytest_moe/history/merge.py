"""``merge DIR... --out DIR``: one results set from the results directories of one night's jobs.

Seed 001's rules, replayed over every entry of every input in ``last_updated`` order, as if one run had
recorded them all: a success replaces the config's success and removes its failure; a failure replaces
the config's failure and never touches its success. Other files (logs, traces, JUnit) are copied beside
them; two inputs holding the same relative path keep the newer file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_moe.history.imports import HistoryImportError, json_entries
from pytest_moe.results import FAILURE_FILE, SUCCESS_FILE


@dataclass(frozen=True)
class Merged:
    successes: int
    failures: int
    files: int


def merge_dirs(inputs: list[Path], out: Path) -> Merged:
    events: list[tuple[str, int, str, str, dict[str, Any]]] = []
    for order, directory in enumerate(inputs):
        if not directory.is_dir():
            raise HistoryImportError(f"{directory}: not a directory")
        for kind, name in (("success", SUCCESS_FILE), ("failure", FAILURE_FILE)):
            path = directory / name
            if path.exists():
                for key, entry in json_entries(path).items():
                    events.append((str(entry.get("last_updated") or ""), order, kind, key, entry))
    successes: dict[str, Any] = {}
    failures: dict[str, Any] = {}
    for _, _, kind, key, entry in sorted(events, key=lambda e: (e[0], e[1], e[2] == "success")):
        if kind == "success":
            successes[key] = entry
            failures.pop(key, None)
        else:
            failures[key] = entry
    out.mkdir(parents=True, exist_ok=True)
    copied = sum(_copy_others(directory, out) for directory in inputs)
    _write_json(out / SUCCESS_FILE, successes)
    _write_json(out / FAILURE_FILE, failures)
    return Merged(len(successes), len(failures), copied)


def _copy_others(src: Path, out: Path) -> int:
    count = 0
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if not path.is_file() or path.is_symlink() or rel.name in (SUCCESS_FILE, FAILURE_FILE) or rel.name.startswith("."):
            continue
        target = out / rel
        if target.exists() and target.stat().st_mtime >= path.stat().st_mtime:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        count += 1
    return count


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Same format as ``ResultsStore`` (sorted, indented) and atomically replaced."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
    os.replace(tmp, path)
