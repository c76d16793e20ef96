"""`plinth data contamination`: which evaluation examples a prepared training set has seen.

    plinth data contamination data/default                 # the built-in eval suite
    plinth data contamination data/default capitals my_task.yaml evals/ --n 8 --output c.json

Prints one row per evaluation set (examples, too short to check, contaminated, fraction, training
documents involved) and, per set, a few contaminated examples with the shared n-gram and the
training documents that hold it. See plinth.data.decontam for the matching rules;
`data.decontaminate` in a data config drops such documents when the dataset is prepared.
"""

from __future__ import annotations

import json
from pathlib import Path

from plinth.errors import UsageError


def contamination_cmd(
    dataset: str,
    evals: list[str] = (),
    *,
    n: int = 13,
    split: str = "train",
    examples: int = 3,
    output: str | None = None,
) -> int:
    """Report n-gram overlap between a prepared dataset and evaluation sets.

    Args:
        dataset: a prepared dataset directory (`plinth data prepare` output)
        evals: evaluation sets: built-in task names (e.g. capitals), task YAML files, JSONL or
            text files, or directories of them (default: the whole built-in suite)
        n: words per n-gram (13 as in GPT-3; lower it for short examples)
        split: the dataset split to scan
        examples: contaminated examples shown per evaluation set
        output: also write the full reports (every contaminated example and the training
            documents that contain it) as JSON to this file
    """
    from rich.console import Console
    from rich.table import Table

    from plinth.data.decontam import load_eval_sets
    from plinth.eval.decontam import contamination_of_dataset
    from plinth.eval.tasks import builtin_tasks

    if n < 1:
        raise UsageError(f"--n must be at least 1 (got {n}); 13 is the usual choice")
    path = Path(dataset)
    if not (path / "manifest.json").is_file():
        raise UsageError(
            f"{dataset} is not a prepared dataset (no manifest.json); give the output directory "
            "of `plinth data prepare`"
        )
    known = builtin_tasks()
    specs = list(evals) or [str(p) for p in known.values()]
    files = [str(known[s]) if s in known and not Path(s).exists() else s for s in specs]
    sets = load_eval_sets(files)
    reports = contamination_of_dataset(path, sets, n=n, split=split)

    con = Console(highlight=False)
    t = Table(title=f"contamination of {dataset} ({split}) by {n}-word overlap",
              title_justify="left")
    for col in ("eval set", "examples", "too short", "contaminated", "fraction", "train docs"):
        t.add_column(col, justify="left" if col == "eval set" else "right")
    for name, r in reports.items():
        frac = f"{r.fraction:.1%}"
        t.add_row(name, f"{r.examples:,}", f"{r.too_short:,}",
                  f"[red]{r.contaminated:,}[/]" if r.contaminated else "0",
                  frac, f"{len(r.train_docs):,}")
    con.print(t)
    for name, r in reports.items():
        if r.too_short == r.examples and r.examples:
            con.print(f"{name}: every example is shorter than {n} words and was not checked; "
                      "lower --n to check them")
        for e in r.contaminated_examples[:examples]:
            docs = ", ".join(map(str, r.doc_matches[e]))
            text = sets[name][e]
            con.print(f"  {name} #{e}: {text[:100]!r}\n    shares {r.example_ngram[e]!r} "
                      f"with {split} document(s) {docs}")
    if output:
        out = {name: r.to_dict() for name, r in reports.items()}
        Path(output).write_text(json.dumps({"dataset": str(path), "split": split, "n": n,
                                            "reports": out}, indent=1) + "\n")
        con.print(f"wrote {output}")
    return 0
