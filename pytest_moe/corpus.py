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
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import AfterValidator, Field, ValidationError

from pytest_moe.configs import StrictModel
from pytest_moe.errors import ERROR_TYPES

#: Percent of the hash space that goes to the dev part (about 60/40).
DEV_PERCENT = 60
#: Package data: the dev part trains the learned fallback (``pytest_moe.learned``) wherever the plugin runs.
CORPUS_DIR = Path(__file__).parent / "data" / "corpus"
#: Samples of the corpus labelled a second time, blind to the first labels (source tree only: not package data).
SECOND_LABELS_DIR = CORPUS_DIR / "second_labels"
_URL = r"^https://github\.com/[\w.-]+/[\w.-]+/(issues|pull)/\d+$"


class Part(str, Enum):
    DEV = "dev"
    TEST = "test"


class CorpusError(ValueError):
    """A corpus file is malformed: one sentence naming the file and the entry."""


def _known_label(value: str) -> str:
    if value not in ERROR_TYPES:
        raise ValueError(f"label {value!r} is not one of {', '.join(ERROR_TYPES)}")
    return value


_Url = Annotated[str, Field(pattern=_URL)]
_Label = Annotated[str, AfterValidator(_known_label)]


class _Entry(StrictModel):
    url: _Url
    label: _Label
    excerpt: str = Field(min_length=1)


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
            entry = _validated(_Entry, raw, path, index)
            if entry.url in seen:
                raise CorpusError(f"{path}: entry {index}: {entry.url} is already in {seen[entry.url]}.")
            seen[entry.url] = path.name
            out.append(Excerpt(entry.url, entry.label, entry.excerpt, path.name))
    return out


class _SecondLabel(StrictModel):
    url: _Url
    label: _Label
    sure: bool
    why: str = Field(min_length=1)


@dataclass(frozen=True)
class SecondLabel:
    """A second labeller's type for one corpus excerpt, given the excerpt, its link and the README's rules but
    not the first label; ``sure`` is the labeller's own word, ``why`` a sentence."""

    url: str
    label: str
    sure: bool
    why: str
    source_file: str


def load_second_labels(directory: Path, corpus: list[Excerpt]) -> list[SecondLabel]:
    """Every second label under ``directory`` (``*.yaml``, each a list of {url, label, sure, why}), each
    checked to name an excerpt of ``corpus`` once per file."""
    known = {e.url for e in corpus}
    out: list[SecondLabel] = []
    for path in sorted(directory.glob("*.yaml")):
        seen: set[str] = set()
        for index, raw in enumerate(_entries(path, "{url, label, sure, why}")):
            entry = _validated(_SecondLabel, raw, path, index)
            if entry.url not in known:
                raise CorpusError(f"{path}: entry {index}: {entry.url} is not in the corpus.")
            if entry.url in seen:
                raise CorpusError(f"{path}: entry {index}: {entry.url} is labelled twice in this file.")
            seen.add(entry.url)
            out.append(SecondLabel(entry.url, entry.label, entry.sure, entry.why, path.name))
    return out


@dataclass(frozen=True)
class Agreement:
    """Two labellers and the classifier on one sample: the ceiling a score can be read against.

    Why: a classifier can only agree with the first labels as often as a second careful person does; the part
    of its misses that falls where the two people agree is what a better classifier could still win.
    """

    n: int
    #: excerpts where the second label equals the first
    agree: int
    #: excerpts the second labeller was sure of, and how many of those agree
    sure: int
    sure_agree: int
    #: the classifier's type equals the first label / the second label
    classifier_first: int
    classifier_second: int
    #: of the ``agree`` excerpts, those the classifier also names
    classifier_on_agreed: int
    #: (first, second) label pairs where the two differ
    disagreements: Counter[tuple[str, str]]


def agreement(rows: Iterable[tuple[str, str, bool, str]]) -> Agreement:
    """Count ``(first label, second label, second labeller sure, classifier's type)`` rows."""
    rows = list(rows)
    return Agreement(
        n=len(rows),
        agree=sum(first == second for first, second, _, _ in rows),
        sure=sum(sure for _, _, sure, _ in rows),
        sure_agree=sum(sure and first == second for first, second, sure, _ in rows),
        classifier_first=sum(got == first for first, _, _, got in rows),
        classifier_second=sum(got == second for _, second, _, got in rows),
        classifier_on_agreed=sum(first == second == got for first, second, _, got in rows),
        disagreements=Counter((first, second) for first, second, _, _ in rows if first != second),
    )


_Schema = TypeVar("_Schema", bound=StrictModel)


def _validated(schema: type[_Schema], raw: object, path: Path, index: int) -> _Schema:
    """``raw`` read through ``schema``, or a CorpusError naming the file, the entry and its first bad key."""
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "entry"
        raise CorpusError(f"{path}: entry {index} ({where}): {first['msg']}.") from None


def _entries(path: Path, shape: str = "{url, label, excerpt}") -> Iterator[object]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise CorpusError(f"{path}: expected a list of {shape} entries.")
    yield from data
