"""`plinth runs [DIR]`: the runs under a directory with their status and headline metrics.

    plinth runs                                   # everything under runs/
    plinth runs runs --filter 'lr-*' --status crashed

A run is a directory holding metrics.jsonl, events.jsonl, manifest.json or config.yaml, found
at most two levels down (runs/<name> or runs/<group>/<name>). Status: `finished` (an `end` event
after the last start), `halted` (the stability guard stopped it), `running` (no end, the
writer alive: its pid on this machine, its heartbeat elsewhere), `killed` (the writer is gone
without an end: SIGKILL, lost node, Ctrl-C; resumable) or `crashed` (it ended with an error);
see plinth.report.rundata.
"""

from __future__ import annotations

import fnmatch
import json as jsonlib
import sys
import time
from pathlib import Path

from plinth.report.rundata import STATUSES, is_run_dir, load_run, summarize


def find_runs(directory: str | Path) -> list[Path]:
    root = Path(directory)
    if is_run_dir(root):
        return [root]
    found = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if is_run_dir(child):
            found.append(child)
        else:
            found += [g for g in sorted(child.iterdir()) if is_run_dir(g)]
    return found


def runs(
    directory: str = "runs",
    *,
    filter: str | None = None,
    status: str | None = None,
    json: bool = False,
) -> int:
    """List the runs under a directory with status and headline metrics.

    Args:
        directory: where to look (default: runs/, the default tracking.output_dir)
        filter: only runs whose name matches this glob, e.g. 'lr-*'
        status: only runs with this status: running, finished, killed, crashed or halted
        json: print one JSON object per run instead of a table
    """
    from plinth.errors import UsageError

    root = Path(directory)
    if not root.is_dir():
        raise UsageError(
            f"{root} is not a directory. Runs are written under tracking.output_dir "
            "(default runs/); give that directory."
        )
    if status is not None and status not in STATUSES:
        raise UsageError(f"--status must be one of {', '.join(STATUSES)}, not {status!r}")
    now = time.time()
    rows = []
    for path in find_runs(root):
        rel = path.relative_to(root).as_posix() if path != root else path.name
        if filter and not (fnmatch.fnmatch(path.name, filter) or fnmatch.fnmatch(rel, filter)):
            continue
        s = summarize(load_run(path), now)
        if status and s["status"] != status:
            continue
        rows.append((rel, s))
    rows.sort(key=lambda r: (r[1]["created"] or 0, r[0]))
    if json:
        for rel, s in rows:
            print(jsonlib.dumps({"run": rel, **s}, default=str))
        return 0
    _print_table(root, rows)
    return 0


def _print_table(root: Path, rows: list[tuple[str, dict]]) -> None:
    from rich.console import Console
    from rich.table import Table

    from plinth.report.page import fmt_duration, fmt_num

    # piped output (scripts, CI logs) gets full-width rows instead of wrapped cells
    con = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    if not rows:
        con.print(f"no runs under {root} match")
        return
    colors = {
        "finished": "green", "running": "blue", "crashed": "red", "halted": "red", "killed": "red"
    }
    t = Table(title=f"{len(rows)} runs under {root}", title_justify="left")
    for col, justify in [
        ("run", "left"),
        ("status", "left"),
        ("step", "right"),
        ("tokens", "right"),
        ("train loss", "right"),
        ("best val", "right"),
        ("tokens/s", "right"),
        ("wall", "right"),
        ("created", "left"),
        ("git", "left"),
    ]:
        # long run names fold onto more lines rather than being cut with an ellipsis
        overflow = "fold" if col in ("run", "status") else "ellipsis"
        t.add_column(col, justify=justify, overflow=overflow)  # type: ignore[arg-type]
    for rel, s in rows:
        step = fmt_num(s["step"]) + (f"/{fmt_num(s['total_steps'])}" if s["total_steps"] else "")
        created = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(s["created"])) if s["created"] else "-"
        )
        sha = (s["git_sha"] or "-")[:8] + ("*" if s["git_dirty"] else "")
        t.add_row(
            rel,
            f"[{colors.get(s['status'], 'white')}]{s['status']}[/]",
            step,
            fmt_num(s["tokens"]),
            fmt_num(s["train_loss"]),
            fmt_num(s["best_val_loss"]),
            fmt_num(s["tokens_per_s"]),
            fmt_duration(s["wall_s"]),
            created,
            sha,
        )
    con.print(t)
