"""HTML building blocks shared by the run report and the comparison: one self-contained page.

The page inlines uPlot (MIT, vendored under `vendor/uplot/` from the npm package `uplot`; its
licence travels inside the page) plus our own CSS and JS from `assets/`, and carries its data as
one JSON block, so the file opens offline, from disk, anywhere. uPlot was chosen over Chart.js
(~200 kB, slower on long series) and Plotly (~3.5 MB) for being ~50 kB and fast with tens of
thousands of points, with synced cursors, drag-zoom and log scales built in.
"""

from __future__ import annotations

import html
import json
import math
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from plinth.report.downsample import MAX_POINTS, downsample
from plinth.report.rundata import Run, finite

HERE = Path(__file__).resolve().parent
UPLOT_DIR = HERE / "vendor" / "uplot"
AXES = ("step", "tokens", "time")

PALETTE = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#d62728",
]

# vertical markers on every chart: event kind -> style (eval events show as the val curve)
MARKER_KINDS = {
    "checkpoint": {"color": "#9aa0a6", "dash": True, "label": "checkpoint"},
    "resume": {"color": "#1f6feb", "width": 2, "label": "resume"},
    "rollback": {"color": "#e67e22", "width": 2, "label": "rollback"},
    "anomaly": {"color": "#d62728", "label": "anomaly"},
    "early_stop": {"color": "#8e44ad", "width": 2, "label": "early stop"},
    "checkpoint_skipped": {"color": "#b26a00", "dash": True, "label": "checkpoint skipped"},
    "end": {"color": "#1a7f37", "width": 2, "label": "end"},
}
MAX_MARKERS = 1500


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_num(v: Any, digits: int = 4) -> str:
    """A number for people: NaN/Inf spelled out, big values with k/M/B, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not isinstance(v, int | float):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    a = abs(v)
    if isinstance(v, int) and a < 10_000:
        return str(v)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e4)):
        if a >= scale:
            div = 1e3 if unit == "k" else scale
            return f"{v / div:.{3}g}{unit}"
    if a != 0 and a < 1e-3:
        return f"{v:.2e}"
    return f"{v:.{digits}g}"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{s} s"
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s"


def fmt_bytes(n: Any) -> str:
    if not finite(n):
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def fmt_time(ts: Any) -> str:
    if not finite(ts):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(
    headers: list[str],
    rows: list[list[str]],
    *,
    num: set[int] = frozenset(),
    row_attrs: list[str] | None = None,
    tid: str | None = None,
) -> str:
    """An HTML table from already-escaped cell strings; `num` columns are right-aligned."""
    head = "".join(
        f'<th class="{"num" if i in num else ""}">{h}</th>' for i, h in enumerate(headers)
    )
    thead = f"<thead><tr>{head}</tr></thead>" if headers else ""
    body = []
    for r, cells in enumerate(rows):
        attrs = row_attrs[r] if row_attrs else ""
        tds = "".join(
            f'<td class="{"num" if i in num else ""}">{c}</td>' for i, c in enumerate(cells)
        )
        body.append(f"<tr {attrs}>{tds}</tr>")
    ident = f' id="{tid}"' if tid else ""
    # wide tables (many runs or metrics) scroll inside their box instead of widening the page
    return f'<div class="tbl"><table{ident}>{thead}<tbody>{"".join(body)}</tbody></table></div>'


def cards(items: list[tuple[str, str]], cls: str = "") -> str:
    """Key figures as small cards; values are already-escaped HTML."""
    inner = "".join(
        f'<div class="card {c}"><div class="k">{k}</div><div class="v">{v}</div></div>'
        for k, v, c in ((*item, "") if len(item) == 2 else item for item in items)
    )
    return f'<div class="cards {cls}">{inner}</div>'


# ---------------------------------------------------------------------------------- axes


class Axes:
    """Maps a run's steps and wall-clock times onto the three x axes: step, tokens, run time."""

    def __init__(self, run: Run):
        self.run = run
        tok = [(p["step"], p["value"]) for p in run.series("tokens") if math.isfinite(p["value"])]
        self._tok_steps = np.array([s for s, _ in tok], dtype=float)
        self._tok_vals = np.array([t for _, t in tok], dtype=float)
        chrono = [
            (r["time"], r["step"])
            for r in run.records
            if finite(r.get("time")) and finite(r.get("step"))
        ]
        self._times = np.array([t for t, _ in chrono], dtype=float)
        self._steps = np.array([s for _, s in chrono], dtype=float)
        self._segments = run.segments()

    def tokens(self, steps: list[float]) -> list[float | None] | None:
        if len(self._tok_steps) < 2:
            return None
        out = np.interp(
            np.asarray(steps, dtype=float),
            self._tok_steps,
            self._tok_vals,
            left=np.nan,
            right=np.nan,
        )
        if len(steps) and np.isnan(out).all():
            return None
        return [None if math.isnan(v) else round(float(v)) for v in out]

    def time(self, times: list[Any]) -> list[float | None]:
        out: list[float | None] = []
        for t in times:
            if not finite(t):
                out.append(None)
                continue
            elapsed, value = 0.0, None
            for begin, end in self._segments:
                if t < begin:
                    value = elapsed
                    break
                if t <= end:
                    value = elapsed + (t - begin)
                    break
                elapsed += end - begin
            out.append(round(elapsed if value is None else value, 3))
        return out

    def step_at(self, times: list[Any]) -> list[float | None]:
        """Training step at wall-clock times (for samples that carry only a time)."""
        if len(self._times) < 2:
            return [None] * len(times)
        out = []
        for t in times:
            if not finite(t) or t < self._times[0] or t > self._times[-1]:
                out.append(None)
            else:
                out.append(round(float(np.interp(t, self._times, self._steps)), 2))
        return out


def series_payload(
    axes: Axes,
    data: list[dict],
    *,
    label: str,
    color: str,
    keep_steps: set = frozenset(),
    max_points: int = MAX_POINTS,
    **style: Any,
) -> dict | None:
    """One chart series (down-sampled) with x values on all three axes and its non-finite
    points listed separately (JSON has no NaN; the page draws them as red triangles)."""
    if not data:
        return None
    steps = [p["step"] for p in data]
    values = [p["value"] for p in data]
    idx = downsample(steps, [values], max_points, keep_steps)
    st = [steps[i] for i in idx]
    tm = [data[i].get("time") for i in idx]
    recorded_tokens = [data[i].get("tokens") for i in idx]
    tok = recorded_tokens if all(finite(t) for t in recorded_tokens) else axes.tokens(st)
    xs = {"step": st, "tokens": tok, "time": axes.time(tm)}
    ys = [values[i] if math.isfinite(values[i]) else None for i in idx]
    bad = [k for k, i in enumerate(idx) if not math.isfinite(values[i])]
    nonfinite = None
    if bad:
        nonfinite = {a: [xs[a][k] for k in bad] if xs[a] is not None else None for a in AXES}
        nonfinite["values"] = [fmt_num(values[idx[k]]) for k in bad]
    return {"label": label, "color": color, "x": xs, "y": ys, "nonfinite": nonfinite, **style}


def markers_payload(run: Run, axes: Axes, label_prefix: str = "") -> list[dict]:
    """Vertical event markers (checkpoints, resumes, rollbacks, anomalies, ...)."""
    chosen = [e for e in run.events if e.get("event") in MARKER_KINDS and finite(e.get("step"))]
    if len(chosen) > MAX_MARKERS:  # keep the rare kinds, thin the frequent ones
        rare = [e for e in chosen if e.get("event") not in ("checkpoint", "anomaly")]
        common = [e for e in chosen if e.get("event") in ("checkpoint", "anomaly")]
        stride = max(1, len(common) // max(1, MAX_MARKERS - len(rare)))
        chosen = sorted(rare + common[::stride], key=lambda e: e["step"])
    steps = [e["step"] for e in chosen]
    tokens = axes.tokens(steps) or [e.get("tokens") for e in chosen]
    times = axes.time([e.get("time") for e in chosen])
    out = []
    for e, tok, tm in zip(chosen, tokens, times, strict=True):
        details = ", ".join(
            f"{k}={fmt_num(v)}" for k, v in e.items() if k not in ("step", "time", "event")
        )
        label = f"{label_prefix}{e['event']} @ step {e['step']}" + (
            f": {details}" if details else ""
        )
        out.append(
            {"kind": e["event"], "step": e["step"], "tokens": tok, "time": tm, "label": label[:300]}
        )
    return out


def marker_legend() -> str:
    keys = []
    for style in MARKER_KINDS.values():
        dash = " dash" if style.get("dash") else ""
        keys.append(
            f'<span><i class="{dash.strip()}" style="border-color:{style["color"]}">'
            f"</i>{esc(style['label'])}</span>"
        )
    keys.append('<span><b class="tri">▼</b> non-finite value (NaN/Inf)</span>')
    keys.append("<span>drag to zoom, double-click to reset</span>")
    return f'<div class="legend-keys">{"".join(keys)}</div>'


def chart_block(spec: dict, note: str = "") -> str:
    log = (
        '<label><input type="checkbox" class="logy"> log y</label>'
        if spec.get("logToggle", True)
        else ""
    )
    return (
        f'<section class="chart" id="chart-{esc(spec["id"])}"><header><h3>{esc(spec["title"])}'
        f'</h3><span class="note">{note}</span>{log}</header>'
        f'<div class="chart-canvas"></div><div class="chart-info"></div></section>'
    )


def controls(axes: tuple[str, ...] = AXES, smoothing: bool = True) -> str:
    names = {"step": "step", "tokens": "tokens", "time": "run time"}
    radios = "".join(
        f'<label><input type="radio" name="xaxis" value="{a}"> {names[a]}</label> ' for a in axes
    )
    slider = (
        '<label>smoothing <input type="range" id="smoothing" min="0" max="0.99" step="0.01">'
        ' <span id="smoothing-value" class="mono"></span></label>'
        if smoothing
        else ""
    )
    return (
        f'<div class="controls"><span>x axis: {radios}</span>{slider}'
        '<label><input type="checkbox" id="show-markers" checked> event markers</label></div>'
    )


@cache
def _asset(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def page(title: str, body: str, payload: dict) -> str:
    """The whole self-contained HTML document."""
    data = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # never closes the script element
    license_text = _asset(UPLOT_DIR / "LICENSE").replace("*/", "* /")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="plinth">
<title>{esc(title)}</title>
<style>{_asset(UPLOT_DIR / "uPlot.min.css")}</style>
<style>{_asset(HERE / "assets" / "report.css")}</style>
</head><body><main>
{body}
</main>
<script type="application/json" id="plinth-data">{data}</script>
<script>/* uPlot 1.6.32 (https://github.com/leeoniya/uPlot)
{license_text}*/
{_asset(UPLOT_DIR / "uPlot.iife.min.js")}</script>
<script>{_asset(HERE / "assets" / "report.js")}</script>
</body></html>
"""


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
