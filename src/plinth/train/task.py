"""What the one training loop trains: a `Task` gives it the model, the batches, the loss and
validation; the loop does everything else (accumulation, clipping, the stability guard,
logging, checkpoints, exact resume, torchrun). Text samples and task scores are not a task's
business here: the recipe passes them to the loop as hooks (plinth.train.hooks).

- `PretrainTask`: a prepared corpus packed into fixed rows, the clm / mlm / span objective.
- `plinth.finetune.task.FinetuneTask`: a pretrained base with adapters and heads on
  instruction or labelled data.

A task's loader yields batches with `.to(device)` and has `state_dict()`/`load_state_dict()`
(a global position, so resume works on any world size) and `len()` (batches per epoch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plinth.config.schema import Config
from plinth.distributed.device import autocast_context
from plinth.distributed.env import DistEnv, all_reduce_sum
from plinth.errors import PlinthError
from plinth.models import build_model
from plinth.train.objectives import LossOutput, SpecialTokens, compute_loss


class Task:
    """Interface the loop calls (see the module doc); subclasses fill it in."""

    name = "task"
    seq_len: int  # tokens per row: the unit of optim.global_batch
    baseline = False  # also evaluate and sample before the first step (a base model's scores)

    def build_model(self, device: torch.device) -> nn.Module:
        raise NotImplementedError

    def loader(self, env: DistEnv):
        raise NotImplementedError

    def total_steps(self, tokens_per_step: int, batches_per_step: int) -> int:
        raise NotImplementedError

    def loss(self, net: nn.Module, batch, generator: torch.Generator) -> LossOutput:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        """Input tokens of a batch that are not padding (tokens/s and the token count)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, env: DistEnv, device: torch.device) -> dict:
        return {}

    def flops_per_token(self, model: nn.Module) -> float:
        return model.flops_per_token(self.seq_len)

    def text_io(self) -> tuple[object, int | None] | None:
        """(tokenizers.Tokenizer, end-of-sequence id) for task evaluation; None: no text."""
        return None

    def checkpoint_base(self) -> dict | None:
        """The base a checkpoint may leave out (dir, name, fingerprint), storing only the
        trainable weights; None: checkpoints hold the whole model."""
        return None


def special_token_ids(ds) -> SpecialTokens:
    """The token ids a prepared dataset's objectives need (eos, pad, mask, bos, sentinels)."""
    return SpecialTokens(
        eos_id=ds.eos_id,
        pad_id=ds.pad_id,
        mask_id=ds.mask_id,
        bos_id=ds.bos_id,
        sentinel_ids=list(getattr(ds, "sentinel_ids", [])),
    )


class PretrainTask(Task):
    """Pretraining from scratch on a prepared dataset (`plinth.data.open_dataset`)."""

    name = "pretrain"

    def __init__(self, cfg: Config, ds):
        self.cfg, self.ds = cfg, ds
        self.seq_len = cfg.model.max_seq_len
        self.special = special_token_ids(ds)

    def build_model(self, device: torch.device) -> nn.Module:
        if self.ds.vocab_size > self.cfg.model.vocab_size:
            raise PlinthError(
                f"the tokenizer in {self.ds.path} has {self.ds.vocab_size} tokens but "
                f"model.vocab_size is {self.cfg.model.vocab_size}: token ids would fall outside "
                f"the embedding. Set model.vocab_size={self.ds.vocab_size} (or larger), or "
                "prepare data with a smaller vocab."
            )
        return build_model(self.cfg.model).to(device)

    def loader(self, env: DistEnv):
        from plinth.data import PackedLoader

        cfg, micro = self.cfg, self.cfg.optim.micro_batch
        loader = PackedLoader(
            self.ds,
            split="train",
            seq_len=self.seq_len,
            batch_size=micro,
            seed=cfg.seed,
            rank=env.rank,
            world_size=env.world_size,
            packing=cfg.data.packing,
        )
        if len(loader) == 0:  # rows counted as the loader packs them (separators included)
            raise PlinthError(
                f"the training split of {self.ds.path} has {self.ds.num_tokens('train')} tokens, "
                f"fewer than one micro-batch needs ({micro} x {self.seq_len + 1}). Add data "
                "(raise data.max_docs or add sources) or lower optim.micro_batch / "
                "model.max_seq_len."
            )
        return loader

    def total_steps(self, tokens_per_step: int, batches_per_step: int) -> int:
        """The first bound reached among max_steps, max_tokens and max_epochs."""
        p = self.cfg.pretrain
        bounds = []
        if p.max_steps is not None:
            bounds.append(p.max_steps)
        if p.max_tokens is not None:
            bounds.append(math.ceil(p.max_tokens / tokens_per_step))
        if p.max_epochs is not None:
            bounds.append(math.ceil(p.max_epochs * self.ds.num_tokens("train") / tokens_per_step))
        return max(1, min(bounds))

    def loss(self, net: nn.Module, batch, generator: torch.Generator) -> LossOutput:
        cfg = self.cfg
        return compute_loss(
            cfg.objective,
            net,
            batch,
            self.special,
            mask_ratio=cfg.pretrain.mask_ratio,
            mean_span_length=cfg.pretrain.mean_span_length,
            z_loss=cfg.optim.z_loss,
            generator=generator,
        )

    def batch_tokens(self, batch) -> int:
        return batch.shape[0] * (batch.shape[1] - 1)

    def evaluate(self, model: nn.Module, env: DistEnv, device: torch.device) -> dict:
        return evaluate(
            model, self.ds, self.cfg, device, self.special, self.ds.bytes_per_token("val"), env
        )

    def text_io(self):
        return self.ds.tokenizer, self.ds.eos_id


@torch.no_grad()
def evaluate(
    model,
    ds,
    cfg: Config,
    device,
    special: SpecialTokens,
    bytes_per_token: float,
    env: DistEnv | None = None,
) -> dict:
    """Validation loss, perplexity and (for causal LMs) bits per byte on a fixed set of batches
    ({} when there is no validation split, e.g. data.val_fraction=0). Under torchrun the
    batches are split over the ranks and the sums reduced, so every rank gets the same result."""
    from plinth.data import PackedLoader

    env = env or DistEnv()
    if ds.num_docs("val") == 0:
        return {}
    was_training = model.training
    model.eval()
    loader = PackedLoader(
        ds,
        split="val",
        seq_len=cfg.model.max_seq_len,
        batch_size=cfg.optim.micro_batch,
        seed=cfg.seed,
        rank=env.rank,
        world_size=env.world_size,
        shuffle=False,
        loop=False,
    )
    gen = torch.Generator().manual_seed(cfg.seed + 1 + env.rank)  # same masks every evaluation
    total, count = 0.0, 0
    batches = math.ceil(cfg.tracking.eval_batches / env.world_size)
    for i, batch in enumerate(loader):
        if i >= batches:
            break
        with autocast_context(cfg, device):
            out = compute_loss(
                cfg.objective,
                model,
                batch.to(device),
                special,
                mask_ratio=cfg.pretrain.mask_ratio,
                mean_span_length=cfg.pretrain.mean_span_length,
                generator=gen,
            )
        total += out.ce.item() * out.n_tokens
        count += out.n_tokens
    model.train(was_training)
    total, count = all_reduce_sum([total, count], env, device)
    if count == 0:
        return {}
    loss = total / count
    metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/tokens": int(count)}
    if cfg.objective == "clm" and bytes_per_token > 0:
        metrics["val/bpb"] = loss / math.log(2) / bytes_per_token
    return metrics
