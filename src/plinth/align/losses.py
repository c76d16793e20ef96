"""Alignment losses as pure functions on tensors; each equals TRL 1.16's to 1e-5.

    python -c "import torch; from plinth.align.losses import dpo_loss; t = torch.tensor; \
print(dpo_loss(t([-5.]), t([-7.]), t([-6.]), t([-6.]), beta=0.1))"

Inputs are log-probabilities the caller computed (summed or per-token-averaged over the completion,
as each function says); nothing here runs a model. `tests/align/test_parity_trl.py` runs TRL's own
code beside each function. Reward/stat tensors come back detached.

DPO (Rafailov et al. 2023, "Direct Preference Optimization"): a logistic loss on the margin between
the policy's and the reference's log-ratio of chosen over rejected; `hinge` is the SLiC form, `ipo`
is IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
Preferences") and `robust` is rDPO (Chowdhury et al. 2024).

SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward"): DPO's
logistic loss on length-averaged log-probs with no reference model and a target margin gamma.

ORPO (Hong et al. 2024, "Monolithic Preference Optimization without Reference Model"): the SFT loss
on the chosen answer minus beta times the log-sigmoid of the log odds ratio of chosen over rejected.

KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization"): unpaired; each
answer is pushed above (desirable) or below (undesirable) a reference point, the batch's KL.

Bradley-Terry (1952), as in InstructGPT's reward model: -log sigmoid(score_chosen - score_rejected).

GRPO (Shao et al. 2024, "DeepSeekMath"): no critic; a completion's advantage is its reward against
the other completions of the same prompt, and the policy takes a PPO-clipped step; `dr_grpo` (Liu
et al. 2025, "Understanding R1-Zero-Like Training") and `dapo` (Yu et al. 2025, "DAPO") change only
how the per-token loss is averaged. RLOO (Ahmadian et al. 2024, "Back to Basics: Revisiting
REINFORCE Style Optimization for Learning from Human Feedback"): the baseline of a completion is the
mean reward of the other completions of its prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# TRL adds this to a reward std before dividing: a group of equal rewards gets advantage 0, not NaN.
_STD_EPS = 1e-4


def token_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """Log-probability of each target token: logits (N, T, V), targets (N, T) -> (N, T).

    The caller shifts (logits[:, :-1] predict targets = ids[:, 1:]) and masks padding afterwards.
    Computed in float32 at least, without materialising a (N, T, V) log-softmax.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x (N, T) over the positions where mask (N, T) is 1; 0 when the mask is empty."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def _nanstd(x: Tensor, dim: int = -1) -> Tensor:
    # Unbiased std ignoring NaN (unscorable rewards), NaN below two values: trl.trainer.utils.nanstd
    var = torch.nanmean((x - torch.nanmean(x, dim=dim, keepdim=True)) ** 2, dim=dim)
    count = (~torch.isnan(x)).sum(dim=dim)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    return torch.sqrt(var * correction)


# ---------------------------------------------------------------------------------------------
# Preference losses


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO per pair: (losses (B,), chosen_rewards (B,), rejected_rewards (B,)).

    Inputs are log-probs summed over each completion (B,). rewards = beta * (logp - ref), detached.
    loss_type:
      sigmoid  -log sigmoid(beta * margin); with label_smoothing e > 0 it is conservative DPO,
               -(1-e) log sigmoid(beta m) - e log sigmoid(-beta m) (TRL 1.16's CPOTrainer and
               "aot" form; TRL 1.16's DPOTrainer ignores label_smoothing for sigmoid).
      robust   rDPO, TRL 1.16 DPOTrainer "robust": label_smoothing is the label-flip rate, < 0.5.
      hinge    relu(1 - beta * margin).
      ipo      (margin / length - 1 / (2 beta))^2 with each log-ratio divided by its completion
               length: TRL 1.16 normalises per token, so chosen_lengths/rejected_lengths (B,)
               (completion token counts) are required.
    Source: trl 1.16 trainer/dpo_trainer.py DPOTrainer._compute_loss (reverse_kl, ld_alpha None).
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margin = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * margin)
        if label_smoothing:
            losses = losses * (1 - label_smoothing) - F.logsigmoid(-beta * margin) * label_smoothing
    elif loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * margin)
        flipped = -label_smoothing * F.logsigmoid(-beta * margin)
        losses = (clean - flipped) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * margin)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "dpo_loss(loss_type='ipo') needs chosen_lengths= and rejected_lengths= (completion "
                "token counts): IPO's target 1/(2*beta) applies to per-token log-ratios, as in TRL."
            )
        ipo_margin = chosen_logratios / chosen_lengths.clamp(min=1.0) - rejected_logratios / (
            rejected_lengths.clamp(min=1.0)
        )
        losses = (ipo_margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: use sigmoid, ipo, hinge or robust")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO per pair: (losses (B,), chosen_rewards, rejected_rewards); rewards = beta * avg logp.

    Inputs are log-probs averaged over each completion's tokens. TRL's defaults: beta 0.1 (the
    paper uses 2-10), gamma (simpo_gamma) 0.5. Source: trl 1.16 experimental/cpo/cpo_trainer.py
    CPOTrainer.cpo_loss, loss_type="simpo", cpo_alpha=0 (no NLL term), alpha=0.
    """
    # gamma is the reward margin; in log-prob units it is gamma / beta
    logits = (chosen_avg_logps - rejected_avg_logps) - gamma / beta
    losses = -F.logsigmoid(beta * logits)
    if label_smoothing:
        losses = losses * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    return losses, beta * chosen_avg_logps.detach(), beta * rejected_avg_logps.detach()


def _log1mexp(x: Tensor) -> Tensor:
    # log(1 - exp(x)) for x < 0, branching at -ln 2 to avoid cancellation (TRL's orpo log1mexp)
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def orpo_loss(
    chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, chosen_nll: Tensor, *, beta: float
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """ORPO: (total loss (scalar, NLL included), chosen_rewards, rejected_rewards, stats).

    Inputs: per-token-averaged log-probs (B,), strictly below 0 (log(1 - p) must be finite), and the
    chosen answers' NLL (scalar; TRL averages it over prompt and answer tokens of the chosen rows).
    stats: log_odds_ratio = mean log sigmoid(log odds), log_odds_chosen = mean log odds, nll (TRL's
    metric names). beta is TRL's lambda, default 0.1. Source: trl 1.16 experimental/orpo/
    orpo_trainer.py ORPOTrainer.odds_ratio_loss and get_batch_loss_metrics.
    """
    # TRL computes in float32 so bf16 log-probs do not lose the odds; keep float64 as it is
    dtype = torch.promote_types(chosen_avg_logps.dtype, torch.float32)
    chosen, rejected = chosen_avg_logps.to(dtype), rejected_avg_logps.to(dtype)
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = chosen_nll - (beta * ratio).mean()
    stats = {
        "log_odds_ratio": ratio.mean().detach(),
        "log_odds_chosen": log_odds.mean().detach(),
        "nll": chosen_nll.detach(),
    }
    return loss, beta * chosen.detach(), beta * rejected.detach(), stats


def kto_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    kl_logps: Tensor | None,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    ref_kl_logps: Tensor | None,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KTO: (losses (n_chosen + n_rejected,), chosen_rewards, rejected_rewards, kl scalar).

    The loss of the batch is losses.nanmean(). Inputs are summed log-probs of the desirable
    (chosen) and undesirable (rejected) rows, and of the KL rows: each prompt paired with another
    row's completion (TRL shifts completions by one within the batch). kl = mean(kl_logps -
    ref_kl_logps) clamped at 0, detached; with kl_logps None it is 0 (TRL's calculate_KL=False).
    Across processes TRL takes each rank's unclamped mean, averages those means with
    accelerator.gather_for_metrics(kl).mean() and clamps after: compute the local mean, all-reduce
    it with AVG, and pass it as `kl=` (it is clamped here). Source: trl 1.16 trainer/
    kto_trainer.py KTOTrainer._compute_loss, loss_type="kto", beta default 0.1.
    """
    if kl is None:
        if kl_logps is None or ref_kl_logps is None:
            kl = chosen_logps.new_zeros(())
        else:
            kl = (kl_logps - ref_kl_logps).mean()
    kl = torch.as_tensor(kl, dtype=chosen_logps.dtype, device=chosen_logps.device)
    kl = kl.detach().clamp(min=0)
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    # Eq. 7 of the paper: the value of an answer is measured against the reference point kl
    chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach(), kl


def bradley_terry_loss(
    chosen_scores: Tensor,
    rejected_scores: Tensor,
    margin: Tensor | None = None,
    *,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """Reward-model loss: -log sigmoid(chosen - rejected - margin), mean over pairs (scalar).

    center_rewards_coefficient adds c * mean((chosen + rejected)^2), which keeps scores near 0
    (Eisenstein et al. 2023). Source: trl 1.16 trainer/reward_trainer.py RewardTrainer.compute_loss.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean(
            (chosen_scores + rejected_scores) ** 2
        )
    return loss


# ---------------------------------------------------------------------------------------------
# RL from rewards


def _groups(rewards: Tensor, num_generations: int) -> Tensor:
    if num_generations < 1 or rewards.numel() % num_generations:
        raise ValueError(
            f"{rewards.numel()} rewards do not split into groups of "
            f"num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)


def group_advantages(rewards: Tensor, num_generations: int, scale: str = "group") -> Tensor:
    """GRPO advantages (N,): reward minus its group's mean, divided by a std + 1e-4.

    Rows are groups of num_generations consecutive completions of one prompt. scale: "group" (std
    of the group), "batch" (std of all N rewards), "none" (no division; Dr. GRPO). A NaN reward
    (unscorable) is left out of the group statistics and gets advantage 0. A group of one
    completion gets advantage 0. Source: trl 1.16 trainer/grpo_trainer.py
    _generate_and_score_completions, multi_objective_aggregation="sum_then_normalize".
    """
    grouped = _groups(rewards, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale in ("group", "none"):
        if num_generations > 1:
            std = _nanstd(grouped).repeat_interleave(num_generations)
        else:
            std = torch.zeros_like(rewards)
    elif scale == "batch":
        std = (
            _nanstd(rewards).expand_as(rewards)
            if rewards.numel() > 1
            else torch.zeros_like(rewards)
        )
    else:
        raise ValueError(f"unknown scale {scale!r}: use group, batch or none")
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + _STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(
    rewards: Tensor,
    num_generations: int,
    *,
    normalize: bool = False,
    seq_kl: Tensor | None = None,
    kl_beta: float = 0.0,
) -> Tensor:
    """RLOO advantages (N,): reward minus the mean reward of the OTHER completions of its group.

    kl_beta > 0 first subtracts kl_beta * seq_kl from the rewards, where seq_kl (N,) is the summed
    first-order KL of each completion, ((old_logps - ref_logps) * mask).sum(-1) (RLOO puts the KL in
    the reward, not the loss; TRL's default beta is 0.05). normalize rescales the advantages of the
    whole batch to mean 0, std 1 (TRL's normalize_advantages, default off). NaN rewards are left out
    of the baselines and get advantage 0. Source: trl 1.16 trainer/rloo_trainer.py
    _generate_and_score_completions.
    """
    if kl_beta:
        if seq_kl is None:
            raise ValueError(
                "rloo_advantages(kl_beta > 0) needs seq_kl= (summed KL per completion)"
            )
        rewards = rewards - kl_beta * seq_kl
    grouped = _groups(rewards, num_generations)
    if num_generations > 1:
        counts = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
        baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (counts - 1)
        advantages = rewards - baselines.view(-1)
    else:
        advantages = torch.zeros_like(rewards)
    if normalize:
        advantages = (advantages - torch.nanmean(advantages)) / (_nanstd(advantages) + _STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def _clip_stats(coef: Tensor, adv: Tensor, lo: float, hi: float, mask: Tensor | None) -> dict:
    low = ((coef < 1 - lo) & (adv < 0)).to(coef.dtype)
    high = ((coef > 1 + hi) & (adv > 0)).to(coef.dtype)
    region = torch.maximum(low, high)

    def mean(x: Tensor) -> Tensor:
        return (token_mean(x, mask) if mask is not None else x.mean()).detach()

    return {
        "clip_ratio": mean(region),
        "clip_ratio/low_mean": mean(low),
        "clip_ratio/high_mean": mean(high),
    }


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    ref_logps: Tensor | None = None,
    kl_beta: float = 0.0,
    max_completion_length: int | None = None,
    num_items: Tensor | float | None = None,
    kl_bias_correction: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clipped policy-gradient loss of GRPO and RLOO: (scalar loss, stats).

    logps, old_logps, ref_logps: per-token log-probs of the completions (N, T); mask (N, T) marks
    real completion tokens; advantages (N,). old_logps None means one update per rollout (TRL's
    num_iterations=1): the ratio is exp(0) = 1 but keeps its gradient. The ratio is clipped to
    [1 - epsilon_low, 1 + epsilon_high] (epsilon_high defaults to epsilon_low; DAPO uses 0.28).
    kl_beta > 0 adds kl_beta * the k3 estimate exp(ref - logp) - (ref - logp) - 1 per token, times
    the ratio when kl_bias_correction (TRL 1.16's default use_bias_correction_kl=True: the ratio's
    gradient makes it the unbiased reverse-KL gradient, DeepSeek-V3.2; its value is 1 on-policy).
    loss_type, i.e. how the per-token loss is averaged:
      grpo     mean over each sequence's tokens, then over sequences (favours short answers);
      dr_grpo  sum over all tokens / (N * max_completion_length), a constant (required);
      dapo     sum over all tokens / number of real tokens (num_items overrides the count, e.g.
               with the global count of a gradient-accumulation window or of all ranks);
      rloo     one ratio per sequence from summed log-probs, mean over sequences (TRL's
               RLOOTrainer; its KL belongs in the reward, see rloo_advantages).
    stats: clip_ratio (clipped region), clip_ratio/low_mean, clip_ratio/high_mean, and kl (mean
    per-token k3 KL) when kl_beta > 0. Source: trl 1.16 trainer/grpo_trainer.py
    GRPOTrainer._compute_loss (importance_sampling_level="token", no vLLM, delta None, no entropy
    masking) and trainer/rloo_trainer.py RLOOTrainer._compute_loss.
    """
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    mask = mask.to(logps.dtype)
    if loss_type == "rloo":
        if kl_beta:
            raise ValueError(
                "RLOO puts the KL penalty in the reward: pass seq_kl to rloo_advantages"
            )
        coef = torch.exp((logps * mask).sum(1) - (old_logps * mask).sum(1))
        clipped = torch.clamp(coef, 1 - epsilon_low, 1 + eps_high)
        loss = (-torch.min(coef * advantages, clipped * advantages)).mean()
        return loss, _clip_stats(coef, advantages, epsilon_low, eps_high, None)

    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (N, 1)
    coef = torch.exp(logps - old_logps)  # (N, T)
    clipped = torch.clamp(coef, 1 - epsilon_low, 1 + eps_high)
    per_token = -torch.min(coef * adv, clipped * adv)
    stats = _clip_stats(coef, adv, epsilon_low, eps_high, mask)
    if kl_beta:
        if ref_logps is None:
            raise ValueError(
                "policy_loss(kl_beta > 0) needs ref_logps= (reference per-token log-probs)"
            )
        # k3 estimator (Schulman 2020): unbiased for KL(policy || ref) and never negative
        per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_bias_correction:
            per_token_kl = per_token_kl * coef
        per_token = per_token + kl_beta * per_token_kl
        stats["kl"] = token_mean(per_token_kl, mask).detach()

    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("policy_loss(loss_type='dr_grpo') needs max_completion_length=")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        count = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype)
        loss = (per_token * mask).sum() / count.clamp(min=1.0)
    else:
        raise ValueError(f"unknown policy loss_type {loss_type!r}: use grpo, dr_grpo, dapo or rloo")
    return loss, stats
