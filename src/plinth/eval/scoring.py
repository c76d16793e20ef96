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
Probes: counterfactual rows are log-likelihood requests like choices (one per group term);
toxicity generates like a generation task and flags continuations; a task's `perturb:` scores
it again on perturbed prompts (metric@perturbation, drop/perturbation/metric).
"""

from __future__ import annotations

import time
import warnings
from contextvars import ContextVar
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
    from plinth.load import eval_eos_id, load_model, no_chat_template

    m = load_model(spec, device=device, chat=chat)
    cfg = m.cfg
    if cfg.model.arch != "decoder":
        raise NotSupportedError(
            f"{spec} is an {cfg.model.arch} model; task and perplexity evaluation score a "
            "decoder's next-token predictions (a causal language model)"
        )
    if chat and m.chat_template is None:
        raise no_chat_template(spec)
    return EvalModel(
        chat=m.chat_template,
        model=m.model,
        tokenizer=m.tokenizer,
        max_len=min(max_len or cfg.model.max_seq_len, cfg.model.max_seq_len),
        eos_id=eval_eos_id(m.run_dir, m.tokenizer, cfg),
        name=spec,
        run_dir=m.run_dir if m.is_run else None,
        step=m.step if m.is_run else None,
        cfg=cfg,
    )


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


# Set by `plinth eval` while a task is scored: called as progress(done, total, what) after each
# batch of requests (what: "scored" or "generated"); None: no progress shown.
PROGRESS: ContextVar = ContextVar("plinth_eval_progress", default=None)


def _report(done: int, total: int, what: str) -> None:
    cb = PROGRESS.get()
    if cb is not None:
        cb(done, total, what)


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
    _report(0, len(order), "scoring")
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
        _report(start, len(order), "scored")
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
    extra: dict = field(default_factory=dict)  # probes: flagged generations, perturbed runs

    def to_json(self) -> dict:
        return {
            "task": self.task, "type": self.type, "metrics": self.metrics, "n": self.n,
            "shots": self.shots, "limit": self.limit, "truncated": self.truncated,
            "seconds": round(self.seconds, 3), "chat": self.chat, "examples": self.examples,
            **self.extra,
        }


# metrics where lower is better: reported under a perturbation, but no drop/ for them
NO_DROP = ("ece",)


def evaluate_task(
    lm: EvalModel,
    task: Task,
    shots: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> TaskResult:
    """Score the first `limit` rows of a task with `shots` examples (default: the task's k;
    probes take none). A task with `perturb:` is scored clean and once per perturbation."""
    from plinth.eval.tasks import PROBES

    k = 0 if task.type in PROBES else task.fewshot.k if shots is None else shots
    n = len(task.rows) if limit is None else min(limit, len(task.rows))
    t0 = time.perf_counter()
    if task.type == "counterfactual":
        res = _counterfactual(lm, task, n, batch_size)
    elif task.type == "toxicity":
        res = _toxicity(lm, task, n, batch_size)
    else:
        score = _multiple_choice if task.type == "multiple_choice" else _generation
        res = score(lm, task, k, n, batch_size)
        if task.perturb:
            _add_perturbed(res, task, lambda p: score(lm, task, k, n, batch_size, p))
    res.limit, res.seconds = limit, time.perf_counter() - t0
    res.chat = lm.chat is not None and task.type != "counterfactual"
    if res.truncated:
        warnings.warn(
            f"task {task.name}: {res.truncated} of {n} prompts were longer than the model's "
            f"context ({lm.max_len} tokens) and were cut from the left; use fewer --shots",
            stacklevel=2,
        )
    return res


def _add_perturbed(res: TaskResult, task: Task, score) -> None:
    """Score the task once per perturbation (score(name) -> TaskResult) and add
    `metric@name` and `drop/name/metric` (clean - perturbed) to the clean result."""
    clean, runs = dict(res.metrics), {}
    for name, setting in task.perturb.items():
        r = score(name)
        for m, v in r.metrics.items():
            res.metrics[f"{m}@{name}"] = v
        for m, v in r.metrics.items():
            if m not in NO_DROP:
                res.metrics[f"drop/{name}/{m}"] = clean[m] - v
        runs[name] = {"setting": setting, "metrics": r.metrics, "truncated": r.truncated,
                      "examples": r.examples}
    res.extra["perturbed"] = {"seed": task.perturb_seed, **runs}


def _multiple_choice(
    lm, task: Task, k: int, n: int, batch_size: int, perturb: str | None = None
) -> TaskResult:
    requests, spans = [], []
    for i in range(n):
        # in chat form the answer opens the assistant turn: no delimiter
        ctx = lm.wrap(task.context(i, k, perturb)) + ("" if lm.chat else task.target_delimiter)
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
        if perturb is not None:
            examples[-1]["prompt"] = task.context(i, 0, perturb)
    metrics = {
        "acc": _mean(acc),
        "acc_norm": _mean(acc_norm),
        "ece": M.ece(conf, correct),
    }
    return TaskResult(task.name, task.type, metrics, n, k, None, truncated, examples=examples)


def _prompt_ids(lm, task: Task, k: int, n: int, perturb: str | None = None):
    """(token ids of each row's prompt, cut from the left to leave room for max_new_tokens;
    how many were cut)."""
    gen = task.generation
    room = lm.max_len - gen.max_new_tokens
    if room < 1:
        raise UsageError(
            f"task {task.name}: generation.max_new_tokens={gen.max_new_tokens} leaves no room "
            f"for a prompt in the model's {lm.max_len}-token context"
        )
    prompts, truncated = [], 0
    for i in range(n):
        ids = lm.encode(lm.wrap(task.context(i, k, perturb)))
        if not ids and lm.eos_id is not None:
            ids = [lm.eos_id]
        if len(ids) > room:
            ids, truncated = ids[-room:], truncated + 1
        prompts.append(ids)
    return prompts, truncated


def _greedy_texts(lm, task: Task, prompts: list[list[int]], batch_size: int) -> list[str]:
    """Greedy continuations, batched longest first, cut at the task's stop strings."""
    from plinth.infer.sampling import generate

    gen = task.generation
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: list[str] = [""] * len(prompts)
    _report(0, len(prompts), "generating")
    for s in range(0, len(prompts), batch_size):
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
        _report(min(s + batch_size, len(prompts)), len(prompts), "generated")
    return texts


def _generation(
    lm, task: Task, k: int, n: int, batch_size: int, perturb: str | None = None
) -> TaskResult:
    prompts, truncated = _prompt_ids(lm, task, k, n, perturb)
    texts = _greedy_texts(lm, task, prompts, batch_size)
    scores: dict[str, list[float]] = {}
    examples = []
    for i in range(n):
        row = task.rows[i]
        got = score_generation(task, texts[i], row)
        for name, v in got.items():
            scores.setdefault(name, []).append(v)
        examples.append({"index": i, "prediction": texts[i], "target": task.targets(row), **got})
        if perturb is not None:
            examples[-1]["prompt"] = task.context(i, 0, perturb)
    metrics = {name: _mean(v) for name, v in scores.items()}
    return TaskResult(task.name, task.type, metrics, n, k, None, truncated, examples=examples)


# ---- probes -------------------------------------------------------------------------------


def _counterfactual(lm, task: Task, n: int, batch_size: int) -> TaskResult:
    """Each row's slot filled by each term of each group, scored as log p(continuation |
    context) (Task.fill splits them); a term's score is that sum, or its mean per token with
    score: per_token; a group's score on a row is the mean over its terms."""
    from plinth.eval.probes import group_gaps

    groups = list(task.groups or {})
    requests, keys = [], []  # keys[j] = (row, group, term) of request j
    for i in range(n):
        row = task.rows[i]
        for g, terms in task.row_groups(row).items():
            for t in terms:
                ctx, cont = task.fill(row, t)
                pair = encode_pair(lm, ctx, cont)
                if not pair[1]:
                    raise UsageError(
                        f"{task.data_path}: row {i + 1} of task {task.name}: the text scored for "
                        f"group {g!r} term {t!r} ({cont!r}) has no tokens; put words in the "
                        "continuation (or after the slot)"
                    )
                requests.append(pair)
                keys.append((i, g, t))
    scored, truncated = loglikelihoods(lm, requests, batch_size=batch_size)
    terms: list[dict[str, dict[str, dict]]] = [{g: {} for g in groups} for _ in range(n)]
    for (i, g, t), (ll, _), (_, cont) in zip(keys, scored, requests, strict=True):
        s = ll / len(cont) if task.score == "per_token" else ll
        terms[i][g][t] = {"loglikelihood": ll, "tokens": len(cont), "score": s}
    scores, examples = [], []
    for i in range(n):
        row_scores = {g: _mean([v["score"] for v in terms[i][g].values()]) for g in groups}
        scores.append(row_scores)
        examples.append({
            "index": i, "scores": row_scores, "terms": terms[i],
            "preferred": max(groups, key=lambda g: row_scores[g]),
        })
    metrics = group_gaps(scores, groups)
    return TaskResult(task.name, task.type, metrics, n, 0, None, truncated, examples=examples)


def _toxicity(lm, task: Task, n: int, batch_size: int) -> TaskResult:
    """Continuations of each prompt (greedy, or `samples` draws at `temperature` with a
    generator seeded by (seed, row)), each flagged toxic when the lexicon matches a term or
    the classifier's probability reaches the threshold."""
    from plinth.eval.probes import classifier_score, lexicon_matches, toxicity_rates
    from plinth.infer.sampling import generate

    tox, gen = task.toxicity, task.generation
    prompts, truncated = _prompt_ids(lm, task, 0, n)
    if tox.temperature == 0:
        texts = [[t] for t in _greedy_texts(lm, task, prompts, batch_size)]
    else:
        texts = []
        for i, ids in enumerate(prompts):  # one batch per prompt: draws independent of --limit
            g = torch.Generator().manual_seed(tox.seed * 1_000_003 + i)
            outs = generate(lm.model, [ids] * tox.samples, max_new_tokens=gen.max_new_tokens,
                            temperature=tox.temperature, eos_id=lm.eos_id, generator=g)
            texts.append([cut_at_stop(lm.decode(o), gen.stop) for o in outs])
            _report(i + 1, len(prompts), "generated")
    flags, probs, examples, flagged = [], [], [], []
    for i in range(n):
        prompt, row_flags, gens = task.render(task.rows[i]), [], []
        for text in texts[i]:
            matches = lexicon_matches(text, tox.pattern) if tox.pattern is not None else []
            p = classifier_score(tox.fn, text, tox.classifier) if tox.fn is not None else None
            toxic = bool(matches) or (p is not None and p >= tox.threshold)
            row_flags.append(toxic)
            item = {"text": text, "toxic": toxic, "matches": matches}
            if p is not None:
                item["score"] = p
                probs.append(p)
            gens.append(item)
            if toxic:
                flagged.append({"index": i, "prompt": prompt, **item})
        flags.append(row_flags)
        examples.append({"index": i, "prompt": prompt, "generations": gens})
    metrics = toxicity_rates(flags)
    if tox.samples == 1:
        del metrics["toxic_prompt_rate"]  # the same number as toxicity_rate
    if probs:
        metrics["mean_toxicity"] = _mean(probs)
    return TaskResult(task.name, task.type, metrics, n, 0, None, truncated, examples=examples,
                      extra={"flagged": flagged})


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
        from plinth.eval.sandbox import score_code_completion

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
