"""Beam search for the engine, as transformers does it (tested equal to it on an imported Llama,
and to an exhaustive search on a 5-token vocabulary); decoder and encoder-decoder models.

    python -c "from plinth.infer.engine import Engine; e = Engine.load('ref-smollm2'); \
print([c.text for c in e.beam_search(['The best'], num_beams=4, num_return_sequences=2)[0]])"
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from plinth.infer.params import Completion

if TYPE_CHECKING:
    from plinth.infer.engine import Engine


def beam_search(
    engine: Engine,
    ids: list[list[int]],
    *,
    num_beams: int,
    length_penalty: float,
    early_stopping: bool,
    max_new_tokens: int,
    num_return_sequences: int,
) -> list[list[Completion]]:
    """The `num_return_sequences` best sequences of each prompt (token ids, checked), best
    first: see `Engine.beam_search`."""
    B, nb, dev = len(ids), num_beams, engine.model_device
    runner = engine.new_runner(ids, max_new_tokens)
    logits = runner.prefill()  # (B, V)
    expand = torch.arange(B, device=dev).repeat_interleave(nb)
    runner.keep(expand)  # every beam of a prompt starts from its prompt's cache
    logits = logits.index_select(0, expand)  # (B * nb, V)
    # only beam 0 is live at first (the others are copies): the rest start at -1e9
    scores = torch.full((B, nb), -1e9, device=dev)
    scores[:, 0] = 0.0
    scores = scores.view(-1)
    hist: list[list[int]] = [[] for _ in range(B * nb)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    eos = set(engine.eos_ids)
    V = logits.shape[1]
    for t in range(1, max_new_tokens + 1):
        logp = logits.float().log_softmax(dim=-1)  # (B * nb, V)
        cand = (scores[:, None] + logp).view(B, nb * V)
        # as transformers: enough candidates that nb stay live after eos ones are set aside
        keep = min(max(2, 1 + len(eos)) * nb, nb * V)
        top_s, top_i = cand.topk(keep, dim=1)  # (B, keep), best first
        top_s, top_i = top_s.tolist(), top_i.tolist()
        last = t == max_new_tokens
        next_rows, next_toks, next_scores = [], [], []
        for b in range(B):
            live = []
            for rank, (sc, flat) in enumerate(zip(top_s[b], top_i[b], strict=True)):
                beam, tok = divmod(flat, V)
                row = b * nb + beam
                ends = tok in eos
                if (ends or last) and rank < nb and not done[b]:
                    _add_hypothesis(finished[b], nb, sc / t**length_penalty,
                                    hist[row] + [tok], early_stopping)
                if not ends and len(live) < nb:
                    live.append((sc, row, tok))
            while len(live) < nb:  # fewer live candidates than beams (tiny vocabularies)
                live.append((-1e9, b * nb, 0))
            if not done[b] and len(finished[b]) == nb:
                best_live = live[0][0] / t**length_penalty
                worst = min(h[0] for h in finished[b])
                done[b] = early_stopping or best_live <= worst
            for sc, row, tok in live:
                next_rows.append(row)
                next_toks.append(tok)
                next_scores.append(sc)
        if last or all(done):
            break
        hist = [hist[r] + [tok] for r, tok in zip(next_rows, next_toks, strict=True)]
        sel = torch.tensor(next_rows, device=dev)
        runner.keep(sel)  # reorder the cache: each new beam continues its parent's rows
        scores = torch.tensor(next_scores, device=dev)
        logits = runner.step(torch.tensor(next_toks, device=dev))
    out = []
    for b in range(B):
        hyps = sorted((h for h in finished[b] if h[0] > -1e8), key=lambda h: -h[0])
        out.append([_completion(engine, ids[b], toks, sc)
                    for sc, toks in hyps[:num_return_sequences]])
    return out


def _completion(engine: Engine, prompt: list[int], toks: list[int], score: float) -> Completion:
    """A finished hypothesis as a Completion (its text without a final eos)."""
    ends = bool(toks) and toks[-1] in engine.eos_ids
    return Completion(
        token_ids=toks,
        text=engine.decode(toks[:-1] if ends else toks),
        finish_reason="stop" if ends else "length",
        prompt_tokens=len(prompt),
        score=score,
    )


def _add_hypothesis(hyps: list, n: int, score: float, toks: list[int], early: bool) -> None:
    """Keep the n best (score, tokens) hypotheses; with early stopping a full set takes no
    more (as transformers)."""
    if len(hyps) < n:
        hyps.append((score, toks))
        return
    if early:
        return
    worst = min(range(n), key=lambda i: hyps[i][0])
    if score > hyps[worst][0]:
        hyps[worst] = (score, toks)
