"""Bottleneck adapters, prefix tuning, IA3 and full fine-tuning: how they start, that they train
(loss falls on a tiny memorisation task) with only their own parameters changing, the disable
switch, prefix generation with a KV cache, and freezing.

    python -m pytest tests/peft/test_methods.py -q -s
"""

from __future__ import annotations

import pytest
import torch
from peft_helpers import V, batch, ft, hf_llama_pair, snapshot, tiny_model, train

from plinth.config.schema import ModelConfig
from plinth.errors import NotSupportedError, UsageError
from plinth.infer.sampling import generate
from plinth.models import build_model
from plinth.peft import apply_method, disable_adapters, merge, unmerge

# learning rates that move each method's few parameters visibly in 30 steps
LR = {"adapter": 3e-2, "prefix": 3e-1, "ia3": 1e-1, "lora": 1e-2, "dora": 1e-2, "qlora": 1e-2}


@pytest.mark.parametrize("method", ["adapter", "prefix", "ia3", "lora", "dora", "qlora"])
def test_method_starts_at_the_base_and_trains_only_its_parameters(method):
    # a base with larger random weights than a fresh init, so its features are not all tiny
    _, model = hf_llama_pair()
    x = batch(b=2)
    with torch.no_grad():
        ref = model(x)
    summary = apply_method(model, ft(method, rank=4))
    with torch.no_grad():
        start = model(x)
    diff = (start - ref).abs().max().item()
    rel = ((start - ref).norm() / ref.norm()).item()
    before = snapshot(model)
    losses = train(model, x, steps=30, lr=LR[method])
    print(f"{method}: start vs base max abs diff {diff:.2e} (relative RMS {rel:.3f}); loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f} over 30 steps; {summary}")
    if method in ("adapter", "ia3", "lora"):
        assert diff <= 1e-6
    elif method == "dora":
        assert diff <= 1e-5
    elif method == "prefix":
        # not equal: near-zero prefixes still take attention weight from the real tokens (the
        # first positions most), which shrinks attention outputs; see plinth.peft.prefix
        assert 0 < rel < 0.7
    assert losses[-1] < 0.85 * losses[0] and losses[-1] < min(losses[:5])
    after = model.state_dict()
    own = {n for n, p in model.named_parameters() if p.requires_grad}
    assert own and summary.trainable == sum(model.get_parameter(n).numel() for n in own)
    for k, v in before.items():
        if k in own:
            assert not torch.equal(after[k], v), f"{k} did not train"
        else:
            assert torch.equal(after[k], v), f"base tensor {k} changed"


@pytest.mark.parametrize("method", ["adapter", "prefix", "ia3"])
def test_disable_adapters_gives_the_base(method):
    model = tiny_model()
    x = batch()
    with torch.no_grad():
        ref = model(x)
    apply_method(model, ft(method, rank=4))
    train(model, x, steps=3, lr=LR[method])
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        with disable_adapters(model):
            torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)
        assert torch.equal(model(x), adapted)  # switched back on


def test_ia3_merges_and_adapters_refuse_to():
    model = tiny_model()
    apply_method(model, ft("ia3"))
    train(model, batch(), steps=3, lr=0.1)
    model.eval()
    x = batch()
    with torch.no_grad():
        adapted = model(x)
        merge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
        unmerge(model)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)
    adapter = tiny_model()
    apply_method(adapter, ft("adapter"))
    with pytest.raises(NotSupportedError, match="cannot be merged"):
        merge(adapter)


def test_prefix_generation_with_kv_cache_equals_full_forward():
    model = tiny_model()
    apply_method(model, ft("prefix", rank=5))
    with torch.no_grad():  # make the prefixes matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 1.0)
    prompts = [[5, 9, 11, 3, 7, 2], [8, 1]]  # different lengths: left padding in the cache
    cached = generate(model, prompts, max_new_tokens=8)
    slow = generate(model, prompts, max_new_tokens=8, use_cache=False)
    assert cached == slow
    with disable_adapters(model):
        assert generate(model, prompts, max_new_tokens=8) != cached


def test_prefix_on_an_encoder_with_padding():
    cfg = ModelConfig(arch="encoder", n_layers=2, d_model=64, n_heads=4, vocab_size=V,
                      max_seq_len=32)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    apply_method(model, ft("prefix", rank=3))
    x = batch(t=12)
    mask = torch.ones_like(x)
    mask[0, 8:] = 0
    with torch.no_grad():
        full = model.encode(x, attention_mask=mask)
        alone = model.encode(x[:1, :8])
    torch.testing.assert_close(full[0, :8], alone[0], atol=1e-5, rtol=1e-5)


def test_full_finetuning_freezes_embeddings_and_lower_blocks():
    model = tiny_model()
    summary = apply_method(model, ft("full", freeze_layers=1))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.startswith(("embed_tokens", "layers.0."))}
    assert summary.trainable < summary.total
    before = snapshot(model)
    losses = train(model, batch(), steps=10, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    after = model.state_dict()
    for k in before:
        assert torch.equal(after[k], before[k]) == (k in frozen), k


def test_trainable_patterns():
    model = tiny_model()
    apply_method(model, ft("full", trainable=["*norm*", "lm_head"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, _ in model.named_parameters() if "norm" in n or "lm_head" in n}
    lora = tiny_model()
    apply_method(lora, ft("lora", trainable=["attn_norm"]))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert {n for n in names if "lora_" not in n} == {"layers.0.attn_norm.weight",
                                                      "layers.1.attn_norm.weight"}
    with pytest.raises(UsageError, match=r"finetune.trainable pattern\(s\) \['nrom'\]"):
        apply_method(tiny_model(), ft("full", trainable=["nrom"]))


def test_bad_settings_are_explained():
    with pytest.raises(UsageError, match="applies to lora, dora and qlora"):
        apply_method(tiny_model(), ft("ia3", target_modules=["q_proj"]))
    with pytest.raises(UsageError, match="freeze_layers=5 is more than the model's 2 blocks"):
        apply_method(tiny_model(), ft("lora", freeze_layers=5))
    with pytest.raises(UsageError, match=r"finetune\.rank=100 is larger than layer"):
        apply_method(tiny_model(), ft("adapter", rank=100))
    with pytest.raises(UsageError, match="leaves no parameter to train"):
        apply_method(tiny_model(), ft("full", freeze_layers=1, trainable=["layers.0.*"]))
    model = tiny_model()
    apply_method(model, ft("lora"))
    with pytest.raises(UsageError, match="already has a fine-tuning method"):
        apply_method(model, ft("lora"))
