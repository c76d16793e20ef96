"""Parity with Hugging Face transformers: the same weights give the same logits, losses and
greedy continuations (Llama; Qwen2 for qkv biases; Qwen3 for QK-norm). Random weights, no hub.

    python -m pytest tests/parity -q
"""

from __future__ import annotations

import pytest
import torch

from plinth.config.schema import ModelConfig
from plinth.infer.sampling import generate
from plinth.models import build_model
from plinth.train.objectives import SpecialTokens, compute_loss

transformers = pytest.importorskip("transformers")

V, D, F, L, H = 96, 64, 160, 3, 8


def hf_to_plinth_names(state: dict) -> dict:
    """Hugging Face Llama-family names -> plinth names (same tensors, no transposes)."""
    out = {}
    for name, t in state.items():
        name = name.removeprefix("model.")
        name = name.replace("self_attn.", "attn.")
        name = name.replace("input_layernorm", "attn_norm")
        name = name.replace("post_attention_layernorm", "mlp_norm")
        out[name] = t
    return out


def _randomise(model: torch.nn.Module) -> None:
    """Non-trivial norms and biases too, so a wrong mapping cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.05 * noise)


CASES = {
    "llama": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=H, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=64, tie_word_embeddings=False)),
        dict(norm_eps=1e-6),
    ),
    "llama-gqa-tied": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0,
            max_position_embeddings=64, tie_word_embeddings=True)),
        dict(n_kv_heads=2, rope_theta=500000.0, tie_embeddings=True),
    ),
    # Llama with attention_bias + mlp_bias is plinth's bias=True with RMSNorm
    "llama-bias": (
        lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=4, rms_norm_eps=1e-5,
            max_position_embeddings=64, attention_bias=True, mlp_bias=True,
            tie_word_embeddings=False)),
        dict(n_kv_heads=4, bias=True),
    ),
    "qwen2-qkv-bias": (
        lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=2, rms_norm_eps=1e-6,
            rope_theta=1000000.0, max_position_embeddings=64, tie_word_embeddings=False)),
        dict(n_kv_heads=2, qkv_bias=True, norm_eps=1e-6, rope_theta=1000000.0),
    ),
    "qwen3-qk-norm": (
        lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
            num_attention_heads=H, num_key_value_heads=4, head_dim=D // H, rms_norm_eps=1e-6,
            rope_theta=1000000.0, max_position_embeddings=64, tie_word_embeddings=False)),
        dict(n_kv_heads=4, qk_norm=True, norm_eps=1e-6, rope_theta=1000000.0),
    ),
}


def pair(case: str):
    make_hf, extra = CASES[case]
    torch.manual_seed(0)
    hf = make_hf().eval()
    hf.config._attn_implementation = "sdpa"
    _randomise(hf)
    cfg = ModelConfig(arch="decoder", n_layers=L, d_model=D, n_heads=H, d_ff=F, vocab_size=V,
                      max_seq_len=64, activation="swiglu", norm="rmsnorm", positional="rope",
                      **extra)
    ours = build_model(cfg).eval()
    missing, unexpected = ours.load_state_dict(hf_to_plinth_names(hf.state_dict()), strict=False)
    assert not unexpected, unexpected
    # a tied head is one tensor: the HF state dict carries it under both names
    assert missing == [], missing
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == cfg.param_count()
    return hf, ours


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match(case):
    hf, ours = pair(case)
    x = torch.randint(0, V, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert ref.abs().max() > 0.5  # non-trivial logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_loss_and_gradients_match():
    hf, ours = pair("llama-gqa-tied")
    x = torch.randint(0, V, (2, 33), generator=torch.Generator().manual_seed(2))
    ref = hf(x, labels=x).loss
    out = compute_loss("clm", ours, x, SpecialTokens(eos_id=0))
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    ref.backward()
    out.loss.backward()
    torch.testing.assert_close(ours.layers[1].attn.k_proj.weight.grad,
                               hf.model.layers[1].self_attn.k_proj.weight.grad,
                               atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.embed_tokens.weight.grad, hf.model.embed_tokens.weight.grad,
                               atol=1e-6, rtol=1e-4)


@torch.no_grad()
def test_greedy_generation_matches_hf_kv_cache_decoding():
    """HF's own cache (DynamicCache) step by step vs plinth's generate. (HF `generate()` adds
    default logits processors from the generation config, so it is not the plain greedy loop.)"""
    hf, ours = pair("llama-gqa-tied")
    prompts = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    for prompt in prompts:
        out = hf(prompt[None], use_cache=True)
        tokens = []
        for _ in range(20):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(nxt.item())
            out = hf(nxt, past_key_values=out.past_key_values, use_cache=True)
        assert generate(ours, [prompt.tolist()], max_new_tokens=20) == [tokens]
