"""Evaluation tasks as small YAML + JSONL files that anyone can add without code.

    python -c "from plinth.eval.tasks import load_tasks; t = load_tasks(['suite'])[0]; \
print(t.name, len(t.rows)); print(t.context(0, 2))"

A task file (see docs/eval.md for every key):

    name: capitals
    type: multiple_choice          # or generation; probes: counterfactual, toxicity
    data: capitals.jsonl           # one JSON object per line, path relative to this file
    prompt: "Q: What is the capital of {country}?\\nA:"   # Python format over the row's fields
    template: python               # or jinja (sandboxed Jinja2, StrictUndefined)
    target_delimiter: " "          # between prompt and answer/choice
    fields: {choices: choices, answer: answer}   # MC: list field + gold index; gen: target(s)
    fewshot: {k: 0, seed: 1234, separator: "\\n\\n", file: null, answer: "{answer}"}
    generation: {max_new_tokens: 32, stop: ["\\n"], metric: exact_match, pattern: null,
                 normalize: strip}

Probe types (docs/eval.md, "Probes"): `counterfactual` scores a template filled with each
group's terms (`groups:`, `slot:`, optional `continuation:`, `score:`); `toxicity` generates
continuations and flags them with `toxicity.lexicon` / `toxicity.classifier`; `perturb:` on a
multiple-choice or generation task also scores typo / case / whitespace variants of its prompts.

Every row is checked when the task loads, so a bad row fails before any model runs, with the
file, line and field in the message. Shots come from `fewshot.file` or, without one, from the
task's other rows (never the scored one), drawn with a generator seeded by (seed, row index):
the same prompt for a row whatever --limit is.
"""

from __future__ import annotations

import difflib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plinth.config.yamlio import describe_error, safe_load
from plinth.data.templates import check_format, compile_jinja, render_jinja, safe_format
from plinth.errors import UsageError

SUITE_DIR = Path(__file__).resolve().parent / "suite"
PROBES_DIR = SUITE_DIR / "probes"  # example probes: `--tasks probes`, not part of `suite`
TYPES = ("multiple_choice", "generation", "counterfactual", "toxicity")
PROBES = ("counterfactual", "toxicity")  # no answers: no shots
SCORES = ("sum", "per_token")
SLOT_MARK = "\x00slot\x00"  # stands for the slot while a template is split at it
# generation metrics; code_exec is scored by plinth.eval.sandbox (run the code, check its tests)
GEN_METRICS = ("exact_match", "f1", "regex", "code_exec")
NORMALIZE = ("strip", "squad")
TOP_KEYS = {
    "name", "type", "data", "prompt", "template", "target_delimiter", "fields", "fewshot",
    "generation", "description", "provenance", "groups", "slot", "continuation", "score",
    "toxicity", "perturb",
}
ONLY_FOR = {  # keys that only one kind of task reads
    "groups": ("counterfactual",), "slot": ("counterfactual",),
    "continuation": ("counterfactual",), "score": ("counterfactual",),
    "toxicity": ("toxicity",), "perturb": ("multiple_choice", "generation"),
}
SUB_KEYS = {
    "fields": {"choices", "answer"},
    "fewshot": {"k", "seed", "separator", "file", "answer"},
    "generation": {"max_new_tokens", "stop", "metric", "pattern", "normalize"},
    "toxicity": {"lexicon", "classifier", "threshold", "samples", "temperature", "seed"},
}


@dataclass
class FewShot:
    k: int = 0
    seed: int = 1234
    separator: str = "\n\n"
    file: Path | None = None
    answer: str = "{answer}"  # how a shot's answer is written (Python format; {answer} = gold)


@dataclass
class Generation:
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["\n\n"])
    metric: str = "exact_match"
    pattern: str | None = None
    normalize: str = "strip"


@dataclass
class Toxicity:
    lexicon: Path | None = None
    classifier: str | None = None  # module:function (or file.py:function) -> P(toxic)
    threshold: float = 0.5  # a classifier probability at or above it flags the text
    samples: int = 1  # continuations per prompt
    temperature: float = 0.0  # 0: greedy
    seed: int = 1234  # prompt i's samples are drawn with a generator seeded by (seed, i)
    terms: list[str] = field(default_factory=list)
    pattern: Any = None  # compiled lexicon regex
    fn: Any = None  # the loaded classifier function


@dataclass
class Task:
    """A loaded, validated task: its rows and how to turn a row into prompts and answers."""

    name: str
    type: str
    path: Path
    data_path: Path
    rows: list[dict]
    prompt: str
    template: str = "python"
    target_delimiter: str = " "
    choices_field: str = "choices"
    answer_field: str = "answer"
    fewshot: FewShot = field(default_factory=FewShot)
    generation: Generation = field(default_factory=Generation)
    description: str = ""
    provenance: str = ""
    shot_rows: list[dict] | None = None  # from fewshot.file; None: the task's other rows
    # counterfactual probes: group -> terms that fill the slot
    groups: dict[str, list[str]] | None = None
    slot: str = "term"
    continuation: str | None = None  # scored given the prompt; None: split at the slot
    score: str = "sum"  # sum of the continuation's token log-probs, or their mean (per_token)
    toxicity: Toxicity = field(default_factory=Toxicity)
    perturb: dict[str, float | str] = field(default_factory=dict)  # perturbation -> setting
    perturb_seed: int = 1234
    _jinja: Any = None
    _jinja_cont: Any = None

    # ---- one row ------------------------------------------------------------------------

    def render(self, row: dict) -> str:
        """The row's prompt (without the answer)."""
        if self.template == "jinja":
            return render_jinja(self._jinja, f"{self.path}: prompt", **row)
        return safe_format(self.prompt, row, f"{self.path}: prompt")

    def render_continuation(self, row: dict) -> str:
        if self.template == "jinja":
            return render_jinja(self._jinja_cont, f"{self.path}: continuation", **row)
        return safe_format(str(self.continuation), row, f"{self.path}: continuation")

    def row_groups(self, row: dict) -> dict[str, list[str]]:
        """Group -> terms for a counterfactual row: the row's own `groups`, else the task's."""
        got = row.get("groups") or self.groups or {}
        return {g: ([t] if isinstance(t, str) else [str(x) for x in t]) for g, t in got.items()}

    def fill(self, row: dict, term: str) -> tuple[str, str]:
        """(context, continuation) of a counterfactual row with the slot filled by `term`.
        With a `continuation` template the context is prompt + target_delimiter; without one
        the filled prompt is split where the slot first occurs, so the words before it (the
        same for every term) are the context and the term and everything after are scored."""
        vals = {**row, self.slot: term}
        if self.continuation is not None:
            return self.render(vals) + self.target_delimiter, self.render_continuation(vals)
        marked = self.render({**row, self.slot: SLOT_MARK})
        cut = marked.index(SLOT_MARK)
        return marked[:cut], marked[cut:].replace(SLOT_MARK, term)

    def choices(self, row: dict) -> list[str]:
        return [str(c) for c in row[self.choices_field]]

    def gold(self, row: dict) -> int:
        return int(row[self.answer_field])

    def targets(self, row: dict) -> list[str]:
        """Acceptable answers of a generation row (the first is shown in shots)."""
        ans = row.get(self.answer_field, "")  # optional for code_exec (its tests decide)
        return [str(a) for a in ans] if isinstance(ans, list) else [str(ans)]

    def answer_text(self, row: dict) -> str:
        if self.type == "multiple_choice":
            return self.choices(row)[self.gold(row)]
        return self.targets(row)[0]

    def shot_answer(self, row: dict) -> str:
        """The answer as a shot shows it (fewshot.answer, e.g. a JSON wrapper)."""
        return safe_format(self.fewshot.answer, {**row, "answer": self.answer_text(row)},
                           f"{self.path}: fewshot.answer")

    def context(self, i: int, k: int | None = None, perturb: str | None = None) -> str:
        """Few-shot prefix + the prompt of row i; k defaults to the task's fewshot.k. With
        `perturb` (a key of self.perturb) the row's own prompt is perturbed, seeded by
        (perturb_seed, perturbation, i); shots, choices and targets stay as written."""
        k = self.fewshot.k if k is None else k
        shots = [
            self.render(r) + self.target_delimiter + self.shot_answer(r) for r in self.shots(i, k)
        ]
        prompt = self.render(self.rows[i])
        if perturb is not None:
            from plinth.eval.probes import perturb_text

            prompt = perturb_text(prompt, perturb, self.perturb[perturb], self.perturb_seed, i)
        return self.fewshot.separator.join([*shots, prompt])

    def shots(self, i: int, k: int) -> list[dict]:
        """k example rows for row i, fixed by (seed, i), never row i itself."""
        if k <= 0:
            return []
        pool = self.shot_rows if self.shot_rows is not None else self.rows
        idx = [j for j in range(len(pool)) if self.shot_rows is not None or j != i]
        if k > len(idx):
            raise UsageError(
                f"task {self.name}: {k} shots asked for, but only {len(idx)} example rows are "
                f"available ({'fewshot.file' if self.shot_rows is not None else 'other rows'}). "
                "Use fewer --shots or give a larger fewshot.file."
            )
        rng = random.Random(self.fewshot.seed * 1_000_003 + i)
        return [pool[j] for j in rng.sample(idx, k)]


# ---- loading ------------------------------------------------------------------------------


def builtin_tasks() -> dict[str, Path]:
    """Built-in task name -> YAML path (the offline suite shipped in plinth/eval/suite)."""
    return {p.stem: p for p in sorted(SUITE_DIR.glob("*.yaml"))}


def example_probes() -> dict[str, Path]:
    """Example probe name -> YAML path (plinth/eval/suite/probes; `probes` names them all)."""
    return {p.stem: p for p in sorted(PROBES_DIR.glob("*.yaml"))}


def load_tasks(specs: list[str]) -> list[Task]:
    """Tasks from names: built-in task names, `suite` (all built-in tasks), `probes` (the
    example probes) or one of their names, YAML paths or directories of YAML files. Commas
    separate several names in one string."""
    names = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not names:
        raise UsageError(
            f"no tasks given; use --tasks suite or some of: {', '.join(builtin_tasks())} "
            "(or a task YAML path)"
        )
    known, probes = builtin_tasks(), example_probes()
    tasks: list[Task] = []
    for name in names:
        p = Path(name).expanduser()
        if name == "suite":
            tasks += [load_task(path) for path in known.values()]
        elif name == "probes":
            tasks += [load_task(path) for path in probes.values()]
        elif name in known or name in probes:
            tasks.append(load_task(known.get(name) or probes[name]))
        elif p.is_dir():
            tasks += [load_task(path) for path in sorted(p.glob("*.y*ml"))]
        elif p.is_file():
            tasks.append(load_task(p))
        else:
            close = difflib.get_close_matches(name, [*known, "suite", *probes, "probes"], n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UsageError(
                f"unknown task {name!r}: not a built-in task and no such file.{hint} Built-in "
                f"tasks: {', '.join(known)} (or `suite` for all of them); example probes: "
                f"{', '.join(probes)} (or `probes`); a task of your own is a YAML file path "
                "(see docs/eval.md)."
            )
    return tasks


def load_task(path: str | Path) -> Task:
    """Read and validate one task YAML and its JSONL rows (clear errors with file and line)."""
    path = Path(path)
    text = read_text_file(path, "task file", "a YAML task file (see docs/eval.md)")
    try:
        spec = safe_load(text)
    except yaml.YAMLError as e:
        raise UsageError(
            f"task file {path} is not valid YAML{describe_error(e)}; fix it (see docs/eval.md)"
        ) from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path}: a task file is a YAML mapping (name, type, data, prompt, ...)")
    _check_keys(path, spec, TOP_KEYS, "")
    for key in ("name", "type", "data", "prompt"):
        if key not in spec:
            raise UsageError(
                f"{path}: missing required key {key!r}. A task needs name, type "
                f"({' | '.join(TYPES)}), data (a JSONL path relative to the YAML) and prompt "
                "(a template over each row's fields); see docs/eval.md."
            )
    _check_types(path, spec)
    if spec["type"] not in TYPES:
        raise UsageError(f"{path}: type is {spec['type']!r}; use one of {', '.join(TYPES)}")
    for key, types in ONLY_FOR.items():
        if key in spec and spec["type"] not in types:
            raise UsageError(
                f"{path}: key {key!r} is only read by {' and '.join(types)} tasks, and this "
                f"task's type is {spec['type']}; remove it or change the type (see docs/eval.md)"
            )
    subs = {}
    for sect in SUB_KEYS:
        val = spec.get(sect) or {}
        if not isinstance(val, dict):
            raise UsageError(f"{path}: {sect} must be a mapping of {sorted(SUB_KEYS[sect])}")
        _check_keys(path, val, SUB_KEYS[sect], f"{sect}.")
        subs[sect] = val
    fewshot = _fewshot(path, subs["fewshot"])
    gen = _generation(path, subs["generation"])
    if gen.metric not in GEN_METRICS:
        raise UsageError(
            f"{path}: generation.metric is {gen.metric!r}; use one of {', '.join(GEN_METRICS)}"
        )
    if gen.normalize not in NORMALIZE:
        raise UsageError(
            f"{path}: generation.normalize is {gen.normalize!r}; use one of {', '.join(NORMALIZE)}"
        )
    if gen.metric == "regex":
        import re

        if not gen.pattern:
            raise UsageError(
                f"{path}: generation.metric is regex but generation.pattern is missing; give a "
                'regular expression whose first group is the answer, e.g. "answer: (\\\\d+)"'
            )
        try:
            re.compile(gen.pattern)
        except re.error as e:
            raise UsageError(f"{path}: generation.pattern is not a valid regex: {e}") from None
    template = spec.get("template", "python")
    if template not in ("python", "jinja"):
        raise UsageError(f"{path}: template is {template!r}; use python or jinja")
    if spec["type"] in PROBES and fewshot.k > 0:
        raise UsageError(
            f"{path}: fewshot.k is {fewshot.k}, but a {spec['type']} probe has no answers to "
            "show as shots; remove fewshot (or put examples in the prompt itself)"
        )
    fields = subs["fields"]
    task = Task(
        name=str(spec["name"]),
        type=spec["type"],
        path=path,
        data_path=path.parent / str(spec["data"]),
        rows=[],
        prompt=str(spec["prompt"]),
        template=template,
        target_delimiter=str(spec.get("target_delimiter", " ")),
        choices_field=str(fields.get("choices", "choices")),
        answer_field=str(fields.get("answer", "answer")),
        fewshot=fewshot,
        generation=gen,
        description=str(spec.get("description", "")).strip(),
        provenance=str(spec.get("provenance", "")).strip(),
    )
    if task.type == "counterfactual":
        _load_counterfactual(task, spec)
    elif task.type == "toxicity":
        _load_toxicity(task, subs["toxicity"])
    if "perturb" in spec:
        from plinth.eval.probes import check_perturb

        task.perturb, task.perturb_seed = check_perturb(spec["perturb"], str(path))
    if template == "jinja":
        import jinja2

        for key, attr in (("prompt", "_jinja"), ("continuation", "_jinja_cont")):
            source = getattr(task, key)
            if source is not None:
                tpl = compile_jinja(source, f"{path}: {key}", undefined=jinja2.StrictUndefined)
                setattr(task, attr, tpl)
    else:
        for key in ("prompt", "continuation"):
            if getattr(task, key) is not None:
                check_format(getattr(task, key), f"{path}: {key}")
    check_format(task.fewshot.answer, f"{path}: fewshot.answer")
    task.rows = _read_rows(task, task.data_path)
    if fewshot.file is not None:
        task.shot_rows = _read_rows(task, fewshot.file)
    return task


def _fewshot(path: Path, fs: dict) -> FewShot:
    return FewShot(
        k=_typed(path, "fewshot.k", fs.get("k", 0), int, minimum=0),
        seed=_typed(path, "fewshot.seed", fs.get("seed", 1234), int),
        separator=_typed(path, "fewshot.separator", fs.get("separator", "\n\n"), str),
        file=(path.parent / _typed(path, "fewshot.file", fs["file"], str))
        if fs.get("file") else None,
        answer=_typed(path, "fewshot.answer", fs.get("answer", "{answer}"), str),
    )


def _generation(path: Path, g: dict) -> Generation:
    gen = Generation(
        max_new_tokens=_typed(path, "generation.max_new_tokens", g.get("max_new_tokens", 32),
                              int, minimum=1),
        stop=g.get("stop", ["\n\n"]),
        metric=_typed(path, "generation.metric", g.get("metric", "exact_match"), str),
        pattern=g.get("pattern"),
        normalize=_typed(path, "generation.normalize", g.get("normalize", "strip"), str),
    )
    if isinstance(gen.stop, str):
        gen.stop = [gen.stop]
    if not isinstance(gen.stop, list) or not all(isinstance(x, str) and x for x in gen.stop):
        raise UsageError(
            f"{path}: generation.stop is {_quote(gen.stop)}; give a string or a list of "
            'non-empty strings, e.g. stop: ["\\n"]'
        )
    if gen.pattern is not None:
        _typed(path, "generation.pattern", gen.pattern, str)
    return gen


def _load_counterfactual(task: Task, spec: dict) -> None:
    path = task.path
    slot = spec.get("slot", "term")
    if not isinstance(slot, str) or not slot.isidentifier():
        raise UsageError(
            f"{path}: slot is {slot!r}; name the placeholder the group terms fill, a plain "
            "identifier such as term (written {term} in the prompt)"
        )
    task.slot = slot
    if spec.get("continuation") is not None:
        task.continuation = str(spec["continuation"])
    score = spec.get("score", "sum")
    if score not in SCORES:
        raise UsageError(
            f"{path}: score is {score!r}; use sum (total log-probability of the scored text) "
            "or per_token (its mean over the scored tokens)"
        )
    task.score = score
    if "groups" in spec:
        task.groups = check_groups(spec["groups"], f"{path}: groups")


def check_groups(val: Any, where: str) -> dict[str, list[str]]:
    """A groups mapping {group: [terms]} (a single term may be a string), checked: at least two
    groups, each with at least one non-empty term."""
    example = "{male: [he, him, man], female: [she, her, woman]}"
    if not isinstance(val, dict) or len(val) < 2:
        raise UsageError(
            f"{where} must map at least two group names to their terms, e.g. {example}; "
            f"got {val!r}"
        )
    out = {}
    for g, terms in val.items():
        terms = [terms] if isinstance(terms, str) else terms
        if not isinstance(terms, list) or not terms or not all(
            isinstance(t, str) and t.strip() for t in terms
        ):
            raise UsageError(
                f"{where}: group {g!r} has no terms ({val[g]!r}); give it a list of one or more "
                f"non-empty strings, e.g. {example}"
            )
        out[str(g)] = [str(t) for t in terms]
    return out


def _load_toxicity(task: Task, sub: dict) -> None:
    from plinth.eval.probes import lexicon_pattern, load_classifier, read_lexicon

    path, tox = task.path, Toxicity()
    if not sub.get("lexicon") and not sub.get("classifier"):
        raise UsageError(
            f"{path}: a toxicity task needs toxicity.lexicon (a text file of terms, one per "
            "line) or toxicity.classifier (module:function returning P(toxic)), or both"
        )
    where = str(path)
    for key, kind in (("samples", int), ("seed", int), ("threshold", float),
                      ("temperature", float)):
        if key in sub:
            v = sub[key]
            if isinstance(v, bool) or not isinstance(v, int | float) or (
                    kind is int and not isinstance(v, int)):
                raise UsageError(f"{where}: toxicity.{key} must be a number, got {v!r}")
            setattr(tox, key, kind(v))
    if tox.samples < 1:
        raise UsageError(f"{where}: toxicity.samples must be at least 1, got {tox.samples}")
    if tox.temperature < 0:
        raise UsageError(f"{where}: toxicity.temperature cannot be negative")
    if tox.samples > 1 and tox.temperature == 0:
        raise UsageError(
            f"{where}: toxicity.samples is {tox.samples} with greedy decoding (temperature 0), "
            "which gives the same continuation every time; set toxicity.temperature (e.g. 1.0) "
            "to sample, or samples: 1"
        )
    if not 0.0 <= tox.threshold <= 1.0:
        raise UsageError(f"{where}: toxicity.threshold must be in [0, 1], got {tox.threshold}")
    if sub.get("lexicon"):
        tox.lexicon = path.parent / str(sub["lexicon"])
        tox.terms = read_lexicon(tox.lexicon, where)
        tox.pattern = lexicon_pattern(tox.terms)
    if sub.get("classifier"):
        tox.classifier = str(sub["classifier"])
        tox.fn = load_classifier(tox.classifier, path.parent, where)
    task.toxicity = tox


MAX_FILE = 256 * 1024 * 1024  # bytes of one task or data file


def read_text_file(path: Path, what: str, expected: str) -> str:
    """A UTF-8 text file, or a UsageError naming it when it is missing, binary, not UTF-8 or
    over MAX_FILE."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE:
            raise UsageError(
                f"{what} {path} is {size / 2**20:.0f} MiB; the limit is {MAX_FILE // 2**20} MiB. "
                f"Give {expected}."
            )
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror or e}") from None
    if b"\0" in raw:
        raise UsageError(
            f"{what} {path} holds NUL bytes: it looks like a binary file. Give {expected}."
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UsageError(
            f"{what} {path} is not UTF-8 text (line {line}, byte {e.start + 1}); save it as "
            f"UTF-8. Give {expected}."
        ) from None


def _quote(value) -> str:
    """A short repr of a YAML value (bounded even for nested aliases: a YAML bomb)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxstring, r.maxother = 2, 160, 160
    return r.repr(value)[:200]


def _check_types(path: Path, spec: dict) -> None:
    """The top-level keys that must be text are text (not numbers, lists or mappings)."""
    for key in ("name", "type", "data", "prompt", "template", "target_delimiter",
                "continuation", "description", "provenance", "slot", "score"):
        if key in spec and spec[key] is not None and not isinstance(spec[key], str):
            kind = type(spec[key]).__name__
            raise UsageError(
                f"{path}: {key} is a {kind} ({_quote(spec[key])}), not text; write it as a "
                "string (quote it in YAML), see docs/eval.md"
            )


def _typed(path: Path, key: str, value, kind: type, minimum: int | None = None):
    """`value` of a task key checked to be a `kind` (and at least `minimum`)."""
    if isinstance(value, bool) or not isinstance(value, kind):
        name = "an integer" if kind is int else "text"
        raise UsageError(
            f"{path}: {key} is {_quote(value)} ({type(value).__name__}); it must be {name}"
        )
    if minimum is not None and value < minimum:
        raise UsageError(f"{path}: {key} is {value}; it must be at least {minimum}")
    return value


def _check_keys(path: Path, spec: dict, allowed: set[str], prefix: str) -> None:
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {prefix}{close[0]}?" if close else ""
            raise UsageError(
                f"{path}: unknown key {prefix}{key}.{hint} Known keys: "
                f"{', '.join(prefix + k for k in sorted(allowed))}."
            )


def _read_rows(task: Task, data: Path) -> list[dict]:
    if not data.is_file():
        raise UsageError(
            f"{task.path}: data file {data} does not exist (paths are relative to the task YAML)"
        )
    rows = []
    text = read_text_file(data, "task data file", "a JSONL file, one JSON object per line")
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{data}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(
                f"{where}: not valid JSON ({e}); each line is one JSON object"
            ) from None
        except RecursionError:
            raise UsageError(
                f"{where}: nested too deeply to read; each line is one JSON object"
            ) from None
        if not isinstance(row, dict):
            raise UsageError(
                f"{where}: each line must be a JSON object, got {type(row).__name__}"
            )
        _check_row(task, row, where)
        rows.append(row)
    if not rows:
        raise UsageError(f"{data}: no rows; a task needs at least one JSON line")
    return rows


def _check_counterfactual_row(task: Task, row: dict, where: str) -> None:
    marked = task.render({**row, task.slot: SLOT_MARK})
    if task.continuation is not None:
        marked += task.render_continuation({**row, task.slot: SLOT_MARK})
    if SLOT_MARK not in marked:
        fields = "prompt" + (" or continuation" if task.continuation is not None else "")
        raise UsageError(
            f"{where}: the {fields} of counterfactual task {task.name} ({task.path}) never uses "
            f"the slot {{{task.slot}}} on this row, so every group would score the same text. "
            f"Write {{{task.slot}}} where the group terms go (e.g. \"The doctor said that "
            f"{{{task.slot}}} was tired\"), or set slot: to the placeholder you use."
        )
    if "groups" in row:
        own = check_groups(row["groups"], f"{where}: field 'groups'")
        expected = list(task.groups) if task.groups else None
        if expected is not None and sorted(own) != sorted(expected):
            raise UsageError(
                f"{where}: field 'groups' names groups {sorted(own)}, but the task's groups are "
                f"{sorted(expected)}; a row may change the terms, not the groups"
            )
        row["groups"] = own
        if task.groups is None:
            task.groups = {g: [] for g in own}  # the first row fixes the group names
    elif task.groups is None or not any(task.groups.values()):
        raise _missing(task, row, "groups", where,
                       "the group terms: no groups: mapping in the task YAML")


def _missing(task: Task, row: dict, key: str, where: str, why: str) -> UsageError:
    return UsageError(
        f"{where}: missing field {key!r} ({why}) in task {task.name} ({task.path}). The row has "
        f"{sorted(row)}; add the field to every row or change the task YAML to use a field "
        "the rows have."
    )


def _check_row(task: Task, row: dict, where: str) -> None:
    slot = {task.slot: SLOT_MARK} if task.type == "counterfactual" else {}
    templates = [("prompt", task.prompt, task._jinja)]
    if task.continuation is not None:
        templates.append(("continuation", task.continuation, task._jinja_cont))
    for key_name, source, jinja in templates:
        if task.template == "python":
            for key in check_format(source, f"{task.path}: {key_name}"):
                if key not in row and key not in slot:
                    raise _missing(task, row, key, where, f"used by the {key_name}")
        else:
            try:
                render_jinja(jinja, f"{task.path}: {key_name}", **row, **slot)
            except UsageError as e:  # StrictUndefined names the missing variable
                raise UsageError(
                    f"{where}: the {key_name} template fails on this row ({e}) in task "
                    f"{task.name}; add the field to the row or fix the template"
                ) from None
    if task.type == "counterfactual":
        _check_counterfactual_row(task, row, where)
        return
    if task.type == "toxicity":
        return  # prompts only: the lexicon / classifier judges the continuations
    ans = task.answer_field
    if task.type == "generation" and task.generation.metric == "code_exec":
        if "tests" not in row:
            raise _missing(task, row, "tests", where, "code that checks the completion")
        if ans not in row:
            return  # a reference solution is optional: the tests decide
    if ans not in row:
        why = "the gold choice index" if task.type == "multiple_choice" else "the target answer"
        raise _missing(task, row, ans, where, why)
    if task.type == "generation":
        val = row[ans]
        if not isinstance(val, str | int | float | list) or isinstance(val, bool):
            raise UsageError(f"{where}: field {ans!r} must be a string or a list of strings")
        return
    ch = task.choices_field
    if ch not in row:
        raise _missing(task, row, ch, where, "the list of choices")
    choices = row[ch]
    if not isinstance(choices, list) or len(choices) < 2:
        raise UsageError(
            f"{where}: field {ch!r} must be a list of at least two choices, got {choices!r}"
        )
    gold = row[ans]
    if isinstance(gold, str) and gold in [str(c) for c in choices]:
        row[ans] = gold = [str(c) for c in choices].index(gold)
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise UsageError(
            f"{where}: field {ans!r} is {gold!r}, but the answer must be the index of the "
            f"correct choice, 0..{len(choices) - 1} for this row's {len(choices)} choices "
            f"(or the choice's text). Fix the row in task {task.name}."
        )
