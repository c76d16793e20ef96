"""The `align` section: preference tuning (DPO, SimPO, ORPO, KTO), reward models and RL from
rewards (GRPO, RLOO), run by `plinth align` through the one training loop.

    plinth config explain align
    plinth config explain align.beta

The base model, the parameter-efficient method (LoRA, ...), lengths, chat template, epochs and
step limit come from the `finetune` section, exactly as for SFT; this section says what the
alignment objective is and where its data lives.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from plinth.config.sections.base import Section

PREFERENCE = ("dpo", "simpo", "orpo", "reward")  # {prompt, chosen, rejected} rows
UNPAIRED = ("kto",)  # {prompt, completion, label} rows
ONLINE = ("grpo", "rloo")  # {prompt, ...fields for rewards} rows; completions are sampled

LOSS_TYPES = {
    "dpo": ("sigmoid", "ipo", "hinge"),
    "grpo": ("grpo", "dr_grpo", "dapo"),
    "rloo": ("grpo", "dr_grpo", "dapo"),
}
DEFAULT_LOSS_TYPE = {"dpo": "sigmoid", "grpo": "dapo", "rloo": "dapo"}
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


class AlignConfig(Section):
    """Alignment after SFT: what is optimised (`method`), its data, and the method's knobs."""

    method: Literal["dpo", "simpo", "orpo", "kto", "reward", "grpo", "rloo"] = "dpo"
    """dpo: preference pairs against a reference model (the usual choice after SFT); simpo:
    pairs without a reference (length-normalised, less memory); orpo: pairs added to the SFT
    loss (no SFT step before, no reference); kto: unpaired thumbs up/down; reward: a scalar
    reward model trained on pairs (Bradley-Terry); grpo/rloo: online RL, completions sampled
    from the policy and scored by reward functions and/or a reward model."""

    dataset: str | None = None
    """Training JSONL. dpo/simpo/orpo/reward: {prompt, chosen, rejected}; kto: {prompt,
    completion, label: true|false}; grpo/rloo: {prompt, ...} where the other fields reach the
    reward functions. prompt/chosen/... are strings or chat `messages` lists."""

    val_dataset: str | None = None
    """Held-out JSONL in the same format; None holds out finetune.val_fraction of `dataset`."""

    beta: float | None = Field(None, gt=0)
    """Strength of the preference signal. dpo/kto: inverse temperature of the implicit reward
    (0.1 default; higher stays closer to the reference, lower moves further); simpo: reward
    scale (2.0); orpo: weight of the odds-ratio term next to the SFT loss (0.1). None: the
    method's default."""

    loss_type: str | None = None
    """dpo: sigmoid (the DPO paper), ipo (squared loss, robust to overfitting on deterministic
    preferences) or hinge (SLiC); grpo/rloo: grpo (per-sequence mean), dr_grpo (constant
    normaliser, no length bias) or dapo (token-level mean over the batch, TRL's default).
    None: sigmoid for dpo, dapo for grpo/rloo."""

    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    """dpo (sigmoid) / simpo: probability that a preference label is wrong (conservative DPO).
    Raise to 0.1-0.2 for noisy human labels; 0 for clean ones."""

    simpo_gamma: float = Field(0.5, ge=0)
    """simpo: target reward margin between chosen and rejected. 0.5-1.5 in the SimPO paper;
    larger pushes the pair further apart."""

    desirable_weight: float = Field(1.0, gt=0)
    """kto: loss weight of desirable (label true) examples. Raise it when they are rarer, so
    weight x count is about equal for both kinds."""

    undesirable_weight: float = Field(1.0, gt=0)
    """kto: loss weight of undesirable (label false) examples."""

    precompute_ref: bool = False
    """dpo/kto: compute the reference model's log-probs once before training and store them
    beside the dataset (reused by later runs of the same base and data), so training never
    holds a second model. Off: a LoRA-family method gets the reference free by switching its
    adapters off; a full fine-tune keeps a frozen copy."""

    reward_funcs: list[str] = Field(default_factory=list)
    """grpo/rloo: reward functions, each a built-in name (exact_match, json_valid,
    length_penalty) or `module:function` taking (prompt, completion, **row fields) and returning
    a float. Several are summed with `reward_weights`."""

    reward_weights: list[float] = Field(default_factory=list)
    """grpo/rloo: weight of each reward function (same order as reward_funcs, then the reward
    model); empty: all 1."""

    reward_model: str | None = None
    """grpo/rloo: a run trained with align.method=reward whose score is added to the reward
    (after the functions). Needs the same tokenizer as the policy."""

    num_generations: int = Field(8, ge=1)
    """grpo/rloo: completions sampled per prompt (the group). Advantages compare completions of
    one prompt, so at least 2; 4-16 is usual. Each micro-batch holds optim.micro_batch prompts
    x num_generations completions."""

    max_new_tokens: int = Field(256, ge=1)
    """grpo/rloo: longest sampled completion, in tokens. Longer allows more reasoning and costs
    rollout time linearly."""

    temperature: float = Field(1.0, gt=0)
    """grpo/rloo: sampling temperature of rollouts. Below 1 explores less (groups of identical
    completions learn nothing); above 1 more."""

    top_p: float = Field(1.0, gt=0, le=1)
    """grpo/rloo: nucleus sampling of rollouts (1: off)."""

    top_k: int = Field(0, ge=0)
    """grpo/rloo: sample among the k most likely tokens only (0: off)."""

    kl_beta: float = Field(0.0, ge=0)
    """grpo/rloo: weight of the KL penalty to the reference model (0: none, and no reference is
    computed: TRL's default since DAPO/Dr. GRPO). 0.01-0.05 keeps the policy near the start."""

    epsilon: float = Field(0.2, gt=0, lt=1)
    """grpo/rloo: clipping range of the probability ratio (lower bound 1 - epsilon)."""

    epsilon_high: float | None = Field(None, gt=0)
    """grpo/rloo: upper clipping bound 1 + epsilon_high (DAPO's clip-higher uses 0.28); None:
    epsilon."""

    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: divide advantages by the reward std of the group (GRPO), of the whole batch, or not
    at all (Dr. GRPO recommends none: no bias toward easy or hard prompts)."""

    @model_validator(mode="after")
    def _method_fields(self) -> AlignConfig:
        if self.loss_type is not None:
            allowed = LOSS_TYPES.get(self.method)
            if allowed is None:
                raise ValueError(
                    f"align.loss_type={self.loss_type} has no meaning for align.method="
                    f"{self.method}; remove it (loss_type is for dpo, grpo and rloo)"
                )
            if self.loss_type not in allowed:
                raise ValueError(
                    f"align.loss_type={self.loss_type} is not a {self.method} loss; use one of "
                    f"{', '.join(allowed)}"
                )
        if self.method in ONLINE and self.num_generations < 2:
            raise ValueError(
                f"align.num_generations={self.num_generations}: {self.method} compares the "
                "completions of one prompt with each other, so a group of 1 has zero advantage "
                "and learns nothing; set align.num_generations to 2 or more (4-16 is usual)"
            )
        if self.reward_weights and len(self.reward_weights) != len(self.reward_funcs) + bool(
            self.reward_model
        ):
            n = len(self.reward_funcs) + bool(self.reward_model)
            raise ValueError(
                f"align.reward_weights has {len(self.reward_weights)} values but there are {n} "
                "rewards (align.reward_funcs, then align.reward_model); give one weight each, "
                "or none for all 1"
            )
        return self

    @property
    def resolved_beta(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.method, 0.1)

    @property
    def resolved_loss_type(self) -> str | None:
        return self.loss_type or DEFAULT_LOSS_TYPE.get(self.method)

    @property
    def data_kind(self) -> str:
        """preference, unpaired or prompt: the rows `dataset` holds."""
        if self.method in PREFERENCE:
            return "preference"
        return "unpaired" if self.method in UNPAIRED else "prompt"
