"""The labelled corpus of real failure excerpts, and its one fixed dev/test split.

Why a corpus: the classifier's patterns were written from the engines' source, and a classifier
scored on the messages it was written from says nothing about the logs of other releases, ranks and
launchers. The corpus (``pytest_moe/data/corpus/*.yaml``) holds excerpts copied from public SGLang,
vLLM, PyTorch, NCCL and FlashInfer issue threads, each with its link and the type a human gave it.

Why a fixed split by URL hash: patterns may be tuned on the *dev* part only; the *test* part is
scored, never looked at while tuning. Hashing the link (not the position in a file) keeps an excerpt
in the same part when the files are reordered or grown, so the test part stays unseen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator

from pytest_moe.configs import StrictModel
from pytest_moe.errors import ERROR_TYPES

#: Percent of the hash space that goes to the dev part (about 60/40).
DEV_PERCENT = 60
#: Package data: the dev part trains the learned fallback (``pytest_moe.learned``) wherever the plugin runs.
CORPUS_DIR = Path(__file__).parent / "data" / "corpus"


class Part(str, Enum):
    DEV = "dev"
    TEST = "test"


class CorpusError(ValueError):
    """A corpus file is malformed: one sentence naming the file and the entry."""


class _Entry(StrictModel):
    url: str = Field(pattern=r"^https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+$")
    label: str
    excerpt: str = Field(min_length=1)

    @field_validator("label")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ERROR_TYPES:
            raise ValueError(f"label {value!r} is not one of {', '.join(ERROR_TYPES)}")
        return value


@dataclass(frozen=True)
class Excerpt:
    """One real failure: where it was published, what it is, and the text as it appeared."""

    url: str
    label: str
    excerpt: str
    source_file: str

    @property
    def part(self) -> Part:
        return part_of(self.url)


def part_of(url: str) -> Part:
    """The part an excerpt belongs to, from its link alone (stable across file edits)."""
    bucket = int(hashlib.sha256(url.encode("utf-8")).hexdigest(), 16) % 100
    return Part.DEV if bucket < DEV_PERCENT else Part.TEST


def load_corpus(directory: Path) -> list[Excerpt]:
    """Every excerpt under ``directory`` (``*.yaml``, each a list of {url, label, excerpt})."""
    out: list[Excerpt] = []
    seen: dict[str, str] = {}
    for path in sorted(directory.glob("*.yaml")):
        for index, raw in enumerate(_entries(path)):
            try:
                entry = _Entry.model_validate(raw)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "entry"
                raise CorpusError(f"{path}: entry {index} ({where}): {first['msg']}.") from None
            if entry.url in seen:
                raise CorpusError(f"{path}: entry {index}: {entry.url} is already in {seen[entry.url]}.")
            seen[entry.url] = path.name
            out.append(Excerpt(entry.url, entry.label, entry.excerpt, path.name))
    return out


def _entries(path: Path) -> Iterator[object]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a list of {{url, label, excerpt}} entries.")
    yield from data
