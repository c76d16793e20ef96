"""Pretraining objectives as plain functions: causal LM, masked LM, T5 span corruption.

    python -c "import torch; from plinth.config.schema import ModelConfig; \
from plinth.models import build_model; from plinth.train.objectives import *; \
m = build_model(ModelConfig(n_layers=1, d_model=64, n_heads=2, vocab_size=64)); \
print(compute_loss('clm', m, torch.randint(4, 64, (2, 17)), SpecialTokens(eos_id=0, pad_id=1)))"

Every objective takes a (B, T+1) batch of token ids as the loader produces it and returns a
`LossOutput`: the mean loss over the tokens that count (what backward() uses), how many counted,
and the cross-entropy without z-loss (for logging). Labels equal to the pad id never count.

- clm: predict batch[:, 1:] from batch[:, :-1] (next-token prediction).
- mlm: corrupt batch[:, :-1] BERT style (each ordinary token is chosen with probability
  mask_ratio; of those 80% -> mask id, 10% -> a random ordinary token, 10% kept) and predict the
  chosen tokens only.
- span: T5 span corruption of batch[:, :-1]: round(T * mask_ratio) tokens in spans of mean length
  mean_span_length are cut out; the encoder reads the rest with one sentinel per span, the
  decoder writes `sentinel_0 span_0 sentinel_1 span_1 ... eos`.

Random masks come from `generator` (CPU), so a seeded generator gives the same masks every run,
which exact resume needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from plinth.models import unwrap
from plinth.models.layers import IGNORE_INDEX, cross_entropy_sums


@dataclass
class SpecialTokens:
    """Ids of the tokens objectives treat specially (from the tokenizer's special tokens)."""

    eos_id: int
    pad_id: int | None = None
    mask_id: int | None = None
    bos_id: int | None = None
    sentinel_ids: list[int] = field(default_factory=list)  # T5 span sentinels, in order

    @classmethod
    def from_token_to_id(
        cls, token_to_id: Callable[[str], int | None], n_sentinels: int = 100
    ) -> SpecialTokens:
        """From a lookup such as `tokenizers.Tokenizer.token_to_id`, with plinth's default special
        tokens (<|endoftext|>, <|pad|>, <|mask|>, <|bos|>, and <|extra_N|> as sentinels)."""
        eos = token_to_id("<|endoftext|>")
        if eos is None:
            raise ValueError("the tokenizer has no <|endoftext|> token")
        sentinels = []
        for i in range(n_sentinels):
            t = token_to_id(f"<|extra_{i}|>")
            if t is None:
                break
            sentinels.append(t)
        return cls(
            eos_id=eos,
            pad_id=token_to_id("<|pad|>"),
            mask_id=token_to_id("<|mask|>"),
            bos_id=token_to_id("<|bos|>"),
            sentinel_ids=sentinels,
        )

    def all_ids(self) -> list[int]:
        ids = [self.eos_id, self.pad_id, self.mask_id, self.bos_id, *self.sentinel_ids]
        return sorted({i for i in ids if i is not None})


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: mean over counted tokens (+ z-loss); call backward() on it
    n_tokens: int  # tokens that counted (the mean's denominator)
    ce: torch.Tensor  # scalar, detached: cross-entropy alone, for logging
    # the task's own numbers for the metrics record (alignment: rewards, margins, KL, ...),
    # averaged over micro-batches and ranks and logged as train/<name>
    metrics: dict[str, float] = field(default_factory=dict)


def compute_loss(
    objective: str,
    model: nn.Module,
    batch: torch.Tensor,
    special: SpecialTokens,
    mask_ratio: float = 0.15,
    mean_span_length: float = 3.0,
    z_loss: float = 0.0,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """Loss of `model` on `batch` (B, T+1) under `objective` (clm | mlm | span)."""
    if objective == "clm":
        labels = _ignore_pad(batch[:, 1:], special)
        # the decoder fuses its head with the loss when given labels (no (B, T, V) logits)
        loss_sum, ce_sum = model(batch[:, :-1], labels=labels, z_loss=z_loss)
        return _mean(loss_sum, ce_sum, labels)
    if objective == "mlm":
        vocab_size = unwrap(model).cfg.vocab_size
        inputs, labels, chosen = mask_tokens(
            batch[:, :-1], special, vocab_size, mask_ratio, generator
        )
        attention_mask = _real_tokens(batch[:, :-1], special)
        logits = model(inputs, attention_mask=attention_mask, select=chosen)  # (N, V)
        return cross_entropy(logits, labels[chosen], z_loss)
    if objective == "span":
        src, tgt_in, labels = span_corrupt(
            batch[:, :-1], special, mask_ratio, mean_span_length, generator
        )
        logits = model(src, tgt_in, src_mask=_real_tokens(src, special))  # (B, T', V)
        return cross_entropy(logits, _ignore_pad(labels, special), z_loss)
    raise ValueError(f"unknown objective {objective!r}; expected clm, mlm or span")


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> LossOutput:
    """Mean cross-entropy of logits (..., V) against labels (...) over labels != IGNORE_INDEX, plus
    z_loss * mean(logsumexp(logits)^2) over the same tokens (PaLM's z-loss keeps the softmax
    normaliser near 1 so logits cannot drift)."""
    return _mean(*cross_entropy_sums(logits, labels, z_loss), labels)


def _mean(loss_sum: torch.Tensor, ce_sum: torch.Tensor, labels: torch.Tensor) -> LossOutput:
    n = (labels != IGNORE_INDEX).sum()
    denom = n.clamp(min=1)  # no counted token: loss 0 (still attached to the graph)
    # the count leaves the device last, so a compiled caller captures everything above in one graph
    return LossOutput(loss=loss_sum / denom, n_tokens=int(n), ce=(ce_sum / denom).detach())


# ---------------------------------------------------------------------------------- masked LM


def mask_tokens(
    tokens: torch.Tensor,
    special: SpecialTokens,
    vocab_size: int,
    mask_ratio: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BERT corruption of tokens (B, T). Returns (inputs, labels, chosen): chosen (B, T) marks
    the positions to predict, labels hold the original token there and IGNORE_INDEX elsewhere.
    Special tokens (padding, separators, ...) are never chosen."""
    if special.mask_id is None:
        raise ValueError("mlm needs a mask token id (SpecialTokens.mask_id)")
    specials = torch.tensor(special.all_ids(), dtype=tokens.dtype, device=tokens.device)
    ordinary = ~torch.isin(tokens, specials)
    r_choose, r_action = _rand((2, *tokens.shape), generator, tokens.device)
    chosen = ordinary & (r_choose < mask_ratio)
    to_mask = chosen & (r_action < 0.8)
    to_random = chosen & (r_action >= 0.8) & (r_action < 0.9)  # the last 10% stay as they are
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in special.all_ids() if i < vocab_size]] = False
    allowed = allowed.nonzero().squeeze(1)  # ordinary token ids
    gen_device = generator.device if generator is not None else torch.device("cpu")
    pick = torch.randint(len(allowed), tokens.shape, generator=generator, device=gen_device)
    random_tokens = allowed.to(gen_device)[pick].to(tokens.device, tokens.dtype)
    inputs = torch.where(to_mask, torch.full_like(tokens, special.mask_id), tokens)
    inputs = torch.where(to_random, random_tokens, inputs)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return inputs, labels, chosen


# ----------------------------------------------------------------------------- span corruption


def span_corrupt(
    tokens: torch.Tensor,
    special: SpecialTokens,
    mask_ratio: float = 0.15,
    mean_span_length: float = 3.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """T5 span corruption of tokens (B, L). Returns (src, tgt_in, labels):
    src (B, L - n_noise + n_spans) keeps the unmasked tokens with one sentinel per span;
    labels (B, n_noise + n_spans + 1) = sentinel_0 span_0 ... sentinel_k span_k eos;
    tgt_in = labels shifted right behind bos (the decoder's start token).
    Every row has the same counts, so the batch stays rectangular without padding."""
    B, L = tokens.shape
    if L < 2:
        raise ValueError("span corruption needs sequences of at least 2 tokens")
    n_noise = min(max(round(L * mask_ratio), 1), L - 1)
    n_spans = max(1, min(round(n_noise / mean_span_length), n_noise, L - n_noise))
    if n_spans > len(special.sentinel_ids):
        raise ValueError(
            f"span corruption of {L} tokens makes {n_spans} spans but the tokenizer has "
            f"{len(special.sentinel_ids)} sentinel tokens (<|extra_N|>); reserve more, or "
            "shorten max_seq_len / raise mean_span_length"
        )
    start_id = special.bos_id if special.bos_id is not None else special.pad_id
    if start_id is None:
        raise ValueError("span corruption needs a bos (or pad) id as the decoder start token")
    dev = tokens.device
    # T5's random_spans_noise_mask: alternate kept / noise segments, kept first, noise last
    noise_lens = _random_segmentation(n_noise, n_spans, B, generator)  # (B, n_spans)
    keep_lens = _random_segmentation(L - n_noise, n_spans, B, generator)  # (B, n_spans)
    lens = torch.stack([keep_lens, noise_lens], dim=-1).view(B, 2 * n_spans)
    boundaries = lens.cumsum(-1)[:, :-1]  # segment starts after the first, all < L
    marks = torch.zeros(B, L, dtype=torch.long).scatter_(1, boundaries, 1)
    is_noise = (marks.cumsum(-1) % 2 == 1).to(dev)  # (B, L)

    prev_noise = torch.cat([torch.zeros_like(is_noise[:, :1]), is_noise[:, :-1]], dim=1)
    span_start = is_noise & ~prev_noise  # first token of each span
    span_id = span_start.long().cumsum(-1) - 1  # (B, L), valid on noise tokens
    sentinels = torch.tensor(special.sentinel_ids[:n_spans], dtype=tokens.dtype, device=dev)
    # encoder input: tokens with each span replaced by its sentinel
    src = torch.where(span_start, sentinels[span_id.clamp(min=0)], tokens)
    src = src[~is_noise | span_start].view(B, L - n_noise + n_spans)
    # decoder target: sentinel k right before the tokens of span k
    noise_rank = is_noise.long().cumsum(-1) - 1
    slot = noise_rank + span_id  # where span tokens' sentinel goes; the token itself is slot + 1
    labels = torch.empty(B, n_noise + n_spans, dtype=tokens.dtype, device=dev)
    labels.scatter_(1, (slot + 1)[is_noise].view(B, n_noise), tokens[is_noise].view(B, n_noise))
    labels.scatter_(1, slot[span_start].view(B, n_spans), sentinels.expand(B, n_spans))
    eos = torch.full((B, 1), special.eos_id, dtype=tokens.dtype, device=dev)
    start = torch.full((B, 1), start_id, dtype=tokens.dtype, device=dev)
    labels = torch.cat([labels, eos], dim=1)
    tgt_in = torch.cat([start, labels[:, :-1]], dim=1)
    return src, tgt_in, labels


def _random_segmentation(
    n_items: int, n_segments: int, batch: int, generator: torch.Generator | None
) -> torch.Tensor:
    """Split n_items into n_segments non-empty runs, uniformly at random per row -> (B, n_seg)."""
    if n_segments == 1:
        return torch.full((batch, 1), n_items, dtype=torch.long)
    # n_segments - 1 distinct cut points among 1..n_items-1
    order = _rand((batch, n_items - 1), generator, torch.device("cpu")).argsort(-1)
    cuts = (order[:, : n_segments - 1] + 1).sort(-1).values
    edges = F.pad(cuts, (1, 0), value=0)
    edges = F.pad(edges, (0, 1), value=n_items)
    return edges.diff(dim=-1)


# ------------------------------------------------------------------------------------ helpers


def _rand(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device (CPU by default), moved to `device`."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def _ignore_pad(labels: torch.Tensor, special: SpecialTokens) -> torch.Tensor:
    if special.pad_id is None:
        return labels
    return labels.masked_fill(labels == special.pad_id, IGNORE_INDEX)


def _real_tokens(tokens: torch.Tensor, special: SpecialTokens) -> torch.Tensor | None:
    """(B, T) attention mask, or None when nothing is padding (lets attention skip the mask)."""
    if special.pad_id is None:
        return None
    real = tokens != special.pad_id
    return None if bool(real.all()) else real
