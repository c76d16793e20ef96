"""The engine's per-row sampling: every row of a batch carries its own `SamplingParams`, applied
as (rows, vocab) tensors so one set of tensor operations serves all rows, and draws its token
from its own `torch.Generator`, so a seeded row's tokens do not depend on its batch-mates.

    python -c "import torch; from plinth.infer.sampler import draw; \
print(draw(torch.tensor([[0.1, 0.9]]), torch.tensor([0.5])))"

Order, as transformers: penalties (repetition, frequency, presence) on the raw logits, then
temperature, top-k, top-p, min-p, then one inverse-CDF draw per row. Log-probabilities are of the
model's raw logits (before penalties and temperature).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from plinth.infer.session import Row


def row_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A row's own generator: seeded (same seed -> same tokens), or a fresh random seed."""
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(int(seed))
    else:
        generator.seed()
    return generator


class RowSampler:
    """Next tokens for the active rows from their logits, with every row's own parameters as
    (A,) tensors, so one set of tensor operations serves all rows. A row (`session.Row`) brings
    its index, prompt, params and generator; `keep` sets the active rows in batch order."""

    def __init__(self, rows: list[Row], vocab: int, device: torch.device):
        self.V, self.device = vocab, device
        self.rows: dict[int, Row] = {}
        # penalty state for every row (kept by row index; only rows that use it cost anything)
        self.counts: dict[int, torch.Tensor] = {}  # generated-token counts (V,)
        self.seen: dict[int, torch.Tensor] = {}  # prompt + generated tokens (bool V,)
        self.add(rows)
        self._set([r.index for r in rows])
        self._info = None

    def add(self, rows: list[Row]) -> None:
        """Take on new rows (their penalty state); `keep` makes them active."""
        vocab, device = self.V, self.device
        for r in rows:
            self.rows[r.index] = r
            sp = r.params
            if sp.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[torch.tensor(r.prompt, device=device)] = True
                self.seen[r.index] = seen
            if sp.frequency_penalty or sp.presence_penalty:
                self.counts[r.index] = torch.zeros(vocab, device=device)

    def _set(self, active: list[int]) -> None:
        self.active = active
        ps = [self.rows[r].params for r in active]
        dev = self.device
        self.sampling = [j for j, p in enumerate(ps) if p.temperature > 0]
        self.any_penalty = any(
            p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in ps
        )
        self.want_logprobs = [j for j, p in enumerate(ps) if p.logprobs is not None]
        if self.sampling:
            sp = [ps[j] for j in self.sampling]
            self.s_idx = torch.tensor(self.sampling, device=dev)
            self.temp = torch.tensor([p.temperature for p in sp], device=dev)[:, None]
            self.top_k = [p.top_k for p in sp]
            self.top_p = [p.top_p for p in sp]
            self.min_p = [p.min_p for p in sp]

    def keep(self, active: list[int]) -> None:
        """Make `active` the rows sampled, in batch order; the others are forgotten."""
        live = set(active)
        for d in (self.rows, self.seen, self.counts):
            for r in [r for r in d if r not in live]:
                del d[r]
        self._set(active)

    def done_step(self) -> None:
        """Forget the step's logprobs (the rows have taken them)."""
        self._info = None

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [j for j, r in enumerate(self.active) if r in self.seen or r in self.counts]
        if not rows:
            return logits
        V, dev = logits.shape[1], self.device
        rs = [self.active[j] for j in rows]
        ps = [self.rows[r].params for r in rs]
        none_seen = torch.zeros(V, dtype=torch.bool, device=dev)
        none_count = torch.zeros(V, device=dev)
        idx = torch.tensor(rows, device=dev)
        sub = apply_penalties(
            logits.index_select(0, idx),
            torch.stack([self.seen.get(r, none_seen) for r in rs]),
            torch.stack([self.counts.get(r, none_count) for r in rs]),
            torch.tensor([p.repetition_penalty for p in ps], device=dev),
            torch.tensor([p.frequency_penalty for p in ps], device=dev),
            torch.tensor([p.presence_penalty for p in ps], device=dev),
        )
        return logits.index_copy(0, idx, sub)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Tokens (A,) for logits (A, V) of the active rows."""
        raw = logits
        if self.any_penalty:
            logits = self._penalise(logits)
        toks = logits.argmax(dim=-1)
        if self.sampling:
            sub = logits.index_select(0, self.s_idx) / self.temp
            sub = filter_logits(sub, self.top_k, self.top_p, self.min_p)
            probs = sub.softmax(dim=-1)
            u = torch.cat([
                torch.rand(1, generator=self.rows[self.active[j]].generator,
                           device=self.rows[self.active[j]].generator.device).to(self.device)
                for j in self.sampling
            ])
            toks = toks.index_copy(0, self.s_idx, draw(probs, u))
        self._raw, self._toks = raw, toks
        if self.want_logprobs:
            self._compute_logprobs()
        for j, r in enumerate(self.active):  # penalty state sees the new token
            if r in self.seen:
                self.seen[r][toks[j]] = True
            if r in self.counts:
                self.counts[r][toks[j]] += 1
        return toks

    def _compute_logprobs(self) -> None:
        idx = torch.tensor(self.want_logprobs, device=self.device)
        lp = self._raw.index_select(0, idx).log_softmax(dim=-1)  # (W, V) of the model's logits
        chosen = lp.gather(1, self._toks.index_select(0, idx)[:, None]).squeeze(1).tolist()
        n = max(self.rows[self.active[j]].params.logprobs for j in self.want_logprobs)
        top = lp.topk(n, dim=-1) if n > 0 else None
        info = {}
        for w, j in enumerate(self.want_logprobs):
            k = self.rows[self.active[j]].params.logprobs
            tops = None
            if k > 0:
                tops = list(zip(top.indices[w, :k].tolist(), top.values[w, :k].tolist(),
                                strict=True))
            info[j] = (chosen[w], tops)
        self._info = info

    def logprob_info(self, j: int):
        """(chosen token's logprob, [(token, logprob)] of the top n or None) of active row j
        this step; None when the row asked for none."""
        return None if self._info is None else self._info.get(j)


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Logits (R, V) with each row's penalties: a token in `seen` (R, V) (prompt or generated)
    has its logit divided by `repetition` (R,) when positive and multiplied by it when negative
    (CTRL, as transformers); then `frequency * count + presence * (count > 0)` is subtracted,
    with `counts` (R, V) the times each token was generated (OpenAI's rule, as vLLM)."""
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_logits(logits: torch.Tensor, top_k: list, top_p: list, min_p: list) -> torch.Tensor:
    """Tempered logits (R, V) with the tokens each row's top-k, top-p and min-p (each a list of
    per-row values or None) rule out set to -inf, in that order (as transformers applies them).
    top-k keeps the k highest; top-p the smallest set of highest tokens whose probability
    reaches p; min-p the tokens with probability >= min_p * (the highest probability)."""
    V = logits.shape[1]
    ninf = float("-inf")
    if any(k is not None and k < V for k in top_k) or any(p is not None and p < 1 for p in top_p):
        srt, order = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([V if k is None else min(k, V) for k in top_k], device=logits.device)
        rank = torch.arange(V, device=logits.device)[None, :]
        srt = srt.masked_fill(rank >= ks[:, None], ninf)
        if any(p is not None and p < 1 for p in top_p):
            ps = torch.tensor([2.0 if p is None else p for p in top_p], device=logits.device)
            probs = srt.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (keeps the first)
            srt = srt.masked_fill(probs.cumsum(dim=-1) - probs >= ps[:, None], ninf)
        logits = torch.full_like(logits, ninf).scatter(1, order, srt)
    if any(m for m in min_p):
        ms = torch.tensor([m or 0.0 for m in min_p], device=logits.device)[:, None]
        probs = logits.softmax(dim=-1)
        keep = probs >= ms * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(~keep, ninf)
    return logits


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (R, V) by inverse transform sampling with uniforms u (R,):
    the first token whose cumulative probability exceeds u * total. Each row uses only its own
    uniform, so its draw does not depend on the other rows."""
    cdf = probs.double().cumsum(dim=-1)  # float64: no drift over a 100k vocabulary
    total = cdf[:, -1:]
    t = torch.searchsorted(cdf, u.double()[:, None] * total, right=True).squeeze(1)
    last = (cdf < total).sum(dim=-1)  # the last token with probability > 0
    return torch.minimum(t, last)

