"""Word n-gram index of evaluation sets: what `data.decontaminate` filters training documents
with, and what `plinth data contamination` (plinth.eval.decontam) reports overlap with.

    python -c "from plinth.data.decontam import NgramIndex, load_eval_sets; \
i = NgramIndex.build(load_eval_sets(['src/plinth/eval/suite']), 8); print(len(i))"

An evaluation example and a training document overlap when they share at least one word
n-gram (n=13 by default, GPT-3's choice). Text is normalised before comparing: lower-cased,
every run of characters that are not letters, digits or `_` (punctuation, symbols, whitespace)
acts as one separator, so `Hello,  World!` and `hello world` have the same words. Examples with
fewer than n words cannot be checked this way; they are counted as `too_short` (lower n to
cover them, at the price of more chance matches).

The evaluation side is held in memory as an index: a vocabulary of the words that occur in any
evaluation n-gram and the set of n-grams as tuples of word ids. A training document is scanned
once; a window is looked up only when all its n words are in the evaluation vocabulary, which
skips most of a corpus at the cost of one dict lookup per word.

Evaluation sets are JSONL files (every string value of a row, nested lists included, joined in
order, is the example's text; or only `fields`), plinth task YAML files (their `data:` JSONL),
plain text files (one example per non-blank line) or directories of those. `plinth data
prepare` drops training documents that contain any evaluation n-gram and counts them as
`contaminated`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from plinth.data.paths import path_problem, read_regular
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
            problem = path_problem(p)
            what = "does not exist"
            if problem is not None and problem[0] != "missing_path":
                what = f"cannot be read ({problem[1]})"
            raise UsageError(
                f"evaluation set {p} {what} (data.decontaminate); give JSONL or text files, "
                "task YAML files or directories of them"
            )
    return out


def _task_data(path: Path) -> tuple[str, Path]:
    from plinth.config.yamlio import read_yaml_file

    spec = read_yaml_file(path, "task file")
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
        text = read_regular(p).decode("utf-8")
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
        except (ValueError, RecursionError) as e:
            raise UsageError(f"{p}:{lineno} is not valid JSON ({str(e)[:200]})") from None
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
        try:
            data = read_regular(p)
        except OSError as e:
            raise UsageError(
                f"cannot read the evaluation set {p} (data.decontaminate): {e}"
            ) from None
        h.update(name.encode() + b"\0" + data + b"\0")
    return h.hexdigest()[:16]
