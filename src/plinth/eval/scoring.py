"""Scoring tasks with a model: log-likelihood of choices, greedy generation, the metrics.

    python -c "from plinth.eval.scoring import load_eval_model, evaluate_task; \
from plinth.eval.tasks import load_tasks; lm = load_eval_model('ref-smollm2'); \
print(evaluate_task(lm, load_tasks(['capitals'])[0], limit=5).metrics)"

Multiple choice: each choice is scored by the sum of log-probabilities of its tokens given the
context (prompt + delimiter), all requests of a task batched together (longest first, rows
right-padded: causal attention never looks at the padding after a row). The pair is tokenized
like lm-eval: context and context+continuation are encoded and the continuation is the tail,
with the context's trailing spaces moved onto the continuation. Requests longer than the
model's context are cut from the left (a warning; the count is reported as `truncated`).
Generation: greedy decoding with the KV cache (plinth.infer.sampling.generate), cut at the first
stop string, then exact match / token F1 / regex-extracted answer.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plinth.errors import NotSupportedError, UsageError
from plinth.eval import metrics as M
from plinth.eval.tasks import Task


@dataclass
class EvalModel:
    """A decoder ready to score: model, tokenizer, the context it can read, end-of-text id."""

    model: torch.nn.Module
    tokenizer: Any
    max_len: int
    eos_id: int | None
    name: str = ""
    run_dir: Path | None = None  # set when the model is a training run (events go there)
    step: int | None = None  # the checkpoint's training step, when known
    cfg: Any = None
    chat: Any = None  # a plinth.data.sft.ChatTemplate: prompts become one user turn

    def wrap(self, prompt: str) -> str:
        """The prompt as the model reads it: as is, or as a user turn + assistant prompt."""
        if self.chat is None:
            return prompt
        return self.chat.render([{"role": "user", "content": prompt}], add_generation_prompt=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def load_eval_model(
    spec: str, device: str = "cpu", max_len: int | None = None, chat: bool = False
) -> EvalModel:
    """A run / checkpoint / `plinth import` directory, Hugging Face directory, .gguf file or
    reference model name (ref-smollm2; imported once into $PLINTH_HOME/models). With `chat`,
    prompts are wrapped in the model's chat template (its own, or its fine-tuning base's)."""
    import json

    from plinth.finetune.base import resolve_base
    from plinth.hf.convert import REFERENCES
    from plinth.recipes.generate import find_run, load_trained

    p = Path(spec).expanduser()
    if spec not in REFERENCES and not p.exists():
        raise UsageError(
            f"model {spec!r}: no such file or directory. Give a plinth run or checkpoint "
            "directory, a `plinth import` output, a Hugging Face model directory, a .gguf file, "
            f"or a reference model: {', '.join(REFERENCES)}."
        )
    path = resolve_base(spec) if (spec in REFERENCES or p.suffix == ".gguf" or (
        (p / "config.json").is_file() and not (p / "config.yaml").is_file())) else p
    run, explicit = find_run(path)
    net, tok, cfg = load_trained(path, device=device)
    if cfg.model.arch != "decoder":
        raise NotSupportedError(
            f"{spec} is an {cfg.model.arch} model; task and perplexity evaluation score a "
            "decoder's next-token predictions (a causal language model)"
        )
    eos_text = cfg.data.tokenizer.special_tokens[0] if cfg.data.tokenizer.special_tokens else None
    rec = run / "import.json"
    if rec.is_file():
        eos_text = json.loads(rec.read_text()).get("special_tokens", {}).get("eos", eos_text)
    eos = tok.token_to_id(eos_text) if eos_text else None
    is_run = explicit != run
    step = None
    ck = explicit if explicit is not None and explicit != run else _latest(run)
    if is_run and ck is not None and ck.name.startswith("step_"):
        step = int(ck.name.removeprefix("step_"))
    from plinth.finetune.base import chat_template_for

    return EvalModel(
        chat=chat_template_for(spec, run, cfg) if chat else None,
        model=net,
        tokenizer=tok,
        max_len=min(max_len or cfg.model.max_seq_len, cfg.model.max_seq_len),
        eos_id=eos,
        name=spec,
        run_dir=run if is_run else None,
        step=step,
        cfg=cfg,
    )


def _latest(run: Path) -> Path | None:
    cks = sorted((run / "checkpoints").glob("step_*"))
    return cks[-1] if cks else None


# ---- log-likelihood -----------------------------------------------------------------------


def encode_pair(lm: EvalModel, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval splits them: trailing spaces of the context
    move to the continuation, and the continuation is the tail of encode(context + it)."""
    n_spaces = len(context) - len(context.rstrip(" "))
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = lm.encode(context + continuation)
    ctx = lm.encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(
    lm: EvalModel,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 8,
    batch_tokens: int = 8192,
) -> tuple[list[tuple[float, bool]], int]:
    """(sum of log p(continuation | context), continuation is the greedy choice) per
    (context ids, continuation ids) request, and how many requests were cut from the left to
    fit the model's context. An empty context starts from the end-of-text token."""
    prepared, truncated = [], 0
    for ctx, cont in requests:
        if not cont:
            raise ValueError("a continuation needs at least one token")
        if not ctx:
            if lm.eos_id is None:
                raise UsageError("an empty context needs an end-of-text token to start from")
            ctx = [lm.eos_id]
        inp = (ctx + cont)[:-1]
        if len(inp) > lm.max_len:
            inp, truncated = inp[-lm.max_len :], truncated + 1
        prepared.append((inp, cont[-len(inp) :] if len(cont) > len(inp) else cont))
    order = sorted(range(len(prepared)), key=lambda i: -len(prepared[i][0]))
    out: list[tuple[float, bool] | None] = [None] * len(prepared)
    device = next(lm.model.parameters()).device
    start = 0
    while start < len(order):
        width = len(prepared[order[start]][0])
        rows = max(1, min(batch_size, batch_tokens // max(width, 1)))
        chunk = order[start : start + rows]
        start += rows
        x = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T) right-padded
        for r, i in enumerate(chunk):
            inp = prepared[i][0]
            x[r, : len(inp)] = torch.tensor(inp)
        logits = lm.model(x.to(device))  # (B, T, V)
        for r, i in enumerate(chunk):
            inp, cont = prepared[i]
            n = len(inp)
            lp = logits[r, n - len(cont) : n].float().log_softmax(-1)  # (C, V)
            tgt = torch.tensor(cont, device=lp.device)
            ll = lp.gather(-1, tgt[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == tgt).all())
            out[i] = (ll, greedy)
    return out, truncated  # type: ignore[return-value]


# ---- tasks --------------------------------------------------------------------------------


@dataclass
class TaskResult:
    task: str
    type: str
    metrics: dict[str, float]
    n: int
    shots: int
    limit: int | None
    truncated: int = 0
    seconds: float = 0.0
    examples: list[dict] = field(default_factory=list)
    chat: bool = False  # prompts were wrapped in the model's chat template

    def to_json(self) -> dict:
        return {
            "task": self.task, "type": self.type, "metrics": self.metrics, "n": self.n,
            "shots": self.shots, "limit": self.limit, "truncated": self.truncated,
            "seconds": round(self.seconds, 3), "chat": self.chat, "examples": self.examples,
        }


def evaluate_task(
    lm: EvalModel,
    task: Task,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """Score the first `limit` rows of a task with `shots` examples (default: the task's k)."""
    k = task.fewshot.k if shots is None else shots
    n = len(task.rows) if limit is None else min(limit, len(task.rows))
    t0 = time.perf_counter()
    if task.type == "multiple_choice":
        res = _multiple_choice(lm, task, k, n, batch_size)
    else:
        res = _generation(lm, task, k, n, batch_size)
    res.limit, res.seconds = limit, time.perf_counter() - t0
    res.chat = lm.chat is not None
    if res.truncated:
        warnings.warn(
            f"task {task.name}: {res.truncated} of {n} prompts were longer than the model's "
            f"context ({lm.max_len} tokens) and were cut from the left; use fewer --shots",
            stacklevel=2,
        )
    return res


def _multiple_choice(lm, task: Task, k: int, n: int, batch_size: int) -> TaskResult:
    requests, spans = [], []
    for i in range(n):
        # in chat form the answer opens the assistant turn: no delimiter
        ctx = lm.wrap(task.context(i, k)) + ("" if lm.chat else task.target_delimiter)
        choices = task.choices(task.rows[i])
        spans.append((len(requests), len(choices)))
        requests += [encode_pair(lm, ctx, c) for c in choices]
    scored, truncated = loglikelihoods(lm, requests, batch_size=batch_size)
    acc, acc_norm, conf, correct, examples = [], [], [], [], []
    for i, (a, m) in enumerate(spans):
        row = task.rows[i]
        lls = [s[0] for s in scored[a : a + m]]
        gold = task.gold(row)
        nbytes = [len(c.encode("utf-8")) for c in task.choices(row)]
        acc.append(M.accuracy(lls, gold))
        acc_norm.append(M.accuracy_norm(lls, nbytes, gold))
        probs = M.choice_probs(lls)
        conf.append(max(probs))
        correct.append(bool(acc[-1]))
        examples.append({"index": i, "gold": gold, "loglikelihoods": lls, "acc": acc[-1]})
    metrics = {
        "acc": _mean(acc),
        "acc_norm": _mean(acc_norm),
        "ece": M.ece(conf, correct),
    }
    return TaskResult(task.name, task.type, metrics, n, k, None, truncated, examples=examples)


def _generation(lm, task: Task, k: int, n: int, batch_size: int) -> TaskResult:
    from plinth.infer.sampling import generate

    gen = task.generation
    room = lm.max_len - gen.max_new_tokens
    if room < 1:
        raise UsageError(
            f"task {task.name}: generation.max_new_tokens={gen.max_new_tokens} leaves no room "
            f"for a prompt in the model's {lm.max_len}-token context"
        )
    prompts, truncated = [], 0
    for i in range(n):
        ids = lm.encode(lm.wrap(task.context(i, k)))
        if not ids and lm.eos_id is not None:
            ids = [lm.eos_id]
        if len(ids) > room:
            ids, truncated = ids[-room:], truncated + 1
        prompts.append(ids)
    order = sorted(range(n), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * n
    for s in range(0, n, batch_size):
        chunk = order[s : s + batch_size]
        outs = generate(
            lm.model,
            [prompts[i] for i in chunk],
            max_new_tokens=gen.max_new_tokens,
            temperature=0.0,
            eos_id=lm.eos_id,
        )
        for i, o in zip(chunk, outs, strict=True):
            texts[i] = cut_at_stop(lm.decode(o), gen.stop)
    scores: dict[str, list[float]] = {}
    examples = []
    for i in range(n):
        row = task.rows[i]
        got = score_generation(task, texts[i], row)
        for name, v in got.items():
            scores.setdefault(name, []).append(v)
        examples.append({"index": i, "prediction": texts[i], "target": task.targets(row), **got})
    metrics = {name: _mean(v) for name, v in scores.items()}
    return TaskResult(task.name, task.type, metrics, n, k, None, truncated, examples=examples)


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The text before the earliest stop string (all of it when none occurs)."""
    cut = len(text)
    for s in stop:
        if s:
            j = text.find(s)
            if j != -1:
                cut = min(cut, j)
    return text[:cut]


def score_generation(task: Task, prediction: str, row: dict) -> dict[str, float]:
    """The task's metric(s) for one generated answer."""
    gen, targets = task.generation, task.targets(row)
    if gen.metric == "exact_match":
        return {"exact_match": M.exact_match(prediction, targets, gen.normalize)}
    if gen.metric == "f1":
        return {
            "f1": M.f1(prediction, targets),
            "exact_match": M.exact_match(prediction, targets, "squad"),
        }
    if gen.metric == "regex":
        found = M.regex_extract(prediction, gen.pattern) is not None
        return {
            "regex": M.regex_match(prediction, targets, gen.pattern, gen.normalize),
            "format": float(found),
        }
    if gen.metric == "code_exec":  # the row's `tests` run against prompt + completion
        try:
            from plinth.eval.sandbox import score_code_completion
        except ImportError:
            raise NotSupportedError(
                f"task {task.name} uses generation.metric=code_exec, which needs the code "
                "sandbox (plinth.eval.sandbox); it is not available in this plinth"
            ) from None
        res = score_code_completion(
            task.render(row), prediction, str(row["tests"]), entry_point=row.get("entry_point")
        )
        return {"code_exec": float(res.passed)}
    raise UsageError(f"task {task.name}: unknown generation metric {gen.metric!r}")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def task_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[Task],
    eos_id: int | None,
    max_len: int,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Flat `{task}/{metric}` values for a model in memory: what periodic evaluation during
    training logs next to validation loss (load the tasks once with `load_tasks`). The model's
    train/eval mode is restored afterwards."""
    lm = EvalModel(model=model, tokenizer=tokenizer, max_len=max_len, eos_id=eos_id)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = [evaluate_task(lm, t, shots, limit, batch_size) for t in tasks]
    finally:
        model.train(was_training)
    return {f"{r.task}/{k}": v for r in results for k, v in r.metrics.items()}
