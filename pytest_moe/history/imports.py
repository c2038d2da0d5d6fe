"""``history import``: results JSON files (or directories holding them) and JUnit XML into the history.

Why each file (or results directory) is one run whose id is the hash of its content: importing the same
artifact twice — a retried job, an overlapping download — adds nothing the second time.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from pytest_moe.history.rows import entry_rows, provenance
from pytest_moe.history.store import HistoryStore, RunInfo
from pytest_moe.results import FAILURE_FILE, SUCCESS_FILE


class HistoryImportError(ValueError):
    """A file that is not a results file; the message names it."""


@dataclass(frozen=True)
class Imported:
    source: str
    run_id: str
    configs: int
    rows: int
    skipped: bool


def import_paths(store: HistoryStore, paths: list[Path]) -> list[Imported]:
    return [import_path(store, p) for p in paths]


def import_path(store: HistoryStore, path: Path) -> Imported:
    if path.is_dir():
        files = [path / SUCCESS_FILE, path / FAILURE_FILE]
        files = [f for f in files if f.exists()]
        if not files:
            raise HistoryImportError(f"{path}: holds neither {SUCCESS_FILE} nor {FAILURE_FILE}")
        entries = {}
        for f in files:  # failure file last: a key in both keeps both rows sets, as the files do
            for key, entry in json_entries(f).items():
                entries.setdefault(key, []).append(entry)
        blobs = [f.read_bytes() for f in files]
    elif path.suffix == ".xml":
        entries = {k: [v] for k, v in _junit_entries(path).items()}
        blobs = [path.read_bytes()]
    else:
        entries = {k: [v] for k, v in json_entries(path).items()}
        blobs = [path.read_bytes()]
    digest = hashlib.sha256(b"\0".join(blobs)).hexdigest()[:20]
    run_id = f"import-{digest}"
    count = sum(len(v) for v in entries.values())
    if store.has_run(run_id):
        return Imported(str(path), run_id, count, 0, True)
    stamps = [_when(e.get("last_updated")) for es in entries.values() for e in es]
    started = min((s for s in stamps if s), default=None) or datetime.fromtimestamp(path.stat().st_mtime)
    run = RunInfo(run_id=run_id, started_at=started, source="import")
    store.ensure_run(run)
    rows = 0
    for key, group in sorted(entries.items()):
        for entry in group:
            rows += store.record(run, provenance(key, entry), entry_rows(entry))
    return Imported(str(path), run_id, count, rows, False)


def json_entries(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise HistoryImportError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise HistoryImportError(f"{path}: not a results file (expected {{\"Model::Config\": entry}})")
    return data


def _junit_entries(path: Path) -> dict[str, dict[str, Any]]:
    """Test cases that carry a ``moe_id`` property (the plugin writes the entry's fields as properties)."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise HistoryImportError(f"{path}: not valid XML ({exc})") from None
    stamp = next((s.get("timestamp") for s in root.iter("testsuite") if s.get("timestamp")), None)
    out: dict[str, dict[str, Any]] = {}
    for case in root.iter("testcase"):
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        key = props.pop("moe_id", None)
        if not key:
            continue
        entry: dict[str, Any] = dict(props)
        if isinstance(entry.get("checks"), str):
            entry["checks"] = _literal(entry["checks"])
        if "status" not in entry:
            entry["status"] = "failed" if case.find("failure") is not None or case.find("error") is not None else "success"
        entry.setdefault("last_updated", stamp)
        out[key] = entry
    if not out:
        raise HistoryImportError(f"{path}: no test case with a moe_id property (not a pytest-moe JUnit file)")
    return out


def _literal(text: str) -> Any:
    """JUnit properties hold ``str(value)``: a dict arrives as its Python repr, read back without eval."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None


def _when(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=None)
