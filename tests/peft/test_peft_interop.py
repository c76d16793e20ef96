"""Adapters in the PEFT library's on-disk format: plinth's load in `peft` with the same logits,
peft's load in plinth with the same logits, and a different base model is refused.

    python -m pytest tests/peft/test_peft_interop.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from peft_helpers import batch, ft, hf_llama_pair, tiny_model, train
from safetensors.torch import load_file

from plinth.errors import UsageError
from plinth.peft import apply_method, base_fingerprint, load_adapter, merge, save_adapter

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _perturb(model, seed: int = 0) -> None:
    """Adapter values far from their init, so a wrong mapping cannot hide behind zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(
    "method,targets",
    [("lora", ["q_proj", "v_proj"]), ("lora", [*ALL, "lm_head"]), ("dora", ALL), ("ia3", None)],
)
def test_plinth_adapter_loads_in_peft_with_the_same_logits(tmp_path, method, targets):
    hf, ours = hf_llama_pair()
    kw = {"target_modules": targets} if targets else {}
    apply_method(ours, ft(method, rank=4, alpha=8.0, **kw))
    _perturb(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="random-llama")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    if method == "ia3":
        assert config["peft_type"] == "IA3"
        assert "base_model.model.model.layers.0.mlp.down_proj.ia3_l" in keys
    else:
        assert config["peft_type"] == "LORA" and config["use_dora"] == (method == "dora")
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert config["plinth_base_fingerprint"] == base_fingerprint(hf_llama_pair()[1])

    with pytest.warns(UserWarning, match="plinth_base_fingerprint"):  # the extra key
        loaded = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    x = batch(t=24)
    with torch.no_grad():
        ref, got = loaded(x).logits, ours.eval()(x)
        plain = hf_llama_pair()[0](x).logits
    assert (ref - plain).abs().max() > 1e-2  # the adapter matters
    diff = (got - ref).abs().max().item()
    print(f"{method} {len(targets or [])} targets: plinth vs peft max abs diff {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_in_plinth_with_the_same_logits(tmp_path, dora):
    hf, ours = hf_llama_pair()
    fingerprint = base_fingerprint(ours)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj", "down_proj"],
        init_lora_weights=False, use_dora=dora, rank_pattern={"up_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 3}, task_type="CAUSAL_LM",
    )
    torch.manual_seed(3)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(str(tmp_path))
    summary = load_adapter(ours, tmp_path)
    assert summary.method == ("dora" if dora else "lora") and len(summary.modules) == 8
    assert ours.layers[0].mlp.up_proj.rank == 2 and ours.layers[1].attn.q_proj.alpha == 3
    x = batch(t=24)
    with torch.no_grad():
        ref, got = pm(x).logits, ours.eval()(x)
    diff = (got - ref).abs().max().item()
    print(f"peft -> plinth ({'dora' if dora else 'lora'}): max abs diff {diff:.2e}")
    assert diff <= 1e-4
    # loaded adapters train like applied ones; the base is frozen
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n in ours.state_dict() if "lora_" in n
    }
    assert ours.peft_base_fingerprint == fingerprint


def test_peft_ia3_adapter_loads_in_plinth(tmp_path):
    hf, ours = hf_llama_pair()
    config = peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"], init_ia3_weights=False,
                            task_type="CAUSAL_LM")
    torch.manual_seed(4)
    pm = peft.get_peft_model(hf, config).eval()
    pm.save_pretrained(str(tmp_path))
    load_adapter(ours, tmp_path)
    x = batch(t=24)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), pm(x).logits, atol=1e-4, rtol=0)


def test_round_trip_in_plinth_and_a_wrong_base_is_refused(tmp_path):
    model = tiny_model()
    apply_method(model, ft("lora", rank=2, target_modules=ALL))
    train(model, batch(), steps=3)
    save_adapter(model, tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 0.1 * sum(p.numel() * 4 for p in model.parameters())  # adapters alone

    again = tiny_model()
    load_adapter(again, tmp_path)
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x), atol=0, rtol=0)

    # the same base in bf16 has the same fingerprint; another seed does not
    assert base_fingerprint(tiny_model().bfloat16()) == base_fingerprint(tiny_model())
    with pytest.raises(UsageError, match=r"different base model.*plinth_base_fingerprint"):
        load_adapter(tiny_model(seed=1), tmp_path)


@pytest.mark.parametrize("method", ["adapter", "prefix"])
def test_methods_peft_cannot_express_save_in_plinth_names(tmp_path, method):
    model = tiny_model()
    apply_method(model, ft(method, rank=4, freeze_layers=1))
    _perturb(model)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_type" not in config and config["plinth_method"] == method
    again = tiny_model()
    summary = load_adapter(again, tmp_path)
    assert summary.method == method
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x), atol=0, rtol=0)


def test_merged_and_qlora_models_save_the_fingerprint_recorded_at_apply(tmp_path):
    fp = base_fingerprint(tiny_model())
    for method in ("lora", "qlora"):
        model = tiny_model()
        apply_method(model, ft(method, rank=2, target_modules=["q_proj", "up_proj"]))
        train(model, batch(), steps=2)
        if method == "lora":
            merge(model)  # the base weights now hold the update
        assert base_fingerprint(model) == fp
        save_adapter(model, tmp_path / method)
        config = json.loads((tmp_path / method / "adapter_config.json").read_text())
        assert config["plinth_base_fingerprint"] == fp
        load_adapter(tiny_model(), tmp_path / method)  # the dense base accepts it


def test_an_adapter_with_a_fingerprint_of_another_scheme_says_so(tmp_path):
    model = tiny_model()
    apply_method(model, ft("lora", rank=2, target_modules=["q_proj"]))
    save_adapter(model, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["plinth_base_fingerprint"] = "a" * 64  # what plinth wrote before the shared scheme
    config_file.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"scheme this plinth does not compute.*"
                                         r"check_base=False\) and save it again"):
        load_adapter(tiny_model(), tmp_path)
    again = tiny_model()
    load_adapter(again, tmp_path, check_base=False)
    assert again.peft_base_fingerprint == base_fingerprint(tiny_model())  # the current scheme
