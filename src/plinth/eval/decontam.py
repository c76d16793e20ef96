"""Contamination reports: which evaluation examples share a word n-gram with training documents.

    python -c "from plinth.eval.decontam import contamination_of_dataset, format_reports; \
from plinth.data.decontam import load_eval_sets; print(format_reports(contamination_of_dataset(\
'data/default', load_eval_sets(['src/plinth/eval/suite']))))"

An evaluation example counts as contaminated when it shares at least one word n-gram with a
training document. The matching rules (word normalisation, n, examples too short to check) and
the evaluation-set formats live with the n-gram index in plinth.data.decontam, which also
drives `data.decontaminate` in `plinth data prepare`; this module scans training text against
that index and reports per evaluation set (`plinth data contamination`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from plinth.data.decontam import DEFAULT_N, NgramIndex


@dataclass
class Report:
    """Contamination of one evaluation set by the training documents."""

    name: str
    n: int
    examples: int  # examples in the set
    too_short: int  # examples with fewer than n words (not checkable)
    contaminated: int = 0  # examples sharing at least one n-gram with a training document
    contaminated_examples: list[int] = field(default_factory=list)  # their indices, sorted
    train_docs: list[int] = field(default_factory=list)  # training documents involved, sorted
    doc_matches: dict[int, list[int]] = field(default_factory=dict)  # example -> first docs
    example_ngram: dict[int, str] = field(default_factory=dict)  # example -> a shared n-gram

    @property
    def fraction(self) -> float:
        """Contaminated examples over all examples (0 for an empty set)."""
        return self.contaminated / self.examples if self.examples else 0.0

    @property
    def clean_examples(self) -> list[int]:
        bad = set(self.contaminated_examples)
        return [i for i in range(self.examples) if i not in bad]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fraction"] = self.fraction
        d["doc_matches"] = {str(k): v for k, v in self.doc_matches.items()}
        d["example_ngram"] = {str(k): v for k, v in self.example_ngram.items()}
        return d


def contamination(
    train_texts: Iterable[str],
    eval_sets: dict[str, list[str]],
    n: int = DEFAULT_N,
    max_docs_per_example: int = 20,
) -> dict[str, Report]:
    """Which examples of each evaluation set share a word n-gram with a training document.

    Training documents are identified by their position in `train_texts`. Per example at most
    `max_docs_per_example` document ids are kept in `doc_matches` (all of them in `train_docs`)."""
    index = NgramIndex.build(eval_sets, n)
    return contamination_with_index(train_texts, index, max_docs_per_example)


def contamination_with_index(
    train_texts: Iterable[str], index: NgramIndex, max_docs_per_example: int = 20
) -> dict[str, Report]:
    """`contamination` with a prebuilt index (reuse it across corpora)."""
    reports = [
        Report(name, index.n, size, short)
        for name, size, short in zip(index.set_names, index.set_sizes, index.too_short, strict=True)
    ]
    docs: list[set[int]] = [set() for _ in reports]
    for d, text in enumerate(train_texts):
        for gram, refs in index.matches(text):
            for s, e in refs:
                r = reports[s]
                docs[s].add(d)
                hits = r.doc_matches.setdefault(e, [])
                if not hits:
                    r.example_ngram[e] = index.gram_text(gram)
                if len(hits) < max_docs_per_example and (not hits or hits[-1] != d):
                    hits.append(d)
    for r, ds in zip(reports, docs, strict=True):
        r.contaminated_examples = sorted(r.doc_matches)
        r.contaminated = len(r.contaminated_examples)
        r.train_docs = sorted(ds)
        r.doc_matches = {e: r.doc_matches[e] for e in r.contaminated_examples}
        r.example_ngram = {e: r.example_ngram[e] for e in r.contaminated_examples}
    return {r.name: r for r in reports}


def dataset_texts(path: str | Path, split: str = "train", batch: int = 256) -> Iterator[str]:
    """The documents of a prepared plinth dataset's split as text, in shard order (document i
    is `open_dataset(path).doc_tokens(split, i)`), decoded with the dataset's tokenizer."""
    from plinth.data import open_dataset

    ds = open_dataset(path)
    tok = ds.tokenizer
    for lo in range(0, ds.num_docs(split), batch):
        hi = min(lo + batch, ds.num_docs(split))
        ids = [ds.doc_tokens(split, i).tolist() for i in range(lo, hi)]
        yield from tok.decode_batch(ids, skip_special_tokens=False)


def contamination_of_dataset(
    path: str | Path,
    eval_sets: dict[str, list[str]],
    n: int = DEFAULT_N,
    split: str = "train",
    max_docs_per_example: int = 20,
) -> dict[str, Report]:
    """`contamination` of a prepared dataset directory (`plinth data prepare` output); the
    documents in each report are indices into that split's documents."""
    return contamination(dataset_texts(path, split), eval_sets, n, max_docs_per_example)


def format_reports(reports: dict[str, Report]) -> str:
    """A small plain-text table: one line per evaluation set."""
    if not reports:
        return "no evaluation sets"
    n = next(iter(reports.values())).n
    width = max(len("eval set"), *(len(k) for k in reports))
    lines = [
        f"{'eval set':<{width}}  examples  too short  contaminated  fraction  train docs  "
        f"({n}-grams)"
    ]
    for name, r in reports.items():
        lines.append(
            f"{name:<{width}}  {r.examples:>8}  {r.too_short:>9}  {r.contaminated:>12}  "
            f"{r.fraction:>8.1%}  {len(r.train_docs):>10}"
        )
    return "\n".join(lines)

