"""QLoRA: the NF4 code is the paper's, its round-trip error is bounded by the code's spacing, the
4-bit model starts near the base, stores its targeted weights ~4x (bf16) / ~7.5x (fp32) smaller,
and trains its LoRA on top.

    python -m pytest tests/peft/test_qlora.py -q -s
"""

from __future__ import annotations

import pytest
import torch
from peft_helpers import batch, ft, snapshot, tiny_model, train

from plinth.errors import NotSupportedError
from plinth.peft import apply_method, disable_adapters, merge
from plinth.peft.lora import LoRALinear
from plinth.peft.nf4 import BLOCK, LEVELS, dequantize, nf4_linear, quantize

# Table of NF4 values from the QLoRA paper (Dettmers et al. 2023, appendix E; bitsandbytes)
PAPER_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_levels_are_the_papers():
    torch.testing.assert_close(LEVELS, torch.tensor(PAPER_NF4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(64, 160), (96, 33), (7,)])
def test_round_trip_error_is_bounded_by_the_code(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    q = quantize(w)
    back = dequantize(q)
    assert back.shape == w.shape
    # every value lands within half the widest gap between neighbouring levels (times its
    # block's absmax, itself rounded to bf16: at most 2^-8 relative)
    half_gap = (LEVELS[1:] - LEVELS[:-1]).max().item() / 2  # 0.152, between -1 and -0.696
    flat = torch.nn.functional.pad(w.reshape(-1), (0, -w.numel() % BLOCK)).view(-1, BLOCK)
    absmax = flat.abs().amax(1).repeat_interleave(BLOCK)[: w.numel()].view(shape)
    err = (back - w).abs()
    assert (err <= absmax * half_gap * (1 + 2**-8) + 1e-12).all()
    # values that are levels already survive (exact zero included)
    exact = LEVELS.repeat(4) * 0.5  # one block of 64 with absmax 0.5
    torch.testing.assert_close(dequantize(quantize(exact)), exact, atol=1e-7, rtol=0)
    rel = (err.pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    print(f"NF4 {tuple(shape)}: max abs err {err.max():.4f} (absmax-relative "
          f"{(err / absmax).max():.3f}, bound {half_gap:.3f}), relative RMS error {rel:.3f}")
    assert rel < 0.12  # ~0.1 for normally distributed weights


def test_matmul_and_its_gradient_use_the_dequantised_weight():
    w = torch.randn(32, 64) * 0.1
    q = quantize(w)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = nf4_linear(x, q.codes, q.absmax, q.shape)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ dequantize(q).T
    torch.testing.assert_close(y, ref)
    y.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_qlora_model_starts_near_base_is_smaller_and_trains():
    base = tiny_model()
    x = batch()
    with torch.no_grad():
        ref = base(x)
    dense_bytes = sum(
        m.weight.numel() * 4 for n, m in base.named_modules()
        if n.split(".")[-1] in ALL
    )
    summary = apply_method(base, ft("qlora", target_modules=ALL))
    layers = [m for m in base.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * len(ALL) and all(m.quantized for m in layers)
    assert not any(k.endswith("_proj.weight") for k in base.state_dict())  # weight_nf4 instead
    nf4_bytes = sum(m.weight_nf4.numel() + m.weight_absmax.numel() * 2 for m in layers)
    with torch.no_grad():
        start = base(x)
    diff = (start - ref).abs().max().item()
    rel = ((start - ref).norm() / ref.norm()).item()
    agree = (start.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"QLoRA start vs base logits: max abs diff {diff:.4f} (max |logit| "
          f"{ref.abs().max():.2f}), relative RMS diff {rel:.3f}, same top-1 token {agree:.0%}; "
          f"targeted weights {dense_bytes} B fp32 -> {nf4_bytes} B NF4 "
          f"({dense_bytes / nf4_bytes:.2f}x smaller than fp32, "
          f"{dense_bytes / 2 / nf4_bytes:.2f}x smaller than bf16); {summary}")
    assert 0 < rel < 0.1 and agree > 0.8  # 14 matrices with ~10% weight error each
    assert 3.7 < dense_bytes / 2 / nf4_bytes < 3.8  # 16 / 4.25 bits
    with torch.no_grad(), disable_adapters(base):
        torch.testing.assert_close(base(x), start)  # B = 0: disabled == the 4-bit base

    before = snapshot(base)
    losses = train(base, x, steps=30, lr=1e-2)
    print(f"QLoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.8 * losses[0]
    after = base.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), k  # 4-bit codes, scales, norms, embeddings
    with pytest.raises(NotSupportedError, match="QLoRA layer cannot be merged"):
        merge(base)


def test_qlora_under_bf16_autocast():
    model = tiny_model()
    apply_method(model, ft("qlora", target_modules=["q_proj", "down_proj"]))
    x = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = model(x[:, :-1], labels=x[:, 1:])
    loss_sum.backward()
    g = model.layers[0].attn.q_proj.lora_B.weight.grad
    assert g is not None and g.abs().max() > 0


def test_a_base_checkpoint_loads_into_qlora_and_its_adapter_onto_the_dense_base(tmp_path):
    from plinth.peft import load_adapter, save_adapter

    dense = tiny_model()
    state = dense.state_dict()
    q1 = tiny_model(seed=5)  # other weights: the dense state dict below replaces them
    apply_method(q1, ft("qlora", target_modules=["q_proj", "up_proj"]))
    missing, unexpected = q1.load_state_dict(state, strict=False)
    assert unexpected == [] and all("lora_" in k for k in missing)
    q2 = tiny_model()
    apply_method(q2, ft("qlora", target_modules=["q_proj", "up_proj"]))
    assert torch.equal(q1.layers[1].mlp.up_proj.weight_nf4, q2.layers[1].mlp.up_proj.weight_nf4)

    train(q2, batch(), steps=3)
    save_adapter(q2, tmp_path)  # the fingerprint is the dense base's, taken before quantising
    summary = load_adapter(dense, tmp_path)
    assert summary.method == "lora" and not dense.layers[0].attn.q_proj.quantized
    torch.testing.assert_close(dense.layers[0].attn.q_proj.lora_B.weight,
                               q2.layers[0].attn.q_proj.lora_B.weight, atol=0, rtol=0)
