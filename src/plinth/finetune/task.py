"""The fine-tuning task the one training loop runs (see plinth.train.task).

`build_task(cfg, base_dir)` reads and tokenizes the data of every task (`finetune.tasks`, or
the single task the top-level `finetune.*` fields describe, named `main`), holds out validation
examples, and returns a `FinetuneTask`: its model is the base with the method applied
(plinth.peft) and one head per classification/regression task; its loss is the language-model
loss on answer tokens (task lm) or the head's cross-entropy / MSE, times the task's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plinth.config.schema import Config, TaskSpec
from plinth.config.tasks import MAIN, head_sizes, task_specs
from plinth.distributed.device import autocast_context
from plinth.distributed.env import DistEnv, all_reduce_sum
from plinth.errors import UsageError
from plinth.finetune.data import (
    MixLoader,
    RowLoader,
    Rows,
    held_out,
    labelled_rows,
    sft_rows,
)
from plinth.load import (
    build_finetune_model,
    chat_template_origin,
    chat_template_source,
    find_run,
    read_tokenizer,
    token_roles,
    token_text,
)
from plinth.models import unwrap
from plinth.models.heads import head_loss, head_outputs, resolve_pooling
from plinth.models.layers import matmul_params
from plinth.train.objectives import LossOutput, _mean
from plinth.train.task import Task

N_SAMPLES = 3  # validation prompts answered at each sampling step


@dataclass
class TaskData:
    spec: TaskSpec
    train: Rows
    val: Rows
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (prompt, reference answer)
    texts: list[str] = field(default_factory=list)  # first validation texts (head tasks)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.task


@dataclass
class TextSetup:
    """How a fine-tune turns records into tokens: the base's tokenizer, its special-token roles,
    the chat template (None: the plain layout), the end-of-sequence text and the padding id."""

    tokenizer: object
    roles: dict[str, int]
    template: object | None
    eos_text: str
    pad_id: int


def read_text_setup(cfg: Config, base_dir: Path) -> TextSetup:
    """The tokenizer side of `base_dir` (a checkpoint's text files are its run's)."""
    from plinth.data.sft import ChatTemplate

    ft = cfg.finetune
    base_dir = find_run(base_dir)[0]
    tokenizer = read_tokenizer(base_dir)
    tokenizer.no_padding()  # some tokenizer.json files pad/truncate every text to a fixed size
    tokenizer.no_truncation()  # (sentence-transformers'): lengths here are finetune.max_length
    roles = token_roles(base_dir, tokenizer)
    if "eos" not in roles:
        raise UsageError(
            f"{base_dir}: cannot tell the tokenizer's end-of-sequence token (no eos in "
            "import.json, no <|endoftext|>); re-import the model with `plinth import`."
        )
    pad_id = roles.get("pad", roles["eos"])
    eos_text = tokenizer.id_to_token(roles["eos"])
    source = chat_template_source(ft.chat_template, base_dir)
    template = None
    if source is not None:
        template = ChatTemplate(
            source,
            bos_token=token_text(base_dir, "bos_token"),
            eos_token=token_text(base_dir, "eos_token") or eos_text,
            origin=f"finetune.chat_template ({chat_template_origin(ft.chat_template, base_dir)})",
        )
    return TextSetup(tokenizer, roles, template, eos_text, pad_id)


def epoch_steps(cfg: Config, rows: int, rows_per_step: int) -> tuple[int, str]:
    """Optimizer steps of a fine-tune over `rows` training rows, and which setting decides them
    (finetune.epochs, or finetune.max_steps when it comes first)."""
    ft = cfg.finetune
    steps = max(1, math.ceil(ft.epochs * rows / rows_per_step))
    epochs = (f"finetune.epochs={ft.epochs:g} ({steps} steps of {rows_per_step} rows over "
              f"{rows} training rows)")
    if ft.max_steps is not None and ft.max_steps < steps:
        return max(1, ft.max_steps), f"finetune.max_steps={ft.max_steps} (before {epochs})"
    unreached = f"; finetune.max_steps={ft.max_steps} is not reached" if ft.max_steps else ""
    return steps, epochs + unreached


def peft_checkpoint_base(
    cfg: Config, base_dir: Path | None, model: nn.Module | None
) -> dict | None:
    """Parameter-efficient methods: checkpoints hold the trainable weights only and refer
    to the base (rebuilt from it on load, fingerprint-checked). Full fine-tunes: None."""
    if cfg.finetune.method == "full" or base_dir is None or model is None:
        return None
    return {
        "name": str(cfg.finetune.base),
        "dir": str(Path(base_dir).resolve()),
        "fingerprint": getattr(model, "peft_base_fingerprint", None),
        "method": cfg.finetune.method,
    }


def adapted_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward 2N, backward 2N for activation gradients + 2 per trainable matmul weight
    (a frozen base computes no weight gradients), plus the attention term."""
    base = unwrap(model)
    n = matmul_params(base)
    trainable = sum(p.numel() for p in base.parameters() if p.requires_grad and p.ndim == 2)
    d_attn = base.cfg.n_heads * base.cfg.head_dim
    return 4.0 * n + 2.0 * min(trainable, n) + 12.0 * base.cfg.n_layers * d_attn * seq_len


def build_task(cfg: Config, base_dir: Path) -> FinetuneTask:
    """Read every task's data (see the module doc)."""
    from plinth.data.sft import (
        SFTOptions,
        detect_format,
        load_sft,
        plain_pieces,
        read_jsonl,
        to_messages,
    )

    ft = cfg.finetune
    weights_dir = base_dir
    text = read_text_setup(cfg, base_dir)
    tokenizer, roles, template, eos_text, pad_id = (
        text.tokenizer, text.roles, text.template, text.eos_text, text.pad_id)
    tasks = []
    for spec in task_specs(cfg):
        key = "finetune" if spec.name == MAIN else f"finetune.tasks[{spec.name}]"
        if spec.task == "lm":
            if cfg.model.arch != "decoder":
                raise UsageError(
                    f"{key}.task=lm needs a decoder base; {base_dir} is an {cfg.model.arch}. "
                    "Use task=classification or regression with a head."
                )
            records = read_jsonl(spec.dataset)
            fmt = detect_format(records[0], spec.dataset) if ft.format == "auto" else ft.format
            if spec.val_dataset:
                val_records = read_jsonl(spec.val_dataset)
            else:
                keep, held = held_out(len(records), ft.val_fraction, cfg.seed)
                val_records = [records[i] for i in held]
                records = [records[i] for i in keep]
                if not records:
                    raise UsageError(
                        f"{spec.dataset}: holding out finetune.val_fraction={ft.val_fraction:g} "
                        f"of its {len(held)} examples leaves none to train on. Add examples, "
                        "lower finetune.val_fraction or give a separate val_dataset."
                    )
            opts = SFTOptions(fmt, ft.max_length, ft.overlong, ft.system_prompt)

            def rows(recs, path, opts=opts):
                data = load_sft(path, tokenizer, opts, template, eos_text, records=recs)
                return sft_rows(data, ft.max_length, ft.packing, pad_id)

            train = rows(records, spec.dataset)
            val = rows(val_records, spec.val_dataset or spec.dataset) if val_records else None
            prompts = []
            for n, rec in enumerate(val_records[:N_SAMPLES], start=1):
                where = f"{spec.val_dataset or spec.dataset} validation example {n}"
                if template is not None:
                    pieces = template.pieces(to_messages(rec, fmt, where, ft.system_prompt))
                else:
                    pieces = plain_pieces(rec, fmt, where, "")
                prompts.append((pieces[0][0], pieces[1][0]))
            tasks.append(TaskData(spec, train, val, prompts))
        else:
            sizes = head_sizes(cfg)
            kw = dict(
                task=spec.task,
                labels=spec.labels,
                num_labels=sizes[spec.name],
                text_field=spec.text_field,
                label_field=spec.label_field,
                max_length=ft.max_length,
                overlong=ft.overlong,
                pad_id=pad_id,
                key=key,
            )
            train = labelled_rows(spec.dataset, tokenizer, **kw)
            if spec.val_dataset:
                val = labelled_rows(spec.val_dataset, tokenizer, **kw)
            else:
                train, val = train.split(ft.val_fraction, cfg.seed)
            texts = [
                r[spec.text_field]
                for r in read_jsonl(spec.val_dataset)[:N_SAMPLES]
            ] if spec.val_dataset else []
            tasks.append(TaskData(spec, train, val if len(val) else None, [], texts))
    return FinetuneTask(cfg, weights_dir, tokenizer, tasks, roles)


class FinetuneTask(Task):
    name = "finetune"
    baseline = True  # step 0 shows the base model's scores and answers, to compare with later

    def __init__(self, cfg: Config, base_dir: Path | None, tokenizer, tasks, roles):
        self.cfg, self.base_dir, self.tokenizer = cfg, base_dir, tokenizer
        self.tasks: dict[str, TaskData] = {t.name: t for t in tasks}
        self.roles = roles
        self.seq_len = cfg.finetune.max_length
        self.pooling = resolve_pooling(cfg.finetune.pooling, cfg.model.arch)
        self.summary = None
        self.model: nn.Module | None = None  # set by build_model (the adapter is saved from it)
        self.verbose = False  # print what the method trains when the model is built
        self.limit = ""  # which setting decides the number of steps (set by total_steps)

    # ------------------------------------------------------------------------- model, data
    def build_model(self, device: torch.device) -> nn.Module:
        model = build_finetune_model(self.cfg, self.base_dir, device)
        self.summary, self.model = model.peft_summary, model
        if self.verbose:
            print(self.summary)
        return model

    def loader(self, env: DistEnv):
        micro = self.cfg.optim.micro_batch
        loaders = {
            name: RowLoader(
                t.train, micro, self.cfg.seed + i, env.rank, env.world_size, task=name
            )
            for i, (name, t) in enumerate(self.tasks.items())
        }
        for name, ld in loaders.items():
            if len(ld) == 0:
                raise UsageError(
                    f"task {name}: {len(self.tasks[name].train)} training rows, fewer than one "
                    f"micro-batch across all processes ({micro} x {env.world_size}). Add "
                    "examples or lower optim.micro_batch."
                )
        if len(loaders) == 1:
            return next(iter(loaders.values()))
        return MixLoader(loaders, self.cfg.seed)

    def text_io(self):
        return self.tokenizer, self.roles["eos"]

    def data_record(self) -> dict:
        """What the manifest records about the data: rows and counts per task."""
        return {"tasks": {
            name: {
                "train_rows": len(t.train),
                "val_rows": len(t.val) if t.val is not None else 0,
                **{f"train_{k}": v for k, v in t.train.counts.items()},
            }
            for name, t in self.tasks.items()
        }}

    def data_lines(self) -> list[str]:
        """One line per task for the start of the run: rows, and what was truncated/dropped."""
        lines = []
        for name, t in self.tasks.items():
            c = t.train.counts
            extra = ", ".join(f"{v} {k}" for k, v in c.items() if k in ("truncated", "dropped")
                              and v)
            lines.append(
                f"task {name} ({t.kind}): {len(t.train)} training rows from "
                f"{c.get('kept', len(t.train))} examples"
                + (f" ({extra}, finetune.overlong={self.cfg.finetune.overlong})" if extra else "")
            )
        return lines

    def train_rows(self) -> int:
        return sum(len(t.train) for t in self.tasks.values())

    def total_steps(self, tokens_per_step: int, batches_per_step: int) -> int:
        rows_per_step = self.cfg.optim.micro_batch * batches_per_step
        steps, self.limit = epoch_steps(self.cfg, self.train_rows(), rows_per_step)
        return steps

    def checkpoint_base(self) -> dict | None:
        return peft_checkpoint_base(self.cfg, self.base_dir, self.model)

    # ---------------------------------------------------------------------------- the loss
    def _forward(self, net: nn.Module, batch) -> tuple[LossOutput, torch.Tensor | None]:
        t = self.tasks[batch.task]
        if t.kind == "lm":
            seg = batch["segment_ids"]
            # one example per row, padded at the end: plain causal attention is the same
            packed = bool((seg.amax() > 1).item())
            loss_sum, ce_sum = net(
                batch["input_ids"], labels=batch["labels"], segment_ids=seg if packed else None
            )
            return _mean(loss_sum, ce_sum, batch["labels"]), None
        out = head_outputs(net, batch, t.name, self.pooling)
        loss = head_loss(out, batch["label"], t.kind)
        return LossOutput(loss, int(batch["label"].shape[0]), loss.detach()), out

    def loss(self, net: nn.Module, batch, generator: torch.Generator) -> LossOutput:
        out, _ = self._forward(net, batch)
        w = self.tasks[batch.task].spec.weight
        return out if w == 1.0 else LossOutput(out.loss * w, out.n_tokens, out.ce)

    def batch_tokens(self, batch) -> int:
        if "segment_ids" in batch:
            return int((batch["segment_ids"] > 0).sum())
        return int(batch["attention_mask"].sum())

    def flops_per_token(self, model: nn.Module) -> float:
        return adapted_flops_per_token(model, self.seq_len)

    # -------------------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, env: DistEnv, device: torch.device) -> dict:
        was_training = model.training
        model.eval()
        metrics: dict = {}
        total_loss, total_weight = 0.0, 0.0
        micro = self.cfg.optim.micro_batch
        for name, t in self.tasks.items():
            if t.val is None:
                continue
            loader = RowLoader(
                t.val, micro, self.cfg.seed, env.rank, env.world_size, False, False, name
            )
            sums = np.zeros(3)  # loss x count, count, correct (classification)
            preds, golds = [], []
            batches = list(loader)  # validation sets are small
            self._even_out(model, t, len(batches), env, device)
            for batch in batches:
                batch = batch.to(device)
                with autocast_context(self.cfg, device):
                    out, logits = self._forward(model, batch)
                sums[0] += out.ce.item() * out.n_tokens
                sums[1] += out.n_tokens
                if t.kind == "classification":
                    pred = logits.argmax(-1)
                    sums[2] += (pred == batch["label"]).sum().item()
                    preds += pred.tolist()
                    golds += batch["label"].tolist()
                elif t.kind == "regression":
                    sums[2] += (logits.squeeze(-1).float() - batch["label"]).abs().sum().item()
            sums = [float(x) for x in all_reduce_sum([float(x) for x in sums], env, device)]
            if sums[1] == 0:
                continue
            loss = sums[0] / sums[1]
            prefix = "val/" if len(self.tasks) == 1 else f"val/{name}/"
            metrics[f"{prefix}loss"] = loss
            if t.kind == "lm":
                metrics[f"{prefix}ppl"] = math.exp(min(loss, 50.0))
                metrics[f"{prefix}tokens"] = int(sums[1])
            elif t.kind == "classification":
                metrics[f"{prefix}accuracy"] = sums[2] / sums[1]
                if env.world_size == 1:  # F1 needs every prediction; one process has them
                    metrics[f"{prefix}f1"] = macro_f1(preds, golds, unwrap(model).heads[name])
            else:
                metrics[f"{prefix}mae"] = sums[2] / sums[1]
            total_loss += t.spec.weight * loss
            total_weight += t.spec.weight
        model.train(was_training)
        if len(self.tasks) > 1 and total_weight:
            metrics["val/loss"] = total_loss / total_weight
        return metrics

    def _even_out(self, model: nn.Module, t: TaskData, batches: int, env: DistEnv,
                  device: torch.device) -> None:
        """Extra, discarded forwards so every rank runs as many as the busiest one: validation
        rows rarely split evenly, and a sharded (FSDP) forward is a collective that would
        otherwise wait forever for a rank that has finished."""
        if not env.distributed:
            return
        counts = [0.0] * env.world_size
        counts[env.rank] = float(batches)
        missing = int(max(all_reduce_sum(counts, env, device))) - batches
        if missing <= 0:
            return
        loader = RowLoader(t.val, self.cfg.optim.micro_batch, self.cfg.seed, 0, 1, False, False,
                           t.name)
        batch = next(iter(loader)).to(device)
        for _ in range(missing):
            with autocast_context(self.cfg, device):
                self._forward(model, batch)

    def samples(self, model: nn.Module, step: int, device: torch.device) -> list[tuple[str, str]]:
        """Greedy answers to the first validation prompts (lm tasks) and the predicted class of
        the first validation texts (classification), so the run shows what changed."""
        from plinth.infer.sampling import generate

        out = []
        was_training = model.training
        model.eval()
        for name, t in self.tasks.items():
            if t.kind == "lm" and t.prompts:
                ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p, _ in t.prompts]
                gens = generate(
                    model,
                    ids,
                    max_new_tokens=min(self.cfg.inference.max_new_tokens, 48),
                    temperature=0.0,
                    eos_id=self.roles["eos"],
                )
                for (p, _), g in zip(t.prompts, gens, strict=True):
                    out.append((p, self.tokenizer.decode(g)))
            elif t.kind == "classification" and t.texts:
                with torch.no_grad():
                    enc = [self.tokenizer.encode(x).ids[: self.seq_len] for x in t.texts]
                    for text, ids in zip(t.texts, enc, strict=True):
                        batch = {
                            "input_ids": torch.tensor([ids], device=device),
                            "attention_mask": torch.ones(1, len(ids), dtype=torch.long,
                                                         device=device),
                        }
                        pred = int(head_outputs(model, batch, name, self.pooling).argmax(-1))
                        labels = t.spec.labels
                        out.append((f"[{name}] {text}", labels[pred] if labels else str(pred)))
        model.train(was_training)
        return out


def macro_f1(preds: list[int], golds: list[int], head: nn.Module) -> float:
    """Mean over classes of F1 (classes absent from both count as 1: nothing to get wrong)."""
    n = head.out_features
    scores = []
    for c in range(n):
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))
