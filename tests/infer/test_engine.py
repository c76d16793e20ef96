"""Engine.generate: KV-cache decoding equals full-forward decoding, batched equals one-by-one,
seeded sampling is reproducible and independent of the batch, and every decoding control does
what it says, checked by numbers.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_engine.py -q
"""

from __future__ import annotations

import pytest
import torch
from infer_helpers import V, tiny_engine

from plinth.errors import UsageError
from plinth.infer.engine import SamplingParams
from plinth.infer.sampler import apply_penalties, draw, filter_logits
from plinth.infer.sampling import generate as reference_generate

PROMPTS = [[5, 9, 13, 2, 40, 41, 7, 8, 30], [11], [3, 3, 3, 4], [50, 20]]


def full_forward_greedy(model, prompt, n):
    """Greedy tokens and the logits each was chosen from, re-reading the whole sequence every
    step (no cache): the reference."""
    seq, logits = torch.tensor([prompt]), []
    with torch.no_grad():
        for _ in range(n):
            out = model(seq)[0, -1]
            logits.append(out)
            seq = torch.cat([seq, out.argmax()[None, None]], dim=1)
    return seq[0, len(prompt):].tolist(), torch.stack(logits)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_heads=2, qk_norm=True),
    dict(n_kv_heads=1, positional="learned", norm="layernorm", bias=True, activation="gelu"),
    dict(tie_embeddings=True, activation="relu2", qkv_bias=True),
])
def test_cached_batched_greedy_equals_full_forward(kw):
    eng = tiny_engine(**kw)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=20))
    for p, c in zip(PROMPTS, out, strict=True):
        ref, _ = full_forward_greedy(eng.model, p, 20)
        assert c.token_ids == ref
        assert c.finish_reason == "length" and c.prompt_tokens == len(p)
        assert c.text == " ".join(f"w{t}" for t in ref)


def test_encoder_decoder_equals_uncached_reference():
    eng = tiny_engine(arch="encoder_decoder", n_decoder_layers=1, n_kv_heads=2)
    out = eng.generate(PROMPTS, SamplingParams(max_new_tokens=12))
    ref = reference_generate(eng.model, PROMPTS, 12, decoder_start_id=eng._decoder_start,
                             use_cache=False)
    assert [c.token_ids for c in out] == ref
    alone = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=12))
    assert alone[0].token_ids == ref[1]
    # rows finishing at different steps leave the batch (memory and cache compacted)
    mixed = eng.generate(PROMPTS, [SamplingParams(max_new_tokens=n) for n in (3, 12, 7, 1)])
    assert [c.token_ids for c in mixed] == [r[:n] for r, n in zip(ref, (3, 12, 7, 1),
                                                                   strict=True)]


MIXED = [
    SamplingParams(max_new_tokens=14),
    SamplingParams(max_new_tokens=9, temperature=0.9, top_k=10, seed=3),
    SamplingParams(max_new_tokens=16, temperature=1.3, top_p=0.8, min_p=0.05, seed=4,
                   repetition_penalty=1.5),
    SamplingParams(max_new_tokens=5, frequency_penalty=0.7, presence_penalty=0.4, logprobs=2),
]


def test_batched_mixed_params_equal_one_by_one():
    eng = tiny_engine()
    batch = eng.generate(PROMPTS, MIXED)
    for p, sp, c in zip(PROMPTS, MIXED, batch, strict=True):
        alone = eng.generate([p], sp)[0]
        assert c.token_ids == alone.token_ids and c.text == alone.text
        assert len(c.token_ids) == sp.max_new_tokens
    torch.testing.assert_close(torch.tensor(batch[3].logprobs),
                               torch.tensor(eng.generate([PROMPTS[3]], MIXED[3])[0].logprobs))


def test_seeded_sampling_reproducible_seed_dependent_and_batch_independent():
    eng = tiny_engine()
    sp = SamplingParams(max_new_tokens=20, temperature=1.0, seed=7)
    a = eng.generate([PROMPTS[0]], sp)[0].token_ids
    assert eng.generate([PROMPTS[0]], sp)[0].token_ids == a
    other = SamplingParams(max_new_tokens=20, temperature=1.0, seed=8)
    assert eng.generate([PROMPTS[0]], other)[0].token_ids != a
    # the same row next to different batch-mates (sampled, longer, shorter) gives the same tokens
    mates = [SamplingParams(max_new_tokens=3, temperature=2.0, seed=1),
             SamplingParams(max_new_tokens=30, temperature=0.5, seed=2)]
    out = eng.generate([PROMPTS[2], PROMPTS[0], PROMPTS[3]], [mates[0], sp, mates[1]])
    assert out[1].token_ids == a
    # unseeded rows differ between calls (a fresh generator each time)
    free = SamplingParams(max_new_tokens=20, temperature=1.0)
    assert eng.generate([PROMPTS[0]], free)[0].token_ids != eng.generate([PROMPTS[0]],
                                                                          free)[0].token_ids


@pytest.mark.parametrize("mixed", [False, True])
def test_repeated_prompts_share_their_prefill_and_decode_as_alone(mixed):
    """n samples of one prompt (GRPO groups) are prefilled once and copied; each row still
    decodes exactly as it would alone, with equal-length and ragged batches."""
    eng = tiny_engine()
    prompts = [PROMPTS[0]] * 3 + ([PROMPTS[2], PROMPTS[0]] if mixed else [PROMPTS[0]])
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, seed=s) for s in range(4)]
    params += [SamplingParams(max_new_tokens=12, temperature=1.0, seed=9)] * mixed
    together = eng.generate(prompts, params)
    for p, sp, out in zip(prompts, params, together, strict=True):
        assert eng.generate([p], sp)[0].token_ids == out.token_ids
    assert len({tuple(o.token_ids) for o in together[:3]}) > 1  # different seeds, different rows


def test_sampled_tokens_follow_the_distribution():
    """draw() picks token i with probability p_i (a seeded chi-square-free check: frequencies
    of 20000 draws within 0.015 of the probabilities), and never a zero-probability token."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    toks = draw(probs, u)
    freq = torch.bincount(toks, minlength=5).float() / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert freq[1] == 0 and freq[4] == 0
    assert draw(probs[:1], torch.tensor([1.0 - 1e-12])).item() == 3  # top end: last nonzero


def test_top_k_top_p_min_p_keep_exactly_the_documented_tokens():
    logits = torch.log(torch.tensor([[0.4, 0.25, 0.15, 0.1, 0.06, 0.04]]))
    kept = lambda out: torch.isfinite(out[0]).nonzero().squeeze(1).tolist()  # noqa: E731
    assert kept(filter_logits(logits, [3], [None], [None])) == [0, 1, 2]
    # top-p 0.7: 0.4 + 0.25 = 0.65 < 0.7, so the third token is needed; 0.65 + 0.15 >= 0.7
    assert kept(filter_logits(logits, [None], [0.7], [None])) == [0, 1, 2]
    assert kept(filter_logits(logits, [None], [0.65], [None])) == [0, 1]
    # min-p 0.3: keep p >= 0.3 * 0.4 = 0.12
    assert kept(filter_logits(logits, [None], [None], [0.3])) == [0, 1, 2]
    assert kept(filter_logits(logits, [None], [None], [0.25])) == [0, 1, 2, 3]
    # per row: three rows, three different rules, one call
    three = logits.repeat(3, 1)
    out = filter_logits(three, [2, None, None], [None, 0.5, None], [None, None, 0.5])
    assert [torch.isfinite(r).sum().item() for r in out] == [2, 2, 2]
    # the kept logits are unchanged (renormalised by the softmax later)
    torch.testing.assert_close(out[0, :2], logits[0, :2])


def test_penalties_change_logits_by_the_documented_amounts():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False], [False] * 4])
    counts = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]])
    out = apply_penalties(logits, seen, counts, torch.tensor([2.0, 1.0]),
                          torch.tensor([0.0, 0.5]), torch.tensor([0.0, 0.25]))
    # row 0: CTRL: positive logits halved, negative doubled, unseen unchanged
    assert out[0].tolist() == [1.0, -2.0, 0.5, 3.0]
    # row 1: - 0.5 * count - 0.25 * (count > 0)
    assert out[1].tolist() == [2.0 - 1.5 - 0.25, -1.0, 0.5 - 0.5 - 0.25, 3.0]


def test_presence_penalty_stops_repeats_end_to_end():
    eng = tiny_engine()
    plain = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30))[0].token_ids
    assert len(set(plain)) < 30  # greedy repeats itself
    pen = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30,
                                                    presence_penalty=100.0))[0].token_ids
    assert len(set(pen)) == 30
    rep = eng.generate([PROMPTS[1]], SamplingParams(max_new_tokens=30, repetition_penalty=1e6,
                                                    ))[0].token_ids
    assert not set(rep) & {11} and len(set(rep)) > len(set(plain))


def test_logprobs_equal_log_softmax_of_full_forward_logits():
    eng = tiny_engine()
    c = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, logprobs=3))[0]
    ref, logits = full_forward_greedy(eng.model, PROMPTS[0], 8)
    lp = logits.log_softmax(-1)
    assert c.token_ids == ref
    torch.testing.assert_close(torch.tensor(c.logprobs), lp[torch.arange(8), ref],
                               atol=1e-5, rtol=0)
    for step, top in enumerate(c.top_logprobs):
        vals, idx = lp[step].topk(3)
        # keys are the text each token would add there (" w7" after the first token)
        assert list(top) == [f"{' ' if step else ''}w{i}" for i in idx.tolist()]
        torch.testing.assert_close(torch.tensor(list(top.values())), vals, atol=1e-5, rtol=0)
    # logprobs=0: the chosen token's only
    c0 = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, logprobs=0))[0]
    assert c0.top_logprobs is None and len(c0.logprobs) == 8


def test_stop_string_spanning_tokens_is_cut_and_held_back_from_streaming():
    eng = tiny_engine()
    full = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0]
    words = full.text.split()
    stop = f"{words[4][1:]} {words[5]}"  # starts inside token 5's text, ends in token 6
    streamed = []
    c = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop=[stop, "zzz"]),
                     on_token=lambda r, t, d: streamed.append((t, d)))[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == full.token_ids[:6]  # generation ends on the token completing it
    assert c.text == " ".join(words[:4]) + " w"
    assert "".join(d for _, d in streamed) == c.text
    assert [t for t, _ in streamed] == c.token_ids
    # the start of the stop string (inside token 5) was held back, never sent
    assert "".join(d for _, d in streamed[:5]) == " ".join(words[:4]) + " w"
    assert streamed[5][1] == ""
    # a stop string that never appears: everything streamed, finish by length
    c2 = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop=["w99"]))[0]
    assert c2.finish_reason == "length" and c2.text == full.text


def test_stop_tokens_and_eos():
    eng = tiny_engine()
    full = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0].token_ids
    t = full[3]
    first = full.index(t)
    c = eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, stop_token_ids=[t]))[0]
    assert c.token_ids == full[: first + 1] and c.finish_reason == "stop"
    assert c.text == " ".join(f"w{i}" for i in full[:first])  # the stop token's text is not
    eos = tiny_engine(eos_ids=[t])
    assert eos.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12))[0].token_ids == \
        c.token_ids
    ign = eos.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert ign.token_ids == full and ign.finish_reason == "length"


def test_on_token_streams_every_row_and_cancel_ends_one_row():
    eng = tiny_engine()
    seen: dict[int, list[int]] = {0: [], 1: []}

    def on_token(row, tok, delta):
        seen[row].append(tok)
        return not (row == 0 and len(seen[0]) == 3)  # cancel row 0 after its third token

    out = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=10), on_token=on_token)
    assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) == 3
    assert seen[0] == out[0].token_ids and seen[1] == out[1].token_ids
    assert out[1].token_ids == eng.generate([PROMPTS[1]], SamplingParams(10))[0].token_ids


def test_text_prompts_and_bad_input():
    eng = tiny_engine()
    by_text = eng.generate(["w5 w9 w13"], SamplingParams(6))[0]
    assert by_text.token_ids == eng.generate([[5, 9, 13]], SamplingParams(6))[0].token_ids
    with pytest.raises(UsageError, match="more than this model's context of 64"):
        eng.generate([PROMPTS[0]], SamplingParams(max_new_tokens=60))
    with pytest.raises(UsageError, match=r"top_p=1\.5"):
        eng.generate([PROMPTS[0]], SamplingParams(top_p=1.5))
    with pytest.raises(UsageError, match=f"outside the vocabulary \\(0..{V - 1}\\)"):
        eng.generate([[V + 3]], SamplingParams(4))
    with pytest.raises(UsageError, match="no chat template"):
        eng.apply_chat_template([{"role": "user", "content": "hi"}])
