"""``report --html``: the morning report as one self-contained HTML file.

Why inline SVG drawn here rather than a charting library: the page must open from an artifact zip on a
laptop with no network, and 90 nights × 100 configs must render in well under two seconds — plain
polylines and circles do both, with nothing to vendor. The script on the page only shows the clicked
point's provenance; every chart is already drawn when the file is written.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pytest_moe.history.regress import Changes, Point, State, changes_markdown, compare, judge_series
from pytest_moe.history.rows import OUTCOME_CHECK, STATUS_METRIC, Status, metric
from pytest_moe.history.store import HistoryStore, utcnow
from pytest_moe.configs import HistorySettings

#: The trend charts: (check, metric) at each config's smallest batch size.
CHARTS = (("benchmark", "output_throughput_tok_per_s"), ("benchmark", "itl_ms"), ("benchmark", "ttft_s"), ("accuracy", "score"))
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f", "#393b79")
STATUS_COLOURS = {Status.PASSED.value: "#3a9d5d", Status.XFAILED.value: "#c9a227", Status.PREDICTED.value: "#b8c4d6"}
ERROR_PALETTE = ("#d62728", "#a2172a", "#e4572e", "#b5179e", "#7b2d26", "#ff6f59", "#c03221", "#8f2d56")
W, H, ML, MR, MT, MB = 640, 220, 64, 12, 12, 28

_SINCE = re.compile(r"^(\d+)([hdw])$")


def parse_since(text: str) -> timedelta:
    match = _SINCE.match(text.strip())
    if not match:
        raise ValueError(f"--since {text!r} is not a duration like 14d, 36h or 2w")
    n, unit = int(match.group(1)), match.group(2)
    return {"h": timedelta(hours=n), "d": timedelta(days=n), "w": timedelta(weeks=n)}[unit]


@dataclass
class ReportData:
    runs: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    changes: Changes
    judged: dict[tuple, list[Point]]


def collect(store: HistoryStore, since: timedelta | None, settings: HistorySettings) -> ReportData:
    """What the page shows, read in two slices so 90 nights × 100 configs stay fast.

    * the chart metrics and outcomes of the window's nights plus the ``baseline_nights`` before it (so the
      first nights shown have baselines too);
    * every metric of the last night and the ``baseline_nights`` before it, for "what changed".
    """
    all_runs = store.runs()
    cutoff = utcnow() - since if since else None
    first = next((i for i, r in enumerate(all_runs) if cutoff is None or r["started_at"] >= cutoff), len(all_runs))
    shown = all_runs[first:]
    if not shown:
        return ReportData([], [], Changes([], [], 0), {})
    loaded = [r["run_id"] for r in all_runs[max(0, first - settings.baseline_nights):]]
    rows = store.rows(run_ids=loaded, slim=True, metrics=[*CHARTS, (OUTCOME_CHECK, STATUS_METRIC)])
    judged = judge_series(rows, settings)
    recent = [r["run_id"] for r in all_runs[-settings.baseline_nights - 1:]]
    changes = compare(store.rows(run_ids=recent, slim=True), {shown[-1]["run_id"]}, settings)
    shown_ids = {r["run_id"] for r in shown}
    return ReportData(shown, [r for r in rows if r["run_id"] in shown_ids], changes, judged)


def render(data: ReportData, title: str = "pytest-moe morning report") -> str:
    runs = data.runs
    run_index = {r["run_id"]: i for i, r in enumerate(runs)}
    configs = sorted({r["config_id"] for r in data.rows})
    cfg_index = {c: i for i, c in enumerate(configs)}
    details = _Details(runs, cfg_index)
    for row in data.rows:
        if row["check_name"] == OUTCOME_CHECK:
            details.add(row)
    parts = [
        f"<h1>{_e(title)}</h1>",
        f"<p class=meta>{len(runs)} nights ({_date(runs[0]) if runs else '-'} → {_date(runs[-1]) if runs else '-'}), "
        f"{len(configs)} configs. Generated {utcnow():%Y-%m-%d %H:%M} UTC. Click any point or cell for its provenance "
        f"and reproduce command.</p>",
        "<div id=detail class=detail hidden></div>",
        _changes_html(data.changes),
    ]
    by_model: dict[str, list[str]] = defaultdict(list)
    for cid in configs:
        by_model[cid.partition("::")[0]].append(cid)
    parts.append("<h2>Trends</h2>")
    smallest: dict[tuple[str, str, str], list[Point]] = {}
    for key in sorted(data.judged, key=lambda k: k[3], reverse=True):  # smallest batch size written last
        smallest[key[:3]] = data.judged[key]
    for model in sorted(by_model):
        charts = [_chart(model, by_model[model], check, name, data, run_index, details, smallest) for check, name in CHARTS]
        charts = [c for c in charts if c]
        if charts:
            parts.append(f"<section class=model><h3>{_e(model)}</h3><div class=charts>{''.join(charts)}</div></section>")
    parts.append(_grid(configs, runs, data.rows, details))
    payload = json.dumps({"cells": details.cells, "runs": details.run_info, "prov": details.prov}, separators=(",", ":"))
    payload = payload.replace("</", "<\\/")
    return _PAGE.format(title=_e(title), style=_STYLE, body="\n".join(parts), data=payload, script=_SCRIPT)


class _Details:
    """Provenance shown on click, deduplicated: per run, per distinct config provenance, per config × night."""

    def __init__(self, runs: list[dict[str, Any]], cfg_index: dict[str, int]):
        self.run_index = {r["run_id"]: i for i, r in enumerate(runs)}
        self.run_info = [
            {k: (v.isoformat(sep=" ", timespec="minutes") if isinstance(v, datetime) else v) for k, v in r.items() if k != "source"}
            for r in runs
        ]
        self.cfg_index = cfg_index
        self.prov: list[dict[str, Any]] = []
        self._prov_index: dict[tuple, int] = {}
        self.cells: list[dict[str, Any]] = []
        self.cell_of: dict[tuple[str, str], int] = {}

    def add(self, row: dict[str, Any]) -> None:
        key = (row["config_id"], row["run_id"])
        if key in self.cell_of:
            cell = self.cells[self.cell_of[key]]
        else:
            fields = ("engine", "engine_version", "engine_commit", "gpu_name", "gpu_count", "moe_backend", "moe_kernel",
                      "config_hash", "server_command", "repro_command")
            prov_key = tuple(row[f] for f in fields)
            if prov_key not in self._prov_index:
                self._prov_index[prov_key] = len(self.prov)
                self.prov.append(dict(zip(fields, prov_key)))
            self.cell_of[key] = len(self.cells)
            cell = {"c": row["config_id"], "r": self.run_index[row["run_id"]], "p": self._prov_index[prov_key]}
            self.cells.append(cell)
        if row["check_name"] == OUTCOME_CHECK and row["metric"] == STATUS_METRIC:
            cell["s"], cell["e"] = row["status"], row["error_type"]

    def index(self, row: dict[str, Any]) -> int:
        return self.cell_of[(row["config_id"], row["run_id"])]


def _changes_html(changes: Changes) -> str:
    regressed, improved = changes.of_state(State.REGRESSED), changes.of_state(State.IMPROVED)
    thin = len({c.row["config_id"] for c in changes.of_state(State.NOT_ENOUGH_HISTORY)})
    out = [
        "<h2>What changed since last night</h2>",
        f"<p>{changes.configs} configs last night: <b class=bad>{len(regressed)} regressions</b>, "
        f"<b class=good>{len(improved)} improvements</b>, {len(changes.flips)} status changes, "
        f"{thin} configs with not enough history.</p>",
    ]
    if regressed or improved:
        out.append("<table class=changes><tr><th>config</th><th>metric</th><th>batch</th><th>last night</th>"
                   "<th>baseline median</th><th>band</th><th>change</th><th>verdict</th></tr>")
        for c in regressed + improved:
            v = c.verdict
            out.append(
                f"<tr class={'bad' if v.state is State.REGRESSED else 'good'}><td>{_e(c.row['config_id'])}</td>"
                f"<td>{_e(c.metric.label)}</td><td>{c.row['batch_size'] or '-'}</td><td>{_num(v.value)}</td>"
                f"<td>{_num(v.median)}</td><td>{_num(v.low)} – {_num(v.high)}</td>"
                f"<td>{v.delta:+.1%}</td><td>{_e(v.state.value)}</td></tr>"
            )
        out.append("</table>")
    if changes.flips:
        out.append("<table class=changes><tr><th>config</th><th>status change</th><th>before</th><th>after</th></tr>")
        out += [f"<tr class=flip><td>{_e(f.config_id)}</td><td>{_e(f.kind)}</td><td>{_e(f.before)}</td><td>{_e(f.after)}</td></tr>"
                for f in changes.flips]
        out.append("</table>")
    out.append(f"<details><summary>Markdown (as in the job summary)</summary><pre>{_e(changes_markdown(changes))}</pre></details>")
    return "\n".join(out)


def _chart(model: str, cids: list[str], check: str, name: str, data: ReportData, run_index: dict[str, int],
           details: _Details, smallest: dict[tuple[str, str, str], list[Point]]) -> str:
    m = metric(check, name)
    series: list[tuple[str, list[Point]]] = []
    for cid in cids:
        pts = [p for p in smallest.get((cid, check, name), ()) if p.run_id in run_index]
        if pts:
            batch = pts[0].row["batch_size"]
            series.append((f"{cid.partition('::')[2]}" + (f" (batch {batch})" if batch else ""), pts))
    if not series:
        return ""
    values = [v for _, pts in series for p in pts for v in (p.verdict.value, p.verdict.low, p.verdict.high) if v is not None]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.08 or abs(hi) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    nights = max(len(run_index) - 1, 1)

    def x(i: int) -> float:
        return ML + (W - ML - MR) * (i / nights)

    def y(v: float) -> float:
        return MT + (H - MT - MB) * (1 - (v - lo) / (hi - lo))

    svg = [f'<svg class=chart viewBox="0 0 {W} {H}" role=img aria-label="{_e(model)} {_e(m.label)}">',
           f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" class=plot />',
           f'<text x="{ML - 4}" y="{MT + 10}" class="ax end">{_num(hi)}</text>',
           f'<text x="{ML - 4}" y="{H - MB}" class="ax end">{_num(lo)}</text>',
           f'<text x="{ML}" y="{H - 8}" class=ax>{_e(_date(data.runs[0]))}</text>',
           f'<text x="{W - MR}" y="{H - 8}" class="ax end">{_e(_date(data.runs[-1]))}</text>']
    legend = []
    for n, (label, pts) in enumerate(series):
        colour = PALETTE[n % len(PALETTE)]
        banded = [p for p in pts if p.verdict.low is not None]
        if len(banded) > 1:
            upper = " ".join(f"{x(run_index[p.run_id]):.1f},{y(p.verdict.high):.1f}" for p in banded)
            lower = " ".join(f"{x(run_index[p.run_id]):.1f},{y(p.verdict.low):.1f}" for p in reversed(banded))
            svg.append(f'<polygon class=band points="{upper} {lower}" fill="{colour}"><title>{_e(label)}: noise band</title></polygon>')
        line = " ".join(f"{x(run_index[p.run_id]):.1f},{y(p.verdict.value):.1f}" for p in pts)
        svg.append(f'<polyline class=line points="{line}" stroke="{colour}" />')
        # Plain points carry only their value; hovering shows the rest from the page's data (keeps 90 nights
        # × 100 configs to a few MB). Regressions and improvements also carry a native tooltip with the band.
        svg.append(f'<g fill="{colour}">')
        for p in pts:
            cx, cy, v = x(run_index[p.run_id]), y(p.verdict.value), p.verdict
            cell = details.index(p.row)
            if v.state in (State.REGRESSED, State.IMPROVED):
                tip = (f"{label} · {_date(data.runs[run_index[p.run_id]])} · {m.label} {_num(v.value)} {m.unit} · "
                       f"median {_num(v.median)}, band {_num(v.low)}–{_num(v.high)} · {v.state.value}")
                shape = f"M{cx:.1f},{cy + 7:.1f} l-6,-11 h12 z" if v.state is State.REGRESSED else f"M{cx:.1f},{cy - 7:.1f} l-6,11 h12 z"
                cls = "bad" if v.state is State.REGRESSED else "good"
                svg.append(f'<path class="mark {cls}" data-c="{cell}" data-v="{_num(v.value)}" d="{shape}"><title>{_e(tip)}</title></path>')
            else:
                svg.append(f'<circle data-c="{cell}" data-v="{_num(v.value)}" cx="{cx:.1f}" cy="{cy:.1f}" r="2.6"/>')
        svg.append("</g>")
        legend.append(f'<span><i style="background:{colour}"></i>{_e(label)}</span>')
    svg.append("</svg>")
    unit = f" ({m.unit})" if m.unit else ""
    direction = "higher is better" if m.higher_is_better else "lower is better"
    return (f'<figure class=fig><figcaption>{_e(m.label)}{_e(unit)} <small>{direction}</small></figcaption>'
            f'{"".join(svg)}<div class=legend>{"".join(legend)}</div></figure>')


def _grid(configs: list[str], runs: list[dict[str, Any]], rows: list[dict[str, Any]], details: _Details) -> str:
    outcome = {(r["config_id"], r["run_id"]): r for r in rows if r["check_name"] == OUTCOME_CHECK and r["metric"] == STATUS_METRIC}
    errors = sorted({r["error_type"] for r in outcome.values() if r["error_type"] and r["status"] == Status.FAILED.value})
    legend = [f'<span><i style="background:{c}"></i>{_e(s)}</span>' for s, c in STATUS_COLOURS.items()]
    legend += [f'<span><i style="background:{_error_colour(e)}"></i>failed: {_e(e)}</span>' for e in errors]
    head = "".join(f"<th title='{_e(r['run_id'])}'>{_e(_date(r, short=True))}</th>" for r in runs)
    out = ["<h2>Config × night</h2>", f"<div class=legend>{''.join(legend)}</div>",
           f"<div class=gridwrap><table class=grid><tr><th>config</th>{head}</tr>"]
    for cid in configs:
        cells = []
        for run in runs:
            row = outcome.get((cid, run["run_id"]))
            if row is None:
                cells.append("<td></td>")
                continue
            colour = _error_colour(row["error_type"]) if row["status"] == Status.FAILED.value else STATUS_COLOURS.get(row["status"], "#999")
            tip = f"{cid} · {_date(run)} · {row['status']}" + (f" ({row['error_type']})" if row["error_type"] else "")
            cells.append(f'<td data-c="{details.index(row)}" style="background:{colour}" title="{_e(tip)}"></td>')
        out.append(f"<tr><th class=cid>{_e(cid)}</th>{''.join(cells)}</tr>")
    out.append("</table></div>")
    return "\n".join(out)


def _error_colour(error_type: str | None) -> str:
    """Stable per error type across reports, so OOM looks the same every morning."""
    digest = hashlib.sha256((error_type or "").encode()).digest()
    return ERROR_PALETTE[digest[0] % len(ERROR_PALETTE)]


def _date(run: dict[str, Any], short: bool = False) -> str:
    when = run["started_at"]
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    return f"{when:%m-%d}" if short else f"{when:%Y-%m-%d %H:%M}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:20px;padding-bottom:34vh;color:#222;max-width:1400px}
h1{margin:0 0 4px}.meta{color:#555}
table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;text-align:left}
tr.bad td{background:#fde8e8}tr.good td{background:#e6f4ea}tr.flip td{background:#fff6dc}
b.bad{color:#b00020}b.good{color:#1b7f3b}
.charts{display:flex;flex-wrap:wrap;gap:12px}.fig{margin:0;border:1px solid #e3e3e3;padding:6px;background:#fff}
.fig figcaption{font-weight:600}.fig small{color:#777;font-weight:400}
svg.chart{width:640px;height:220px;display:block}.plot{fill:#fafafa;stroke:#ccc}
.line{fill:none;stroke-width:1.6}.band{opacity:.13}circle{cursor:pointer}
.mark{cursor:pointer;stroke:#000;stroke-width:.6}.mark.bad{fill:#d62728}.mark.good{fill:#2ca02c}
.ax{font-size:10px;fill:#555}.ax.end{text-anchor:end}
.legend span{display:inline-block;margin:2px 10px 2px 0;font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;margin-right:4px;vertical-align:middle}
.gridwrap{overflow:auto;max-height:70vh}table.grid td{width:12px;height:12px;padding:0;cursor:pointer}
table.grid th{font-size:10px;font-weight:400;white-space:nowrap}th.cid{position:sticky;left:0;background:#fff}
.detail{position:fixed;left:20px;right:20px;bottom:12px;z-index:2;background:#f4f6fb;border:1px solid #c9d2e3;padding:8px;
white-space:pre-wrap;font:12px/1.35 ui-monospace,monospace;max-height:30vh;overflow:auto;box-shadow:0 2px 10px #0003}
.detail[hidden]{display:none}
"""

_SCRIPT = """
(function(){
  var D=JSON.parse(document.getElementById('moe-data').textContent);
  var panel=document.getElementById('detail');
  function show(i,value){
    var c=D.cells[i],r=D.runs[c.r],p=D.prov[c.p],lines=[c.c+'  ·  night '+r.started_at+'  ·  '+(c.s||'')+(c.e?' ('+c.e+')':'')+(value?'  ·  value '+value:'')];
    lines.push('reproduce: '+(p.repro_command||'-'));
    lines.push('server command: '+(p.server_command||'-'));
    lines.push('engine: '+(p.engine||'-')+' '+(p.engine_version||'')+(p.engine_commit?' @'+p.engine_commit:'')+
      '  ·  MoE backend: '+(p.moe_backend||'-')+' → kernel '+(p.moe_kernel||'unknown'));
    lines.push('GPU: '+(p.gpu_name||'-')+' ×'+(p.gpu_count==null?'-':p.gpu_count)+'  ·  driver '+(r.gpu_driver||'-')+'  ·  CUDA '+(r.cuda_version||'-'));
    lines.push('run '+r.run_id+'  ·  host '+(r.host||'-')+'  ·  pytest-moe '+(r.pytest_moe_version||'-')+'  ·  suite commit '+(r.suite_commit||'-')+'  ·  config hash '+(p.config_hash||'-'));
    panel.textContent=lines.join('\\n');panel.hidden=false;
  }
  function pick(e){var t=e.target.closest('[data-c]');if(t){show(+t.getAttribute('data-c'),t.getAttribute('data-v'));}}
  document.addEventListener('click',pick);
  document.addEventListener('mouseover',function(e){if(e.target.tagName==='circle'){pick(e);}});
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<style>{style}</style></head>
<body>
{body}
<script type="application/json" id="moe-data">{data}</script>
<script>{script}</script>
</body></html>
"""


def write_report(store: HistoryStore, out: str, since: timedelta | None, settings: HistorySettings) -> ReportData:
    data = collect(store, since, settings)
    with open(out, "w", encoding="utf-8") as fh:
        fh.write(render(data))
    return data
