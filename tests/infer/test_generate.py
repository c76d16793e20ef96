"""Generation: KV-cache decoding equals full-forward decoding; sampling is seeded and bounded.

    python -m pytest tests/infer/test_generate.py -q
"""

from __future__ import annotations

import pytest
import torch

from plinth.config.schema import ModelConfig
from plinth.infer.sampling import _BatchSampler, generate
from plinth.models import build_model

V = 53
PROMPTS = [[5, 9, 13, 2, 40, 41, 7, 8, 30], [11], [3, 3, 3, 4], [50, 20]]


def tiny(**kw):
    base = dict(n_layers=2, d_model=48, n_heads=4, vocab_size=V, max_seq_len=64)
    base.update(kw)
    torch.manual_seed(0)
    return build_model(ModelConfig(**base))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_heads=2, qk_norm=True),
    dict(n_kv_heads=1, positional="learned", norm="layernorm", bias=True, activation="gelu"),
    dict(tie_embeddings=True, activation="relu2", qkv_bias=True),
])
def test_cached_greedy_equals_full_forward_greedy(kw):
    model = tiny(**kw)
    cached = generate(model, PROMPTS, max_new_tokens=24)
    full = generate(model, PROMPTS, max_new_tokens=24, use_cache=False)
    assert cached == full
    assert [len(r) for r in cached] == [24] * 4
    # and each row is what the prompt gives alone (padding never leaks between rows)
    assert generate(model, [PROMPTS[1]], max_new_tokens=24) == [cached[1]]


def test_cached_generation_matches_a_hand_written_greedy_loop():
    model = tiny().eval()
    seq = torch.tensor([PROMPTS[0]])
    for _ in range(10):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert generate(model, [PROMPTS[0]], 10) == [seq[0, len(PROMPTS[0]):].tolist()]


def test_tensor_prompts_and_training_mode_is_restored():
    model = tiny(dropout=0.3)
    model.train()
    a = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 8)
    assert model.training
    assert a == generate(model, [[1, 2, 3], [4, 5, 6]], 8)  # eval inside: dropout off


def test_encoder_decoder_cached_equals_uncached():
    model = tiny(arch="encoder_decoder", n_decoder_layers=1, n_kv_heads=2)
    a = generate(model, PROMPTS, 16, decoder_start_id=0)
    b = generate(model, PROMPTS, 16, decoder_start_id=0, use_cache=False)
    assert a == b and len(a[0]) == 16
    # padding of shorter sources does not change their output
    assert generate(model, [PROMPTS[1]], 16, decoder_start_id=0) == [a[1]]
    with pytest.raises(ValueError, match="decoder_start_id"):
        generate(model, PROMPTS, 4)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = tiny()

    def run(seed, use_cache=True):
        g = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, 20, temperature=1.0, top_k=20, top_p=0.95, generator=g,
                        use_cache=use_cache)

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert run(3, use_cache=False) == run(3, use_cache=False)


def test_eos_ends_a_row_and_is_included():
    model = tiny()
    greedy = generate(model, PROMPTS, 12)
    eos = greedy[0][3]
    out = generate(model, PROMPTS, 12, eos_id=eos)
    assert out[0] == greedy[0][: greedy[0].index(eos) + 1]
    for row, ref in zip(out, greedy, strict=True):
        expected = ref[: ref.index(eos) + 1] if eos in ref else ref
        assert row == expected


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = tiny()
    greedy = generate(model, PROMPTS, 10)
    g = torch.Generator().manual_seed(0)
    assert generate(model, PROMPTS, 10, temperature=1.5, top_k=1, generator=g) == greedy
    assert generate(model, PROMPTS, 10, temperature=1.5, top_p=1e-6, generator=g) == greedy


def test_sampler_distribution_respects_top_k_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(_BatchSampler(1.0, None, 0.7, 1.0, g)(logits), minlength=4)
    assert counts[2:].sum() == 0  # 0.5 + 0.3 >= 0.7: the rest is cut
    assert counts[0] / 20000 == pytest.approx(0.5 / 0.8, abs=0.02)
    counts = torch.bincount(_BatchSampler(1.0, 3, None, 1.0, g)(logits), minlength=4)
    assert counts[3] == 0 and counts[2] / 20000 == pytest.approx(0.15 / 0.95, abs=0.01)
    counts = torch.bincount(_BatchSampler(1.0, None, None, 1.0, g)(logits), minlength=4)
    assert counts[3] / 20000 == pytest.approx(0.05, abs=0.01)


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([[2.0, 1.9, -1.0]])
    sampler = _BatchSampler(0.0, None, None, 2.0, None)
    assert sampler(logits, torch.tensor([[1]])).item() == 0
    assert sampler(logits, torch.tensor([[0]])).item() == 1  # 2.0 / 2 < 1.9


def test_bad_requests():
    with pytest.raises(ValueError, match="encoder-only"):
        generate(tiny(arch="encoder"), PROMPTS, 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(tiny(positional="learned", max_seq_len=12), PROMPTS, 8)
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny(), [[1], []], 4)


def test_repetition_penalty_ignores_left_padding():
    model = tiny()
    short = PROMPTS[1]  # the row that gets left-padded (with token 0) in the batch
    first = generate(model, [short], 1)[0][0]
    with torch.no_grad():  # make token 0 narrowly the favourite after `short`
        model.lm_head.weight[0] = 1.05 * model.lm_head.weight[first]
    kw = dict(max_new_tokens=10, repetition_penalty=1.3)
    alone = [generate(model, [p], **kw)[0] for p in PROMPTS]
    assert alone[1][0] == 0  # 0 is not in the prompt, so not penalised...
    assert generate(model, PROMPTS, **kw) == alone  # ...even when the padding slots hold 0
    assert alone != [generate(model, [p], 10)[0] for p in PROMPTS]  # the penalty acts


def test_wrapped_models_generate_with_the_plain_module():
    model = tiny()
    compiled = torch.compile(model)  # never traced: generate unwraps it
    assert generate(compiled, PROMPTS, 6) == generate(model, PROMPTS, 6)
