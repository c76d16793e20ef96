"""`plinth report RUN_DIR`: one self-contained HTML overview of a training run.

    plinth report runs/quickstart            # writes runs/quickstart/report.html

Reads only the run directory (works while the run is going and after a crash) and writes a
single file that opens offline: status card, health summary, interactive charts (loss with
smoothing and log-y, learning rate, gradient norm with the clip line, throughput, step time,
memory, resources) with event and checkpoint markers, then evaluations, events, checkpoints,
samples, the config with non-default values highlighted, and the environment.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from plinth.report.downsample import MAX_POINTS
from plinth.report.page import (
    MARKER_KINDS,
    PALETTE,
    Axes,
    cards,
    chart_block,
    controls,
    esc,
    fmt_bytes,
    fmt_duration,
    fmt_num,
    fmt_time,
    marker_legend,
    markers_payload,
    page,
    series_payload,
    table,
    write_atomic,
)
from plinth.report.rundata import Run, finite, health, load_run, summarize

# metrics with a chart of their own below; anything else numeric goes to "More metrics"
_CHARTED = {
    "train/loss",
    "val/loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "step_time",
    "data_share",
    "mem_mb",
    "tokens",
    "clipped",
    "val/tokens",
    "val/ppl",
    "val/bpb",
}
MAX_TABLE_ROWS = 3000
MAX_SAMPLE_STEPS = 40


def report(run_dir: str, *, output: str | None = None, max_points: int = MAX_POINTS) -> int:
    """Write a self-contained HTML overview of a run (RUN_DIR/report.html).

    Works on finished, running and crashed runs; it only reads the run directory.

    Args:
        run_dir: the run directory, e.g. runs/quickstart
        output: where to write the HTML file (default: RUN_DIR/report.html)
        max_points: most points per chart series; longer series are down-sampled keeping
            every spike, every non-finite value and every event step
    """
    run = load_run(run_dir)
    out = Path(output) if output else run.path / "report.html"
    write_atomic(out, render_report(run, max_points=max_points))
    s = summarize(run)
    print(
        f"{run.name}: {s['status']}, step {fmt_num(s['step'])}"
        + (f"/{fmt_num(s['total_steps'])}" if s["total_steps"] else "")
        + f", train loss {fmt_num(s['train_loss'])}, best val loss {fmt_num(s['best_val_loss'])}"
    )
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------- charts


def keep_steps(run: Run) -> set:
    """Steps that down-sampling must keep: every event (checkpoints, anomalies, ...)."""
    return {e["step"] for e in run.events if finite(e.get("step"))}


def system_points(run: Run, axes: Axes, key: str) -> list[dict]:
    rows = [r for r in run.system if finite(r.get(key)) and finite(r.get("time"))]
    steps = axes.step_at([r["time"] for r in rows])
    return [
        {"step": s, "value": float(r[key]), "time": r["time"]}
        for s, r in zip(steps, rows, strict=True)
    ]


def run_chart_specs(run: Run, axes: Axes, max_points: int = MAX_POINTS) -> tuple[list[dict], dict]:
    """The report's charts as JSON-able specs, plus notes shown in chart headers."""
    keep = keep_steps(run)
    notes: dict[str, str] = {}

    def s(key: str, label: str | None = None, color: str = PALETTE[0], **style: Any):
        return series_payload(
            axes,
            run.series(key),
            label=label or key,
            color=color,
            keep_steps=keep,
            max_points=max_points,
            **style,
        )

    def sys_series(key: str, label: str, color: str, **style: Any):
        return series_payload(
            axes,
            system_points(run, axes, key),
            label=label,
            color=color,
            max_points=max_points,
            **style,
        )

    specs: list[dict] = []

    def add(cid: str, title: str, series: list, **extra: Any) -> None:
        series = [x for x in series if x]
        if series:
            specs.append({"id": cid, "title": title, "series": series, **extra})

    add(
        "loss",
        "Loss",
        [
            s("train/loss", "train loss", PALETTE[0], smooth=True),
            s("val/loss", "val loss", PALETTE[1], points=True, width=2),
        ],
        yLabel="loss",
    )
    add("lr", "Learning rate", [s("lr", "lr", PALETTE[2])], logToggle=True)
    clip = run.config_value("optim.grad_clip")
    hlines = (
        [{"y": clip, "label": f"clip {fmt_num(clip)}", "color": "#c0392b"}] if finite(clip) else []
    )
    clipped = [p["value"] for p in run.series("clipped") if math.isfinite(p["value"])]
    if clipped:
        pct = 100 * sum(clipped) / len(clipped)
        shown = f"{pct:.0f}%" if pct == 0 or pct >= 1 else "<1%"
        notes["grad"] = f"clipped on {shown} of logged steps"
    add(
        "grad",
        "Gradient norm (pre-clip)",
        [s("grad_norm", "grad norm", PALETTE[3], smooth=True)],
        hlines=hlines,
    )
    add(
        "throughput",
        "Throughput",
        [
            s("tokens_per_s", "tokens/s", PALETTE[4]),
            s("mfu", "MFU", PALETTE[5], scale="y2", dash=True),
        ],
        yLabel="tokens/s",
        y2Label="MFU",
        yZero=True,
        y2Zero=True,
    )
    add(
        "steptime",
        "Step time and data-loading share",
        [
            s("step_time", "step time (s)", PALETTE[6]),
            s("data_share", "data share", PALETTE[7], scale="y2", dash=True),
        ],
        yLabel="seconds",
        y2Label="share of step",
        yZero=True,
        y2Zero=True,
    )
    mem = [s("mem_mb", "device memory (MB)", PALETTE[8])]
    mem.append(sys_series("rss_mb", "process RSS (MB)", PALETTE[0], dash=True))
    gpus = sorted({k.split("/")[0] for r in run.system for k in r if k.startswith("gpu")})
    for i, g in enumerate(gpus):
        mem.append(sys_series(f"{g}/mem_mb", f"{g} memory (MB)", PALETTE[(i + 2) % 10]))
    add("memory", "Memory", mem, yLabel="MB")
    res = [
        sys_series("cpu_percent", "process CPU %", PALETTE[1]),
        sys_series("sys_cpu_percent", "machine CPU %", PALETTE[2], dash=True),
        sys_series("ram_percent", "machine RAM %", PALETTE[3], dash=True),
    ]
    for i, g in enumerate(gpus):
        res.append(sys_series(f"{g}/util", f"{g} util %", PALETTE[(i + 4) % 10]))
        res.append(
            sys_series(
                f"{g}/power_w", f"{g} power (W)", PALETTE[(i + 6) % 10], scale="y2", dash=True
            )
        )
    add("resources", "Resources (sampled)", res, yLabel="%", y2Label="watts", logToggle=False)
    others = [k for k in run.numeric_keys() if k not in _CHARTED]
    for i, key in enumerate(others):
        add(f"m{i}", key, [s(key, key, PALETTE[i % 10])])
    return specs, notes


# ------------------------------------------------------------------------------- sections


def _status_section(run: Run, summary: dict, hl: dict) -> str:
    st = summary["status"]
    age = summary["last_record_age_s"]
    live = st in ("running", "crashed", "killed")
    when = f" · last record {fmt_duration(age)} ago" if live else ""
    steps = fmt_num(summary["step"])
    if summary["total_steps"]:
        steps += f" <small>/ {fmt_num(summary['total_steps'])}</small>"
    sha = summary["git_sha"]
    git = esc(sha[:10]) if sha else "-"
    if summary["git_dirty"]:
        git += " <small>dirty</small>"
    fp = summary["data_fingerprint"]
    mfu = summary["mfu"]
    peak = summary["peak_mem_mb"] or summary["peak_gpu_mem_mb"]
    items = [
        ("state", f'<span class="badge {esc(st)}">{esc(st)}</span>'),
        ("steps", steps),
        ("tokens", esc(fmt_num(summary["tokens"]))),
        ("wall time", esc(fmt_duration(summary["wall_s"]))),
        ("compute", f"{summary['compute_h']:.3g} <small>device-h × {summary['devices']}</small>"),
        ("final train loss", esc(fmt_num(summary["train_loss"]))),
        ("best val loss", esc(fmt_num(summary["best_val_loss"]))),
        ("final val loss", esc(fmt_num(summary["val_loss"]))),
        ("tokens/s", esc(fmt_num(summary["tokens_per_s"]))),
        ("MFU", esc(f"{100 * mfu:.1f}%") if finite(mfu) else "-"),
        ("peak memory", esc(f"{fmt_num(peak)} MB") if peak else "-"),
        ("params", esc(fmt_num(summary["params"]))),
        ("device", esc(summary["device"] or "-")),
        ("git", git),
        ("data", f'<span class="mono" title="{esc(fp)}">{esc(str(fp)[:12]) if fp else "-"}</span>'),
    ]
    created = fmt_time(summary["created"])
    head = (
        f'<h1>{esc(run.name)} <span class="badge {esc(st)}">{esc(st)}</span></h1>'
        f'<div class="sub">{esc(run.path.resolve())} · created {esc(created)}{esc(when)}</div>'
    )
    return head + cards(items) + _health_section(hl)


def _health_section(hl: dict) -> str:
    def level(n: int, bad: bool = False) -> str:
        return "ok" if n == 0 else ("bad" if bad else "warn")

    items = [
        ("non-finite steps", str(hl["nonfinite"]), level(hl["nonfinite"], True)),
        ("skipped steps", str(hl["skipped"]), level(hl["skipped"])),
        ("spikes", str(hl["spikes"]), level(hl["spikes"])),
        ("rollbacks", str(hl["rollbacks"]), level(hl["rollbacks"], True)),
        ("stalls", str(hl["stalls"]), level(hl["stalls"])),
        ("resumes", str(hl["resumes"]), "ok" if not hl["resumes"] else ""),
        ("bad checkpoints", str(hl["checkpoints_skipped"]), level(hl["checkpoints_skipped"])),
    ]
    if hl["sink_failures"]:
        items.append(("sink failures", str(hl["sink_failures"]), "warn"))
    return "<h2>Health</h2>" + cards(items, "health")


def _details(ev: dict, skip: tuple = ("step", "time", "event")) -> str:
    parts = []
    for k, v in ev.items():
        if k in skip:
            continue
        if isinstance(v, dict | list):
            v = str(v)[:200]
        parts.append(f"<b>{esc(k)}</b>={esc(fmt_num(v))}")
    return ", ".join(parts)


def _events_section(run: Run, axes: Axes) -> str:
    if not run.events:
        return "<h2>Events</h2><p>No events yet.</p>"
    events = run.events[-MAX_TABLE_ROWS:]
    times = axes.time([e.get("time") for e in events])
    kinds = sorted({str(e.get("event")) for e in run.events})
    options = "".join(f'<option value="{esc(k)}">{esc(k)}</option>' for k in kinds)
    rows, attrs = [], []
    for e, t in zip(events, times, strict=True):
        kind = str(e.get("event"))
        rows.append(
            [
                esc(fmt_num(e.get("step"))),
                f'<span title="{esc(fmt_time(e.get("time")))}">{esc(fmt_duration(t))}</span>',
                esc(kind),
                _details(e),
            ]
        )
        attrs.append(f'class="ev-{esc(kind)}" data-kind="{esc(kind)}"')
    more = (
        f"<p>Showing the last {MAX_TABLE_ROWS} of {len(run.events)} events.</p>"
        if len(run.events) > MAX_TABLE_ROWS
        else ""
    )
    return (
        f"<h2>Events <small>({len(run.events)})</small></h2>"
        f'<p><label>show <select id="event-filter"><option value="">all</option>{options}'
        f"</select></label></p>{more}"
        + '<div class="scroll">'
        + table(
            ["step", "run time", "event", "details"],
            rows,
            num={0, 1},
            row_attrs=attrs,
            tid="events",
        )
        + "</div>"
    )


def _checkpoints_section(run: Run) -> str:
    if not run.checkpoints:
        return "<h2>Checkpoints</h2><p>No checkpoints yet.</p>"
    metric_keys: list[str] = []
    for c in run.checkpoints:
        for k in c["metrics"]:
            if k not in metric_keys and k != "tokens":
                metric_keys.append(k)
    rows = []
    for c in run.checkpoints:
        state = ("on disk" if c["complete"] else "incomplete") if c["on_disk"] else "deleted"
        size = fmt_bytes(c["bytes"])
        rows.append(
            [
                esc(c["step"]),
                esc(c["name"] or "-"),
                esc(state),
                esc(size),
                esc(fmt_num(c["metrics"].get("tokens"))),
                esc(fmt_time(c.get("time"))),
            ]
            + [esc(fmt_num(c["metrics"].get(k))) for k in metric_keys]
        )
    headers = ["step", "name", "state", "size", "tokens", "written", *map(esc, metric_keys)]
    return f"<h2>Checkpoints <small>({len(run.checkpoints)})</small></h2>" + table(
        headers, rows, num={0, 3, 4, *range(6, 6 + len(metric_keys))}
    )


def _evals_section(run: Run) -> str:
    """Validation metrics and tasks scored during training (`eval/<task>/<metric>`) per step,
    then results of `plinth eval` on the run's checkpoints (evals.jsonl)."""
    keys = [k for k in run.numeric_keys() if k.startswith(("val/", "eval/"))]
    if not keys:
        return "<h2>Evaluations</h2><p>No evaluations yet.</p>" + _task_evals(run)
    by_step: dict[Any, dict] = {}
    for k in keys:
        for p in run.series(k):
            row = by_step.setdefault(p["step"], {"tokens": p.get("tokens")})
            row[k] = p["value"]
    best = min((r["val/loss"] for r in by_step.values() if finite(r.get("val/loss"))), default=None)
    rows = []
    for step in sorted(by_step)[-MAX_TABLE_ROWS:]:
        r = by_step[step]
        cells = [esc(fmt_num(step)), esc(fmt_num(r.get("tokens")))]
        for k in keys:
            v = esc(fmt_num(r.get(k)))
            cells.append(f"<b>{v}</b>" if k == "val/loss" and r.get(k) == best else v)
        rows.append(cells)
    return f"<h2>Evaluations <small>({len(by_step)})</small></h2>" + table(
        ["step", "tokens", *map(esc, keys)], rows, num=set(range(len(keys) + 2))
    ) + _task_evals(run)


def _task_evals(run: Run) -> str:
    """`plinth eval RUN` results (RUN/evals.jsonl): one row per task or text and checkpoint,
    newest last. They are listed here, never on the training timeline."""
    evs = [e for e in run.evals if ("task" in e or "source" in e)]
    if not evs:
        return ""
    rows = []
    for e in evs[-MAX_TABLE_ROWS:]:
        if "task" in e:
            metrics = e.get("metrics") if isinstance(e.get("metrics"), dict) else {}
            what, n = e.get("task"), e.get("n")
        else:
            metrics = {k: e.get(k) for k in ("loss", "perplexity", "bits_per_byte") if k in e}
            what, n = Path(str(e.get("source"))).name, e.get("docs")
        shown = ", ".join(f"{k} {fmt_num(v)}" for k, v in metrics.items())
        rows.append([esc(fmt_num(e.get("step"))), esc(str(what)), esc(fmt_num(e.get("shots"))),
                     esc(fmt_num(n)), esc(shown), esc(fmt_time(e.get("time")))])
    return "<h3>Task evaluations (plinth eval)</h3>" + table(
        ["step", "task / text", "shots", "examples", "metrics", "evaluated"], rows, num={0, 2, 3}
    )


def _samples_section(run: Run) -> str:
    if not run.samples:
        return "<h2>Samples</h2><p>No samples yet.</p>"
    by_step: dict[Any, list[dict]] = {}
    for s in run.samples:
        by_step.setdefault(s.get("step"), []).append(s)
    steps = list(by_step)[-MAX_SAMPLE_STEPS:]
    blocks = []
    for i, step in enumerate(reversed(steps)):
        inner = "".join(
            f'<div class="sample"><div class="prompt">prompt: <code>{esc(s.get("prompt"))}</code>'
            f"</div><pre>{esc(s.get('text'))}</pre></div>"
            for s in by_step[step]
        )
        opened = " open" if i == 0 else ""
        blocks.append(
            f"<details{opened}><summary>step {esc(fmt_num(step))}</summary>{inner}</details>"
        )
    more = (
        f"<p>Latest {MAX_SAMPLE_STEPS} of {len(by_step)} sampled steps.</p>"
        if len(by_step) > MAX_SAMPLE_STEPS
        else ""
    )
    return f"<h2>Samples</h2>{more}" + "".join(blocks)


def _config_section(run: Run) -> str:
    if not run.config_lines:
        return "<h2>Config</h2><p>No config.yaml in this run directory.</p>"
    changed = [ln for ln in run.config_lines if ln.source]
    rows = [
        [
            f"<code>{esc(ln.key)}</code>",
            f"<code>{esc(ln.text.split(':', 1)[-1].strip())}</code>",
            esc(ln.source),
        ]
        for ln in changed
    ]
    summary = table(["key", "value", "source"], rows) if rows else "<p>All values are defaults.</p>"
    groups: list[list[str]] = []
    for ln in run.config_lines:
        if ln.indent == 0 or not groups:
            groups.append([])
        is_section = ln.text.rstrip().endswith(":")
        cls = "line" + (" nondefault" if ln.source else "") + (" section" if is_section else "")
        src = f'<span class="src"># {esc(ln.source)}</span>' if ln.source else ""
        groups[-1].append(f'<div class="{cls}">{esc(ln.text)}{src}</div>')
    full = "".join(f'<div class="cfg-sec">{"".join(g)}</div>' for g in groups)
    return (
        f"<h2>Config <small>({len(changed)} non-default values)</small></h2>{summary}"
        "<details><summary>full resolved config (non-default values highlighted)</summary>"
        '<p><label><input type="checkbox" id="only-nondefault"> only non-default values'
        f'</label></p><div id="config">{full}</div></details>'
    )


def _environment_section(run: Run) -> str:
    m = run.manifest
    if not m:
        return "<h2>Environment</h2><p>No manifest.json in this run directory.</p>"
    git = m.get("git") if isinstance(m.get("git"), dict) else {}
    hw = m.get("hardware") if isinstance(m.get("hardware"), dict) else {}
    data = m.get("data") if isinstance(m.get("data"), dict) else {}
    cmd = m.get("command")
    cmd = " ".join(map(str, cmd)) if isinstance(cmd, list) else cmd
    rows = [
        ["command", f"<code>{esc(cmd)}</code>"],
        ["git", f"<code>{esc(git.get('sha'))}</code>" + (" (dirty)" if git.get("dirty") else "")],
        ["python", esc(m.get("python"))],
        ["world size", esc(m.get("world_size"))],
        ["seed", esc(m.get("seed"))],
    ]
    rows += [[f"hardware.{esc(k)}", esc(v)] for k, v in hw.items()]
    rows += [[f"data.{esc(k)}", f"<code>{esc(v)}</code>"] for k, v in data.items()]
    pk = m.get("packages") if isinstance(m.get("packages"), dict) else {}
    rows += [[f"package {esc(k)}", esc(v)] for k, v in pk.items()]
    diff = git.get("diff")
    diff_html = (
        f"<details><summary>uncommitted changes (git diff)</summary><pre>{esc(diff)}"
        "</pre></details>"
        if diff
        else ""
    )
    return "<h2>Environment</h2>" + table([], rows) + diff_html


def render_report(run: Run, *, max_points: int = MAX_POINTS, now: float | None = None) -> str:
    """The report page as one HTML string."""
    axes = Axes(run)
    summary = summarize(run, now)
    specs, notes = run_chart_specs(run, axes, max_points)
    payload = {
        "kind": "report",
        "axes": ["step", "tokens", "time"],
        "smoothing": 0.6,
        "charts": specs,
        "markers": markers_payload(run, axes),
        "markerKinds": MARKER_KINDS,
        "summary": {
            k: v
            for k, v in summary.items()
            if isinstance(v, str | int | float | None)
            and not (isinstance(v, float) and not math.isfinite(v))
        },
    }
    chart_html = "".join(chart_block(sp, esc(notes.get(sp["id"], ""))) for sp in specs)
    if not specs:
        chart_html = "<p>No metrics yet.</p>"
    body = (
        _status_section(run, summary, health(run))
        + "<h2>Training curves</h2>"
        + controls()
        + marker_legend()
        + f'<div class="charts">{chart_html}</div>'
        + '<div class="two"><div>'
        + _evals_section(run)
        + "</div><div>"
        + _checkpoints_section(run)
        + "</div></div>"
        + _events_section(run, axes)
        + _samples_section(run)
        + _config_section(run)
        + _environment_section(run)
    )
    return page(f"{run.name} · plinth report", body, payload)
