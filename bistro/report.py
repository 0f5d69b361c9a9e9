"""`bistro report DIR`: one self-contained HTML page about a run (inline SVG, no script, no network).

DIR is a localnet directory (summary.json, network.json and the top validator's windows.jsonl),
a validator's directory (`<dir>/validator/windows.jsonl`), or a windows.jsonl file. The page shows
the master's loss over windows, incentive (localnet) and weights per uid over windows, each uid's
verdict in each window, and the summary table. Loading (`load_run`) is apart from drawing
(`render`, pure: a `Run` in, a string out).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .windowlog import read_lines

log = logging.getLogger("bistro.report")

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")  # fmt: skip
VERDICT_COLOURS = {"ok": "#2ca02c", "skip": "#bbbbbb", "missing": "#f2d16b", "copy": "#9467bd"}
REJECTED = "#d62728"
"""Every other verdict (a DeltaRejected reason, peer_error, timeout, …)."""


class ReportError(ValueError):
    """DIR holds no run this command can read."""


@dataclass
class Run:
    """What the page is drawn from."""

    name: str
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None = None
    personas: dict[int, str] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    """`bistro eval`'s results (DIR/eval.json), when the run directory holds them."""


# --- loading -------------------------------------------------------------------------------------


def read_records(path: Path) -> list[dict[str, Any]]:
    """windows.jsonl, one record a line; a line cut short (a run still writing) ends the list."""
    return [r for r in read_lines(path) if isinstance(r, dict) and isinstance(r.get("uids"), dict)]


def _windows_file(path: Path, network: dict | None) -> Path | None:
    if path.is_file():
        return path
    candidates = [path / "validator" / "windows.jsonl", path / "windows.jsonl"]
    if network:
        validators = [u["name"] for u in network.get("uids", []) if u.get("role") == "validator"]
        candidates = [path / "nodes" / v / "validator" / "windows.jsonl" for v in validators[:1]] + candidates
    return next((c for c in candidates if c.is_file()), None)


def load_run(path: Path) -> Run:
    """The run at `path` (see the module docstring)."""
    path = path.expanduser()
    if not path.exists():
        raise ReportError(f"{path}: no such file or directory")
    directory = path if path.is_dir() else path.parent
    network = _read_json(directory / "network.json")
    summary = _read_json(directory / "summary.json")
    source = _windows_file(path, network)
    if source is None and summary is None:
        raise ReportError(f"{path}: neither a windows.jsonl nor a localnet summary.json here")
    personas = {
        int(u["uid"]): u["persona"] for u in (network or {}).get("uids", []) if u.get("role") == "miner"
    }
    records = read_records(source) if source else []
    evaluation = _read_json(directory / "eval.json")
    if not (isinstance(evaluation, dict) and isinstance(evaluation.get("tasks"), dict)):
        evaluation = None
    return Run(directory.resolve().name, records, summary, personas, evaluation)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# --- drawing -------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi == lo:
        return [lo]
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def line_chart(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    ylabel: str,
    dashed: frozenset[str] = frozenset(),
) -> str:
    """An SVG line chart: one polyline per series (x = window), a legend, axes with ticks."""
    width, height, left, right, top, bottom = 720, 300, 64, 170, 30, 40
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f'<figure><figcaption>{html.escape(title)}</figcaption><p class="empty">no data</p></figure>'
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: top + (y1 - y) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    out = [f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           f'xmlns="http://www.w3.org/2000/svg"><title>{html.escape(title)}</title>',
           f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
           'fill="#fafafa" stroke="#999"/>']  # fmt: skip
    for y in _ticks(y0 + pad, y1 - pad):
        out.append(
            f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="11">{y:.4g}</text>'
        )
        out.append(
            f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#e5e5e5"/>'
        )
    for x in sorted(set(int(v) for v in _ticks(x0, x1, min(6, int(x1 - x0) + 1)))):
        out.append(
            f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle" font-size="11">{x}</text>'
        )
    out.append(
        f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle" font-size="12">window</text>'
    )
    out.append(f'<text x="14" y="{(top + height - bottom) / 2}" font-size="12" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + height - bottom) / 2})">{html.escape(ylabel)}</text>')  # fmt: skip
    for i, (label, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="6 4"' if label in dashed else ""
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline class="series" data-label="{html.escape(label)}" points="{path}" fill="none" '
                   f'stroke="{colour}" stroke-width="2.5"{dash}/>')  # fmt: skip
        for x, y in pts:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>')
        ly = top + 14 + 16 * i
        out.append(f'<line x1="{width - right + 10}" x2="{width - right + 30}" y1="{ly - 4}" y2="{ly - 4}" '
                   f'stroke="{colour}" stroke-width="2.5"{dash}/><text x="{width - right + 36}" y="{ly}" '
                   f'font-size="11">{html.escape(label)}</text>')  # fmt: skip
    out.append("</svg>")
    return f"<figure><figcaption>{html.escape(title)}</figcaption>{''.join(out)}</figure>"


def verdict_grid(records: list[dict[str, Any]], label: dict[int, str]) -> str:
    """An SVG grid: a row per uid, a column per window, each cell coloured by the verdict."""
    uids = sorted({int(u) for r in records for u in r["uids"]})
    windows = [r["window"] for r in records]
    if not uids:
        return '<p class="empty">no verdicts</p>'
    cell, left, top = 18, 150, 24
    width, height = left + cell * len(windows) + 10, top + cell * len(uids) + 10
    out = [f'<svg class="verdicts" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
           'xmlns="http://www.w3.org/2000/svg"><title>verdicts per uid and window</title>']  # fmt: skip
    for j, w in enumerate(windows):
        if j % max(1, len(windows) // 10) == 0:
            out.append(
                f'<text x="{left + j * cell + cell / 2}" y="16" font-size="10" text-anchor="middle">{w}</text>'
            )
    for i, uid in enumerate(uids):
        y = top + i * cell
        out.append(
            f'<text x="{left - 6}" y="{y + 13}" font-size="11" text-anchor="end">{html.escape(label.get(uid, str(uid)))}</text>'
        )
        for j, r in enumerate(records):
            verdict = r["uids"].get(str(uid), {}).get("verdict")
            if verdict is None:
                continue
            colour = VERDICT_COLOURS.get(verdict, REJECTED)
            out.append(f'<rect class="cell" data-verdict="{html.escape(verdict)}" x="{left + j * cell}" y="{y}" '
                       f'width="{cell - 2}" height="{cell - 2}" fill="{colour}"><title>uid {uid}, window '
                       f'{r["window"]}: {html.escape(verdict)}</title></rect>')  # fmt: skip
    out.append("</svg>")
    legend = " ".join(
        f'<span class="key"><i style="background:{c}"></i>{name}</span>'
        for name, c in [*VERDICT_COLOURS.items(), ("rejected (any reason)", REJECTED)]
    )
    return "".join(out) + f'<p class="legend">{legend}</p>'


def _table(head: list[str], rows: list[list[Any]], cls: str) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else (json.dumps(v) if isinstance(v, dict) else str(v))
        return f"<td>{html.escape(text)}</td>"

    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead><tbody>{body}</tbody></table>'


def _paid(summary: dict) -> dict[int, float]:
    """Each uid's pay over the run: `paid` (summary.json), else its `incentive_history` summed."""
    history = summary.get("incentive_history", [])
    return {
        u["uid"]: float(u["paid"]) if "paid" in u
        else sum(h["incentive"].get(str(u["uid"]), 0.0) for h in history)
        for u in summary["uids"]
    }  # fmt: skip


def _summary_table(run: Run) -> str:
    if run.summary and run.summary.get("uids"):
        paid = _paid(run.summary)
        total = sum(paid.values())
        rows = [[u["uid"], u.get("persona", ""), round(paid[u["uid"]] / total, 4) if total > 0 else 0.0,
                 round(paid[u["uid"]], 4), u.get("incentive", 0.0), u.get("weight", 0.0),
                 u.get("moving_average", 0.0), u.get("rejections", {})]
                for u in sorted(run.summary["uids"], key=lambda u: (-paid[u["uid"]], -u.get("incentive", 0.0)))]  # fmt: skip
        return _table(["uid", "persona", "share of run's pay", "paid", "last incentive", "weight", "moving avg",
                       "rejections"], rows, "summary")  # fmt: skip
    if not run.records:
        return '<p class="empty">no windows</p>'
    counts: dict[int, dict[str, int]] = {}
    for r in run.records:
        for uid, v in r["uids"].items():
            c = counts.setdefault(int(uid), {})
            c[v["verdict"]] = c.get(v["verdict"], 0) + 1
    last = run.records[-1]["uids"]
    rows = [[uid, run.personas.get(uid, ""), last.get(str(uid), {}).get("weight", 0.0),
             last.get(str(uid), {}).get("moving_average", 0.0), counts[uid]] for uid in sorted(counts)]  # fmt: skip
    return _table(["uid", "persona", "weight", "moving avg", "verdicts"], rows, "summary")


def _master_loss(run: Run) -> tuple[dict[str, list[tuple[float, float]]], str]:
    """Held-out loss of each θ_w (localnet observer), else the publisher's global loss per window."""
    s = run.summary or {}
    if s.get("master_loss"):
        return {
            "held-out loss": list(zip(s["master_windows"], s["master_loss"], strict=True))
        }, "held-out loss"
    pts = [(r["window"] + 1, r["global_loss_after"]) for r in run.records
           if isinstance(r.get("global_loss_after"), int | float)]  # fmt: skip
    return {"global loss of θ_w+1": pts}, "global loss"


def _per_uid(run: Run, values: list[tuple[int, dict[str, float]]]) -> tuple[dict[str, list], frozenset[str]]:
    series: dict[str, list[tuple[float, float]]] = {}
    dashed = set()
    for window, by_uid in values:
        for uid, value in sorted(by_uid.items(), key=lambda kv: int(kv[0])):
            if int(uid) not in run.personas and run.personas:
                continue  # validators: they get no incentive and no weight
            name = _label(run, int(uid))
            series.setdefault(name, []).append((window, float(value)))
            if run.personas.get(int(uid), "honest") != "honest":
                dashed.add(name)
    return series, frozenset(dashed)


def _label(run: Run, uid: int) -> str:
    persona = run.personas.get(uid)
    return f"{uid} {persona}" if persona else f"uid {uid}"


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:980px}
h1{font-size:22px}h2,figcaption{font-size:17px;font-weight:600;margin:28px 0 6px}figure{margin:0}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f0f0f0}.legend{font-size:12px}.key{margin-right:12px}
.key i{display:inline-block;width:11px;height:11px;margin-right:4px;vertical-align:middle}.empty{color:#888}"""


def _evaluation(run: Run) -> str:
    """The benchmark scores `bistro eval` wrote (eval.json): one row per task and metric."""
    e = run.evaluation
    if not e:
        return ""
    rows = [[task, metric, value] for task, row in sorted(e["tasks"].items()) if isinstance(row, dict)
            for metric, value in sorted(row.items())]  # fmt: skip
    where = f"θ_{e['window']}" if e.get("window") is not None else str(e.get("source", "the model"))
    return f"<h2>Benchmark scores of {html.escape(where)} (lm-eval)</h2>" + _table(
        ["task", "metric", "value"], rows, "evaluation"
    )


def render(run: Run) -> str:
    """The whole page."""
    loss, ylabel = _master_loss(run)
    weights, dashed = _per_uid(run, [(r["window"], {u: v.get("weight", 0.0) for u, v in r["uids"].items()})
                                     for r in run.records])  # fmt: skip
    history = (run.summary or {}).get("incentive_history", [])
    incentive, dashed_i = _per_uid(run, [(h["window"], h["incentive"]) for h in history])
    s = run.summary or {}
    facts = [f"{len(run.records)} windows scored"]
    if s:
        paid = _paid(s) if s.get("uids") else {}
        total = sum(paid.values())
        honest = sum(paid[u["uid"]] for u in s.get("uids", []) if u.get("persona") == "honest")
        share = s.get("honest_paid_share", honest / total if total > 0 else 0.0)
        facts += [f"honest share of the run's pay {share:.3f}",
                  f"{s.get('wall_seconds', 0):.0f} s", f"crashed: {', '.join(s.get('crashed') or []) or 'none'}"]  # fmt: skip
    if s.get("model"):
        facts.append(f"model θ_{s['model']['window']} exported to {s['model']['dir']}")
    parts = [
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>bistro run {html.escape(run.name)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>bistro run {html.escape(run.name)}</h1><p class=facts>{html.escape('; '.join(facts))}</p>",
        line_chart("Master loss per window", loss, ylabel),
        line_chart("Incentive per uid", incentive, "incentive", dashed_i) if history
        else '<h2>Incentive per uid</h2><p class="empty">incentive is on the chain: a localnet run records it, '
             'a validator does not</p>',
        line_chart("Weight per uid (this validator)", weights, "weight", dashed),
        "<h2>Verdicts per uid</h2>", verdict_grid(run.records, {u: _label(run, u) for u in run.personas}),
        "<h2>Summary</h2>", _summary_table(run), _evaluation(run), "</body></html>",
    ]  # fmt: skip
    return "\n".join(parts)


def main(settings: Any, args: argparse.Namespace) -> int:  # noqa: ARG001 - the CLI's signature
    path = Path(args.run_dir)
    try:
        run = load_run(path)
    except ReportError as e:
        log.error("%s", e)
        return 1
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "report.html"
    out.write_text(render(run), encoding="utf-8")
    print(f"report: {out}")
    return 0
