"""Decontamination: word n-gram overlap between training documents and evaluation sets.

    python -c "from plinth.eval.decontam import contamination_of_dataset, load_eval_sets, \
format_reports; print(format_reports(contamination_of_dataset('data/default', \
load_eval_sets(['src/plinth/eval/suite']))))"

An evaluation example counts as contaminated when it shares at least one word n-gram (n=13 by
default, GPT-3's choice) with a training document. Text is normalised before comparing:
lower-cased, every run of characters that are not letters, digits or `_` (punctuation,
symbols, whitespace) acts as one separator, so `Hello,  World!` and `hello world` have the
same words. Examples with fewer than n words cannot be checked this way; they are counted as
`too_short` in the report (lower n to cover them, at the price of more chance matches).

The evaluation side is held in memory as an index: a vocabulary of the words that occur in any
evaluation n-gram and the set of n-grams as tuples of word ids. A training document is scanned
once; a window is looked up only when all its n words are in the evaluation vocabulary, which
skips most of a corpus at the cost of one dict lookup per word.

Evaluation sets are JSONL files (every string value of a row, nested lists included, joined in
order, is the example's text; or only `fields`), plinth task YAML files (their `data:` JSONL),
plain text files (one example per non-blank line) or directories of those. The same index
drives `data.decontaminate` in `plinth data prepare`, which drops training documents that
contain any evaluation n-gram and counts them as `contaminated`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from plinth.errors import UsageError

DEFAULT_N = 13
_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Normalised words: lower-case runs of letters/digits/underscore."""
    return _WORD.findall(text.lower())


# ------------------------------------------------------------------------------------ index


class NgramIndex:
    """The n-grams of a collection of evaluation sets, each mapped to the examples it is in."""

    def __init__(self, n: int = DEFAULT_N):
        if n < 1:
            raise UsageError(f"the n-gram length must be at least 1, got {n}")
        self.n = n
        self.vocab: dict[str, int] = {}
        self.grams: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        self.set_names: list[str] = []
        self.set_sizes: list[int] = []
        self.too_short: list[int] = []

    @classmethod
    def build(cls, eval_sets: dict[str, list[str]], n: int = DEFAULT_N) -> NgramIndex:
        index = cls(n)
        for name, examples in eval_sets.items():
            index.add_set(name, examples)
        return index

    def add_set(self, name: str, examples: Iterable[str]) -> None:
        s = len(self.set_names)
        self.set_names.append(name)
        self.set_sizes.append(0)
        self.too_short.append(0)
        n, vocab = self.n, self.vocab
        for e, text in enumerate(examples):
            self.set_sizes[s] += 1
            ws = words(text)
            if len(ws) < n:
                self.too_short[s] += 1
                continue
            ids = [vocab.setdefault(w, len(vocab)) for w in ws]
            for i in range(len(ids) - n + 1):
                refs = self.grams.setdefault(tuple(ids[i : i + n]), [])
                if not refs or refs[-1] != (s, e):
                    refs.append((s, e))

    def __len__(self) -> int:
        return len(self.grams)

    def matches(self, text: str) -> Iterator[tuple[tuple[int, ...], list[tuple[int, int]]]]:
        """Each window of `text` that is an evaluation n-gram: (gram, [(set, example), ...])."""
        get, n, grams = self.vocab.get, self.n, self.grams
        ids = [get(w, -1) for w in _WORD.findall(text.lower())]
        run = 0
        for i, t in enumerate(ids):
            if t < 0:
                run = 0
                continue
            run += 1
            if run >= n:
                gram = tuple(ids[i - n + 1 : i + 1])
                refs = grams.get(gram)
                if refs is not None:
                    yield gram, refs

    def first_match(self, text: str) -> str | None:
        """A description of the first evaluation n-gram found in `text`, or None (the filter)."""
        for gram, refs in self.matches(text):
            s, e = refs[0]
            return f"{self.set_names[s]} example {e}: '{self.gram_text(gram)}'"
        return None

    def gram_text(self, gram: tuple[int, ...]) -> str:
        if not hasattr(self, "_words"):
            self._words = sorted(self.vocab, key=self.vocab.__getitem__)
        return " ".join(self._words[i] for i in gram)


# ----------------------------------------------------------------------------------- report


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


# ------------------------------------------------------------------------------- eval files


def eval_files(paths: Iterable[str | Path]) -> list[tuple[str, Path]]:
    """(set name, file) for every evaluation file `paths` names: JSONL and text files as
    given, a task YAML as its `data:` file, a directory as its task YAMLs (or, without any,
    its *.jsonl files). UsageError for a path that does not exist."""
    out: list[tuple[str, Path]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(p.glob("*.yaml")) + sorted(p.glob("*.yml")) or sorted(p.glob("*.jsonl"))
            if not found:
                raise UsageError(f"evaluation set directory {p} has no *.yaml or *.jsonl files")
            out.extend(eval_files(found))
        elif p.suffix in (".yaml", ".yml") and p.is_file():
            out.append(_task_data(p))
        elif p.is_file():
            out.append((p.stem, p))
        else:
            raise UsageError(
                f"evaluation set {p} does not exist; give JSONL or text files, task YAML "
                "files or directories of them"
            )
    return out


def _task_data(path: Path) -> tuple[str, Path]:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"cannot read the task file {path}: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise UsageError(f"task file {path} has no `data:` JSONL file to check for overlap")
    data = (path.parent / spec["data"]).resolve()
    if not data.is_file():
        raise UsageError(f"task file {path} names data {spec['data']}, which does not exist")
    return str(spec.get("name") or path.stem), data


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def load_eval_file(path: str | Path, fields: list[str] | None = None) -> list[str]:
    """The examples of one evaluation file as texts (see the module doc for the formats)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the evaluation set {p}: {e}") from None
    if p.suffix != ".jsonl":
        return [line for line in text.splitlines() if line.strip()]
    examples = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{p}:{lineno} is not valid JSON ({e})") from None
        if fields is not None:
            if not isinstance(row, dict) or not all(f in row for f in fields):
                raise UsageError(f"{p}:{lineno} lacks one of the fields {fields}")
            row = [row[f] for f in fields]
        examples.append(" ".join(_strings(row)))
    return examples


def load_eval_sets(
    paths: Iterable[str | Path], fields: list[str] | None = None
) -> dict[str, list[str]]:
    """{set name: example texts} for files, task YAMLs and directories; a name that repeats
    gets its file path instead."""
    sets: dict[str, list[str]] = {}
    for name, p in eval_files(paths):
        sets[str(p) if name in sets else name] = load_eval_file(p, fields)
    return sets


def files_digest(paths: Iterable[str | Path]) -> str:
    """Hash of the contents of every evaluation file `paths` names (for dataset fingerprints)."""
    h = hashlib.sha256()
    for name, p in eval_files(paths):
        h.update(name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]
