"""Robustness and bias probes: the model-free parts (metric math, prompt perturbations,
toxicity scorers). plinth.eval.tasks loads probe task files; plinth.eval.scoring runs them.

    python -c "from plinth.eval.probes import perturb_text; \
print(perturb_text('The capital of France is', 'typos', 0.2, seed=1, index=0))"

Counterfactual probes compare groups by log-likelihood: `group_gaps` turns per-row group scores
into mean gaps and preference fractions. Perturbations rewrite a prompt with a generator seeded
by (seed, perturbation, row index), so a rerun (or another --limit) perturbs a row the same way.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from plinth.errors import UsageError

# ---- counterfactual metrics ----------------------------------------------------------------


def group_pairs(groups: Sequence[str]) -> list[tuple[str, str]]:
    """Every pair (a, b) of groups with a declared before b: the gaps that get reported."""
    return [(a, b) for i, a in enumerate(groups) for b in groups[i + 1 :]]


def group_gaps(scores: Sequence[dict[str, float]], groups: Sequence[str]) -> dict[str, float]:
    """Metrics of a counterfactual probe from each row's {group: score}:

    - `ll/G`: mean over rows of group G's score;
    - `gap/A-B`: mean over rows of (score A - score B): > 0 means the model prefers A;
    - `pref/A-B`: fraction of rows where A's score is strictly higher (a tie counts for neither).
    """
    n = len(scores)
    out: dict[str, float] = {}
    for g in groups:
        out[f"ll/{g}"] = sum(s[g] for s in scores) / n if n else math.nan
    for a, b in group_pairs(groups):
        out[f"gap/{a}-{b}"] = sum(s[a] - s[b] for s in scores) / n if n else math.nan
        out[f"pref/{a}-{b}"] = sum(s[a] > s[b] for s in scores) / n if n else math.nan
    return out


# ---- prompt perturbations ------------------------------------------------------------------

PERTURBATIONS = ("typos", "case", "whitespace")
CASE_MODES = ("upper", "lower", "random")
# the setting a bare name in a `perturb:` list gets
DEFAULTS: dict[str, float | str] = {"typos": 0.05, "case": "random", "whitespace": 0.1}


def typos(text: str, rate: float, rng: random.Random) -> str:
    """Each letter, with probability `rate`, is dropped or swapped with the letter after it
    (even odds). A swapped pair is not edited again."""
    chars, out, i = list(text), [], 0
    while i < len(chars):
        c = chars[i]
        if c.isalpha() and rng.random() < rate:
            if rng.random() < 0.5:
                i += 1  # drop
                continue
            if i + 1 < len(chars) and chars[i + 1].isalpha():
                out += [chars[i + 1], c]  # swap with the next letter
                i += 2
                continue
            i += 1  # a swap with nothing to swap with drops the letter
            continue
        out.append(c)
        i += 1
    return "".join(out)


def case(text: str, mode: str, rng: random.Random) -> str:
    """UPPER, lower, or each letter's case flipped with probability 1/2 (random)."""
    if mode == "upper":
        return text.upper()
    if mode == "lower":
        return text.lower()
    return "".join(c.swapcase() if c.isalpha() and rng.random() < 0.5 else c for c in text)


def whitespace(text: str, rate: float, rng: random.Random) -> str:
    """Each space, with probability `rate`, becomes a double space or a newline (even odds)."""
    out = []
    for c in text:
        if c == " " and rng.random() < rate:
            out.append("  " if rng.random() < 0.5 else "\n")
        else:
            out.append(c)
    return "".join(out)


_FUNCS: dict[str, Callable[[str, object, random.Random], str]] = {
    "typos": typos, "case": case, "whitespace": whitespace,  # type: ignore[dict-item]
}


def perturb_text(text: str, kind: str, setting: float | str, seed: int, index: int) -> str:
    """`text` perturbed by `kind` at `setting` (a rate, or a case mode), with a generator seeded
    by (seed, kind, index): the same row gets the same perturbation on every run."""
    rng = random.Random(f"{seed}:{kind}:{index}")  # str seeds are stable across processes
    return _FUNCS[kind](text, setting, rng)


def check_perturb(spec: object, where: str) -> tuple[dict[str, float | str], int]:
    """({perturbation: setting}, seed) from a task's `perturb:` value, which is a list of names
    (default settings) or a mapping {typos: rate, case: mode, whitespace: rate, seed: N}."""
    import difflib

    known = ", ".join(PERTURBATIONS)
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, list):
        spec = {name: DEFAULTS.get(name) for name in spec} if all(
            isinstance(s, str) for s in spec) else None
    if not isinstance(spec, dict) or not spec:
        raise UsageError(
            f"{where}: perturb must be a list of perturbations ({known}) or a mapping such as "
            "{typos: 0.05, case: random, whitespace: 0.1, seed: 1234}"
        )
    seed = spec.get("seed", 1234)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError(f"{where}: perturb.seed must be an integer, got {seed!r}")
    out: dict[str, float | str] = {}
    for name, val in spec.items():
        if name == "seed":
            continue
        if name not in PERTURBATIONS:
            close = difflib.get_close_matches(str(name), PERTURBATIONS, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise UsageError(
                f"{where}: unknown perturbation perturb.{name}.{hint} Known perturbations: "
                f"{known} (and perturb.seed)."
            )
        if name == "case":
            if val not in CASE_MODES:
                raise UsageError(
                    f"{where}: perturb.case is {val!r}; use one of {', '.join(CASE_MODES)}"
                )
        elif isinstance(val, bool) or not isinstance(val, int | float) or not 0 < val <= 1:
            raise UsageError(
                f"{where}: perturb.{name} is {val!r}; give the rate of edits, a number in (0, 1] "
                f"(e.g. {DEFAULTS[name]})"
            )
        out[name] = val
    if not out:
        raise UsageError(f"{where}: perturb names no perturbation; use some of {known}")
    return out, seed


# ---- toxicity ------------------------------------------------------------------------------


def read_lexicon(path: Path, where: str) -> list[str]:
    """Terms of a lexicon file: one per line; blank lines and lines starting with # skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"{where}: toxicity.lexicon {path} cannot be read ({e}); give a UTF-8 text file with "
            "one term per line, its path relative to the task YAML"
        ) from None
    terms = [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]
    if not terms:
        raise UsageError(
            f"{where}: toxicity.lexicon {path} has no terms; write one term per line "
            "(lines starting with # are comments)"
        )
    return terms


def lexicon_pattern(terms: Sequence[str]) -> re.Pattern:
    """Case-insensitive match of any term as a whole word: not inside a longer word, so `he`
    does not match `she` or `the` (terms may contain spaces or punctuation)."""
    alts = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def lexicon_matches(text: str, pattern: re.Pattern) -> list[str]:
    """The lexicon terms found in the text, as written there, in order."""
    return [m.group(0) for m in pattern.finditer(text)]


def load_classifier(spec: str, base: Path, where: str) -> Callable[[str], float]:
    """The function named by `module:function` (a module on sys.path, or a .py file path
    relative to the task YAML): it takes a generated text and returns P(toxic) in [0, 1]."""
    mod_name, sep, fn_name = str(spec).rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise UsageError(
            f"{where}: toxicity.classifier is {spec!r}; write module:function (e.g. "
            "my_filters:toxic_prob, or scorer.py:toxic_prob for a file next to the task YAML)"
        )
    try:
        if mod_name.endswith(".py"):
            file = (base / mod_name).resolve()
            name = f"plinth_probe_classifier_{abs(hash(str(file)))}"
            loader_spec = importlib.util.spec_from_file_location(name, file)
            if loader_spec is None or not file.is_file():
                raise ImportError(f"no such file {file}")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(mod_name)
    except Exception as e:  # any failure to import is the user's classifier to fix
        raise UsageError(
            f"{where}: toxicity.classifier {spec!r}: cannot import {mod_name} "
            f"({type(e).__name__}: {e})"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UsageError(
            f"{where}: toxicity.classifier {spec!r}: {mod_name} has no function {fn_name!r}"
        )
    return fn


def classifier_score(fn: Callable[[str], float], text: str, spec: str) -> float:
    """P(toxic) from a user classifier, checked to be a number in [0, 1]."""
    p = fn(text)
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise UsageError(
            f"toxicity.classifier {spec!r} returned {p!r} for {text[:60]!r}; it must return a "
            "probability, a number in [0, 1]"
        )
    return float(p)


def toxicity_rates(flags: Sequence[Sequence[bool]]) -> dict[str, float]:
    """From each prompt's per-sample toxic flags: `toxicity_rate` (fraction of all
    generations flagged) and `toxic_prompt_rate` (fraction of prompts with at least one)."""
    gens = [f for row in flags for f in row]
    return {
        "toxicity_rate": sum(gens) / len(gens) if gens else math.nan,
        "toxic_prompt_rate": sum(any(r) for r in flags) / len(flags) if flags else math.nan,
    }
