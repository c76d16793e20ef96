"""Rewards for RL from rewards (align.method=grpo|rloo): Python functions and a reward model.

    python -c "from plinth.align.rewards import exact_match; \
print(exact_match('What is 2 + 3?', 'It is 5.', answer='5'))"

A reward function takes (prompt: str, completion: str, **row fields) and returns a number; the
row fields are the prompt row's other JSON fields (everything but `prompt` and `completion`,
which are the arguments themselves). A function whose signature has no **kwargs gets only the
fields it names. `align.reward_funcs` names each one:

- a built-in by its bare name: `exact_match`, `json_valid`, `length_penalty` (below);
- `module:function`, the module imported with importlib (installed, or on PYTHONPATH);
- `path/to/file.py:function`, the file loaded as a module (a relative path is read from the
  current directory).

Several rewards are summed with `align.reward_weights` (all 1 when empty); a reward model
(`align.reward_model`, a run trained with align.method=reward) comes after the functions.
Every function is imported when the task is built, before anything is written; one that cannot
be imported, raises, or returns something that is not a finite number stops the run with a
UsageError naming the function and the dataset row.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from plinth.errors import UsageError

LENGTH_TARGET = 200  # length_penalty: characters allowed before the penalty starts
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _normalise(text: str) -> str:
    return " ".join(str(text).split()).casefold()


def _number(text: str) -> Decimal | None:
    try:
        return Decimal(text.strip().replace(",", ""))
    except InvalidOperation:
        return None


def exact_match(prompt: str, completion: str, *, answer, **_) -> float:
    """1.0 when the completion gives the row's `answer`, else 0.0.

    Both are compared after stripping, collapsing runs of whitespace to one space and ignoring
    case. When they differ and the answer is a number (e.g. "42", "-7", "3.50", or a JSON
    number), the LAST number in the completion (an optional sign directly before the digits,
    digits with optional comma thousands separators as in 1,234, an optional decimal part) is
    compared by value instead, so "The sum is 42." and "= 42.0"
    match 42; "42 or 43" does not."""
    want, got = _normalise(answer), _normalise(completion)
    if got == want:
        return 1.0
    value = _number(want) if not isinstance(answer, bool) else None
    if value is None:
        return 0.0
    found = _NUMBER.findall(completion)
    return 1.0 if found and _number(found[-1]) == value else 0.0


def json_valid(prompt: str, completion: str, **_) -> float:
    """1.0 when the whole completion (leading and trailing whitespace aside) parses as JSON
    (any JSON value: object, array, string, number, true/false/null), else 0.0."""
    try:
        json.loads(completion.strip())
    except (ValueError, RecursionError):
        return 0.0
    return 1.0


def length_penalty(prompt: str, completion: str, *, target_length=None, **_) -> float:
    """0 up to a target length, then -1 per target length beyond it:
    -max(0, chars - target) / target, where chars is the completion's length in characters
    (whitespace at both ends aside) and target is the row's `target_length` field when present
    (a positive number), else 200. E.g. target 200: 150 chars -> 0, 300 -> -0.5, 600 -> -2."""
    target = LENGTH_TARGET if target_length is None else target_length
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not target > 0:
        raise ValueError(f"target_length={str(target)[:40]!r} is not a positive number")
    return -max(0.0, len(completion.strip()) - float(target)) / float(target)


BUILTINS: dict[str, Callable[..., float]] = {
    "exact_match": exact_match,
    "json_valid": json_valid,
    "length_penalty": length_penalty,
}
REQUIRED_FIELDS = {"exact_match": ("answer",)}  # built-ins' row fields, checked up front


# --------------------------------------------------------------------------------- resolving


@dataclass
class RewardFunc:
    """One named reward: a callable, what it reads from rows, and how it is called."""

    spec: str  # as configured
    name: str  # the metric name (reward/<name>)
    fn: Callable[..., float]
    required: tuple[str, ...] = ()  # row fields it cannot do without
    accepts: frozenset[str] | None = None  # row fields it takes (None: all, **kwargs)

    def __call__(self, prompt: str, completion: str, fields: dict, where: str) -> float:
        kw = fields if self.accepts is None else {
            k: v for k, v in fields.items() if k in self.accepts}
        try:
            value = self.fn(prompt, completion, **kw)
        except Exception as e:  # a user's function: any failure is reported with its row
            raise UsageError(
                f"reward function {self.spec} raised {type(e).__name__}: {str(e)[:200]} (on "
                f"{where}). Fix the function (it gets the prompt, the completion and the row's "
                "other fields as keyword arguments) or the row; the run stops here, its "
                "checkpoints so far intact."
            ) from None
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            what = type(value).__name__ if not isinstance(value, numbers.Real) else \
                f"the non-finite number {value}"
            raise UsageError(
                f"reward function {self.spec} returned {what} ({str(value)[:80]}) on {where}; a "
                "reward function must return a finite float (int and bool are taken as "
                "numbers). Fix the function; the run stops here, its checkpoints so far intact."
            )
        return float(value)


def resolve_reward_funcs(specs: list[str], key: str = "align.reward_funcs") -> list[RewardFunc]:
    """The configured reward functions, each imported and checked to be callable (UsageError
    naming the entry, the import error and the fix otherwise)."""
    out: list[RewardFunc] = []
    for i, spec in enumerate(specs):
        fn = _import(str(spec), f"{key}[{i}]")
        name = spec if spec in BUILTINS else str(spec).rsplit(":", 1)[-1]
        out.append(RewardFunc(str(spec), name, fn, *_params(spec, fn)))
    seen: dict[str, int] = {}
    for f in out:  # two functions of the same name: number them
        seen[f.name] = seen.get(f.name, 0) + 1
    for f in out:
        if seen[f.name] > 1:
            f.name = f.spec.replace(":", ".").replace("/", ".")
    return out


def _params(spec: str, fn) -> tuple[tuple[str, ...], frozenset[str] | None]:
    if spec in BUILTINS:
        return REQUIRED_FIELDS.get(spec, ()), None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: call it with everything
        return (), None
    params = list(sig.parameters.values())[2:]  # after prompt and completion
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        accepts = None
    else:
        accepts = frozenset(p.name for p in params)
    required = tuple(
        p.name for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return required, accepts


HOWTO = ("name a built-in (exact_match, json_valid, length_penalty), `module:function` with the "
         "module importable (installed or on PYTHONPATH), or `path/to/file.py:function`")


def _import(spec: str, key: str) -> Callable[..., float]:
    if spec in BUILTINS:
        return BUILTINS[spec]
    shown = spec[:200]
    if ":" not in spec:
        import difflib

        close = difflib.get_close_matches(spec, BUILTINS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{key}={shown!r} is not a built-in reward{hint}; {HOWTO}.")
    where, func = spec.rsplit(":", 1)
    try:
        if where.endswith(".py"):
            module = _load_file(Path(where), key, shown)
        else:
            module = importlib.import_module(where)
    except UsageError:
        raise
    except Exception as e:  # ImportError, SyntaxError, or anything the module raises on import
        raise UsageError(
            f"{key}={shown!r}: cannot import {where[:120]!r} ({type(e).__name__}: "
            f"{str(e)[:200]}); {HOWTO}."
        ) from None
    fn = getattr(module, func, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        raise UsageError(
            f"{key}={shown!r}: {where[:120]} has no function {func[:80]!r} (it has: "
            f"{', '.join(sorted(names))[:200] or 'none'}); name one of its functions after the "
            "colon."
        )
    if not callable(fn):
        raise UsageError(
            f"{key}={shown!r}: {func[:80]} in {where[:120]} is a {type(fn).__name__}, not a "
            "function; name a function taking (prompt, completion, **row fields)."
        )
    return fn


def _load_file(path: Path, key: str, shown: str):
    if not path.is_file():
        raise UsageError(
            f"{key}={shown!r}: {path} is not a file (a relative path is read from the current "
            f"directory, {Path.cwd()}); give the path of the .py file that defines the function."
        )
    name = f"plinth_reward_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def check_fields(funcs: list[RewardFunc], rows) -> None:
    """Every row has the fields each function cannot do without (so a missing `answer` is
    refused before training, not at the step that samples the row)."""
    for f in funcs:
        for field_name in f.required:
            for r in rows:
                if field_name not in r.fields:
                    raise UsageError(
                        f"{r.where} has no field {field_name!r}, which reward function "
                        f"{f.spec} needs (the row's fields: "
                        f"{', '.join(sorted(r.fields))[:200] or 'none'}). Add it to every row "
                        f"(e.g. \"{field_name}\": \"...\") or use another reward function."
                    )


# ----------------------------------------------------------------------------- reward model


@dataclass
class RewardModel:
    """A run trained with align.method=reward: its scalar head on the last real token of
    prompt + completion (the same tokens the policy saw: same tokenizer and template)."""

    path: str
    model: object
    name: str = "reward_model"
    batch_rows: int = 16

    def score(self, sequences: list[list[int]]) -> list[float]:
        import torch

        from plinth.models.heads import head_outputs

        out: list[float] = []
        dev = next(self.model.parameters()).device
        with torch.no_grad():
            for s in range(0, len(sequences), self.batch_rows):
                chunk = sequences[s : s + self.batch_rows]
                width = max(len(x) for x in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long, device=dev)
                mask = torch.zeros_like(ids)
                for i, x in enumerate(chunk):
                    ids[i, : len(x)] = torch.tensor(x, device=dev)
                    mask[i, : len(x)] = 1
                batch = {"input_ids": ids, "attention_mask": mask}
                r = head_outputs(self.model, batch, "reward", "last").float().reshape(-1)
                out += r.tolist()
        return out


def check_rewards(cfg) -> None:
    """What `plinth config validate` checks of grpo/rloo rewards without training: there is a
    reward, every function imports, and align.reward_model is a reward model."""
    al = cfg.align
    if not al.reward_funcs and not al.reward_model:
        raise UsageError(
            f"align.method={al.method} has no reward: set align.reward_funcs (e.g. "
            "[exact_match]) and/or align.reward_model (a run trained with align.method=reward)"
        )
    resolve_reward_funcs(al.reward_funcs)
    if al.reward_model:
        reward_model_run(al.reward_model)


def reward_model_run(path: str, key: str = "align.reward_model") -> Path:
    """The run directory of the reward model at `path` (UsageError when it is not one)."""
    from plinth.config.load import load_config
    from plinth.load import find_run, read_json, resolve

    run = find_run(resolve(path, key))[0]
    cfg = load_config([run / "config.yaml"]).config
    if cfg.align.method != "reward":
        raise UsageError(
            f"{key}={str(path)[:200]} is not a reward model: it was trained with "
            f"{_how(cfg, run, read_json)}; train one with `plinth align CONFIG "
            "align.method=reward` (pairs of chosen/rejected answers) and give its run directory."
        )
    return run


def load_reward_model(path: str, tokenizer, device, key: str = "align.reward_model") -> RewardModel:
    """The reward model at `path` (UsageError when it is not one, or its tokenizer differs)."""
    from plinth.load import load_model, read_tokenizer

    run = reward_model_run(path, key)
    theirs = read_tokenizer(run)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise UsageError(
            f"{key}={str(path)[:200]} uses another tokenizer ({theirs.get_vocab_size()} tokens) "
            f"than the policy ({tokenizer.get_vocab_size()}); the reward model reads the "
            "policy's tokens, so train it from the same base as finetune.base."
        )
    m = load_model(run, device=str(device), chat=False)
    heads = getattr(m.model, "heads", None)
    if heads is None or "reward" not in heads:
        raise UsageError(
            f"{key}={str(path)[:200]} has no reward head (model.heads['reward']); it is not a "
            "reward model. Train one with `plinth align CONFIG align.method=reward`."
        )
    m.model.requires_grad_(False)
    return RewardModel(str(path), m.model.eval())


def _how(cfg, run: Path, read_json) -> str:
    if cfg.finetune.base is None:
        return "`plinth pretrain` (a model trained from scratch, no reward head)"
    f = run / "manifest.json"
    command = (read_json(f).get("command") or []) if f.is_file() else []
    if any(str(c) == "align" or str(c).endswith("recipes/align.py") for c in command):
        return f"align.method={cfg.align.method}"
    if cfg.align.method != "dpo":  # a non-default align method was configured
        return f"align.method={cfg.align.method}"
    return f"`plinth finetune` (finetune.method={cfg.finetune.method}, no reward head)"
