"""Shared pieces of the PEFT tests: a tiny model, a memorisation task, an HF twin."""

from __future__ import annotations

import torch

from plinth.config.schema import FinetuneConfig, ModelConfig, OptimConfig
from plinth.models import build_model
from plinth.train.optim import build_optimizer

V, D, F, L, H = 96, 64, 160, 2, 8


def tiny_cfg(**extra) -> ModelConfig:
    return ModelConfig(arch="decoder", n_layers=L, d_model=D, n_heads=H, d_ff=F, vocab_size=V,
                       max_seq_len=64, activation="swiglu", norm="rmsnorm", positional="rope",
                       **extra)


def tiny_model(seed: int = 0, **extra):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**extra)).eval()


def batch(seed: int = 1, b: int = 4, t: int = 17) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def ft(method: str, **kw) -> FinetuneConfig:
    return FinetuneConfig(method=method, lora_dropout=kw.pop("lora_dropout", 0.0), **kw)


def loss_of(model, x: torch.Tensor) -> torch.Tensor:
    loss_sum, _ = model(x[:, :-1], labels=x[:, 1:])
    return loss_sum / x[:, 1:].numel()


def train(model, x: torch.Tensor, steps: int = 30, lr: float = 1e-2) -> list[float]:
    """Memorise one batch with the project's optimizer; returns the losses."""
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0))
    losses = []
    for _ in range(steps):
        loss = loss_of(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_llama_pair(seed: int = 0, n_kv_heads: int = 2):
    """A random HF LlamaForCausalLM and a plinth Decoder with identical weights (as
    tests/parity does it)."""
    import transformers

    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
        num_attention_heads=H, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=64, tie_word_embeddings=False)).eval()
    hf.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.05 * noise)
    ours = build_model(tiny_cfg(n_kv_heads=n_kv_heads)).eval()
    state = {}
    for name, t in hf.state_dict().items():
        name = name.removeprefix("model.").replace("self_attn.", "attn.")
        name = name.replace("input_layernorm", "attn_norm")
        state[name.replace("post_attention_layernorm", "mlp_norm")] = t
    ours.load_state_dict(state, strict=True)
    return hf, ours


def _randomise(model) -> None:
    """Non-trivial norms and biases too, so a wrong mapping cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            normish = any(s in name for s in ("norm", "ln_", "LayerNorm"))
            p.copy_(1.0 + 0.2 * noise if normish else 0.05 * noise)


def hf_imported(kind: str, path, seed: int = 0):
    """A random transformers GPT2LMHeadModel or BertModel saved under `path`/hf, and
    `plinth import`ed into `path`/plinth: (hf model, plinth model, plinth directory)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from plinth.hf import import_model
    from plinth.load import load_trained

    torch.manual_seed(seed)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0))
    else:
        hf = transformers.BertModel(transformers.BertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, type_vocab_size=2))
    hf.eval()
    _randomise(hf)
    if seed:
        with torch.no_grad():
            for p in hf.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    src = path / f"hf{seed}"
    hf.save_pretrained(src)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(src / "tokenizer.json"))
    out = path / f"plinth{seed}"
    import_model(src, out)
    net, _, _ = load_trained(out)
    return hf, net.eval(), out
