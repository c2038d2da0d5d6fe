"""Retrying a failed server launch by the failure's type, as the policy in ``data/retry_policy.yaml`` says.

Why by type: a port taken at bind time or a download cut off is transient, an OOM or an FP8 block
misalignment is not; retrying the latter only burns GPU hours. The policy is data so it can be read
and changed without the code, and ``--moe-retries N`` changes the count for one run.

What a retry leaves behind: every earlier attempt's type and message (``Attempt``), so a config
that passes on a retry is recorded as passed *and* ``flaky``, with what went wrong the first time.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator

from pytest_moe.configs import Regex, StrictModel
from pytest_moe.datafiles import load_yaml
from pytest_moe.errors import ERROR_TYPES, FALLBACK_TYPE, LEARNED_ID, Classification

POLICY_FILE = "retry_policy.yaml"
T = TypeVar("T")


class RetryPolicyError(ValueError):
    """``retry_policy.yaml`` is malformed: one sentence naming the file and the key."""


def _known(value: str) -> str:
    if value not in ERROR_TYPES:
        raise ValueError(f"{value!r} is not an error type ({', '.join(ERROR_TYPES)})")
    return value


#: The most retries a type may get: a boot costs up to 30 minutes on a GPU runner.
MAX_RETRIES = 5


class RetryRule(StrictModel):
    """Retry failures of one type (whose deciding line matches ``match``) up to ``retries`` times."""

    error_type: str
    match: Regex | None = None
    retries: int = Field(ge=0, le=MAX_RETRIES)
    why: str = Field(min_length=1)

    @field_validator("error_type")
    @classmethod
    def _type_known(cls, value: str) -> str:
        return _known(value)

    def applies_to(self, failure: Classification) -> bool:
        return failure.error_type == self.error_type and (self.match is None or re.search(self.match, failure.message) is not None)


class RetryPolicy(StrictModel):
    rules: list[RetryRule]
    never: list[str] = []

    @field_validator("never")
    @classmethod
    def _never_known(cls, values: list[str]) -> list[str]:
        return [_known(v) for v in values]

    @model_validator(mode="after")
    def _never_means_never(self) -> RetryPolicy:
        for rule in self.rules:
            if rule.error_type in self.never and rule.retries:
                raise ValueError(f"{rule.error_type} is listed in 'never' but a rule retries it")
        return self

    def retries_for(self, failure: Classification, override: int | None = None) -> int:
        """How many times a launch failing like ``failure`` may be retried (``override``: ``--moe-retries``).

        A type guessed by the learned fallback is a lead, not a verdict: such a failure is retried as the
        ``ServerError`` the rules left it (a hub download that failed on the network stays retryable even
        when the model reads it as something deterministic).
        """
        if failure.pattern_id == LEARNED_ID:
            failure = replace(failure, error_type=FALLBACK_TYPE)
        if failure.error_type in self.never:
            return 0
        rule = next((r for r in self.rules if r.applies_to(failure)), None)
        if rule is None or rule.retries == 0:
            return 0
        return rule.retries if override is None else override


def parse_policy(data: Any, source: str = POLICY_FILE) -> RetryPolicy:
    try:
        return RetryPolicy.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "top level"
        raise RetryPolicyError(f"{source}: {where}: {err['msg'].removeprefix('Value error, ')}.") from None


@lru_cache(maxsize=None)
def load_policy() -> RetryPolicy:
    """The packaged policy, validated once per process."""
    return parse_policy(load_yaml(POLICY_FILE), f"pytest_moe/data/{POLICY_FILE}")


@dataclass(frozen=True)
class Attempt:
    """A launch attempt that failed and was retried."""

    error_type: str
    message: str


def retry_launch(
    launch: Callable[[], T],
    classify_failure: Callable[[Exception], Classification],
    *,
    retryable: type[Exception],
    override: int | None = None,
    policy: RetryPolicy | None = None,
    on_retry: Callable[[Attempt, int, int], None] = lambda attempt, n, allowed: None,
) -> tuple[T, list[Attempt]]:
    """``launch()`` until it succeeds or the policy stops retrying; returns its result and the failed attempts.

    Only ``retryable`` exceptions (a failed launch) are classified and maybe retried; anything else
    (an interrupt, a bug) propagates at once. The last failure is re-raised unchanged, so the caller
    records it exactly as without retries.
    """
    policy = policy or load_policy()
    attempts: list[Attempt] = []
    while True:
        try:
            return launch(), attempts
        except retryable as exc:
            failure = classify_failure(exc)
            allowed = policy.retries_for(failure, override)
            if len(attempts) >= allowed:
                raise
            attempts.append(Attempt(failure.error_type, failure.message))
            on_retry(attempts[-1], len(attempts), allowed)


def entry_fields(attempts: list[Attempt], *, passed: bool, scrub: Callable[[str], str] = str) -> dict[str, Any]:
    """What a results entry says about retries: nothing without any, else the first attempt's failure.

    A config that passed after a retry is ``flaky``: the report and JUnit show it, and the history
    can tell a flaky pass from a clean one.
    """
    if not attempts:
        return {}
    fields: dict[str, Any] = {"flaky": True} if passed else {}
    fields.update(
        attempts=len(attempts) + 1,
        first_attempt_error_type=attempts[0].error_type,
        first_attempt_error_message=scrub(attempts[0].message),
    )
    return fields
