"""RL from rewards (align.method=grpo | rloo) as a `Task` of the one training loop.

    plinth align configs/grpo-arithmetic.yaml

`build_rl_task(cfg, base_dir)` reads the prompt rows (plinth.align.prompts), imports the reward
functions and loads the reward model (plinth.align.rewards), all before anything is written, and
returns an `RLTask`. Each micro-batch is optim.micro_batch prompts; its loss:

1. rollouts: plinth's `Engine` samples align.num_generations completions per prompt from the
   LIVE policy (the training weights themselves, no copy; eval mode and no gradient while it
   generates), with align.temperature / top_p / top_k / max_new_tokens. Each completion's seed
   is drawn from the loop's generator, which checkpoints carry, so a resumed run samples exactly
   the completions the uninterrupted one would;
2. rewards: every function on (prompt, completion text, row fields), then the reward model on
   prompt + completion tokens, summed with align.reward_weights;
3. advantages within each prompt's group: GRPO's (reward - group mean) / std (align.
   scale_rewards), or RLOO's leave-one-out baseline;
4. per-token log-probs of the completion tokens (eos included; logits / temperature, as TRL)
   under the policy, one forward with gradient; under the reference (adapters switched off for
   LoRA-family methods, a frozen copy for a full fine-tune) only when align.kl_beta > 0;
5. the clipped policy-gradient loss of align.loss_type (plinth.align.losses, matched to TRL).
   One update per rollout, so the ratio is 1 in value and its gradient is the policy gradient.
   GRPO adds kl_beta x the per-token k3 KL to the loss; RLOO, as TRL's RLOOTrainer, subtracts
   kl_beta x the completion's summed log-ratio to the reference from its reward instead.

Metrics (train/<name>): reward, reward_std, reward/<function>, completion_length, truncated
(share of completions cut at max_new_tokens), frac_zero_std (groups whose rewards are all equal:
they teach nothing), clip_ratio, kl (when kl_beta > 0). Validation answers the held-out prompts
greedily: val/reward, val/reward/<function>, and val/loss = -val/reward (the loop's early stop
and best checkpoint look for the lowest val/loss, i.e. the highest reward); and num_generations
times each by sampling as in training, with the same seeds every time: val/reward_sampled, the
expected reward of the policy itself, which is what RL raises (greedy answers may lag behind).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from plinth.align.prompts import PromptRow, PromptSet, read_prompts
from plinth.align.rewards import (
    RewardFunc,
    RewardModel,
    check_fields,
    load_reward_model,
    resolve_reward_funcs,
)
from plinth.align.task import adapters_off, frozen_reference
from plinth.config.schema import Config
from plinth.config.sections.align import ONLINE
from plinth.distributed.env import DistEnv, all_reduce_sum
from plinth.errors import UsageError
from plinth.finetune.data import RowLoader, Rows, held_out
from plinth.finetune.task import (
    adapted_flops_per_token,
    epoch_steps,
    peft_checkpoint_base,
    read_text_setup,
)
from plinth.load import build_finetune_model
from plinth.models import unwrap
from plinth.models.layers import IGNORE_INDEX
from plinth.train.objectives import LossOutput
from plinth.train.task import Task

N_SAMPLES = 3  # held-out prompts answered at each sampling step
EVAL_CHUNK = 64  # prompts generated together during validation


def build_rl_task(cfg: Config, base_dir: Path) -> RLTask:
    """Read the prompts, resolve the rewards and check the settings (see the module doc)."""
    from plinth.data.sft import read_jsonl

    al, ft = cfg.align, cfg.finetune
    _check_settings(cfg)
    funcs = resolve_reward_funcs(al.reward_funcs)
    weights_dir = base_dir
    text = read_text_setup(cfg, base_dir)
    tokenizer, roles, template = text.tokenizer, text.roles, text.template
    records = read_jsonl(_data_path(al.dataset, "align.dataset"))
    if al.val_dataset:
        val_records = read_jsonl(_data_path(al.val_dataset, "align.val_dataset"))
    else:
        keep, held = held_out(len(records), ft.val_fraction, cfg.seed)
        val_records = [records[i] for i in held]
        records = [records[i] for i in keep]
    opts = dict(max_prompt=ft.max_length - al.max_new_tokens, overlong=ft.overlong,
                system_prompt=ft.system_prompt)
    train = read_prompts(records, al.dataset, tokenizer, template, **opts)
    val = read_prompts(val_records, al.val_dataset or al.dataset, tokenizer, template,
                       key="align.val_dataset" if al.val_dataset else "align.dataset",
                       **opts) if val_records else PromptSet([], {"examples": 0, "kept": 0})
    check_fields(funcs, train.rows + val.rows)
    reward_model = None
    if al.reward_model:
        reward_model = load_reward_model(al.reward_model, tokenizer, "cpu")
    return RLTask(cfg, weights_dir, tokenizer, roles, train, val, funcs, reward_model)


def _check_settings(cfg: Config) -> None:
    al, ft = cfg.align, cfg.finetune
    if al.method not in ONLINE:
        raise UsageError(
            f"align.method={al.method} is not RL from rewards; build_rl_task is for "
            f"{' and '.join(ONLINE)}"
        )
    if cfg.model.arch != "decoder":
        raise UsageError(
            f"align.method={al.method} samples completions, which needs a decoder base; "
            f"finetune.base is an {cfg.model.arch}."
        )
    if not al.dataset:
        raise UsageError(
            f"align.dataset is not set: give a JSONL file of prompts for {al.method}, one "
            'object per line such as {"prompt": "What is 2 + 3?", "answer": "5"}'
        )
    if not al.reward_funcs and not al.reward_model:
        raise UsageError(
            f"align.method={al.method} has no reward: set align.reward_funcs (e.g. "
            "[exact_match]) and/or align.reward_model (a run trained with align.method=reward)"
        )
    if ft.max_length - al.max_new_tokens < 1:
        raise UsageError(
            f"finetune.max_length={ft.max_length} leaves no room for a prompt next to "
            f"align.max_new_tokens={al.max_new_tokens} (prompt + completion must fit in "
            "max_length); raise finetune.max_length or lower align.max_new_tokens."
        )
    if ft.max_length > cfg.model.max_seq_len:
        raise UsageError(
            f"finetune.max_length={ft.max_length} is longer than the base's context "
            f"(model.max_seq_len={cfg.model.max_seq_len}); lower finetune.max_length."
        )
    if cfg.distributed.strategy in ("fsdp", "hsdp"):
        raise UsageError(
            f"distributed.strategy={cfg.distributed.strategy}: rollouts run the policy once per "
            "generated token and ranks finish at different lengths, which sharded weights "
            "cannot follow; use distributed.strategy=ddp (or one process) for grpo/rloo."
        )


def _data_path(path: str, key: str) -> str:
    from plinth.data.paths import path_problem

    problem = path_problem(Path(path))
    if problem is not None:
        what = "does not exist" if problem[0] == "missing_path" else \
            f"cannot be read: {problem[1]}"
        raise UsageError(f"{key}={str(path)[:200]} {what}; point {key} at a JSONL file of "
                         'prompts such as {"prompt": "What is 2 + 3?", "answer": "5"}')
    return path


class RLTask(Task):
    """GRPO / RLOO on prompt rows (see the module doc)."""

    name = "align"
    baseline = True  # step 0: the starting policy's held-out reward and answers

    def __init__(self, cfg: Config, base_dir: Path | None, tokenizer, roles: dict,
                 train: PromptSet, val: PromptSet, funcs: list[RewardFunc],
                 reward_model: RewardModel | None = None):
        self.cfg, self.base_dir, self.tokenizer, self.roles = cfg, base_dir, tokenizer, roles
        self.train, self.val = train, val
        self.funcs, self.reward_model = funcs, reward_model
        al = cfg.align
        n = len(funcs) + (reward_model is not None)
        self.weights = list(al.reward_weights) or [1.0] * n
        self.reward_names = [f.name for f in funcs] + (["reward_model"] if reward_model else [])
        self.seq_len = cfg.finetune.max_length
        self.eos_id = roles["eos"]
        self.pad_id = roles.get("pad", self.eos_id)
        self.model: nn.Module | None = None
        self.reference: nn.Module | None = None  # a full fine-tune's frozen copy (kl_beta > 0)
        self.summary = None
        self.verbose = False
        self.limit = ""

    # ------------------------------------------------------------------------- model, data
    def build_model(self, device: torch.device) -> nn.Module:
        cfg = self.cfg
        model = build_finetune_model(cfg, self.base_dir, device)
        self.summary, self.model = model.peft_summary, model
        if self.verbose:
            print(self.summary)
        if cfg.align.kl_beta > 0 and cfg.finetune.method == "full":
            self.reference = frozen_reference(cfg, model, self.base_dir, device)
        if self.reward_model is not None:
            self.reward_model.model.to(device)
        return model

    def loader(self, env: DistEnv):
        n, micro = len(self.train), self.cfg.optim.micro_batch
        rows = Rows({"row": np.arange(n, dtype=np.int64)[:, None],
                     "attention_mask": np.ones((n, 1), dtype=np.int64)})
        loader = RowLoader(rows, micro, self.cfg.seed, env.rank, env.world_size, task="align")
        if len(loader) == 0:
            raise UsageError(
                f"{n} training prompts, fewer than one micro-batch across all processes "
                f"({micro} x {env.world_size}). Add prompts or lower optim.micro_batch."
            )
        return loader

    def total_steps(self, tokens_per_step: int, batches_per_step: int) -> int:
        """finetune.epochs over the training prompts, or finetune.max_steps when it comes
        first (a step is optim.global_batch prompts, each sampled num_generations times)."""
        steps, self.limit = epoch_steps(self.cfg, len(self.train),
                                        self.cfg.optim.micro_batch * batches_per_step)
        return steps

    def data_record(self) -> dict:
        """What the manifest records about the data."""
        return {"align": {"method": self.cfg.align.method, "train_rows": len(self.train),
                          "val_rows": len(self.val),
                          **{f"train_{k}": v for k, v in self.train.counts.items()},
                          "rewards": self.reward_names, "reward_weights": self.weights}}

    def data_lines(self) -> list[str]:
        c = self.train.counts
        extra = ", ".join(f"{v} {k}" for k, v in c.items() if k not in ("kept", "examples") and v)
        rewards = " + ".join(f"{w:g} x {n}" for w, n in zip(self.weights, self.reward_names,
                                                             strict=True))
        return [f"align {self.cfg.align.method}: {len(self.train)} training prompts, "
                f"{len(self.val)} held out" + (f" ({extra})" if extra else "")
                + f"; reward = {rewards}"]

    def text_io(self):
        return self.tokenizer, self.eos_id

    def checkpoint_base(self) -> dict | None:
        """As a fine-tune's: parameter-efficient checkpoints hold the trained weights only."""
        return peft_checkpoint_base(self.cfg, self.base_dir, self.model)

    def batch_tokens(self, batch) -> int:
        """Prompt + completion tokens once the batch's rollouts exist (set by `loss`); before
        that, the prompt tokens of every completion."""
        done = getattr(batch, "rollout_tokens", None)
        if done is not None:
            return done
        g = self.cfg.align.num_generations
        return g * sum(len(self.train.rows[i].ids) for i in batch["row"][:, 0].tolist())

    def flops_per_token(self, model: nn.Module) -> float:
        """As a fine-tune's; the rollouts' generation is not counted."""
        return adapted_flops_per_token(model, self.seq_len)

    # ------------------------------------------------------------------------ rollouts
    def generate(self, model: nn.Module, rows: list[PromptRow], seeds: list[int] | None):
        """Completions of `rows` from the live weights of `model`: num_generations sampled
        per row with the given seeds (row-major), or one greedy each (seeds None)."""
        from plinth.infer.engine import Engine
        from plinth.infer.params import SamplingParams

        al = self.cfg.align
        base = unwrap(model)
        was_training = base.training
        dev = next(base.parameters()).device
        engine = Engine(base, self.tokenizer, self.cfg, device=str(dev), eos_ids=[self.eos_id])
        engine.use_fast = False  # the fast path re-lays the weights out: not under an optimizer
        try:
            if seeds is None:
                prompts = [r.ids for r in rows]
                params = [SamplingParams(al.max_new_tokens, temperature=0.0)] * len(rows)
            else:
                g = len(seeds) // len(rows)
                prompts = [r.ids for r in rows for _ in range(g)]
                params = [SamplingParams(al.max_new_tokens, temperature=al.temperature,
                                         top_k=al.top_k or None,
                                         top_p=al.top_p if al.top_p < 1 else None, seed=s)
                          for s in seeds]
            return engine.generate(prompts, params)
        finally:
            base.train(was_training)

    def score(self, rows: list[PromptRow], completions) -> torch.Tensor:
        """(N, F) rewards of each completion (row i pairs with rows[i]) by each reward."""
        cols = [[f(r.text, c.text, r.fields, r.where) for r, c in zip(rows, completions,
                                                                     strict=True)]
                for f in self.funcs]
        if self.reward_model is not None:
            cols.append(self.reward_model.score(
                [r.ids + list(c.token_ids) for r, c in zip(rows, completions, strict=True)]))
        return torch.tensor(cols, dtype=torch.float32).T.reshape(len(rows), len(cols))

    # ---------------------------------------------------------------------------- the loss
    def loss(self, net: nn.Module, batch, generator: torch.Generator) -> LossOutput:
        from plinth.align.losses import group_advantages, policy_loss, rloo_advantages, token_mean

        al = self.cfg.align
        g = al.num_generations
        prompts = [self.train.rows[i] for i in batch["row"][:, 0].tolist()]
        seeds = torch.randint(0, 2**62, (len(prompts) * g,), generator=generator).tolist()
        completions = self.generate(net, prompts, seeds)
        rows = [r for r in prompts for _ in range(g)]
        per_func = self.score(rows, completions)  # (N, F)
        rewards = per_func @ torch.tensor(self.weights, dtype=torch.float32)  # (N,)
        seq = self._sequences(rows, completions, batch["row"].device)
        logps = self._logps(net, seq)  # (N, C), with gradient
        mask = seq["mask"]
        ref = self._reference_logps(net, seq) if al.kl_beta > 0 else None
        kl, beta = None, al.kl_beta
        if al.method == "grpo":
            advantages = group_advantages(rewards, g, al.scale_rewards)
        else:  # RLOO (as TRL's) puts the KL in the reward: kl_beta x summed log-ratio
            seq_kl = None
            if ref is not None:
                diff = (logps.detach() - ref) * mask
                seq_kl, kl = diff.sum(1).cpu(), token_mean(diff, mask)
            advantages = rloo_advantages(rewards, g, seq_kl=seq_kl, kl_beta=beta)
            beta = 0.0
        loss, stats = policy_loss(
            logps, None, advantages.to(logps.device), mask,
            loss_type=al.resolved_loss_type, epsilon_low=al.epsilon,
            epsilon_high=al.epsilon_high, ref_logps=ref if beta else None, kl_beta=beta,
            max_completion_length=al.max_new_tokens,
        )
        if kl is not None:
            stats["kl"] = kl
        batch.rollout_tokens = int(seq["segment_ids"].gt(0).sum())
        metrics = self._metrics(rewards, per_func, completions, stats)
        return LossOutput(loss, int(mask.sum()), loss.detach(), metrics=metrics)

    def _sequences(self, rows: list[PromptRow], completions, device) -> dict:
        """Prompt (left-padded) + completion (right-padded) rows, completions starting at one
        column P; segment ids mark the real tokens (positions start at each row's first)."""
        P = max(len(r.ids) for r in rows)
        C = max(1, max(len(c.token_ids) for c in completions))
        N = len(rows)
        ids = torch.full((N, P + C), self.pad_id, dtype=torch.long)
        seg = torch.zeros((N, P + C), dtype=torch.long)
        mask = torch.zeros((N, C), dtype=torch.float32)
        for i, (r, c) in enumerate(zip(rows, completions, strict=True)):
            p, t = r.ids, list(c.token_ids)
            ids[i, P - len(p):P] = torch.tensor(p)
            ids[i, P:P + len(t)] = torch.tensor(t, dtype=torch.long)
            seg[i, P - len(p):P + len(t)] = 1
            mask[i, :len(t)] = 1
        return {"input_ids": ids.to(device), "segment_ids": seg.to(device),
                "mask": mask.to(device), "prompt_width": P}

    def _logps(self, net: nn.Module, seq: dict) -> torch.Tensor:
        """(N, C) log-probabilities of the completion tokens, of logits / temperature (as TRL).
        At temperature 1 the decoder's fused path computes them without (N, T, V) logits."""
        from plinth.align.losses import token_logps

        P, ids, seg = seq["prompt_width"], seq["input_ids"], seq["segment_ids"]
        temperature = self.cfg.align.temperature
        if temperature == 1.0:
            labels = torch.full_like(ids, IGNORE_INDEX)
            labels[:, P:] = torch.where(seq["mask"] > 0, ids[:, P:], IGNORE_INDEX)
            out = net(ids[:, :-1], labels=labels[:, 1:], segment_ids=seg[:, :-1],
                      token_logps=True)  # (N, T-1): position t scores token t+1
            return out[:, P - 1:]
        logits = net(ids, segment_ids=seg)[:, P - 1:-1].float()  # (N, C, V)
        return token_logps(logits / temperature, ids[:, P:])

    @torch.no_grad()
    def _reference_logps(self, net: nn.Module, seq: dict) -> torch.Tensor:
        if self.reference is not None:
            return self._logps(self.reference, seq)
        with adapters_off(net):
            return self._logps(unwrap(net), seq)

    def _metrics(self, rewards, per_func, completions, stats) -> dict:
        g = self.cfg.align.num_generations
        grouped = rewards.view(-1, g)
        lengths = torch.tensor([len(c.token_ids) for c in completions], dtype=torch.float32)
        metrics = {
            "reward": rewards.mean().item(),
            "reward_std": rewards.std().item() if len(rewards) > 1 else 0.0,
            **{f"reward/{n}": per_func[:, j].mean().item()
               for j, n in enumerate(self.reward_names)},
            "completion_length": lengths.mean().item(),
            "truncated": float(np.mean([c.finish_reason == "length" for c in completions])),
            "frac_zero_std": (grouped.amax(1) == grouped.amin(1)).float().mean().item(),
            "clip_ratio": float(stats["clip_ratio"]),
        }
        if self.cfg.align.kl_beta > 0:
            metrics["kl"] = float(stats["kl"])
        return metrics

    # -------------------------------------------------------------------------- validation
    def _eval_rows(self) -> list[PromptRow]:
        cap = self.cfg.tracking.eval_batches * self.cfg.optim.micro_batch
        return self.val.rows[:cap]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, env: DistEnv, device: torch.device) -> dict:
        """The held-out prompts (the first tracking.eval_batches x optim.micro_batch of them,
        split over the ranks) answered greedily: val/reward, val/reward/<function>, and
        val/loss = -val/reward; and answered num_generations times each by sampling as in
        training (align.temperature / top_p / top_k; the same seeds at every evaluation):
        val/reward_sampled, the policy's own expected reward, which RL raises directly."""
        every = self._eval_rows()
        if not every:
            return {}
        rank = range(env.rank, len(every), env.world_size)
        rows = [every[i] for i in rank]
        g = self.cfg.align.num_generations
        seeds = [self.cfg.seed * 1_000_003 + i * g + j for i in rank for j in range(g)]
        sums = np.zeros(3 + len(self.reward_names))  # greedy, sampled, count, per reward
        weights = torch.tensor(self.weights, dtype=torch.float32)
        for s in range(0, len(rows), EVAL_CHUNK):
            chunk = rows[s:s + EVAL_CHUNK]
            per = self.score(chunk, self.generate(model, chunk, None))
            sampled = self.score([r for r in chunk for _ in range(g)], self.generate(
                model, chunk, seeds[s * g:(s + len(chunk)) * g]))  # fixed across evaluations
            sums[0] += (per @ weights).sum().item()
            sums[1] += (sampled @ weights).sum().item() / g
            sums[2] += len(chunk)
            sums[3:] += per.sum(0).numpy()
        sums = all_reduce_sum([float(x) for x in sums], env, device)
        if sums[2] == 0:
            return {}
        mean = sums[0] / sums[2]
        return {"val/loss": -mean, "val/reward": mean, "val/reward_sampled": sums[1] / sums[2],
                **{f"val/reward/{n}": sums[3 + j] / sums[2]
                   for j, n in enumerate(self.reward_names)}}

    def samples(self, model: nn.Module, step: int, device: torch.device) -> list[tuple[str, str]]:
        """Greedy answers to the first held-out prompts, each followed by its rewards, e.g.
        "42 [reward 1.00: exact_match 1.00]"."""
        rows = self.val.rows[:N_SAMPLES]
        if not rows:
            return []
        with torch.no_grad():
            completions = self.generate(model, rows, None)
            per = self.score(rows, completions)
        total = per @ torch.tensor(self.weights, dtype=torch.float32)
        out = []
        for i, (r, c) in enumerate(zip(rows, completions, strict=True)):
            parts = ", ".join(f"{n} {per[i, j].item():.2f}"
                              for j, n in enumerate(self.reward_names))
            out.append((r.text, f"{c.text} [reward {total[i].item():.2f}: {parts}]"))
        return out
