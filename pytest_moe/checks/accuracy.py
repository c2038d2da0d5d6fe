"""gsm8k-style accuracy: few-shot prompts over ``/v1/completions``, greedy, the answer is the last number.

Why this shape: it is what SGLang's nightly gsm8k check does (5-shot, temperature 0, last number of the
output, requests in parallel), so a floor measured there means the same here.  Why a confidence bound
instead of ``score >= floor``: at N = 200 a healthy server scoring 0.88 on average lands below 0.88 on about
half of all nights; the verdict (docs/cells.md) fails only when the score is too low to be chance.

Questions come from a local JSONL file (``{"question": ..., "answer": "... #### 42"}``, gsm8k's format); the
packaged default is a synthetic 2-digit addition set, so a CPU run never downloads anything.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import requests
from scipy.stats import beta

from pytest_moe.bench import BenchmarkError
from pytest_moe.checks.base import Check, CheckContext
from pytest_moe.entries import AccuracyResult, CheckFailure, CheckStatus
from pytest_moe.matrix import AccuracySpec

DEFAULT_DATASET = "arithmetic.jsonl"
#: Stop sequences: the model would otherwise go on to invent the next "Question:".
STOP = ["Question:", "\n\n"]
#: A number as gsm8k answers write it: sign, thousands commas, decimals ("-1,234.50", "$18", "3.").
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


@dataclass(frozen=True)
class Question:
    id: int
    question: str
    answer: str

    @property
    def expected(self) -> float | None:
        """gsm8k's reference answer: the number after ``####``."""
        _, _, final = self.answer.rpartition("####")
        return extract_answer(final)


def extract_answer(text: str) -> float | None:
    """The last number of a model's output (commas and units dropped), or None when it wrote no number.

    A ``####`` marker wins when present: gsm8k-trained models write the final answer after it and may add
    text (even numbers, e.g. "#### 18 dollars, 2 per egg") after that.
    """
    _, marker, after = text.rpartition("####")
    if marker:
        first = _NUMBER.search(after)
        if first:
            return _to_float(first.group())
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def _to_float(token: str) -> float | None:
    try:
        return float(token.replace(",", "").rstrip("."))
    except ValueError:
        return None


def load_questions(dataset: str | None) -> list[Question]:
    """Questions of a JSONL file (``dataset`` path, or the packaged synthetic set when None)."""
    path = Path(dataset) if dataset else Path(str(files("pytest_moe") / "data" / DEFAULT_DATASET))
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise BenchmarkError(f"accuracy dataset {path}: cannot read it ({exc.strerror or exc})") from None
    questions = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            questions.append(Question(len(questions), str(row["question"]), str(row["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise BenchmarkError(f"accuracy dataset {path}:{number}: expected a JSON object with 'question' and 'answer'") from None
    return questions


def few_shot_prompt(shots: list[Question], question: Question) -> str:
    """SGLang's gsm8k few-shot layout: worked examples, then the open question."""
    head = "".join(f"Question: {q.question}\nAnswer: {q.answer}\n\n" for q in shots)
    return f"{head}Question: {question.question}\nAnswer:"


def bounds(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds on the true accuracy at ``confidence`` (exact, never optimistic)."""
    alpha = 1 - confidence
    lower = 0.0 if correct == 0 else float(beta.ppf(alpha, correct, n - correct + 1))
    upper = 1.0 if correct == n else float(beta.ppf(1 - alpha, correct + 1, n - correct))
    return lower, upper


def verdict(correct: int, n: int, spec: AccuracySpec) -> tuple[bool, float, float, str]:
    """Fail only when even the optimistic bound is under the floor: ``P(fail | true accuracy = floor) <= 1 - confidence``."""
    lower, upper = bounds(correct, n, spec.confidence)
    score = correct / n
    if spec.floor is None:
        return True, lower, upper, f"score {score:.3f} on {n} questions (no floor for this model in the matrix)"
    passed = upper >= spec.floor
    relation = "reaches" if passed else "is below"
    return passed, lower, upper, (
        f"score {score:.3f} ({correct}/{n}); its {spec.confidence:.0%} upper bound {upper:.3f} {relation} the floor "
        f"{spec.floor:.3f} (lower bound {lower:.3f})"
    )


class AccuracyCheck(Check):
    name = "accuracy"
    help = "accuracy: gsm8k-style few-shot score against the model's floor (binomial bound)"
    failure_type = CheckFailure.WRONG_ANSWERS

    def run(self, ctx: CheckContext) -> AccuracyResult:
        spec = ctx.cfg.accuracy
        questions = load_questions(spec.dataset)
        if len(questions) < spec.shots + spec.n:
            raise BenchmarkError(
                f"accuracy dataset {spec.dataset or DEFAULT_DATASET} has {len(questions)} questions; "
                f"{spec.shots} shots + n={spec.n} need {spec.shots + spec.n}")
        shots, asked = questions[: spec.shots], questions[spec.shots : spec.shots + spec.n]
        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=spec.parallel)
        try:
            outputs = list(pool.map(lambda q: _complete(ctx, spec, few_shot_prompt(shots, q)), asked))
        finally:
            # Not ``with``: its exit waits for every request, and after pytest-timeout or Ctrl-C stops this thread
            # a hung server answers none of them for the read timeout (600 s each).  They end when the server is stopped.
            pool.shutdown(wait=False, cancel_futures=True)
        seconds = time.perf_counter() - started
        rows = []
        for question, output in zip(asked, outputs):
            extracted = extract_answer(output)
            rows.append({"id": question.id, "question": question.question, "expected": question.expected,
                         "extracted": extracted, "correct": extracted is not None and extracted == question.expected,
                         "output": output})
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        per_question = ctx.out_dir / "accuracy.jsonl"
        per_question.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        correct = sum(row["correct"] for row in rows)
        passed, lower, _, text = verdict(correct, len(rows), spec)
        return AccuracyResult(
            status=CheckStatus.PASSED if passed else CheckStatus.FAILED,
            score=round(correct / len(rows), 4), n=len(rows), lower_bound=round(lower, 4), floor=spec.floor,
            per_question_file=str(per_question), seconds_per_question=round(seconds / len(rows), 3), verdict=text,
        )


def _complete(ctx: CheckContext, spec: AccuracySpec, prompt: str) -> str:
    body = {"model": ctx.served_name, "prompt": prompt, "max_tokens": spec.max_tokens, "temperature": 0, "stop": STOP}
    try:
        resp = requests.post(f"{ctx.base_url}/v1/completions", json=body, timeout=(10, 600))
    except requests.RequestException as exc:
        raise BenchmarkError(f"accuracy request to {ctx.base_url}/v1/completions failed: {exc}") from exc
    if resp.status_code != 200:
        raise BenchmarkError(f"HTTP {resp.status_code} from {ctx.base_url}/v1/completions: {resp.text[:300]}")
    return resp.json()["choices"][0]["text"]
