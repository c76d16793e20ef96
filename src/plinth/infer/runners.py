"""Forward passes for the engine's decode loop, over a KV cache the runner owns:
`prefill()` -> logits (B, V) at each prompt's last position, `step(tokens (A,))` -> logits
(A, V), `keep(idx)` drops the other rows, and (decoders) `admit` merges new rows between steps.

    python -c "from plinth.infer.runners import DecoderRunner; help(DecoderRunner.admit)"

A decoder runs through `plinth.infer.fast.FastDecoder` where that applies (the engine builds it
once) and through the model's own forward otherwise; an encoder-decoder encodes its sources once
and decodes from the decoder-start token.
"""

from __future__ import annotations

import torch

from plinth.errors import NotSupportedError
from plinth.models.layers import KVCache


class Runner:
    """Forward passes for the decode loop: prefill() -> logits (B, V) of the last position;
    step(tokens (A,)) -> logits (A, V); keep(idx) drops the other rows from the batch."""

    def prefill(self) -> torch.Tensor:
        raise NotImplementedError

    def step(self, toks: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def admit(self, ids: list[list[int]], max_new: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def keep(self, idx: torch.Tensor) -> None:
        raise NotImplementedError


class DecoderRunner(Runner):
    """Rows left-padded to one cache position; `admit` merges new rows between steps (see
    `plinth.infer.session.DecodeSession`)."""

    def __init__(self, model, ids, max_new, fast=None):
        self.model, self.fast = model, fast
        self.device = model.embed_tokens.weight.device
        self._first = (ids, max_new)
        self.cache: KVCache | None = None
        self.until: list[int] = []  # per batch row: the cache position it may write up to

    def _forward(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.forward(idx, cache)
        h = self.model.encode(idx, cache)
        return self.model.lm_head(h[:, -1]).float()  # only the last position gets logits

    def prefill(self) -> torch.Tensor:
        ids, max_new = self._first
        return self.admit(ids, [max_new] * len(ids))

    def admit(self, ids: list[list[int]], max_new: list[int]) -> torch.Tensor:
        """Add rows (prompts, each with its max_new_tokens) after the current ones; logits
        (len(ids), V) at their last prompt positions.

        The cache is laid out afresh: every row's real tokens end at P = the longest row (old
        rows' tokens so far, new prompts), old rows shifted by P - pos, and its length is what
        the rows may still write. Each new prompt is prefilled at its own length into a cache
        of its own (no compute on padding; positions count from the row's first token) and
        copied in after its padding, so the row decodes exactly as it would alone."""
        old, dev = self.cache, self.device
        lens = [len(p) for p in ids]
        # identical prompts (n samples of one prompt, RL groups) are prefilled once and their
        # cache rows copied: the same numbers, a fraction of the compute
        first: dict[tuple, int] = {}
        uniq = [first.setdefault(tuple(p), len(first)) for p in ids]
        if old is None and len(set(lens)) == 1:  # a fresh batch of equal lengths: one pass
            rows = [list(k) for k in first]
            self.cache = self.model.new_cache(len(rows), lens[0] + max(max_new))
            self.until = [lens[0] + m for m in max_new]
            logits = self._forward(torch.tensor(rows, device=dev), self.cache)
            if len(rows) == len(ids):
                return logits
            inv = torch.tensor(uniq, device=dev)
            compact_cache(self.cache, inv)
            return logits.index_select(0, inv)
        A = 0 if old is None else old.k.shape[1]
        pos = 0 if old is None else old.pos
        pads = [] if old is None else (
            old.pad.tolist() if old.pad is not None else [0] * A)
        P = max([pos - p for p in pads] + lens)
        delta = P - pos
        until = [u + delta for u in self.until] + [P + m for m in max_new]
        pad = torch.tensor([p + delta for p in pads] + [P - n for n in lens], device=dev)
        cache = self.model.new_cache(A + len(ids), max(until), pad=pad)
        if old is not None:
            if cache.k.dtype != old.k.dtype:
                cache.k, cache.v = cache.k.to(old.k.dtype), cache.v.to(old.v.dtype)
            src, dst = max(0, -delta), max(0, delta)
            cache.k[:, :A, :, dst:P] = old.k[:, :, :, src:pos]
            cache.v[:, :A, :, dst:P] = old.v[:, :, :, src:pos]
        logits, done = [], {}
        for i, p in enumerate(ids):
            if uniq[i] not in done:
                one = self.model.new_cache(1, len(p))
                done[uniq[i]] = (self._forward(torch.tensor([p], device=dev), one), one)
            lg, one = done[uniq[i]]
            logits.append(lg)
            cache.k[:, A + i, :, P - len(p):P] = one.k[:, 0]
            cache.v[:, A + i, :, P - len(p):P] = one.v[:, 0]
        cache.pos = P
        self.cache, self.until = cache, until
        return torch.cat(logits)

    def step(self, toks: torch.Tensor) -> torch.Tensor:
        return self._forward(toks[:, None], self.cache)

    def keep(self, idx: torch.Tensor) -> None:
        compact_cache(self.cache, idx)
        self.until = [self.until[i] for i in idx.tolist()]


class Seq2SeqRunner(Runner):
    """An encoder-decoder batch: the sources, right-padded and masked, are encoded once; every
    row decodes from `start_id`. Rows cannot join a running batch."""

    def __init__(self, model, ids, max_new, start_id):
        self.model = model
        device = model.embed_tokens.weight.device
        S = max(len(p) for p in ids)
        self.src = torch.tensor([p + [0] * (S - len(p)) for p in ids], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (S - len(p)) for p in ids], device=device)
        self.src_mask = None if bool(mask.all()) else mask
        self.cache = model.new_cache(len(ids), max_new + 1)
        self.start = torch.full((len(ids), 1), start_id, dtype=torch.long, device=device)

    def prefill(self) -> torch.Tensor:
        self.memory = self.model.encode(self.src, self.src_mask)  # (B, S, D), once
        return self.step(self.start[:, 0])

    def step(self, toks: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(toks[:, None], self.memory, self.src_mask, self.cache)
        return out[:, -1].float()

    def admit(self, ids, max_new) -> torch.Tensor:
        raise NotSupportedError("an encoder-decoder batch cannot be joined while it runs")

    def keep(self, idx: torch.Tensor) -> None:
        compact_cache(self.cache, idx)
        self.memory = self.memory.index_select(0, idx)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, idx)


def compact_cache(cache: KVCache, idx: torch.Tensor) -> None:
    """Keep rows `idx` of the cache (finished rows stop costing attention and matmul work)."""
    cache.k = cache.k.index_select(1, idx)
    cache.v = cache.v.index_select(1, idx)
    if cache.pad is not None:
        cache.pad = cache.pad.index_select(0, idx)
    for layer, (k, v) in list(cache.cross.items()):
        cache.cross[layer] = (k.index_select(0, idx), v.index_select(0, idx))
