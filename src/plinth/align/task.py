"""Offline alignment as a task of the one training loop: DPO, SimPO, ORPO and KTO on the policy's
log-probs, and reward models (a 1-output head trained with the Bradley-Terry loss).

    plinth align configs/dpo-smollm2-lora.yaml

`build_preference_task(cfg, base_dir)` reads the data (plinth.align.data) and returns a
`PreferenceTask`. Chosen and rejected answers go through one forward (concatenated along the
batch; right padding is masked, so causal attention never reads it); per-sequence log-probs
come from the decoder's `token_logps` path, which never stores (B, T, V) logits. The reference
model of DPO and KTO is (a) free under LoRA-family methods: the same forward with the adapters
switched off, (b) a frozen copy for full fine-tunes, or (c) precomputed once
(`align.precompute_ref`) and stored beside the dataset, so no second model is held.
The losses themselves are plain functions in plinth.align.losses (matched to TRL's).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from plinth.align import losses as L
from plinth.config.schema import Config
from plinth.config.tasks import REWARD
from plinth.distributed.device import autocast_context
from plinth.distributed.env import DistEnv, all_reduce_sum
from plinth.errors import UsageError
from plinth.finetune.data import Batch, RowLoader, Rows
from plinth.finetune.task import (
    TextSetup,
    adapted_flops_per_token,
    epoch_steps,
    peft_checkpoint_base,
    read_text_setup,
)
from plinth.load import build_finetune_model
from plinth.models import unwrap
from plinth.models.heads import head_outputs
from plinth.models.layers import IGNORE_INDEX
from plinth.peft.apply import disable_adapters
from plinth.train.objectives import LossOutput
from plinth.train.task import Task

N_SAMPLES = 3  # validation prompts answered at each sampling step
REF_KEYS = {"preference": ("ref_chosen", "ref_rejected"), "unpaired": ("ref_logps", "ref_kl")}


# ------------------------------------------------------------------ log-probs and reference
def sequence_logps(net: nn.Module, ids: torch.Tensor, labels: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the labelled tokens, their count) per row (B,) for ids/labels (B, T)
    aligned (label t scores ids[t]); one forward, padding and prompts masked by IGNORE_INDEX."""
    target = labels[:, 1:]
    tok = net(ids[:, :-1], labels=target, token_logps=True)  # (B, T-1)
    counted = (target != IGNORE_INDEX).sum(-1)
    return tok.sum(-1), counted


def reference_kind(cfg: Config) -> str:
    """How a method gets its reference log-probs: none (simpo, orpo, reward), precomputed,
    adapters (LoRA family: adapters off) or copy (a frozen copy of a full fine-tune)."""
    if cfg.align.method not in ("dpo", "kto"):
        return "none"
    if cfg.align.precompute_ref:
        return "precomputed"
    return "copy" if cfg.finetune.method == "full" else "adapters"


def frozen_reference(cfg: Config, model: nn.Module, base_dir: Path | None,
                     device: torch.device) -> nn.Module:
    """A full fine-tune's reference: a frozen copy of the starting model, or, when resuming
    (the model is about to receive trained weights), the base rebuilt from finetune.base."""
    if base_dir is not None:
        ref = copy.deepcopy(model)
    else:
        from plinth.load import resolve

        ref = build_finetune_model(cfg, resolve(cfg.finetune.base, "finetune.base"), device)
    return ref.requires_grad_(False).eval()


@contextlib.contextmanager
def adapters_off(net: nn.Module):
    """The reference inside a LoRA-family model: adapters switched off and eval mode (no
    dropout), both restored on exit."""
    base = unwrap(net)
    was = base.training
    base.eval()
    try:
        with torch.no_grad(), disable_adapters(base):
            yield net
    finally:
        base.train(was)


class Reference:
    """The reference policy's forward: the model with adapters off, or a frozen copy."""

    def __init__(self, copy_of: nn.Module | None):
        self.copy = copy_of

    @torch.no_grad()
    def logps(self, net: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.copy is not None:
            return sequence_logps(self.copy, ids, labels)[0]
        with adapters_off(net):
            return sequence_logps(net, ids, labels)[0]


def _pairs(batch: Batch, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of one concatenated forward: chosen then rejected (preference) or the examples
    then their mismatched KL rows (unpaired), each (2B, W)."""
    if kind == "preference":
        return (torch.cat([batch["chosen_ids"], batch["rejected_ids"]]),
                torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
    return (torch.cat([batch["input_ids"], batch["kl_ids"]]),
            torch.cat([batch["labels"], batch["kl_labels"]]))


# --------------------------------------------------------------------------------- the task
class PreferenceTask(Task):
    """dpo / simpo / orpo / kto / reward on fixed rows (see the module doc)."""

    name = "align"
    baseline = True  # step 0: the starting model's margins and answers, to compare with later

    def __init__(self, cfg: Config, base_dir: Path | None, text: TextSetup, data):
        self.cfg, self.base_dir, self.text = cfg, base_dir, text
        self.tokenizer, self.roles = text.tokenizer, text.roles
        self.data = data  # plinth.align.data.AlignData
        self.method = cfg.align.method
        self.kind = cfg.align.data_kind
        self.seq_len = cfg.finetune.max_length
        self.beta = cfg.align.resolved_beta
        self.ref: Reference | None = None
        self.model: nn.Module | None = None
        self.summary = None
        self.verbose = False
        self.limit = ""

    # ------------------------------------------------------------------------ model, data
    def build_model(self, device: torch.device) -> nn.Module:
        model = build_finetune_model(self.cfg, self.base_dir, device)
        self.summary, self.model = model.peft_summary, model
        if self.verbose:
            print(self.summary)
        kind = reference_kind(self.cfg)
        if kind == "precomputed":
            self.precompute(model, device)
        elif kind == "copy":
            self.ref = Reference(frozen_reference(self.cfg, model, self.base_dir, device))
        elif kind == "adapters":
            self.ref = Reference(None)
        return model

    def loader(self, env: DistEnv):
        micro = self.cfg.optim.micro_batch
        ld = RowLoader(self.data.train, micro, self.cfg.seed, env.rank, env.world_size,
                       task=self.method)
        if len(ld) == 0:
            raise UsageError(
                f"{self.cfg.align.dataset}: {len(self.data.train)} training examples, fewer than "
                f"one micro-batch across all processes ({micro} x {env.world_size}). Add "
                "examples or lower optim.micro_batch."
            )
        return ld

    def total_steps(self, tokens_per_step: int, batches_per_step: int) -> int:
        rows_per_step = self.cfg.optim.micro_batch * batches_per_step
        steps, self.limit = epoch_steps(self.cfg, len(self.data.train), rows_per_step)
        return steps

    def checkpoint_base(self) -> dict | None:
        return peft_checkpoint_base(self.cfg, self.base_dir, self.model)

    def text_io(self):
        return self.tokenizer, self.roles["eos"]

    def data_record(self) -> dict:
        """What the manifest records about the data."""
        d = self.data
        return {"align": {"method": self.method, "train_rows": len(d.train),
                          "val_rows": len(d.val) if d.val is not None else 0,
                          **{f"train_{k}": v for k, v in d.train.counts.items()}}}

    def data_lines(self) -> list[str]:
        d, what = self.data, "pairs" if self.kind == "preference" else "examples"
        c = d.train.counts
        extra = ", ".join(f"{v} {k}" for k, v in c.items() if k != "kept" and v)
        val = f", {len(d.val)} held out" if d.val is not None else ""
        return [f"align {self.method}: {len(d.train)} training {what}{val}"
                + (f" ({extra})" if extra else "")]

    def flops_per_token(self, model: nn.Module) -> float:
        return adapted_flops_per_token(model, self.seq_len)

    def batch_tokens(self, batch) -> int:
        if self.kind == "preference":
            return int(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())
        return int(batch["seq_mask"].sum() + batch["kl_mask"].sum())

    # --------------------------------------------------------------------- reference log-probs
    def _ref_logps(self, net, batch: Batch, ids, labels) -> torch.Tensor:
        keys = REF_KEYS[self.kind]
        if keys[0] in batch:  # precomputed
            return torch.cat([batch[keys[0]], batch[keys[1]]]).to(torch.float32)
        return self.ref.logps(net, ids, labels).float()

    @torch.no_grad()
    def precompute(self, model: nn.Module, device: torch.device) -> None:
        """Reference log-probs of every row, by the starting model, stored as arrays of the
        rows (and cached beside the dataset, keyed by the rows and the base weights)."""
        from safetensors.numpy import load_file, save_file

        for split, rows in (("train", self.data.train), ("val", self.data.val)):
            if rows is None:
                continue
            cache = self._cache_path(split, rows, model)
            if cache is not None and cache.is_file():
                try:
                    rows.arrays.update(load_file(str(cache)))
                    continue
                except Exception:  # a damaged cache is recomputed, never trusted
                    pass
            was = model.training
            model.eval()
            out = {k: np.zeros(len(rows), dtype=np.float32) for k in REF_KEYS[self.kind]}
            loader = RowLoader(rows, self.cfg.optim.micro_batch, 0, shuffle=False, loop=False)
            start = 0
            for batch in loader:
                batch = batch.to(device)
                ids, labels = _pairs(batch, self.kind)
                with autocast_context(self.cfg, device):
                    logps = sequence_logps(model, ids, labels)[0].float().cpu().numpy()
                n = len(logps) // 2
                a, b = REF_KEYS[self.kind]
                out[a][start:start + n], out[b][start:start + n] = logps[:n], logps[n:]
                start += n
            model.train(was)
            rows.arrays.update(out)
            if cache is not None:
                try:
                    tmp = cache.with_suffix(".tmp")
                    save_file(out, str(tmp))
                    tmp.replace(cache)
                except OSError:  # a read-only data directory: recomputed next time
                    pass

    def _cache_path(self, split: str, rows: Rows, model: nn.Module) -> Path | None:
        dataset = self.cfg.align.val_dataset if split == "val" and self.cfg.align.val_dataset \
            else self.cfg.align.dataset
        if dataset is None:
            return None
        h = hashlib.sha256()
        fp = getattr(model, "peft_base_fingerprint", None) or str(self.cfg.finetune.base)
        h.update(f"{fp}|{self.cfg.hardware.precision}|{split}".encode())
        for k in sorted(rows.arrays):
            if not k.startswith("ref_"):
                h.update(k.encode())
                h.update(np.ascontiguousarray(rows.arrays[k]).tobytes())
        p = Path(dataset)
        return p.with_name(f"{p.name}.ref-{h.hexdigest()[:16]}.safetensors")

    # ---------------------------------------------------------------------------- the loss
    def loss(self, net: nn.Module, batch, generator: torch.Generator) -> LossOutput:
        loss, metrics = self._loss(net, batch)
        return LossOutput(loss, int(self._count(batch)), loss.detach(),
                          {k: float(v) for k, v in metrics.items()})

    def _count(self, batch) -> int:
        return batch["label"].shape[0] if self.kind == "unpaired" else \
            batch["chosen_ids"].shape[0]

    def _loss(self, net: nn.Module, batch) -> tuple[torch.Tensor, dict]:
        a = self.cfg.align
        if self.method == "reward":
            return self._reward_loss(net, batch)
        ids, labels = _pairs(batch, self.kind)
        logps, counts = sequence_logps(net, ids, labels)
        n = logps.shape[0] // 2
        pol_a, pol_b = logps[:n].float(), logps[n:].float()
        if self.method == "kto":
            return self._kto(net, batch, ids, labels, pol_a, pol_b)
        m: dict = {"chosen_logp": pol_a.detach().mean(), "rejected_logp": pol_b.detach().mean()}
        if self.method == "dpo":
            ref = self._ref_logps(net, batch, ids, labels)
            losses, cr, rr = L.dpo_loss(pol_a, pol_b, ref[:n], ref[n:], beta=self.beta,
                                        loss_type=a.resolved_loss_type,
                                        label_smoothing=a.label_smoothing,
                                        chosen_lengths=counts[:n], rejected_lengths=counts[n:])
            loss = losses.mean()
        else:
            avg_a = pol_a / counts[:n].clamp(min=1)
            avg_b = pol_b / counts[n:].clamp(min=1)
            if self.method == "simpo":
                losses, cr, rr = L.simpo_loss(avg_a, avg_b, beta=self.beta, gamma=a.simpo_gamma,
                                              label_smoothing=a.label_smoothing)
                loss = losses.mean()
            else:  # orpo: the SFT loss on chosen answers plus the odds-ratio term
                nll = -pol_a.sum() / counts[:n].sum().clamp(min=1)
                loss, cr, rr, stats = L.orpo_loss(avg_a, avg_b, nll, beta=self.beta)
                m.update({k: v.detach().mean() for k, v in stats.items()})
        m.update(_reward_stats(cr, rr))
        return loss, m

    def _kto(self, net, batch, ids, labels, pol, pol_kl) -> tuple[torch.Tensor, dict]:
        a = self.cfg.align
        ref = self._ref_logps(net, batch, ids, labels)
        n = pol.shape[0]
        good = batch["label"].bool()
        losses, cr, rr, kl = L.kto_loss(
            pol[good], pol[~good], pol_kl, ref[:n][good], ref[:n][~good], ref[n:],
            beta=self.beta, desirable_weight=a.desirable_weight,
            undesirable_weight=a.undesirable_weight,
        )
        # a micro-batch may hold only one kind: its mean is then 0 (keys stay the same, so
        # windows and ranks average alike)
        m = {"kl": kl, "chosen_reward": cr.sum() / max(1, cr.numel()),
             "rejected_reward": rr.sum() / max(1, rr.numel()),
             "desirable_share": good.float().mean()}
        return losses.mean(), m

    def _reward_loss(self, net, batch) -> tuple[torch.Tensor, dict]:
        scores = head_outputs(net, {
            "input_ids": torch.cat([batch["chosen_ids"], batch["rejected_ids"]]),
            "attention_mask": torch.cat([batch["chosen_mask"], batch["rejected_mask"]]),
        }, REWARD, "last").squeeze(-1).float()
        n = scores.shape[0] // 2
        loss = L.bradley_terry_loss(scores[:n], scores[n:])
        return loss, {"chosen_score": scores[:n].detach().mean(),
                      "rejected_score": scores[n:].detach().mean(),
                      **_reward_stats(scores[:n].detach(), scores[n:].detach())}

    # -------------------------------------------------------------------------- validation
    @torch.no_grad()
    def evaluate(self, model: nn.Module, env: DistEnv, device: torch.device) -> dict:
        """Mean validation loss and, per pair, accuracy (chosen reward > rejected) and margin;
        under torchrun the rows are split over ranks and the sums reduced."""
        rows = self.data.val
        if rows is None or len(rows) == 0:
            return {}
        was = model.training
        model.eval()
        loader = RowLoader(rows, self.cfg.optim.micro_batch, self.cfg.seed, env.rank,
                           env.world_size, shuffle=False, loop=False, task=self.method)
        sums: dict[str, float] = {}
        n = 0.0
        limit = -(-self.cfg.tracking.eval_batches // env.world_size)
        for i, batch in enumerate(loader):
            if i >= limit:
                break
            batch = batch.to(device)
            with autocast_context(self.cfg, device):
                loss, m = self._loss(model, batch)
            k = self._count(batch)
            n += k
            for name, v in {"loss": loss, **m}.items():
                sums[name] = sums.get(name, 0.0) + float(v) * k
        model.train(was)
        keys = sorted(sums)
        vals = all_reduce_sum([n, *(sums[k] for k in keys)], env, device)
        if vals[0] == 0:
            return {}
        return {f"val/{k}": v / vals[0] for k, v in zip(keys, vals[1:], strict=True)}

    def samples(self, model: nn.Module, step: int, device: torch.device) -> list[tuple[str, str]]:
        """Greedy answers to the first validation prompts, so the run shows the style change."""
        from plinth.infer.sampling import generate

        if self.method == "reward" or not self.data.prompts:
            return []
        was = model.training
        model.eval()
        prompts = self.data.prompts[:N_SAMPLES]
        ids = [self.tokenizer.encode(p, add_special_tokens=False).ids for p in prompts]
        gens = generate(model, ids, max_new_tokens=min(self.cfg.inference.max_new_tokens, 96),
                        temperature=0.0, eos_id=self.roles["eos"])
        model.train(was)
        return [(p, self.tokenizer.decode(g)) for p, g in zip(prompts, gens, strict=True)]


def _reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Implicit (or reward-model) rewards of a batch of pairs: means, margin, accuracy."""
    return {
        "chosen_reward": chosen.mean(),
        "rejected_reward": rejected.mean(),
        "margin": (chosen - rejected).mean(),
        "accuracy": (chosen > rejected).float().mean(),
    }


def build_preference_task(cfg: Config, base_dir: Path) -> PreferenceTask:
    """Read the alignment data with the base's tokenizer and template (see the module doc)."""
    from plinth.align.data import load_align_data

    if cfg.model.arch != "decoder":
        raise UsageError(
            f"align.method={cfg.align.method} needs a decoder (causal LM) base; "
            f"{cfg.finetune.base} is an {cfg.model.arch}."
        )
    text = read_text_setup(cfg, base_dir)
    data = load_align_data(cfg, text.tokenizer, text.template, text.eos_text, text.pad_id)
    return PreferenceTask(cfg, base_dir, text, data)
