"""Fixtures of the inference tests (the tiny models themselves are in infer_helpers)."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_engine, word_tokenizer

from plinth.infer.engine import Engine


@pytest.fixture
def engine() -> Engine:
    return tiny_engine()


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers LlamaForCausalLM in eval mode, its `plinth import` directory): a tiny
    random Llama (vocabulary 96, eos 2) with a word-level tokenizer."""
    transformers = pytest.importorskip("transformers")
    from plinth.hf import import_model

    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the default init: sharper, distinct choices
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    src = root / "hf"
    hf.save_pretrained(src)
    word_tokenizer(96).save(str(src / "tokenizer.json"))
    return hf, import_model(src, root / "plinth")
