"""Tiny engines shared by the inference tests: random models over a word-level tokenizer
(`w0 .. w{V-1}`, whitespace split), so every prompt is written in words with known ids and the
decoded text of ids [3, 7] is "w3 w7". (A module of its own, not conftest: test directories
each have a conftest, and `from conftest import` picks whichever was imported first.)"""

from __future__ import annotations

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
