"""A tiny random Llama saved by transformers and imported into plinth, shared by eval tests.

Its tokenizer is word-level over `w0 .. w95` (whitespace split), so test prompts are written in
those words and every id is known."""

from __future__ import annotations

import shutil

import pytest
import torch

V, D, F, L, H, T = 96, 64, 128, 2, 4, 64


def write_tokenizer(path, vocab_size: int = V) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(transformers LlamaForCausalLM in eval mode, the `plinth import` directory)."""
    transformers = pytest.importorskip("transformers")
    from plinth.hf import import_model

    root = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=H, max_position_embeddings=T,
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
    write_tokenizer(src)
    out = import_model(src, root / "plinth")
    return hf, out


@pytest.fixture
def tiny_run(tiny_hf, tmp_path):
    """A plinth run directory (config, tokenizer, checkpoint at step 7) of the tiny model."""
    from plinth.load import load_trained
    from plinth.train.state import save_checkpoint

    _, imported = tiny_hf
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(imported / "config.yaml", run / "config.yaml")
    shutil.copy(imported / "tokenizer.json", run / "tokenizer.json")
    net, _, _ = load_trained(imported)
    save_checkpoint(run / "checkpoints", 7, net, {"step": 7}, {})
    return run
