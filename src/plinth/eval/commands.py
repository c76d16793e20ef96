"""`plinth eval`: score a model on tasks and text, as a table, JSON and run events.

    plinth eval ref-smollm2 --tasks suite --limit 10 --output eval.json
    plinth eval runs/quickstart --tasks capitals,my_task.yaml --shots 2 --text notes.txt
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path

from plinth.errors import UsageError


def eval_cmd(
    model: str,
    *,
    tasks: list[str] = (),
    shots: int | None = None,
    limit: int | None = None,
    output: str | None = None,
    text: list[str] = (),
    dataset: str | None = None,
    split: str = "val",
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    chat: bool = False,
    lm_eval: list[str] = (),
    lm_eval_include: list[str] = (),
) -> int:
    """Evaluate a decoder on tasks (multiple choice, generation) and language-model metrics.

    Prints a results table; `--output` also writes them as JSON. When MODEL is a training run
    (or one of its checkpoints) each result is appended to RUN/evals.jsonl (`task_eval` and
    `lm_eval` records at the checkpoint's step), so the run's overview shows them without
    changing its training timeline.

    Args:
        model: run directory (its latest checkpoint), checkpoint directory, `plinth import`
            directory, Hugging Face model directory, .gguf file, or a reference model name
            (ref-smollm2)
        tasks: task names separated by commas or spaces: built-in tasks, `suite` for all of
            them, or paths of task YAML files (see docs/eval.md)
        shots: few-shot examples per prompt (default: each task's fewshot.k)
        limit: score only the first N examples of each task (and N documents of --dataset)
        output: write the results as JSON to this file
        text: text files to score: loss, perplexity and bits per byte
        dataset: a prepared dataset directory (`plinth data prepare`) to score like --text
        split: which split of --dataset to score
        window: tokens of context per scoring window (default: the model's max_seq_len)
        stride: tokens between sliding windows for long documents (default: the window)
        batch_size: sequences per forward pass
        device: torch device to run on (cpu, cuda, cuda:1, ...)
        chat: wrap each task prompt (shots included) in the model's chat template as one user
            turn; for instruction-tuned models such as ref-smollm2
        lm_eval: lm-evaluation-harness tasks to run on the model (names, groups or task YAML
            paths; needs `pip install "plinth[eval]"`; offline: local data files or the
            datasets cache); --shots, --limit, --batch-size and --chat apply to them too
        lm_eval_include: folders of lm-eval task YAML files, for --lm-eval task names
    """
    from plinth.eval.lm import evaluate_dataset, evaluate_text
    from plinth.eval.scoring import load_eval_model
    from plinth.eval.tasks import load_tasks

    if lm_eval_include and not lm_eval:
        raise UsageError("--lm-eval-include only names folders for --lm-eval tasks; add --lm-eval")
    if not tasks and not text and dataset is None and not lm_eval:
        raise UsageError(
            "nothing to evaluate: give --tasks (e.g. --tasks suite), --text FILE, "
            "--dataset DIR or --lm-eval TASK"
        )
    if lm_eval:
        from plinth.eval.harness import require_lm_eval

        require_lm_eval()  # a missing package fails before the model loads
    check_args(limit=limit, shots=shots, batch_size=batch_size, window=window, stride=stride)
    for path in text:
        check_text_file(path)
    loaded = load_tasks(list(tasks)) if tasks else []  # bad task files fail before the model
    lm = load_eval_model(model, device=device, chat=chat)
    results, lm_results = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is reported in the table instead
        results += score_tasks(lm, loaded, shots, limit, batch_size)
    if lm_eval:
        from plinth.eval.harness import run_lm_eval

        results += run_lm_eval(lm, lm_eval, lm_eval_include, shots, limit, batch_size, chat)[0]
    for path in text:
        lm_results.append(evaluate_text(lm, path, window, stride, batch_size))
    if dataset is not None:
        lm_results.append(evaluate_dataset(lm, dataset, split, limit, window, stride, batch_size))
    print_results(model, results, lm_results)
    record = {
        "model": model,
        "step": lm.step,
        "time": time.time(),
        "tasks": [r.to_json() for r in results],
        "lm": [r.to_json() for r in lm_results],
    }
    if output:
        from plinth.track.run import encode

        out = Path(output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(encode(record), indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    if lm.run_dir is not None:
        path = log_events(lm.run_dir, lm.step or 0, model, results, lm_results)
        print(f"recorded {len(results) + len(lm_results)} evaluation result(s) in {path}")
    return 0


def check_args(*, limit, shots, batch_size, window, stride) -> None:
    """Numeric options in range, before any model loads (UsageError naming the flag)."""
    for flag, value, least in (("--limit", limit, 1), ("--shots", shots, 0),
                               ("--batch-size", batch_size, 1), ("--window", window, 1),
                               ("--stride", stride, 1)):
        if value is not None and (isinstance(value, bool) or value < least):
            raise UsageError(
                f"{flag} must be at least {least}, got {value}"
                + ("; leave it out to use the model's context" if flag == "--window" else "")
                + ("; leave it out to use the window (no overlap)" if flag == "--stride" else "")
            )
    if window is not None and stride is not None and stride > window:
        raise UsageError(
            f"--stride {stride} is larger than --window {window}: windows would skip tokens. "
            "Use a stride of at most the window (the window itself: no overlap)."
        )


def check_text_file(path: str) -> None:
    """A --text file exists and is non-empty UTF-8 text (not binary)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text {p}: no such file; give a UTF-8 text file to score")
    with open(p, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise UsageError(f"--text {p} is empty: there is no text to score; give a text file")
    if b"\0" in head:
        raise UsageError(
            f"--text {p} holds NUL bytes: it looks like a binary file; give a UTF-8 text file"
        )
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise UsageError(
                f"--text {p} is not UTF-8 text (byte {e.start + 1}); save it as UTF-8"
            ) from None


def score_tasks(lm, tasks, shots, limit, batch_size) -> list:
    """evaluate_task for each task, with a progress bar per task on a terminal's stderr
    (nothing when stderr is not a terminal: logs and pipes stay clean)."""
    import sys

    from plinth.eval.scoring import PROGRESS, evaluate_task
    from plinth.track.progress import TaskProgress

    results = []
    prog = TaskProgress(enabled=bool(tasks) and sys.stderr.isatty())
    with prog:
        overall = prog.task("tasks", len(tasks))
        for task in tasks:
            bar = prog.task(f"  {task.name}", None)

            def report(done, total, what, bar=bar):
                prog.update(bar, completed=done, total=total, info=what)

            token = PROGRESS.set(report)
            try:
                results.append(evaluate_task(lm, task, shots, limit, batch_size))
            finally:
                PROGRESS.reset(token)
            prog.update(bar, visible=False)
            prog.update(overall, advance=1, info=task.name)
            prog.log(f"{task.name}: done in {results[-1].seconds:.1f}s")
    return results


def log_events(run: Path, step: int, model: str, results, lm_results) -> Path:
    """Record task_eval / lm_eval results in the run's evals.jsonl (listed by `plinth report`
    and `compare`, never part of the training timeline: wall time and compute stay as they
    were). Returns the file written."""
    from plinth.track.run import append_evals

    now = time.time()
    records = [
        {
            "step": step, "time": now, "event": "task_eval", "model": model,
            "task": r.task, "type": r.type, "metrics": r.metrics, "shots": r.shots,
            "limit": r.limit, "n": r.n, "truncated": r.truncated, "chat": r.chat,
            "seconds": round(r.seconds, 3),
        }
        for r in results
    ]
    records += [
        {"step": step, "time": now, "event": "lm_eval", "model": model, **r.to_json()}
        for r in lm_results
    ]
    return append_evals(run, records)


KINDS = {"multiple_choice": "MC", "generation": "gen", "counterfactual": "CF", "toxicity": "tox"}


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4g}"


def print_results(model: str, results, lm_results) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if results:
        table = Table(title=f"plinth eval {model}")
        for col in ("task", "type", "n", "shots", "metrics", "truncated", "seconds"):
            table.add_column(col, justify="right" if col in ("n", "shots", "seconds") else "left")
        for r in results:
            metrics = "  ".join(f"{k} {_fmt(v)}" for k, v in r.metrics.items())
            table.add_row(
                r.task, KINDS.get(r.type, r.type), str(r.n), str(r.shots),
                metrics, f"[yellow]{r.truncated}[/]" if r.truncated else "0",
                f"{r.seconds:.1f}",
            )
        console.print(table)
        for r in results:
            for f in getattr(r, "extra", {}).get("flagged", [])[:3]:  # toxicity: a few
                console.print(f"{r.task}: flagged {f['text']!r} after {f['prompt']!r}")
            if r.truncated:
                console.print(
                    f"[yellow]warning:[/] {r.task}: {r.truncated} of {r.n} prompts were longer "
                    "than the model's context and were cut from the left; use fewer --shots"
                )
    if lm_results:
        table = Table(title="language-model metrics")
        for col in ("source", "docs", "tokens", "loss", "perplexity", "bits/byte", "window"):
            table.add_column(col)
        for r in lm_results:
            table.add_row(
                r.source, str(r.docs), str(r.tokens), _fmt(r.loss), _fmt(r.perplexity),
                _fmt(r.bits_per_byte), f"{r.window}/{r.stride}",
            )
        console.print(table)
