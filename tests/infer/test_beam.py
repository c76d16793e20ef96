"""Beam search: equals an exhaustive search on a tiny vocabulary (decoder and encoder-decoder) and
transformers' beam search on an imported Llama (sequences and scores).

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_beam.py -q
"""

from __future__ import annotations

import itertools

import pytest
import torch
from infer_helpers import tiny_engine

from plinth.errors import UsageError
from plinth.infer.engine import Engine, SamplingParams

EOS, STEPS = 4, 3


def brute_force(eng, prompt, length_penalty):
    """Every sequence of up to STEPS tokens over the 5-token vocabulary that is either cut at
    STEPS tokens or ends at its first eos, with score sum(logprob) / len ** length_penalty."""
    model = eng.model

    def logp(prefix):
        with torch.no_grad():
            if eng.arch == "encoder_decoder":
                tgt = torch.tensor([[eng._decoder_start, *prefix]])
                out = model(torch.tensor([prompt]), tgt)[0, -1]
            else:
                out = model(torch.tensor([prompt + prefix]))[0, -1]
        return out.float().log_softmax(-1)

    seqs = []
    for n in range(1, STEPS + 1):
        for seq in itertools.product(range(5), repeat=n):
            if EOS in seq[:-1] or (n < STEPS and seq[-1] != EOS):
                continue
            total = sum(float(logp(list(seq[:i]))[t]) for i, t in enumerate(seq))
            seqs.append((total / n**length_penalty, list(seq)))
    return sorted(seqs, key=lambda s: -s[0])


@pytest.mark.parametrize("arch", ["decoder", "encoder_decoder"])
@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5])
def test_wide_beam_equals_brute_force_on_a_tiny_vocabulary(arch, length_penalty):
    kw = dict(vocab_size=5) if arch == "decoder" else dict(
        vocab_size=5, arch="encoder_decoder", n_decoder_layers=1)
    eng = tiny_engine(eos_ids=[EOS], **kw)
    prompt = [1, 3, 0, 2]
    # 25 beams hold every prefix of 2 tokens, so nothing is pruned: beam search is exhaustive
    got = eng.beam_search([prompt], num_beams=25, length_penalty=length_penalty,
                          max_new_tokens=STEPS, num_return_sequences=12)[0]
    want = brute_force(eng, prompt, length_penalty)[:12]
    assert [c.token_ids for c in got] == [s for _, s in want]
    torch.testing.assert_close(torch.tensor([c.score for c in got]),
                               torch.tensor([s for s, _ in want]), atol=1e-5, rtol=0)
    for c in got:
        assert c.finish_reason == ("stop" if c.token_ids[-1] == EOS else "length")


@pytest.mark.parametrize("num_beams,length_penalty,early_stopping", [
    (4, 1.0, False), (3, 2.0, True), (5, 0.5, False), (2, -1.0, True),
])
def test_beam_search_matches_transformers(tiny_hf, num_beams, length_penalty, early_stopping):
    hf, path = tiny_hf
    eng = Engine.load(str(path))
    eos = 32  # a token this model likes: hypotheses end at different lengths
    eng.eos_ids = [eos]
    prompts = [[5, 9, 13, 20], [7, 8]]
    got = eng.beam_search(prompts, num_beams=num_beams, length_penalty=length_penalty,
                          early_stopping=early_stopping, max_new_tokens=9,
                          num_return_sequences=2)
    for p, hyps in zip(prompts, got, strict=True):  # one at a time: no padding on HF's side
        out = hf.generate(torch.tensor([p]), num_beams=num_beams, length_penalty=length_penalty,
                          early_stopping=early_stopping, max_new_tokens=9, do_sample=False,
                          num_return_sequences=2, eos_token_id=eos, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True)
        rows = out.sequences[:, len(p):].tolist()  # finished rows are padded after their eos
        want = [row[: row.index(eos) + 1] if eos in row else row for row in rows]
        assert [c.token_ids for c in hyps] == want
        torch.testing.assert_close(torch.tensor([c.score for c in hyps]),
                                   out.sequences_scores.float(), atol=1e-4, rtol=0)
    assert any(c.finish_reason == "stop" for hyps in got for c in hyps)


def test_beam_of_one_is_greedy_and_bad_arguments():
    eng = tiny_engine()
    greedy = eng.generate([[5, 9, 13]], SamplingParams(max_new_tokens=8))[0].token_ids
    assert eng.beam_search([[5, 9, 13]], num_beams=1, max_new_tokens=8)[0][0].token_ids == greedy
    with pytest.raises(UsageError, match="num_return_sequences=5"):
        eng.beam_search([[1]], num_beams=4, num_return_sequences=5)
