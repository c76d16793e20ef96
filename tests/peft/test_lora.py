"""LoRA and DoRA as module swaps: exact start, merge/unmerge, the disable switch, names kept,
training with the project's optimizer and checkpoints, and clear errors.

    python -m pytest tests/peft/test_lora.py -q
"""

from __future__ import annotations

import pytest
import torch
from peft_helpers import V, batch, ft, loss_of, snapshot, tiny_model, train

from plinth.config.schema import OptimConfig
from plinth.errors import UsageError
from plinth.peft import apply_method, disable_adapters, merge, unmerge
from plinth.peft.lora import LoRALinear
from plinth.train.optim import build_optimizer
from plinth.train.state import load_checkpoint, save_checkpoint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_zero_init_starts_exactly_at_the_base(method):
    base = tiny_model()
    x = batch()
    with torch.no_grad():
        ref = base(x)
    summary = apply_method(base, ft(method, target_modules=ALL))
    with torch.no_grad():
        got = base(x)
    assert summary.trainable < 0.2 * summary.total
    assert len(summary.modules) == 2 * len(ALL)
    if method == "lora":
        assert torch.equal(got, ref)  # B = 0: the update is exactly zero
    else:  # m / ||W|| = 1 up to rounding of the norm
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_names_are_kept_and_only_adapters_train():
    model = tiny_model()
    before = set(model.state_dict())
    apply_method(model, ft("dora", target_modules=["q_proj", "down_proj"]))
    after = set(model.state_dict())
    assert before <= after  # every base key is still there, same name
    new = sorted(after - before)
    assert new[:3] == [
        "layers.0.attn.q_proj.lora_A.weight",
        "layers.0.attn.q_proj.lora_B.weight",
        "layers.0.attn.q_proj.lora_magnitude_vector",
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(new)
    opt = build_optimizer(model, OptimConfig())  # takes only requires_grad parameters
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for n, p in model.named_parameters() if n in trainable}


def test_lora_on_q_proj_takes_effect():
    """Attention fuses q/k/v into one GEMM only for plain nn.Linear; a LoRA q_proj must be
    called (not bypassed): with a nonzero B the logits equal a model whose q_proj weight
    carries the update."""
    model, manual = tiny_model(), tiny_model()
    apply_method(model, ft("lora", target_modules=["layers.1.attn.q_proj"]))
    layer = model.layers[1].attn.q_proj
    assert isinstance(layer, LoRALinear)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.5)
        manual.layers[1].attn.q_proj.weight += layer.delta_weight()
    x = batch()
    with torch.no_grad():
        got, ref, base = model(x), manual(x), tiny_model()(x)
    assert (got - base).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_train_then_merge_equals_unmerged_and_unmerge_restores_base(method):
    model = tiny_model()
    x = batch()
    with torch.no_grad():
        base_logits = model(x)
    apply_method(model, ft(method, target_modules=ALL, lora_dropout=0.1))
    base_state = {k: v for k, v in snapshot(model).items() if "lora" not in k}
    losses = train(model, x, steps=8, lr=1e-2)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base_logits).abs().max() > 1e-2  # training moved the output
        with disable_adapters(model):
            torch.testing.assert_close(model(x), base_logits, atol=1e-6, rtol=0)
        assert merge(model) == 2 * len(ALL)
        merged = model(x)
        # merged weights differ from the base; the merged model equals the adapted one
        assert not torch.equal(model.layers[0].attn.q_proj.weight, base_state[
            "layers.0.attn.q_proj.weight"])
        diff = (merged - adapted).abs().max().item()
        print(f"{method}: merged vs unmerged max abs diff {diff:.2e}")
        assert diff <= 1e-5
        with disable_adapters(model):  # unmerges for the duration, merges again after
            torch.testing.assert_close(model(x), base_logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), merged, atol=1e-6, rtol=0)
        unmerge(model)
        for k, v in base_state.items():
            torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=0)


def test_base_weights_bit_identical_after_training():
    model = tiny_model()
    apply_method(model, ft("lora", target_modules=ALL))
    before = snapshot(model)
    train(model, batch(), steps=5)
    after = model.state_dict()
    for k, v in before.items():
        if "lora_" not in k:
            assert torch.equal(after[k], v), k
        else:
            assert "lora_A" in k or not torch.equal(after[k], v), k  # B moved off zero


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix"])
def test_checkpoint_round_trip_resumes_identically(tmp_path, method):
    """plinth.train.state saves adapters under their new names (QLoRA: its 4-bit codes too) and
    the optimizer state of the trainable parameters only; a fresh adapted model resumes
    bit-for-bit."""
    x = batch()
    new_key = {"lora": "layers.0.attn.q_proj.lora_B.weight",
               "qlora": "layers.0.attn.q_proj.weight_nf4",
               "prefix": "layers.0.attn.prefix_kv.key"}[method]

    def fresh():
        m = tiny_model()
        apply_method(m, ft(method, **({} if method == "prefix" else {"target_modules": ALL})))
        m.train()
        return m, build_optimizer(m, OptimConfig(lr=1e-2, weight_decay=0.0))

    def step(m, opt):
        loss = loss_of(m, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    model, opt = fresh()
    for _ in range(3):
        step(model, opt)
    path = save_checkpoint(tmp_path, 3, model, {"step": 3}, {}, optimizer=opt)
    ref = [step(model, opt) for _ in range(3)]

    resumed, opt2 = fresh()
    loaded = load_checkpoint(path)
    assert new_key in loaded.weights
    loaded.load_into(resumed, opt2)
    got = [step(resumed, opt2) for _ in range(3)]
    assert got == ref


def test_target_modules_that_match_nothing_list_what_exists():
    with pytest.raises(UsageError) as e:
        apply_method(tiny_model(), ft("lora", target_modules=["q_proj", "qkv"]))
    msg = str(e.value)
    assert "finetune.target_modules" in msg and "['qkv']" in msg
    assert "layers.*.attn.q_proj" in msg and "layers.*.mlp.down_proj" in msg and "lm_head" in msg


@pytest.mark.parametrize("method", ["lora", "dora", "qlora"])
def test_rank_larger_than_the_layer_is_refused(method):
    model = tiny_model(n_kv_heads=2)  # k_proj: 64 in, 16 out
    with pytest.raises(UsageError) as e:
        apply_method(model, ft(method, rank=32, target_modules=["q_proj", "k_proj"]))
    assert str(e.value) == (
        "finetune.rank=32 is larger than layer layers.0.attn.k_proj allows (64 in, 16 out: a "
        "rank above 16 adds parameters but no capacity). Set finetune.rank to at most 16 or "
        "leave layers.0.attn.k_proj out of finetune.target_modules."
    )
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half-applied
    assert getattr(model, "peft_method", None) is None


def test_empty_target_modules_list_what_exists():
    with pytest.raises(UsageError, match=r"pattern\(s\) \[\] match no linear layer.*lm_head"):
        apply_method(tiny_model(), ft("lora", target_modules=[]))


def test_target_modules_in_hugging_face_names_are_translated_in_the_message():
    """GPT-2's fused c_attn and BERT's query/dense are plinth's q/k/v and projections."""
    from plinth.config.schema import ModelConfig
    from plinth.models import build_model

    gpt2 = build_model(ModelConfig(n_layers=2, d_model=64, n_heads=4, activation="gelu_tanh",
                                   norm="layernorm", positional="learned", bias=True))
    with pytest.raises(UsageError) as e:
        apply_method(gpt2, ft("lora", target_modules=["c_attn", "up_proj"]))
    msg = str(e.value)
    assert "['c_attn'] match no linear layer" in msg and "layers.*.attn.q_proj" in msg
    assert msg.endswith("In Hugging Face names: c_attn (GPT2LMHeadModel) is plinth's "
                        "layers.*.attn.q_proj, layers.*.attn.k_proj, layers.*.attn.v_proj.")
    bert = build_model(ModelConfig(
        arch="encoder", n_layers=2, d_model=64, n_heads=4, activation="gelu", norm="layernorm",
        norm_position="post", positional="learned", bias=True, type_vocab_size=2,
        tie_embeddings=True))
    with pytest.raises(UsageError, match=r"query \(BertModel\) is plinth's layers\.\*\.attn\."
                                         r"q_proj; output\.dense \(BertModel\) is plinth's "
                                         r"layers\.\*\.attn\.o_proj, layers\.\*\.mlp\.down_proj"):
        apply_method(bert, ft("lora", target_modules=["query", "output.dense"]))


def test_patterns_select_layers_and_freeze_layers_skips_blocks():
    model = tiny_model()
    s = apply_method(model, ft("lora", target_modules=["*_proj"], freeze_layers=1))
    assert s.modules == [f"layers.1.{p}" for p in (
        "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_lora_on_the_tied_head():
    model = tiny_model(tie_embeddings=True)
    apply_method(model, ft("lora", target_modules=["lm_head"]))
    assert model.lm_head.weight is model.embed_tokens.weight  # still one tensor
    x = batch()
    losses = train(model, x, steps=5)
    assert losses[-1] < losses[0]
    logits = model.eval()(x)
    assert logits.shape == (*x.shape, V)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_product_has_exact_gradients(bias):
    """plinth.peft.lora.lora_linear (one autograd function) against autograd's own derivative
    of x W^T + b + s (x A^T) B^T, in float64 (gradcheck), every input requiring grad."""
    from plinth.peft.lora import lora_linear

    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, w, a, b = t(2, 3, 6), t(5, 6), t(2, 6), t(5, 2)
    bias_t = t(5) if bias else None
    assert torch.autograd.gradcheck(
        lambda x, w, a, b, *bb: lora_linear(x, w, bb[0] if bb else None, a, b, 0.7),
        (x, w, a, b, *([bias_t] if bias else [])),
    )
    # and the value is the plain formula
    want = x @ w.t() + 0.7 * (x @ a.t()) @ b.t() + (bias_t if bias else 0)
    assert torch.allclose(lora_linear(x, w, bias_t, a, b, 0.7), want)
