"""Activation memory the layers must not keep: concatenated projection weights, the fused
loss's gradients after backward, more than one chunk of logits. Measured with `PeakMemory`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from plinth.config.load import load_config
from plinth.models import build_model
from plinth.models import layers as layers_mod
from plinth.models.kernels import fused_linear
from plinth.models.layers import linear_cross_entropy
from plinth.train.memory import PeakMemory, measure_peak_bytes
from plinth.train.objectives import SpecialTokens, compute_loss

SPECIAL = SpecialTokens(eos_id=0, pad_id=1, mask_id=2)
# wide and short: the projection weights are large next to the activations
SMALL = ["model.d_model=256", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2"]
SMALL += ["model.max_seq_len=32", "model.vocab_size=512"]


def small_decoder(*extra):
    torch.manual_seed(0)
    cfg = load_config([], [*SMALL, *extra]).config.model
    return build_model(cfg), cfg


def nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def concatenated_copy(x, *linears):
    """The formulation the layers used to have: F.linear on torch.cat of the weights, which
    autograd keeps until backward."""
    weight = torch.cat([m.weight for m in linears])
    bias = None if linears[0].bias is None else torch.cat([m.bias for m in linears])
    return F.linear(x, weight, bias).split([m.out_features for m in linears], dim=-1)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_projections_save_their_weights_by_reference(bf16):
    model, cfg = small_decoder("model.qkv_bias=true")
    batch = torch.randint(3, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    saved = []
    hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        compute_loss("clm", model, batch, SPECIAL).loss.backward()  # backward under autocast too
    kept = {t.untyped_storage().data_ptr() for t in saved}
    fused = [(a.q_proj, a.k_proj, a.v_proj) for a in (b.attn for b in model.layers)]
    fused += [(b.mlp.gate_proj, b.mlp.up_proj) for b in model.layers]
    for linears in fused:
        # the parameters themselves are kept, not a copy of them
        missing = [m for m in linears if m.weight.untyped_storage().data_ptr() not in kept]
        assert not missing, f"{len(missing)} of {len(linears)} fused weights not kept as such"
        # and nothing of the concatenated matrix's shape (in any dtype)
        shape = (sum(m.out_features for m in linears), cfg.d_model)
        copies = [t.dtype for t in saved if tuple(t.shape) == shape]
        assert not copies, f"concatenated {shape} weights kept for backward: {copies}"
    # the fused forward also matches the separate projections, gradients included
    block = model.layers[0]
    x = torch.randn(2, 5, cfg.d_model, requires_grad=True)
    q, k, v = fused_linear(x, block.attn.q_proj, block.attn.k_proj, block.attn.v_proj)
    ref = [block.attn.q_proj(x), block.attn.k_proj(x), block.attn.v_proj(x)]
    for got, want in zip([q, k, v], ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    g = torch.autograd.grad(sum(t.square().sum() for t in (q, k, v)), [x, block.attn.k_proj.bias])
    g_ref = torch.autograd.grad(sum(t.square().sum() for t in ref), [x, block.attn.k_proj.bias])
    for got, want in zip(g, g_ref, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_training_step_peak_drops_by_the_concatenated_weights(monkeypatch):
    """A decoder training step measured with the old formulation and with the layers' own: the
    peak (at the loss, when every block's saved tensors are alive) drops by at least the
    concatenated q/k/v and gate/up matrices of every block."""
    model, cfg = small_decoder()
    batch = torch.randint(3, cfg.vocab_size, (8, cfg.max_seq_len + 1))

    def step():
        compute_loss("clm", model, batch, SPECIAL).loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    ours = measure_peak_bytes(step, model)
    with monkeypatch.context() as mp:
        mp.setattr(layers_mod, "fused_linear", concatenated_copy)  # as the layers call it
        old = measure_peak_bytes(step, model)
    blk = model.layers[0]
    copies = cfg.n_layers * nbytes(
        blk.attn.q_proj.weight, blk.attn.k_proj.weight, blk.attn.v_proj.weight
    )
    copies += cfg.n_layers * nbytes(blk.mlp.gate_proj.weight, blk.mlp.up_proj.weight)
    assert old - ours >= copies, (old, ours, copies)


def test_loss_output_keeps_no_gradients_after_backward():
    """The training loop keeps the last loss output until the next forward returns; the fused
    loss must not keep the gradients of h and the head weight alive through it."""
    model, cfg = small_decoder()
    batch = torch.randint(3, cfg.vocab_size, (4, cfg.max_seq_len + 1))
    with PeakMemory(model) as mem:
        out = compute_loss("clm", model, batch, SPECIAL)
        out.loss.backward()
        live = mem.current  # parameters, buffers, gradients, and whatever `out` still holds
    grads = nbytes(*(p.grad for p in model.parameters()))
    params = nbytes(*model.parameters(), *model.buffers())
    head_grads = nbytes(model.lm_head.weight) + 4 * batch[:, 1:].numel() * cfg.d_model
    assert live - params - grads < head_grads / 10, (live - params - grads, head_grads)
    assert out.loss.item() > 0
    with pytest.raises(RuntimeError, match="backward twice"):
        h = torch.randn(8, 4, requires_grad=True)
        loss, _ = linear_cross_entropy(h, torch.randn(16, 4), torch.randint(0, 16, (8,)))
        loss.backward(retain_graph=True)
        loss.backward()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fused_loss_keeps_one_chunk_of_logits(bf16):
    """Forward + backward of linear_cross_entropy holds its inputs, their gradients and one
    chunk of fp32 logits (plus its 16-bit copy under autocast), never two chunks."""
    torch.manual_seed(0)
    N, D, V, chunk = 1024, 16, 2048, 128
    h = torch.randn(N, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    labels = torch.randint(0, V, (N,))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _ = linear_cross_entropy(h, w, labels, chunk=chunk)
        loss.backward()

    peak = measure_peak_bytes(run, h, w)
    one_chunk = chunk * V * (6 if bf16 else 4)  # fp32 logits (and their 16-bit gradient)
    # beyond the inputs and their gradients (the loss's, which become .grad) and, under
    # autocast, the 16-bit head, its 16-bit gradient product and its fp32 conversion
    over = peak - 2 * nbytes(h, w) - (8 * V * D if bf16 else 0)
    assert one_chunk <= over < 1.25 * one_chunk, (over, one_chunk)  # one chunk, not two
