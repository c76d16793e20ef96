"""Adapters of imported GPT-2 and BERT models in the PEFT library's format: plinth's load in `peft`
on the transformers model with the same outputs, peft's load in plinth, GPT-2's fused c_attn is
written exactly, what peft cannot express is refused, and the base fingerprint is import.json's.

    python -m pytest tests/peft/test_peft_families.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from peft_helpers import V, ft, hf_imported
from safetensors.torch import load_file

from plinth.errors import NotSupportedError, UsageError
from plinth.peft import apply_method, base_fingerprint, load_adapter, save_adapter
from plinth.peft.ia3 import IA3Linear
from plinth.peft.lora import LoRALinear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _perturb(model, seed: int = 0) -> None:
    """Adapter values far from their init, so a wrong mapping cannot hide behind zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    return ids, mask, types


@torch.no_grad()
def _out(model, plinth: bool) -> torch.Tensor:
    """GPT-2 logits, or BERT hidden states at the real (unpadded) tokens."""
    ids, mask, types = _inputs()
    if plinth:
        model = model.eval()
        if model.cfg.arch == "decoder":
            return model(ids)
        return model.encode(ids, mask, types)[mask.bool()]
    if isinstance(model.get_base_model(), transformers.GPT2LMHeadModel):
        return model(input_ids=ids).logits
    h = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    return h[mask.bool()]


def _lora_layers(model) -> dict[str, tuple[int, bool]]:
    return {n: (m.rank, m.dora) for n, m in model.named_modules() if isinstance(m, LoRALinear)}


CASES = [
    ("gpt2", "lora", ALL),
    ("gpt2", "lora", ["q_proj"]),  # one third of c_attn: k and v rows of lora_B stay zero
    ("gpt2", "dora", ["q_proj", "v_proj", "up_proj", "lm_head"]),  # the head is tied in GPT-2
    ("gpt2", "ia3", None),  # k and v scale c_attn's output, down_proj scales c_proj's input
    ("bert", "lora", ALL),
    ("bert", "dora", ["q_proj", "k_proj", "down_proj"]),
    ("bert", "ia3", None),
]


@pytest.mark.parametrize("kind,method,targets", CASES)
def test_plinth_adapter_of_an_imported_model_loads_in_peft_with_the_same_outputs(
        tmp_path, kind, method, targets):
    hf, ours, base = hf_imported(kind, tmp_path)
    kw = {"target_modules": targets} if targets else {}
    apply_method(ours, ft(method, rank=4, alpha=8.0, **kw))
    _perturb(ours)
    before = _lora_layers(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    keys = sorted(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert config["peft_type"] == ("IA3" if method == "ia3" else "LORA")
    # the fingerprint is the one `plinth import` wrote
    info = json.loads((base / "import.json").read_text())
    assert config["plinth_base_fingerprint"] == info["fingerprint"]
    if kind == "gpt2":
        assert config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] is True
        assert "base_model.model.transformer.h.0.attn.c_attn." + (
            "ia3_l" if method == "ia3" else "lora_A.weight") in keys
        assert not any("q_proj" in k for k in keys)
    else:
        assert config["task_type"] == "FEATURE_EXTRACTION"
        assert any(k.startswith("base_model.model.encoder.layer.0.attention.self.") for k in keys)
    if kind == "gpt2" and method != "ia3":  # c_attn's rank is the sum of its parts'
        fused = 4 * len({"q_proj", "k_proj", "v_proj"} & set(targets))
        c_attn = "transformer.h.0.attn.c_attn"
        assert config["rank_pattern"].get(c_attn, config["r"]) == fused

    with pytest.warns(UserWarning, match="plinth_base_fingerprint"):  # the extra key
        loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    ref, got = _out(loaded, plinth=False), _out(ours, plinth=True)
    with loaded.disable_adapter():
        plain = _out(loaded, plinth=False)
    assert (ref - plain).abs().max() > 1e-2  # the adapter matters
    diff = (got - ref).abs().max().item()
    print(f"{kind} {method} {targets}: plinth vs peft max abs diff {diff:.2e}")
    assert diff <= TOL

    # and back into plinth: the same layers (c_attn split into q/k/v of the original ranks)
    _, again, _ = hf_imported(kind, tmp_path / "again")
    summary = load_adapter(again, tmp_path / "adapter")
    assert summary.method == method
    assert _lora_layers(again) == before
    if method == "ia3":
        ia3 = sorted(n for n, m in again.named_modules() if isinstance(m, IA3Linear))
        assert ia3 == sorted(n for n, m in ours.named_modules() if isinstance(m, IA3Linear))
    torch.testing.assert_close(_out(again, plinth=True), got, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_on_gpt2_c_attn_loads_in_plinth(tmp_path, dora):
    hf, ours, _ = hf_imported("gpt2", tmp_path)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_fc", "mlp.c_proj"],
        init_lora_weights=False, use_dora=dora, rank_pattern={"c_fc": 2},
        alpha_pattern={"h.1.attn.c_attn": 3}, fan_in_fan_out=True, task_type="CAUSAL_LM",
    )
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    summary = load_adapter(ours, tmp_path / "adapter")
    assert summary.method == ("dora" if dora else "lora") and len(summary.modules) == 10
    q = ours.layers[1].attn.q_proj
    assert q.rank == 4 and q.alpha == 3 and ours.layers[0].mlp.up_proj.rank == 2
    diff = (_out(ours, plinth=True) - _out(pm, plinth=False)).abs().max().item()
    print(f"peft c_attn -> plinth q/k/v ({'dora' if dora else 'lora'}): max abs diff {diff:.2e}")
    assert diff <= TOL


def test_peft_ia3_adapter_on_bert_with_a_task_model_prefix_loads_in_plinth(tmp_path):
    """peft on BertForSequenceClassification names `bert.encoder...`: the encoder's part loads."""
    hf, ours, _ = hf_imported("bert", tmp_path)
    task = transformers.BertForSequenceClassification(hf.config)
    task.bert.load_state_dict(hf.state_dict())
    config = peft.IA3Config(target_modules=["key", "value", "output.dense"],
                            feedforward_modules=["output.dense"], init_ia3_weights=False)
    torch.manual_seed(4)
    pm = peft.get_peft_model(task, config).eval()
    pm.save_pretrained(str(tmp_path / "adapter"))
    assert any(k.startswith("base_model.model.bert.encoder.") for k in
               load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    summary = load_adapter(ours, tmp_path / "adapter")
    # output.dense is BERT's down_proj (fed forward) and also the attention output's o_proj
    assert "layers.0.mlp.down_proj" in summary.modules and "layers.0.attn.o_proj" in summary.modules
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = pm.base_model.model.bert(input_ids=ids, attention_mask=mask,
                                       token_type_ids=types).last_hidden_state[mask.bool()]
    torch.testing.assert_close(_out(ours, plinth=True), ref, atol=TOL, rtol=0)


def test_what_peft_cannot_express_is_refused_and_saves_in_plinth_layout(tmp_path):
    _, ours, _ = hf_imported("bert", tmp_path)
    apply_method(ours, ft("lora", rank=2, target_modules=["q_proj", "lm_head"]))
    _perturb(ours)
    with pytest.raises(NotSupportedError) as e:
        save_adapter(ours, tmp_path / "a", format="peft")
    msg = str(e.value)
    assert "lm_head has no counterpart in BertModel" in msg
    assert "Targets that export: layers.*.attn.q_proj" in msg and "format='plinth'" in msg
    save_adapter(ours, tmp_path / "a")  # auto: plinth's own layout, saying why
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["plinth_method"] == "lora" and "peft_type" not in config
    assert config["plinth_not_peft"] == msg
    _, again, _ = hf_imported("bert", tmp_path / "again")
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(_out(again, plinth=True), _out(ours, plinth=True), atol=0, rtol=0)


def test_ia3_scaling_the_shared_input_of_c_attn_differently_is_refused(tmp_path):
    _, ours, _ = hf_imported("gpt2", tmp_path)
    apply_method(ours, ft("ia3"))
    attn = ours.layers[0].attn  # q, k and v scale their (shared) input, q differently
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, IA3Linear(_linear(getattr(attn, name)), feedforward=True))
    with torch.no_grad():
        attn.q_proj.ia3_l.fill_(2.0)
    with pytest.raises(NotSupportedError) as e:
        save_adapter(ours, tmp_path / "a", format="peft")
    msg = str(e.value)
    assert "layers.0.attn.q_proj, layers.0.attn.k_proj, layers.0.attn.v_proj scale the input " \
           "of the fused transformer.h.0.attn.c_attn" in msg
    assert "transformer.h.1" not in msg and "format='plinth'" in msg
    with torch.no_grad():
        attn.q_proj.ia3_l.fill_(1.0)  # one vector for all three: c_attn's input scaling
    save_adapter(ours, tmp_path / "b")
    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert tensors["base_model.model.transformer.h.0.attn.c_attn.ia3_l"].shape == (1, 64)
    assert tensors["base_model.model.transformer.h.1.attn.c_attn.ia3_l"].shape == (3 * 64, 1)


def _linear(layer) -> torch.nn.Linear:
    """A plain nn.Linear on the same weight and bias (unwrapping an adapter layer)."""
    lin = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    lin.weight, lin.bias = layer.weight, layer.bias
    return lin


def test_adapter_saved_on_one_imported_model_is_refused_by_another(tmp_path):
    _, ours, base = hf_imported("gpt2", tmp_path)
    apply_method(ours, ft("lora", rank=2, target_modules=["q_proj", "v_proj"]))
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    mine = json.loads((base / "import.json").read_text())["fingerprint"]
    assert recorded["plinth_base_fingerprint"] == mine == base_fingerprint(ours)

    _, other, other_dir = hf_imported("gpt2", tmp_path, seed=1)  # same shape, other weights
    theirs = json.loads((other_dir / "import.json").read_text())["fingerprint"]
    assert theirs != mine and base_fingerprint(other) == theirs
    with pytest.raises(UsageError) as e:
        load_adapter(other, tmp_path / "adapter")
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg and f"adapter in {tmp_path / 'adapter'}" in msg
    assert mine in msg and theirs in msg
    assert f"Load it onto {base} (its import.json records the adapter's fingerprint)" in msg
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # nothing half-loaded
