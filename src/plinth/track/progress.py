"""Live progress: a bar for training (step, loss, tokens/s and ETA; plain lines when piped) and
bars of counted work for the other commands."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    """Rich progress bar on a terminal; on a pipe/CI a plain line at each logged step."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True):
        self.total, self.start, self.enabled = total, start, enabled
        self.console = Console(highlight=False)
        self.live = enabled and sys.stdout.isatty()
        self._t0 = time.perf_counter()
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> TrainProgress:
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]train[/]"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "train", total=self.total, completed=self.start, loss="-", tps="-"
            )
        return self

    def update(self, step: int, loss: float, tokens_per_s: float | None = None) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            fields = {"loss": f"{loss:.3f}"}
            if tokens_per_s is not None:
                fields["tps"] = f"{tokens_per_s:,.0f}"
            self._progress.update(self._task, completed=step, **fields)
        elif tokens_per_s is not None:
            done = (step - self.start) / max(1, self.total - self.start)
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / done - elapsed if done > 0 else 0.0
            print(
                f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
                f"eta {eta:,.0f}s",
                flush=True,
            )

    def note(self, text: str) -> None:
        if self.enabled:
            (self._progress.console if self._progress else self.console).print(text)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


class TaskProgress:
    """Bars of counted work (data preparation stages, batch generation) on stderr, or nothing
    when disabled: `task(description, total)` adds a bar, `update(task, advance=, info=)`
    moves it, `log(message)` prints above the bars."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._p = None
        if enabled:
            self.console = Console(stderr=True)
            self._p = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=self.console,
            )

    def __enter__(self):
        if self._p:
            self._p.start()
        return self

    def __exit__(self, *exc):
        if self._p:
            self._p.stop()

    def task(self, description: str, total: int | None = None):
        if not self._p:
            return None
        return self._p.add_task(description, total=total, info="")

    def update(self, task, **kw):
        if self._p and task is not None:
            self._p.update(task, **kw)

    def log(self, message: str):
        if self._p:
            self._p.console.print(message, markup=False, highlight=False, soft_wrap=True)
