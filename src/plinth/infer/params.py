"""What a caller asks of the engine and what it gets back: `SamplingParams` (one per prompt:
length, temperature, top-k/top-p/min-p, penalties, stops, seed, logprobs) and `Completion`.

    python -c "from plinth.infer.params import SamplingParams as S; S(16, temperature=-1).check()"
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from plinth.errors import UsageError


@dataclass
class SamplingParams:
    """One prompt's decoding controls (docs/inference.md has what each one does)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL-style, multiplicative
    frequency_penalty: float = 0.0  # OpenAI-style, additive: - f * count(token)
    presence_penalty: float = 0.0  # OpenAI-style, additive: - p * (count > 0)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per-request generator: same seed -> same output
    logprobs: int | None = None  # None: none; 0: chosen token's logprob; n: plus top-n

    @classmethod
    def from_defaults(cls, inf, *, max_new_tokens=None, temperature=None, top_k=None,
                      top_p=None, repetition_penalty=None, **rest) -> SamplingParams:
        """Params from command-line flags; a flag left at None takes the model's `inference`
        config default (max_new_tokens, temperature, top_k, top_p, repetition_penalty). Checked."""
        params = cls(
            max_new_tokens=inf.max_new_tokens if max_new_tokens is None else max_new_tokens,
            temperature=inf.temperature if temperature is None else temperature,
            top_k=inf.top_k if top_k is None else top_k,
            top_p=inf.top_p if top_p is None else top_p,
            repetition_penalty=inf.repetition_penalty if repetition_penalty is None
            else repetition_penalty,
            **rest,
        )
        params.check()
        return params

    def check(self) -> None:
        """UsageError naming the field for values no sampler can honour."""
        bad = []
        for name in ("temperature", "top_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                bad.append(f"{name}={v} (needs a finite number)")
        if bad:
            raise UsageError("sampling parameters: " + "; ".join(bad) + ".")
        if self.max_new_tokens < 1:
            bad.append(f"max_new_tokens={self.max_new_tokens} (needs >= 1)")
        if self.temperature < 0:
            bad.append(f"temperature={self.temperature} (needs >= 0; 0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            bad.append(f"top_k={self.top_k} (needs >= 1, or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad.append(f"top_p={self.top_p} (needs 0 < top_p <= 1, or None)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad.append(f"min_p={self.min_p} (needs 0 <= min_p <= 1, or None)")
        if self.repetition_penalty <= 0:
            bad.append(f"repetition_penalty={self.repetition_penalty} (needs > 0; 1 is off)")
        if self.logprobs is not None and self.logprobs < 0:
            bad.append(f"logprobs={self.logprobs} (needs >= 0, or None)")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            bad.append(f"seed={self.seed} (needs a 64-bit integer, -2**63 <= seed < 2**63)")
        if any(not s for s in self.stop):
            bad.append("stop contains an empty string")
        if bad:
            raise UsageError("sampling parameters: " + "; ".join(bad) + ".")


@dataclass
class Completion:
    """One generated sequence: its tokens, text, why it ended, and what was asked for."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos / stop token / stop string), "length" or "cancelled"
    prompt_tokens: int
    logprobs: list[float] | None = None  # per generated token
    top_logprobs: list[dict[str, float]] | None = None  # per generated token, when logprobs>0
    # the same as (token id, logprob) pairs, best first (token texts can coincide)
    top_ids: list[list[tuple[int, float]]] | None = None
    score: float | None = None  # beam search: the hypothesis' length-penalised score

