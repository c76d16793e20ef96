"""Token generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import *; \
from plinth.infer.sampling import generate; m = build_model(C(n_layers=1, d_model=64, \
n_heads=2, vocab_size=64)); print(generate(m, [[1, 2, 3], [4]], max_new_tokens=5))"

A batch of prompts of different lengths is left-padded so every row appends at the same cache
slot; the cache masks each row's padding and starts its positions after it, so a row's tokens
are the same as if it had been generated alone. `use_cache=False` is the slow reference: every
step re-reads the whole sequence of each prompt on its own (tests check both agree).
Encoder-decoder models take the prompts as sources and decode from `decoder_start_id`.

This is the small generate that evaluation and training samples use (one set of sampling
settings, the model's own forward); `plinth generate`, `chat` and `serve` use the engine
(`plinth.infer.engine`).
"""

from __future__ import annotations

import torch
from torch import nn

from plinth.models import unwrap


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[list[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    repetition_penalty: float = 1.0,
    decoder_start_id: int | None = None,
) -> list[list[int]]:
    """New tokens for each prompt (up to max_new_tokens; a row ends after emitting eos_id, which
    is included). temperature 0 is greedy; otherwise sample from softmax(logits / temperature)
    restricted to the top_k tokens and to the smallest set with probability >= top_p.
    repetition_penalty > 1 makes tokens already in the row less likely (CTRL's rule)."""
    if torch.is_tensor(prompt_ids):
        prompt_ids = prompt_ids.tolist()
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # generation changes shapes every step: run the plain module, not a compiled/DDP wrapper
    model = unwrap(model)
    arch = model.cfg.arch
    if arch == "encoder":
        raise ValueError("an encoder-only model cannot generate; use a decoder or encoder_decoder")
    was_training = model.training
    model.eval()
    try:
        pick = _BatchSampler(temperature, top_k, top_p, repetition_penalty, generator)
        if arch == "encoder_decoder":
            if decoder_start_id is None:
                raise ValueError("encoder_decoder generation needs decoder_start_id (e.g. bos)")
            return _generate_seq2seq(
                model, prompts, max_new_tokens, pick, eos_id, decoder_start_id, use_cache
            )
        if use_cache:
            return _generate_cached(model, prompts, max_new_tokens, pick, eos_id)
        return [_generate_one(model, p, max_new_tokens, pick, eos_id) for p in prompts]
    finally:
        model.train(was_training)


class _BatchSampler:
    """Turns last-position logits (B, V) into next tokens (B,), with one set of settings for
    every row (the engine's sampler, plinth.infer.sampler.RowSampler, has settings per row)."""

    def __init__(self, temperature, top_k, top_p, repetition_penalty, generator):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.generator = repetition_penalty, generator

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        logits = logits.float()  # (B, V)
        if self.repetition_penalty != 1.0 and seen is not None:
            prev = logits.gather(1, seen)  # (B, S) logits of tokens already in each row
            penalty = self.repetition_penalty
            prev = torch.where(prev > 0, prev / penalty, prev * penalty)
            logits = logits.scatter(1, seen, prev)
        if self.temperature <= 0:
            return logits.argmax(dim=-1)
        logits = logits / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]  # (B, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (keeps the first)
            drop = probs.cumsum(dim=-1) - probs >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = logits.scatter(1, order, sorted_logits)
        probs = logits.softmax(dim=-1)
        gen = self.generator
        if gen is not None and gen.device != probs.device:
            probs = probs.to(gen.device)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


def _generate_cached(model, prompts, max_new_tokens, pick, eos_id) -> list[list[int]]:
    device = model.embed_tokens.weight.device
    B, lengths = len(prompts), [len(p) for p in prompts]
    T = max(lengths)
    if model.cfg.positional == "learned" and T + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds the learned position "
            f"table (max_seq_len={model.cfg.max_seq_len})"
        )
    pad = torch.tensor([T - n for n in lengths], device=device)  # (B,)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
    cache = model.new_cache(B, T + max_new_tokens, pad=pad)
    logits = model(idx, cache=cache)[:, -1]  # (B, V)
    # tokens each row has seen, for the repetition penalty (padding repeats the first token)
    seen = torch.tensor([[p[0]] * (T - len(p)) + p for p in prompts], device=device)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        nxt = pick(logits, seen)  # (B,)
        out = torch.cat([out, nxt[:, None]], dim=1)
        seen = torch.cat([seen, nxt[:, None]], dim=1)
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
        if out.shape[1] == max_new_tokens:
            break
        logits = model(nxt[:, None], cache=cache)[:, -1]
    return [_trim(row, eos_id) for row in out.tolist()]


def _generate_one(model, prompt, max_new_tokens, pick, eos_id) -> list[int]:
    device = model.embed_tokens.weight.device
    seq = torch.tensor([prompt], device=device)  # (1, T)
    new: list[int] = []
    for _ in range(max_new_tokens):
        nxt = pick(model(seq)[:, -1], seq)  # full forward over the whole sequence every step
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        new.append(int(nxt))
        if eos_id is not None and new[-1] == eos_id:
            break
    return new


def _generate_seq2seq(model, prompts, max_new_tokens, pick, eos_id, start_id, use_cache):
    device = model.embed_tokens.weight.device
    B, S = len(prompts), max(len(p) for p in prompts)
    src = torch.tensor([p + [0] * (S - len(p)) for p in prompts], device=device)  # right-padded
    src_mask = torch.tensor([[1] * len(p) + [0] * (S - len(p)) for p in prompts], device=device)
    src_mask = None if bool(src_mask.all()) else src_mask
    memory = model.encode(src, src_mask)  # (B, S, D), computed once
    tgt = torch.full((B, 1), start_id, dtype=torch.long, device=device)
    cache = model.new_cache(B, max_new_tokens + 1) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_in = tgt
    for _ in range(max_new_tokens):
        if use_cache:
            logits = model.decode(step_in, memory, src_mask, cache)[:, -1]
        else:
            logits = model.decode(tgt, memory, src_mask)[:, -1]
        nxt = pick(logits, tgt)
        tgt = torch.cat([tgt, nxt[:, None]], dim=1)
        step_in = nxt[:, None]
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                break
    return [_trim(row[1:], eos_id) for row in tgt.tolist()]


def _trim(row: list[int], eos_id: int | None) -> list[int]:
    """Cut a row after its first eos (rows that finished early kept generating meanwhile)."""
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row
