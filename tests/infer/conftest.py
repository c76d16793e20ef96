"""Tiny engines shared by the inference tests: random models over a word-level tokenizer
(`w0 .. w{V-1}`, whitespace split), so every prompt is written in words with known ids and the
decoded text of ids [3, 7] is "w3 w7"."""

from __future__ import annotations

import pytest
import torch

from plinth.config.schema import Config, ModelConfig
from plinth.infer.engine import Engine
from plinth.models import build_model

V = 53


def word_tokenizer(vocab_size: int = V):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def tiny_model(**kw):
    base = dict(n_layers=2, d_model=48, n_heads=4, vocab_size=V, max_seq_len=64)
    base.update(kw)
    torch.manual_seed(0)
    model = build_model(ModelConfig(**base)).eval()
    with torch.no_grad():  # larger weights than the init: sharper, distinct greedy choices
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model


def tiny_engine(eos_ids=(), **kw) -> Engine:
    model = tiny_model(**kw)
    return Engine(model, word_tokenizer(), Config(model=model.cfg), eos_ids=list(eos_ids))


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
