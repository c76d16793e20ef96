"""Model behaviour: exact parameter counts, init, causality, padding, KV cache, FLOPs.

    python -m pytest tests/models/test_models.py -q
"""

from __future__ import annotations

import itertools
import math
import pathlib

import pytest
import torch

from plinth.config.schema import ModelConfig
from plinth.models import Decoder, EncoderDecoder, build_model

ARCHS = ["decoder", "encoder", "encoder_decoder"]


def tiny(**kw) -> ModelConfig:
    base = dict(n_layers=2, d_model=32, n_heads=4, vocab_size=61, max_seq_len=24)
    base.update(kw)
    return ModelConfig(**base)


def _combos():
    """Every arch x positional x norm x bias x qk_norm x tie, cycling the remaining options
    (activation, qkv_bias, GQA, d_ff, decoder depth) so each value meets every arch."""
    grid = itertools.product(ARCHS, ["rope", "learned"], ["rmsnorm", "layernorm"], [False, True],
                             [False, True], [False, True])
    for i, (arch, pos, norm, bias, qk_norm, tie) in enumerate(grid):
        yield dict(
            arch=arch, positional=pos, norm=norm, bias=bias, qk_norm=qk_norm, tie_embeddings=tie,
            activation=["swiglu", "gelu", "relu2"][i % 3],
            qkv_bias=bool(i % 2),
            n_kv_heads=[None, 2, 1][(i // 2) % 3],
            d_ff=[None, 48][(i // 3) % 2],
            n_decoder_layers=[None, 1, 3][(i // 5) % 3],
        )


def test_num_params_equals_config_count_for_every_option_combination():
    checked = 0
    for kw in _combos():
        cfg = tiny(**kw)
        model = build_model(cfg)
        assert model.num_params() == cfg.param_count(), kw
        # and num_params really is the number of distinct parameter elements
        distinct = {id(p): p.numel() for p in model.parameters()}
        assert model.num_params() == sum(distinct.values())
        checked += 1
    assert checked == 96


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_import_options_count_exactly_and_behave(arch):
    """gelu_tanh, post-norm blocks and token types (GPT-2 / BERT checkpoints)."""
    types = 2 if arch == "encoder" else 0
    for kw in (dict(activation="gelu_tanh"), dict(norm_position="post", norm="layernorm",
                                                  bias=True, type_vocab_size=types)):
        cfg = tiny(arch=arch, positional="learned", **kw)
        m = build_model(cfg).eval()
        assert m.num_params() == cfg.param_count(), kw
    x = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    post = build_model(tiny(arch=arch, norm_position="post", type_vocab_size=types)).eval()
    pre = build_model(tiny(arch=arch)).eval()
    pre.load_state_dict(post.state_dict(), strict=False)
    assert (post(x) - pre(x)).abs().max() > 1e-3  # the norms really moved
    if arch == "encoder":
        seg = torch.zeros_like(x)
        seg[:, 6:] = 1
        a, b = post.encode(x), post.encode(x, token_type_ids=seg)
        torch.testing.assert_close(a, post.encode(x, token_type_ids=torch.zeros_like(x)))
        assert (a - b).abs().max() > 1e-3
        assert post.embed_types.weight.shape == (2, 32)


def test_reference_preset_size_and_flops():
    cfg = ModelConfig(n_layers=6, d_model=384, n_heads=6, d_ff=1536, vocab_size=8192,
                      max_seq_len=256)
    model = build_model(cfg)
    d, ff, V, L, T = 384, 1536, 8192, 6, 256
    per_layer = 4 * d * d + 3 * d * ff + 2 * d
    assert model.num_params() == V * d * 2 + L * per_layer + d == cfg.param_count()
    matmul = L * (4 * d * d + 3 * d * ff) + V * d  # the head is a matmul, the embedding is not
    assert model.flops_per_token(T) == 6 * matmul + 12 * L * d * T


def test_tied_head_shares_the_embedding_and_counts_it_once():
    for arch in ARCHS:
        m = build_model(tiny(arch=arch, tie_embeddings=True))
        assert m.lm_head.weight is m.embed_tokens.weight
        # tied head is still a matmul for FLOPs
        untied = build_model(tiny(arch=arch))
        assert m.flops_per_token(16) == untied.flops_per_token(16)


def test_encoder_decoder_flops_counts_both_stacks():
    cfg = tiny(arch="encoder_decoder", n_decoder_layers=1)
    m = build_model(cfg)
    d, L, Ld, V, ff = 32, 2, 1, 61, cfg.ffn_dim
    S, T = 20, 6
    block = 4 * d * d + 3 * d * ff
    expected = (6 * (L * block * S + Ld * 2 * d * d * S + (Ld * (block + 2 * d * d) + V * d) * T)
                + 12 * d * (L * S * S + Ld * (T * T + T * S))) / S
    assert m.flops_per_token(S, T) == pytest.approx(expected, rel=1e-12)


def test_explicit_init():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=4, d_model=256, n_heads=4, bias=True, norm="layernorm",
                      vocab_size=4096, init_std=0.02)
    m = build_model(cfg)
    out_std = 0.02 / math.sqrt(2 * 4)
    assert m.layers[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.embed_tokens.weight.std().item() == pytest.approx(0.02, rel=0.03)
    assert m.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.03)
    for layer in m.layers:
        assert layer.attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
        assert layer.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
        assert torch.all(layer.attn.q_proj.bias == 0) and torch.all(layer.mlp.up_proj.bias == 0)
        assert torch.all(layer.attn_norm.weight == 1) and torch.all(layer.attn_norm.bias == 0)
    # the encoder-decoder scales each stack by its own depth
    ed = build_model(tiny(arch="encoder_decoder", d_model=256, n_heads=4, n_layers=8,
                          n_decoder_layers=2))
    assert ed.encoder.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(
        0.02 / 4, rel=0.05)
    assert ed.decoder.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(
        0.02 / 2, rel=0.05)


def test_hf_style_parameter_names():
    names = set(dict(build_model(tiny()).named_parameters()))
    for n in ["embed_tokens.weight", "layers.1.attn.q_proj.weight", "layers.1.attn.k_proj.weight",
              "layers.1.attn.v_proj.weight", "layers.1.attn.o_proj.weight",
              "layers.1.mlp.gate_proj.weight", "layers.1.mlp.up_proj.weight",
              "layers.1.mlp.down_proj.weight", "layers.1.attn_norm.weight",
              "layers.1.mlp_norm.weight", "norm.weight", "lm_head.weight"]:
        assert n in names
    gelu = set(dict(build_model(tiny(activation="gelu")).named_parameters()))
    assert "layers.0.mlp.up_proj.weight" in gelu and "layers.0.mlp.gate_proj.weight" not in gelu
    ed = set(dict(build_model(tiny(arch="encoder_decoder")).named_parameters()))
    assert {"encoder.layers.0.attn.q_proj.weight", "decoder.layers.0.cross_attn.k_proj.weight",
            "decoder.layers.0.cross_attn_norm.weight", "encoder.norm.weight",
            "decoder.norm.weight"} <= ed


@pytest.mark.parametrize("positional", ["rope", "learned"])
def test_decoder_is_causal_and_encoder_is_not(positional):
    torch.manual_seed(0)
    x = torch.randint(0, 61, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 1) % 61  # change only the future
    dec = build_model(tiny(positional=positional)).eval()
    a, b = dec(x), dec(y)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-6, rtol=0)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-4
    enc = build_model(tiny(arch="encoder", positional=positional)).eval()
    assert (enc(x)[:, :8] - enc(y)[:, :8]).abs().max() > 1e-4


def test_encoder_padding_does_not_leak_into_real_tokens():
    torch.manual_seed(0)
    enc = build_model(tiny(arch="encoder", n_kv_heads=2)).eval()
    x = torch.randint(0, 61, (1, 10))
    padded = torch.cat([x, torch.randint(0, 61, (1, 5))], dim=1)
    mask = torch.tensor([[1] * 10 + [0] * 5])
    torch.testing.assert_close(enc(padded, attention_mask=mask)[:, :10], enc(x), atol=1e-5, rtol=0)
    # `select` gives exactly the selected rows of the full logits
    sel = torch.zeros(1, 15, dtype=torch.bool)
    sel[0, [1, 4, 9]] = True
    full = enc(padded, attention_mask=mask)
    torch.testing.assert_close(enc(padded, attention_mask=mask, select=sel), full[sel])
    assert enc.encode(x).shape == (1, 10, 32)


def test_encoder_decoder_source_padding_and_target_causality():
    torch.manual_seed(0)
    m = build_model(tiny(arch="encoder_decoder", n_decoder_layers=3)).eval()
    src = torch.randint(0, 61, (1, 9))
    tgt = torch.randint(0, 61, (1, 7))
    ref = m(src, tgt)
    padded = torch.cat([src, torch.randint(0, 61, (1, 4))], dim=1)
    mask = torch.tensor([[1] * 9 + [0] * 4])
    torch.testing.assert_close(m(padded, tgt, src_mask=mask), ref, atol=1e-5, rtol=0)
    tgt2 = tgt.clone()
    tgt2[:, 5:] = (tgt2[:, 5:] + 1) % 61
    torch.testing.assert_close(m(src, tgt2)[:, :5], ref[:, :5], atol=1e-6, rtol=0)
    src2 = src.clone()
    src2[:, -1] = (src2[:, -1] + 1) % 61  # every target position sees the whole source
    assert (m(src2, tgt)[:, 0] - ref[:, 0]).abs().max() > 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=1, qk_norm=True),
                                dict(positional="learned", norm="layernorm", bias=True),
                                dict(norm_position="post", activation="gelu_tanh")])
def test_kv_cache_chunks_match_full_forward(kw):
    torch.manual_seed(0)
    m: Decoder = build_model(tiny(**kw)).eval()
    x = torch.randint(0, 61, (3, 14))
    full = m(x)
    cache = m.new_cache(3, 20)
    parts = [m(x[:, :5], cache), m(x[:, 5:6], cache), m(x[:, 6:11], cache), m(x[:, 11:], cache)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.pos == 14


def test_kv_cache_with_left_padding_matches_each_row_alone():
    torch.manual_seed(0)
    m: Decoder = build_model(tiny(n_kv_heads=2)).eval()
    rows = [torch.randint(0, 61, (n,)) for n in (7, 3, 5)]
    T = 7
    idx = torch.stack([torch.cat([torch.zeros(T - len(r), dtype=torch.long), r]) for r in rows])
    pad = torch.tensor([T - len(r) for r in rows])
    cache = m.new_cache(3, T + 2, pad=pad)
    last = m(idx, cache)[:, -1]  # (B, V)
    nxt = torch.tensor([[5], [6], [7]])
    step = m(nxt, cache)[:, -1]
    for b, r in enumerate(rows):
        alone = m(torch.cat([r, nxt[b]])[None])
        torch.testing.assert_close(last[b], alone[0, -2], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[b], alone[0, -1], atol=1e-5, rtol=0)


def test_encoder_decoder_cached_decode_matches_full_decode():
    torch.manual_seed(0)
    m: EncoderDecoder = build_model(tiny(arch="encoder_decoder", n_kv_heads=2)).eval()
    src = torch.randint(0, 61, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    tgt = torch.randint(0, 61, (2, 6))
    memory = m.encode(src, mask)
    full = m.decode(tgt, memory, mask)
    cache = m.new_cache(2, 6)
    steps = [m.decode(tgt[:, i : i + 1], memory, mask, cache) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_learned_positions_refuse_inputs_past_the_table():
    m = build_model(tiny(positional="learned", max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 9, dtype=torch.long))


def test_rope_extends_past_max_seq_len():
    m = build_model(tiny(max_seq_len=8)).eval()
    x = torch.randint(0, 61, (1, 20))
    cache = m.new_cache(1, 20)
    torch.testing.assert_close(m(x, cache), m(x), atol=1e-5, rtol=0)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = build_model(tiny(dropout=0.5))
    x = torch.randint(0, 61, (2, 10))
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert (m(x) - m(x)).abs().max() > 1e-3


def test_model_files_never_import_torch_distributed():
    root = pathlib.Path(__file__).parents[2] / "src" / "plinth" / "models"
    for f in root.rglob("*.py"):
        assert "torch.distributed" not in f.read_text(), f


class _Wrapped(torch.nn.Module):
    """Stands in for a LoRA/quantised wrapper swapped in place of a projection."""

    def __init__(self, base: torch.nn.Linear, shift: float):
        super().__init__()
        self.base, self.shift = base, shift

    def forward(self, x):
        return self.base(x) + self.shift


@pytest.mark.parametrize("bias", [False, True])
def test_swapped_projections_are_called_not_bypassed(bias):
    """Plain projections run as one fused GEMM; a swapped-in module must still be used."""
    torch.manual_seed(0)
    m = build_model(tiny(bias=bias, n_kv_heads=2)).eval()
    x = torch.randint(0, 61, (2, 10))
    ref = m(x)
    attn, mlp = m.layers[0].attn, m.layers[1].mlp
    attn.k_proj, mlp.up_proj = _Wrapped(attn.k_proj, 0.0), _Wrapped(mlp.up_proj, 0.0)
    torch.testing.assert_close(m(x), ref, atol=1e-5, rtol=0)  # same maths unfused
    attn.k_proj.shift = mlp.up_proj.shift = 0.5
    assert (m(x) - ref).abs().max() > 1e-3  # and the wrapper really runs


@pytest.mark.parametrize("z_loss,chunk", [(0.0, 64), (1e-2, 100), (0.0, None)])
def test_linear_cross_entropy_matches_materialised_logits(z_loss, chunk):
    from plinth.models.layers import IGNORE_INDEX, cross_entropy_sums, linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(333, 24, requires_grad=True)
    w = (0.5 * torch.randn(61, 24)).requires_grad_()
    labels = torch.randint(0, 61, (333,))
    labels[::5] = IGNORE_INDEX
    ref_loss, ref_ce = cross_entropy_sums(h @ w.t(), labels, z_loss)
    (2.5 * ref_loss).backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, ce = linear_cross_entropy(h, w, labels, z_loss, chunk)
    (2.5 * loss).backward()  # gradients computed in forward, scaled in backward
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(ce, ref_ce)
    assert not ce.requires_grad and (z_loss == 0) == bool(torch.equal(loss, ce))
    torch.testing.assert_close(h.grad, ref_grads[0])
    torch.testing.assert_close(w.grad, ref_grads[1])
    with torch.no_grad():  # evaluation path: same sums, no gradient work
        torch.testing.assert_close(linear_cross_entropy(h, w, labels, z_loss, chunk)[0], ref_loss)
    h.grad = None
    frozen = w.detach()  # a frozen head (LoRA fine-tuning) gets no gradient work
    linear_cross_entropy(h, frozen, labels, z_loss, chunk)[0].mul(2.5).backward()
    torch.testing.assert_close(h.grad, ref_grads[0])
    assert frozen.grad is None


def test_linear_cross_entropy_skips_rows_that_count_nothing():
    """SFT batches are mostly prompt: only counted rows reach the head, the rest get zero
    gradient; with nothing counted the sums are 0."""
    from plinth.models.layers import IGNORE_INDEX, cross_entropy_sums, linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(200, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    labels = torch.full((200,), IGNORE_INDEX)
    labels[150:170] = torch.randint(0, 40, (20,))
    ref = cross_entropy_sums(h @ w.t(), labels)[0]
    ref.backward()
    ref_grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    loss, _ = linear_cross_entropy(h, w, labels, chunk=8)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(h.grad, ref_grads[0])
    torch.testing.assert_close(w.grad, ref_grads[1])
    assert h.grad[:150].abs().sum() == 0
    h.grad = None
    none, _ = linear_cross_entropy(h, w, torch.full((200,), IGNORE_INDEX))
    none.backward()
    assert none.item() == 0 and h.grad.abs().sum() == 0


def test_linear_cross_entropy_under_bf16_autocast():
    from plinth.models.layers import cross_entropy_sums, linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = (0.3 * torch.randn(50, 32)).requires_grad_()
    labels = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = cross_entropy_sums(h @ w.t(), labels)
        loss, _ = linear_cross_entropy(h, w, labels)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0)


def test_decoder_loss_mode_equals_logits_mode_and_survives_a_swapped_head():
    from plinth.models.layers import cross_entropy_sums

    torch.manual_seed(0)
    m = build_model(tiny())
    x = torch.randint(0, 61, (2, 12))
    y = torch.randint(0, 61, (2, 12))
    ref, _ = cross_entropy_sums(m(x), y, 1e-3)
    ref.backward()
    ref_grad = m.layers[0].attn.q_proj.weight.grad.clone()
    m.zero_grad()
    loss, _ = m(x, labels=y, z_loss=1e-3)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(m.layers[0].attn.q_proj.weight.grad, ref_grad)
    m.lm_head = torch.nn.Sequential(m.lm_head, torch.nn.Hardtanh(-0.01, 0.01))  # a swapped head
    swapped = m(x, labels=y)[0]
    torch.testing.assert_close(swapped, cross_entropy_sums(m(x), y)[0])
    assert abs(swapped.item() - loss.item()) > 0.1  # the swapped head really ran
