"""Tonight against the last K good nights: regressions, improvements, status flips (docs/history.md).

Baseline of one series (config × check × metric × batch size × GPU kind × engine): the values of the
last ``baseline_nights`` earlier runs in which that check passed. Its centre is the median and its noise
the MAD scaled to a standard deviation (1.4826 × MAD): both ignore one wild night, which a mean and a
standard deviation over seven points do not. Tonight regresses when it is worse than the median by more
than ``max(relative × |median|, noise_k × sigma)`` — the relative floor keeps a perfectly quiet series
from flagging a 0.1 % wobble; the noise term keeps a noisy one from flagging its own jitter. With fewer
than ``min_nights`` earlier values the state is "not enough history", never a guess.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pytest_moe.history.rows import OUTCOME_CHECK, STATUS_METRIC, Metric, Status, metric
from pytest_moe.configs import HistorySettings

#: MAD → standard deviation of a normal distribution.
MAD_TO_SIGMA = 1.4826


class State(str, enum.Enum):
    REGRESSED = "regressed"
    IMPROVED = "improved"
    UNCHANGED = "unchanged"
    NOT_ENOUGH_HISTORY = "not enough history"


@dataclass(frozen=True)
class Verdict:
    state: State
    value: float
    n: int
    median: float | None = None
    low: float | None = None
    high: float | None = None

    @property
    def delta(self) -> float | None:
        """Relative change against the median (+0.10 = 10 % higher)."""
        if self.median in (None, 0):
            return None
        return (self.value - self.median) / abs(self.median)


def judge(previous: Sequence[float], value: float, m: Metric, relative: float, settings: HistorySettings) -> Verdict:
    """``previous``: the series' earlier good values, oldest first."""
    window = list(previous)[-settings.baseline_nights:]
    if len(window) < settings.min_nights:
        return Verdict(State.NOT_ENOUGH_HISTORY, value, len(window))
    median = _median(window)
    sigma = MAD_TO_SIGMA * _median([abs(v - median) for v in window])
    allowed = max(relative * abs(median), settings.noise_k * sigma)
    low, high = median - allowed, median + allowed
    worse = value < low if m.higher_is_better else value > high
    better = value > high if m.higher_is_better else value < low
    state = State.REGRESSED if worse else State.IMPROVED if better else State.UNCHANGED
    return Verdict(state, value, len(window), median, low, high)


def _median(values: list[float]) -> float:
    """``statistics.median`` without its generality: this runs ~10^5 times per report."""
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


SeriesKey = tuple[str, str, str, int, str | None, str | None]


def series_key(row: dict[str, Any]) -> SeriesKey:
    return (row["config_id"], row["check_name"], row["metric"], row["batch_size"], row["gpu_name"], row["engine"])


@dataclass(frozen=True)
class Point:
    run_id: str
    row: dict[str, Any]
    verdict: Verdict


def judge_series(rows: Iterable[dict[str, Any]], settings: HistorySettings) -> dict[SeriesKey, list[Point]]:
    """Every numeric row judged against the good rows before it (rows oldest first, as the store returns them)."""
    by_series: dict[SeriesKey, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["value"] is not None and metric(row["check_name"], row["metric"]) is not None:
            by_series[series_key(row)].append(row)
    out: dict[SeriesKey, list[Point]] = {}
    for key, series in by_series.items():
        m = metric(key[1], key[2])
        relative = settings.relative_for(series[0]["model"], m.name)
        good: list[float] = []
        points = []
        for row in series:
            points.append(Point(row["run_id"], row, judge(good, row["value"], m, relative, settings)))
            if row["status"] == Status.PASSED.value:
                good.append(row["value"])
        out[key] = points
    return out


@dataclass(frozen=True)
class Change:
    """A judged metric of tonight."""

    row: dict[str, Any]
    metric: Metric
    verdict: Verdict


@dataclass(frozen=True)
class Flip:
    config_id: str
    kind: str  # "passed → failed", "failed → passed", "new error type", "auto kernel changed"
    before: str
    after: str


@dataclass(frozen=True)
class Changes:
    metrics: list[Change]
    flips: list[Flip]
    configs: int

    def of_state(self, state: State) -> list[Change]:
        return [c for c in self.metrics if c.verdict.state is state]

    def regressions_of(self, config_id: str) -> list[Change]:
        return [c for c in self.of_state(State.REGRESSED) if c.row["config_id"] == config_id]


def compare(rows: list[dict[str, Any]], tonight: set[str], settings: HistorySettings,
            judged: dict[SeriesKey, list[Point]] | None = None) -> Changes:
    """Judge the rows of the runs in ``tonight`` against everything that started before them.

    ``judged``: ``judge_series`` of ``rows`` when the caller has it already (the report) and ``tonight`` is
    the newest run, so judging twice is not needed.
    """
    tonight_rows = [r for r in rows if r["run_id"] in tonight]
    if not tonight_rows:
        return Changes([], [], 0)
    start = min(r["started_at"] for r in tonight_rows)
    earlier = [r for r in rows if r["run_id"] not in tonight and r["started_at"] < start]
    if judged is None:
        judged = judge_series(earlier + tonight_rows, settings)
    changes = [
        Change(p.row, metric(p.row["check_name"], p.row["metric"]), p.verdict)
        for points in judged.values() for p in points if p.run_id in tonight
    ]
    configs = {r["config_id"] for r in tonight_rows}
    return Changes(changes, _flips(earlier, tonight_rows), len(configs))


def _flips(earlier: list[dict[str, Any]], tonight: list[dict[str, Any]]) -> list[Flip]:
    last_outcome: dict[str, dict[str, Any]] = {}
    last_kernel: dict[str, str] = {}
    for row in earlier:  # oldest first: the dicts end holding the latest
        if row["check_name"] == OUTCOME_CHECK and row["metric"] == STATUS_METRIC:
            last_outcome[row["config_id"]] = row
            if row["moe_kernel"] and row["moe_backend"] == "auto":
                last_kernel[row["config_id"]] = row["moe_kernel"]
    flips: list[Flip] = []
    seen_kernel: set[str] = set()
    for row in tonight:
        cid = row["config_id"]
        if row["check_name"] == OUTCOME_CHECK and row["metric"] == STATUS_METRIC and cid in last_outcome:
            before, after = last_outcome[cid], row
            was_ok, is_ok = before["status"] == Status.PASSED.value, after["status"] == Status.PASSED.value
            if was_ok and after["status"] == Status.FAILED.value:
                flips.append(Flip(cid, "passed → failed", "passed", f"failed ({after['error_type'] or 'unknown'})"))
            elif not was_ok and is_ok and before["status"] == Status.FAILED.value:
                flips.append(Flip(cid, "failed → passed", f"failed ({before['error_type'] or 'unknown'})", "passed"))
            elif not was_ok and not is_ok and after["error_type"] and before["error_type"] != after["error_type"]:
                flips.append(Flip(cid, "new error type", before["error_type"] or before["status"], after["error_type"]))
        kernel = row["moe_kernel"] if row["check_name"] == OUTCOME_CHECK else None
        if kernel and row["moe_backend"] == "auto" and cid not in seen_kernel:
            seen_kernel.add(cid)
            if cid in last_kernel and last_kernel[cid] != kernel:
                flips.append(Flip(cid, "auto kernel changed", last_kernel[cid], kernel))
    return flips


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def change_line(c: Change) -> str:
    v = c.verdict
    delta = f"{v.delta:+.1%}" if v.delta is not None else "-"
    batch = c.row["batch_size"] or "-"
    return (
        f"| {c.row['config_id']} | {c.metric.label} | {batch} | {_num(v.value)} | {_num(v.median)} | "
        f"{_num(v.low)} – {_num(v.high)} | {delta} | {v.state.value} |"
    )


def changes_markdown(changes: Changes, title: str = "What changed since last night") -> str:
    """The ``$GITHUB_STEP_SUMMARY`` section: regressions first, then improvements, then flips."""
    regressed, improved = changes.of_state(State.REGRESSED), changes.of_state(State.IMPROVED)
    thin = {c.row["config_id"] for c in changes.of_state(State.NOT_ENOUGH_HISTORY)}
    lines = [
        f"## {title}", "",
        f"{changes.configs} configs: {len(regressed)} regressions, {len(improved)} improvements, "
        f"{len(changes.flips)} status changes, {len(thin)} configs with not enough history.",
    ]
    if regressed or improved:
        lines += ["", "| config | metric | batch | tonight | baseline median | band | change | verdict |", "|---|---|---|---|---|---|---|---|"]
        lines += [change_line(c) for c in regressed + improved]
    if changes.flips:
        lines += ["", "| config | status change | before | after |", "|---|---|---|---|"]
        lines += [f"| {f.config_id} | {f.kind} | {f.before} | {f.after} |" for f in changes.flips]
    return "\n".join(lines) + "\n"
