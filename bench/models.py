"""Models the benchmarks share.

`random_smollm2(dir)` writes a Hugging Face Llama directory with SmolLM2-135M's exact shapes
(30 layers, d 576, 9 heads / 3 KV heads, MLP 1536, vocab 49152, tied embeddings) and random
weights, plus a word-level tokenizer of the same vocabulary size. Speed and memory depend on
shapes, not values, so it stands in for ref-smollm2 where the 98 MB GGUF cannot travel (the GPU
machine takes at most 64 MiB of files).
"""

from __future__ import annotations

from pathlib import Path

import torch

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def random_smollm2(path: str | Path, seed: int = 0) -> Path:
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = Path(path)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_135M))
    model.save_pretrained(path)
    vocab = {f"w{i}": i for i in range(SMOLLM2_135M["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path
