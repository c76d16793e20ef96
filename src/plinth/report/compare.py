"""`plinth compare RUN_A RUN_B [...]`: runs side by side, in the terminal and as one HTML page.

    plinth compare runs/base runs/lr-3e-3            # writes runs/compare-base-vs-lr-3e-3.html

The first run is the baseline. Shown: the config keys whose values differ (nothing else), code
and data versions (git SHA + dirty flag, data fingerprint, packages), overlaid curves on step /
tokens / run-time axes, final metrics with deltas against the baseline, and the first point
where each run's training loss diverges from the baseline's beyond noise.

Divergence test (`divergence`). The two loss curves are aligned on tokens seen (steps when a
run has no token counts; the other run is linearly interpolated onto the baseline's points,
non-finite points dropped) and d = loss_run - loss_baseline is formed. The per-point noise of d,
sigma, is estimated robustly from its first differences: sigma = 1.4826 * MAD(diff(d)) / sqrt(2)
(trends barely change from one logged point to the next; noise does, and MAD ignores the odd
spike). Over a trailing window of `window` points (default 10) the median of d is compared with
the threshold max(z * 1.2533 * sigma / sqrt(window), rel_floor * |baseline loss|) with z = 4
(1.2533 sigma / sqrt(n) is the standard error of a median; rel_floor = 0.5% keeps numerically
tiny but "significant" gaps of nearly identical runs from counting). The curves diverge at the
first point where the threshold is exceeded, with the same sign, for `window` consecutive
windows: a sustained gap, not one spike (a median ignores isolated spikes anyway). The step
reported is the last point of the first such window: the earliest step at which the gap is
distinguishable from noise; the gap reported is the median over the confirming points. On
synthetic curves a step change of ~3x the per-point noise is flagged within ~5 logged points
and none of ten noise-only pairs is flagged; a change of ~1.2x noise is found in most, not all,
cases, within ~150 points.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from plinth.report.downsample import MAX_POINTS
from plinth.report.page import (
    MARKER_KINDS,
    PALETTE,
    Axes,
    chart_block,
    controls,
    esc,
    fmt_duration,
    fmt_num,
    marker_legend,
    markers_payload,
    page,
    series_payload,
    table,
    write_atomic,
)
from plinth.report.rundata import (
    Run,
    eval_direction,
    evaluations,
    finite,
    health,
    load_run,
    metric_direction,
    summarize,
)

DIVERGENCE_WINDOW = 10
DIVERGENCE_Z = 4.0
DIVERGENCE_REL_FLOOR = 0.005

# (summary key, label, which direction is better: -1 lower, +1 higher, 0 neither; from
# rundata.metric_direction, the one home for it)
FINAL_METRICS = [
    (key, label, metric_direction(key))
    for key, label in [
        ("step", "steps"),
        ("tokens", "tokens"),
        ("wall_s", "wall time"),
        ("compute_h", "compute (device-h)"),
        ("train_loss_tail", "final train loss (last 5%)"),
        ("best_train_loss", "best train loss"),
        ("val_loss", "final val loss"),
        ("best_val_loss", "best val loss"),
        ("tokens_per_s", "tokens/s"),
        ("mfu", "MFU"),
        ("peak_mem_mb", "peak memory (MB)"),
    ]
]
HEALTH_METRICS = [
    ("nonfinite", "non-finite steps"),
    ("spikes", "spikes"),
    ("rollbacks", "rollbacks"),
]


def compare(runs: list[str], *, output: str | None = None, max_points: int = MAX_POINTS) -> int:
    """Compare runs: config and version diff, overlaid curves, final metrics, divergence.

    The first run is the baseline for deltas and divergence. Prints a summary and writes an
    HTML page.

    Args:
        runs: two or more run directories, baseline first
        output: where to write the HTML (default: next to the first run,
            compare-<a>-vs-<b>.html)
        max_points: most points per chart series (longer ones are down-sampled)
    """
    from plinth.errors import UsageError

    if len(runs) < 2:
        raise UsageError("give at least two run directories to compare, baseline first")
    loaded = [load_run(r) for r in runs]
    result = comparison(loaded)
    if output:
        out = Path(output)
    else:
        stem = "-vs-".join(r.name for r in loaded)[:120]
        out = loaded[0].path.resolve().parent / f"compare-{stem}.html"
    write_atomic(out, render_compare(loaded, result, max_points=max_points))
    print_summary(loaded, result)
    print(f"\nwrote {out}")
    return 0


# -------------------------------------------------------------------------------- analysis


def labels(runs: list[Run]) -> list[str]:
    """Short unique names (parent/name when two runs share a name)."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name for r in runs]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


_MISSING = object()


def config_diff(runs: list[Run]) -> list[tuple[str, list[Any]]]:
    """(key, value per run) for every config key whose values are not all equal."""
    flats = [flatten(r.config) for r in runs]
    keys: dict[str, None] = {}
    for f in flats:
        keys.update(dict.fromkeys(f))
    diff = []
    for k in keys:
        values = [f.get(k, _MISSING) for f in flats]
        if any(v != values[0] for v in values[1:]):
            diff.append((k, values))
    return diff


def version_rows(runs: list[Run]) -> list[tuple[str, list[Any], bool]]:
    """(what, value per run, differs) for code, data and environment versions."""

    def get(run: Run, *path: str) -> Any:
        node: Any = run.manifest
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        return node

    rows = []
    for label, path in [
        ("git SHA", ("git", "sha")),
        ("git dirty", ("git", "dirty")),
        ("data fingerprint", ("data", "fingerprint")),
        ("data dir", ("data", "dir")),
        ("python", ("python",)),
        ("world size", ("world_size",)),
        ("seed", ("seed",)),
        ("device", ("hardware", "device")),
        ("gpu", ("hardware", "gpu")),
        ("host", ("hardware", "host")),
    ]:
        values = [get(r, *path) for r in runs]
        rows.append((label, values, len({repr(v) for v in values}) > 1))
    pkgs: dict[str, None] = {}
    for r in runs:
        p = get(r, "packages")
        if isinstance(p, dict):
            pkgs.update(dict.fromkeys(p))
    for name in pkgs:
        values = [(get(r, "packages") or {}).get(name) for r in runs]
        rows.append((f"package {name}", values, len({repr(v) for v in values}) > 1))
    return rows


def _loss_curve(run: Run, use_tokens: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = [p for p in run.series("train/loss") if math.isfinite(p["value"])]
    if use_tokens:
        pts = [p for p in pts if finite(p.get("tokens"))]
    x = np.array([p["tokens"] if use_tokens else p["step"] for p in pts], dtype=float)
    y = np.array([p["value"] for p in pts], dtype=float)
    steps = np.array([p["step"] for p in pts], dtype=float)
    return x, y, steps


def divergence(
    base: Run,
    other: Run,
    *,
    window: int = DIVERGENCE_WINDOW,
    z: float = DIVERGENCE_Z,
    rel_floor: float = DIVERGENCE_REL_FLOOR,
) -> dict[str, Any]:
    """Where `other`'s training loss first departs from `base`'s beyond noise (module doc).

    Returns {"diverged": bool, "step", "tokens", "delta", "sigma", "axis", "points", "reason"}.
    """
    use_tokens = all(
        any(finite(p.get("tokens")) for p in r.series("train/loss")) for r in (base, other)
    )
    xa, ya, steps_a = _loss_curve(base, use_tokens)
    xb, yb, _ = _loss_curve(other, use_tokens)
    out: dict[str, Any] = {
        "diverged": False,
        "step": None,
        "tokens": None,
        "delta": None,
        "sigma": None,
        "axis": "tokens" if use_tokens else "step",
        "points": 0,
        "reason": "",
    }
    if len(xa) < 2 or len(xb) < 2:
        out["reason"] = "no overlapping training loss"
        return out
    order = np.argsort(xb, kind="stable")
    xb, yb = xb[order], yb[order]
    inside = (xa >= xb[0]) & (xa <= xb[-1])
    xa, ya, steps_a = xa[inside], ya[inside], steps_a[inside]
    out["points"] = len(xa)
    if len(xa) < 2 * window + 2:
        out["reason"] = f"only {len(xa)} overlapping points (need {2 * window + 2})"
        return out
    d = np.interp(xa, xb, yb) - ya
    dd = np.diff(d)
    sigma = 1.4826 * float(np.median(np.abs(dd - np.median(dd)))) / math.sqrt(2)
    out["sigma"] = sigma
    run_len, sign = 0, 0
    for i in range(window - 1, len(d)):
        med = float(np.median(d[i - window + 1 : i + 1]))
        scale = float(np.mean(np.abs(ya[i - window + 1 : i + 1])))
        thr = max(z * 1.2533 * sigma / math.sqrt(window), rel_floor * scale)
        s = 1 if med > thr else (-1 if med < -thr else 0)
        if s != 0 and s == sign:
            run_len += 1
        else:
            run_len, sign = (1, s) if s else (0, 0)
        if run_len >= window:
            first = i - window + 1  # the first window of the sustained run
            out.update(
                diverged=True,
                step=int(steps_a[first]),
                tokens=float(xa[first]) if use_tokens else None,
                delta=float(np.median(d[first : i + 1])),
            )
            return out
    out["reason"] = "within noise over the whole overlap"
    return out


def comparison(runs: list[Run], now: float | None = None) -> dict[str, Any]:
    """Everything the terminal summary and the page show, as plain data."""
    summaries = [summarize(r, now) for r in runs]
    healths = [health(r) for r in runs]
    return {
        "labels": labels(runs),
        "summaries": summaries,
        "health": healths,
        "config_diff": config_diff(runs),
        "versions": version_rows(runs),
        "divergence": [None] + [divergence(runs[0], r) for r in runs[1:]],
        "evaluations": eval_rows(runs),
    }


def eval_rows(runs: list[Run]) -> list[tuple[str, list[float | None], int]]:
    """(evaluation, value per run or None, direction) for every evaluation any run holds:
    validation and in-training task scores, `plinth eval` results (latest per task)."""
    per_run = [evaluations(r) for r in runs]
    keys = sorted({k for e in per_run for k in e}, key=lambda k: (not k.startswith("val/"), k))
    return [(k, [e.get(k) for e in per_run], eval_direction(k)) for k in keys]


def _delta(base: Any, value: Any, better: int, key: str = "") -> tuple[str, str]:
    """('+0.12 (-3.1%)', css class) for value vs base."""
    if not (finite(base) and finite(value)):
        return "", ""
    diff = value - base
    if diff == 0 or (base and abs(diff / base) < 5e-4):
        return ("=" if diff == 0 else "≈"), ""
    if key == "mfu":  # already a fraction: percentage points
        cls = "better" if diff > 0 else "worse"
        return f"{100 * diff:+.1f} pp", cls
    if key == "wall_s":
        return ("+" if diff > 0 else "-") + fmt_duration(abs(diff)), ""
    pct = f" ({100 * diff / abs(base):+.1f}%)" if base else ""
    cls = ""
    if better and diff:
        cls = "better" if (diff > 0) == (better > 0) else "worse"
    sign = "+" if diff >= 0 else ""
    return f"{sign}{fmt_num(diff)}{pct}", cls


def _show(v: Any) -> str:
    if v is _MISSING:
        return "(absent)"
    if isinstance(v, float) and math.isfinite(v) and abs(v) < 1e-3 and v != 0:
        return f"{v:.3g}"
    return str(v)


def _metric(s: dict, key: str) -> str:
    v = s.get(key)
    if key == "wall_s":
        return fmt_duration(v)
    if key == "mfu" and finite(v):
        return f"{100 * v:.1f}%"
    return fmt_num(v)


def _divergence_text(label: str, base_label: str, dv: dict | None) -> str:
    if dv is None:
        return ""
    if not dv["diverged"]:
        return f"{label} vs {base_label}: no divergence ({dv['reason']})"
    where = f"step {fmt_num(dv['step'])}"
    if dv["tokens"] is not None:
        where += f" ({fmt_num(dv['tokens'])} tokens)"
    direction = "higher" if dv["delta"] > 0 else "lower"
    return (
        f"{label} vs {base_label}: loss diverges at {where}, {direction} by "
        f"{fmt_num(abs(dv['delta']))} (noise sigma {fmt_num(dv['sigma'])})"
    )


# -------------------------------------------------------------------------------- terminal


MAX_COL = 40  # widest a run's column is planned at (longer cells fold inside it)


def _plain_width(cell: str) -> int:
    from rich.text import Text

    return max((len(line) for line in Text.from_markup(cell).plain.splitlines()), default=0)


def column_groups(width: int, first: list[str], columns: list[list[str]]) -> list[list[int]]:
    """Which run columns go into each table so that none is wider than `width`: every column
    fits whole (cells fold at MAX_COL), and the baseline (column 0) leads every group."""
    cost = [min(MAX_COL, max(map(_plain_width, col), default=1)) + 3 for col in columns]
    room = width - 1 - (min(MAX_COL, max(map(_plain_width, first), default=1)) + 3)
    if sum(cost) <= room or len(columns) < 2:
        return [list(range(len(columns)))]
    groups: list[list[int]] = []
    current: list[int] = [0]
    used = cost[0]
    for i in range(1, len(columns)):
        if len(current) > 1 and used + cost[i] > room:
            groups.append(current)
            current, used = [0], cost[0]
        current.append(i)
        used += cost[i]
    groups.append(current)
    return groups


def _print_wide(con, title: str, head: str, names: list[str], rows: list[tuple]) -> None:
    """A table with one column per run, split into several when the runs do not fit across:
    `rows` are (label, [cell per run]) with rich markup in the cells."""
    from rich.table import Table

    headers = [n + (" (baseline)" if i == 0 else "") for i, n in enumerate(names)]
    columns = [[headers[i], *(cells[i] for _, cells in rows)] for i in range(len(names))]
    groups = column_groups(con.width, [head, *(label for label, _ in rows)], columns)
    for group in groups:
        part = ""
        if len(groups) > 1:
            part = f" (runs {group[1] + 1}-{group[-1] + 1} of {len(names)}, with the baseline)"
        t = Table(title=title + part, title_justify="left")
        t.add_column(head, overflow="fold", max_width=MAX_COL)
        for i in group:
            t.add_column(headers[i], justify="right", overflow="fold", max_width=MAX_COL)
        for label, cells in rows:
            t.add_row(label, *(cells[i] for i in group))
        con.print(t)


def _with_delta(text: str, base: Any, value: Any, better: int, key: str = "") -> str:
    delta, cls = _delta(base, value, better, key)
    if not delta:
        return text
    color = {"better": "green", "worse": "red"}.get(cls, "dim")
    return f"{text} [{color}]{delta}[/]"


def print_summary(runs: list[Run], result: dict) -> None:
    from rich.console import Console

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    names = result["labels"]
    summaries = result["summaries"]
    base = summaries[0]
    rows: list[tuple] = [("status", [s["status"] for s in summaries])]
    for key, label, better in FINAL_METRICS:
        cells = [_metric(s, key) for s in summaries]
        for i in range(1, len(cells)):
            cells[i] = _with_delta(cells[i], base.get(key), summaries[i].get(key), better, key)
        rows.append((label, cells))
    for key, label in HEALTH_METRICS:
        rows.append((label, [str(h[key]) for h in result["health"]]))
    _print_wide(con, "runs", "metric", names, rows)

    evals = result["evaluations"]
    if evals:
        rows = []
        for key, values, better in evals:
            cells = [fmt_num(v) if v is not None else "-" for v in values]
            for i in range(1, len(cells)):
                if values[i] is not None:
                    cells[i] = _with_delta(cells[i], values[0], values[i], better)
            rows.append((key, cells))
        _print_wide(con, f"evaluations ({len(evals)})", "task metric", names, rows)

    diff = result["config_diff"]
    if diff:
        rows = [(key, [_show(v) for v in values]) for key, values in diff[:60]]
        _print_wide(con, f"config differences ({len(diff)})", "key", names, rows)
        if len(diff) > 60:
            con.print(f"... and {len(diff) - 60} more (see the HTML page)")
    else:
        con.print("config: identical")
    differing = [(w, v) for w, v, d in result["versions"] if d]
    if differing:
        rows = [(what, [_show(v) if v is not None else "-" for v in values])
                for what, values in differing]
        _print_wide(con, "code / data / environment differences", "what", names, rows)
    else:
        con.print("code, data and environment: same git SHA, data fingerprint and packages")
    for label, dv in zip(names[1:], result["divergence"][1:], strict=True):
        con.print(_divergence_text(label, names[0], dv))


# -------------------------------------------------------------------------------- page

_CHARTS = [
    ("train/loss", "Training loss", True),
    ("val/loss", "Validation loss", False),
    ("lr", "Learning rate", False),
    ("grad_norm", "Gradient norm (pre-clip)", True),
    ("tokens_per_s", "Throughput (tokens/s)", False),
]


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def overlay_chart_specs(runs: list[Run], names: list[str], max_points: int) -> list[dict]:
    """The comparison's charts as JSON-able specs: each metric with every run overlaid, one
    colour per run, plus each run's train-loss gap to the baseline (the first run)."""
    axes = [Axes(r) for r in runs]
    specs = []
    for key, title, smooth in _CHARTS:
        series = []
        for i, (run, ax) in enumerate(zip(runs, axes, strict=True)):
            keep = {e["step"] for e in run.events if finite(e.get("step"))}
            s = series_payload(
                ax,
                run.series(key),
                label=names[i],
                color=_color(i),
                keep_steps=keep,
                max_points=max_points,
                smooth=smooth,
                points=key == "val/loss",
            )
            if s:
                series.append(s)
        if series:
            spec = {"id": key.replace("/", "-"), "title": title, "series": series}
            if key == "tokens_per_s":
                spec["yZero"] = True
            specs.append(spec)
    # the gap to the baseline, on the baseline's points
    base = runs[0].series("train/loss")
    if base:
        bx = np.array([p["step"] for p in base], dtype=float)
        series = []
        for i, run in enumerate(runs[1:], start=1):
            pts = [p for p in run.series("train/loss") if math.isfinite(p["value"])]
            if len(pts) < 2:
                continue
            ox = np.array([p["step"] for p in pts], dtype=float)
            oy = np.array([p["value"] for p in pts], dtype=float)
            inside = [
                (p, v)
                for p, v in zip(base, np.interp(bx, ox, oy), strict=True)
                if ox[0] <= p["step"] <= ox[-1]
            ]
            diff = [{**p, "value": float(v) - p["value"]} for p, v in inside]
            s = series_payload(
                axes[0],
                diff,
                label=f"{names[i]} - {names[0]}",
                color=_color(i),
                max_points=max_points,
                smooth=True,
            )
            if s:
                series.append(s)
        if series:
            specs.append(
                {
                    "id": "loss-gap",
                    "title": f"Training loss minus {names[0]}'s",
                    "series": series,
                    "logToggle": False,
                    "hlines": [{"y": 0, "label": "", "color": "#888"}],
                }
            )
    return specs


def _evals_html(names: list[str], evals: list) -> str:
    if not evals:
        return "<h2>Evaluations</h2><p>No run has evaluations yet (validation, tasks scored " \
            "during training, or <code>plinth eval</code>).</p>"
    rows = []
    for key, values, better in evals:
        cells = [esc(key)]
        for i, v in enumerate(values):
            text = esc(fmt_num(v)) if v is not None else "-"
            if i and v is not None:
                delta, cls = _delta(values[0], v, better)
                if delta:
                    text += f' <small class="{cls}">{esc(delta)}</small>'
            cells.append(text)
        rows.append(cells)
    return f"<h2>Evaluations <small>({len(evals)}, latest of each)</small></h2>" + table(
        ["task metric", *map(esc, names)], rows, num=set(range(1, len(names) + 1))
    )


def render_compare(runs: list[Run], result: dict, *, max_points: int = MAX_POINTS) -> str:
    names = result["labels"]
    specs = overlay_chart_specs(runs, names, max_points)
    markers = []
    for name, run in zip(names, runs, strict=True):
        ms = markers_payload(run, Axes(run), label_prefix=f"{name}: ")
        markers += [m for m in ms if m["kind"] not in ("checkpoint", "end")]
    base_axes = Axes(runs[0])
    for i, dv in enumerate(result["divergence"]):
        if dv and dv["diverged"]:
            pts = [p for p in runs[0].series("train/loss") if p["step"] == dv["step"]]
            t = base_axes.time([pts[0]["time"]])[0] if pts else None
            markers.append(
                {
                    "kind": "diverge",
                    "step": dv["step"],
                    "tokens": dv["tokens"],
                    "time": t,
                    "label": _divergence_text(names[i], names[0], dv),
                }
            )
    kinds = {**MARKER_KINDS, "diverge": {"color": "#111", "width": 2, "label": "divergence"}}
    payload = {
        "kind": "compare",
        "axes": ["step", "tokens", "time"],
        "smoothing": 0.6,
        "charts": specs,
        "markers": markers,
        "markerKinds": kinds,
    }

    swatches = "".join(
        f'<span style="margin-right:16px"><span class="swatch" style="background:{_color(i)}">'
        f"</span><b>{esc(n)}</b>{' (baseline)' if i == 0 else ''} "
        f'<span class="badge {esc(s["status"])}">{esc(s["status"])}</span></span>'
        for i, (n, s) in enumerate(zip(names, result["summaries"], strict=True))
    )
    head = f'<h1>Comparison of {len(runs)} runs</h1><div class="sub">{swatches}</div>'
    div_lines = [
        _divergence_text(n, names[0], dv)
        for n, dv in zip(names[1:], result["divergence"][1:], strict=True)
    ]
    divergence_html = (
        "<h2>Divergence</h2><ul>" + "".join(f"<li>{esc(x)}</li>" for x in div_lines) + "</ul>"
        f'<p class="sub">Test: median of the loss gap over a trailing window of '
        f"{DIVERGENCE_WINDOW} logged points beyond max({DIVERGENCE_Z:g}·1.25·σ/√"
        f"{DIVERGENCE_WINDOW}, {100 * DIVERGENCE_REL_FLOOR:g}% of the loss) for "
        f"{DIVERGENCE_WINDOW} windows in a row; σ from the gap's first differences (MAD).</p>"
    )

    base = result["summaries"][0]
    rows = []
    for key, label, better in FINAL_METRICS:
        cells = [esc(label)]
        for i, s in enumerate(result["summaries"]):
            text = esc(_metric(s, key))
            if i:
                delta, cls = _delta(base.get(key), s.get(key), better, key)
                if delta:
                    text += f' <small class="{cls}">{esc(delta)}</small>'
            cells.append(text)
        rows.append(cells)
    for key, label in HEALTH_METRICS:
        rows.append([esc(label), *[esc(h[key]) for h in result["health"]]])
    metrics_html = "<h2>Final metrics</h2>" + table(
        ["", *map(esc, names)], rows, num=set(range(1, len(names) + 1))
    ) + _evals_html(names, result["evaluations"])

    diff = result["config_diff"]
    cfg_rows = []
    sources = [{ln.key: ln.source for ln in r.config_lines if ln.key} for r in runs]
    for key, values in diff:
        cells = [f"<code>{esc(key)}</code>"]
        for v, src in zip(values, sources, strict=True):
            note = f' <small class="sub">{esc(src.get(key))}</small>' if src.get(key) else ""
            cells.append(f"<code>{esc(_show(v))}</code>{note}")
        cfg_rows.append(cells)
    cfg_html = f"<h2>Config differences <small>({len(diff)})</small></h2>" + (
        table(["key", *map(esc, names)], cfg_rows) if diff else "<p>The configs are identical.</p>"
    )
    ver_rows, attrs = [], []
    for what, values, differs in result["versions"]:
        ver_rows.append(
            [esc(what), *[f"<code>{esc(v if v is not None else '-')}</code>" for v in values]]
        )
        attrs.append('class="ev-anomaly"' if differs else "")
    ver_html = (
        "<h2>Code, data and environment <small>(differences highlighted)</small></h2>"
        + table(["", *map(esc, names)], ver_rows, row_attrs=attrs)
    )

    chart_html = "".join(chart_block(sp) for sp in specs) or "<p>No metrics yet.</p>"
    body = (
        head
        + metrics_html
        + divergence_html
        + "<h2>Curves</h2>"
        + controls()
        + marker_legend()
        + f'<div class="charts">{chart_html}</div>'
        + cfg_html
        + ver_html
    )
    return page(f"compare {' vs '.join(names)} · plinth", body, payload)
