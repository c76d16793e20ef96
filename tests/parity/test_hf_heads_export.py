"""Task heads exported as AutoModelForSequenceClassification, for every family and pooling:
transformers gives the logits plinth's head gives (plinth.models.heads), on a padded batch.

    python -m pytest tests/parity/test_hf_heads_export.py -q

Small random models and heads (non-zero biases), written by plinth.hf.exporter.export_hf with
an ExportHead; the fine-tuned end-to-end cases are in tests/recipes/test_classify.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from plinth.config.schema import Config, ModelConfig
from plinth.hf.exporter import ExportHead, export_hf
from plinth.models import build_model
from plinth.models.heads import hidden_states, pool

transformers = pytest.importorskip("transformers")

V = 64
SHAPES = {  # model_type -> plinth ModelConfig fields that export as it
    "llama": dict(bias=True),
    "qwen2": dict(n_kv_heads=2, qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gpt2": dict(activation="gelu_tanh", norm="layernorm", positional="learned", bias=True),
    "bert": dict(arch="encoder", activation="gelu", norm="layernorm", positional="learned",
                 norm_position="post", bias=True, type_vocab_size=2, tie_embeddings=True),
}


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    lengths = [9, 4, 6]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, :n] = torch.randint(3, V, (n,), generator=g)
        mask[r, :n] = 1
    return ids, mask


@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("model_type", list(SHAPES))
def test_exported_head_gives_plinths_logits(model_type, pooling, tmp_path):
    mc = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=V, max_seq_len=32,
                     **SHAPES[model_type])
    torch.manual_seed(0)
    net = build_model(mc).eval()
    with torch.no_grad():  # non-trivial norms, so a misplaced tensor shows
        for name, p in net.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    head = torch.nn.Linear(32, 3)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([0.5, -0.25, 0.1]))
    spec = ExportHead(task="topic", kind="classification", labels=["a", "b", "c"],
                      pooling=pooling, weight=head.weight, bias=head.bias)
    out = export_hf(net, Config(model=mc), tmp_path / "run", tmp_path / f"{model_type}-hf",
                    head=spec)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == f"plinth_{model_type}"
    assert config["id2label"] == {"0": "a", "1": "b", "2": "c"}
    name = "classifier" if model_type == "bert" else "score"
    assert torch.equal(load_file(str(out / "model.safetensors"))[f"{name}.bias"], head.bias)
    ids, mask = _batch()
    with torch.no_grad():
        want = head(pool(hidden_states(net, ids, mask), mask, pooling))
        hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            out, trust_remote_code=True).eval()
        got = hf(input_ids=ids, attention_mask=mask).logits
    assert (got - want).abs().max().item() <= 1e-5, (got, want)
