"""Score the failure classifier on the real-issue corpus: overall, per type, confusion matrix.

Why a script and not a test: the test part of the corpus is a score to report, never a target to
tune to (patterns are written looking at dev misses only), so no test asserts on it.
Usage: python3 scripts/bench_classifier.py [--part test|dev|all] [--misses] [--agreement]

``--agreement`` reads the score against a ceiling: on each sample of the corpus that a second person labelled
blind (``pytest_moe/data/corpus/second_labels/``), how often the two labellers agree, and how often the
classifier names the first label, the second, and the type both gave. Counts only: it never prints an excerpt.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from pytest_moe.corpus import CORPUS_DIR as CORPUS, SECOND_LABELS_DIR, Excerpt, Part, agreement, load_corpus, load_second_labels
from pytest_moe.errors import ERROR_TYPES, LEARNED_ID, classify

ABBREV = {t: "".join(c for c in t if c.isupper())[:4] or t[:4] for t in ERROR_TYPES}


def score(name: str, excerpts: list[Excerpt], show_misses: bool) -> None:
    results = [(e, classify(e.excerpt)) for e in excerpts]
    right = sum(e.label == got.error_type for e, got in results)
    print(f"== {name} part: {len(excerpts)} excerpts, {right} right, accuracy {right / len(excerpts):.1%}")
    learned = [(e, got) for e, got in results if got.pattern_id == LEARNED_ID]
    rules = [(e, got) for e, got in results if got.pattern_id not in (None, LEARNED_ID)]
    print(f"   decided by a rule: {len(rules)} ({sum(e.label == g.error_type for e, g in rules)} right); "
          f"by the learned fallback: {len(learned)} ({sum(e.label == g.error_type for e, g in learned)} right); "
          f"left ServerError: {len(results) - len(rules) - len(learned)}")
    print(f"{'type':22s} {'n':>3s} {'right':>5s} {'acc':>7s}")
    for t in ERROR_TYPES:
        mine = [(e, got) for e, got in results if e.label == t]
        if mine:
            ok = sum(e.label == got.error_type for e, got in mine)
            print(f"{t:22s} {len(mine):3d} {ok:5d} {ok / len(mine):7.1%}")
    confusion = Counter((e.label, got.error_type) for e, got in results)
    print(f"\nconfusion matrix ({name}): rows = label, columns = predicted")
    print(" " * 22 + "".join(f"{ABBREV[t]:>5s}" for t in ERROR_TYPES))
    for t in ERROR_TYPES:
        print(f"{t:22s}" + "".join(f"{confusion[(t, p)] or '.':>5}" for p in ERROR_TYPES))
    print("columns: " + ", ".join(f"{ABBREV[t]}={t}" for t in ERROR_TYPES))
    if show_misses:
        for e, got in results:
            if e.label != got.error_type:
                print(f"MISS {e.url} label={e.label} got={got.error_type} ({got.pattern_id}): {got.message[:120]}")
    print()


def ceiling(corpus: list[Excerpt]) -> None:
    first = {e.url: e for e in corpus}
    second = load_second_labels(SECOND_LABELS_DIR, corpus)
    for name in sorted({s.source_file for s in second}):
        for part in Part:  # the classifier's figures on dev excerpts are on what it was fitted to: apart
            mine = [s for s in second if s.source_file == name and first[s.url].part is part]
            if not mine:
                continue
            a = agreement((first[s.url].label, s.label, s.sure, classify(first[s.url].excerpt).error_type) for s in mine)
            print(f"== second labels {name}, {part.value} part: {a.n} excerpts")
            print(f"   the two labellers agree on {a.agree} ({a.agree / a.n:.1%}); on {a.sure_agree} of the {a.sure} "
                  f"the second was sure of ({a.sure_agree / max(a.sure, 1):.1%})")
            print(f"   the classifier names the first label {a.classifier_first} ({a.classifier_first / a.n:.1%}), "
                  f"the second {a.classifier_second} ({a.classifier_second / a.n:.1%}); of the {a.agree} both gave "
                  f"one type, {a.classifier_on_agreed} ({a.classifier_on_agreed / max(a.agree, 1):.1%})")
            pairs = ", ".join(f"{ABBREV[f]}->{ABBREV[s]} {n}" for (f, s), n in a.disagreements.most_common())
            print(f"   where they differ (first->second): {pairs or 'nowhere'}")
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["test", "dev", "all"], default="all",
                        help="which part to score (default: test, then dev labelled as such)")
    parser.add_argument("--misses", action="store_true", help="list misclassified excerpts (use on dev only)")
    parser.add_argument("--agreement", action="store_true",
                        help="also score against the second labels: the two labellers' agreement is the ceiling")
    args = parser.parse_args()
    corpus = load_corpus(CORPUS)
    parts = [Part.TEST, Part.DEV] if args.part == "all" else [Part(args.part)]
    print(f"corpus: {len(corpus)} excerpts in {CORPUS}")
    for part in parts:
        score(part.value, [e for e in corpus if e.part is part], args.misses and part is Part.DEV)
    if args.agreement:
        ceiling(corpus)


if __name__ == "__main__":
    main()
