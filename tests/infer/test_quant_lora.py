"""The engine's fast forward equals the model's, weight-only int8 stays within its error bound,
and LoRA adapters give the same tokens merged into the weights or applied on the fly.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_quant_lora.py -q
"""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_engine, tiny_model, word_tokenizer

from plinth.config.schema import Config
from plinth.errors import UsageError
from plinth.infer.engine import Engine, SamplingParams
from plinth.infer.fast import FastDecoder
from plinth.infer.quant import Int8Linear, quantize_int8, quantize_model

PROMPTS = [[5, 9, 13, 2, 40, 41, 7, 8, 30], [11], [3, 3, 3, 4]]


@pytest.mark.parametrize("kw", [
    dict(n_kv_heads=2, qk_norm=True),
    dict(n_kv_heads=1, positional="learned", norm="layernorm", bias=True, activation="gelu"),
    dict(tie_embeddings=True, activation="relu2", qkv_bias=True),
])
def test_fast_path_equals_the_models_forward(kw):
    fast, slow = tiny_engine(**kw), tiny_engine(**kw)
    slow.use_fast = False
    assert FastDecoder.supports(fast.model)
    sp = SamplingParams(max_new_tokens=12, logprobs=0)
    a, b = fast.generate(PROMPTS, sp), slow.generate(PROMPTS, sp)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]),
                               torch.tensor([c.logprobs for c in b]), atol=1e-5, rtol=0)
    # the model still works after the fast path re-laid its weights out (views, same values)
    assert fast.model(torch.tensor([PROMPTS[0]])).shape == (1, 9, fast.vocab_size)


def test_int8_linear_is_within_the_rounding_bound():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear.from_linear(lin)
    x = torch.randn(5, 96)
    w, s = lin.weight.detach(), q.scale
    # per-channel rounding: |w - s q| <= s / 2; the product also rounds x (and y) to bf16
    # on CPU (2^-8 relative each)
    bound = (s / 2)[None, :] * x.abs().sum(1, keepdim=True) + 2**-8 * (
        x.abs() @ w.abs().t()) * 2 + 1e-6
    err = (q(x) - lin(x)).abs()
    assert (err <= bound).all()
    qw, sc = quantize_int8(w)
    assert qw.dtype == torch.int8 and qw.abs().max() == 127
    assert ((qw.float() * sc[:, None] - w).abs() <= sc[:, None] / 2 + 1e-7).all()


def test_cpu_kernels_equal_float64_products():
    """plinth's AVX2 kernels (where they build) against float64 products (int8: dequantised),
    on shapes that exercise every tail: K not a multiple of 16, N not a multiple of 4, M of 1
    to 9."""
    from plinth.infer.quant import cpu_kernel

    kernel = cpu_kernel()
    if kernel is None:
        pytest.skip("no AVX2 CPU or no compiler: Int8Linear uses torch's kernel")
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(1, 64, 96), (3, 7, 37), (9, 130, 200), (2, 4, 16)]:
        q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
        s = torch.rand(N, generator=g) / 100
        x = torch.randn(M, K, generator=g)
        ref = x.double() @ (q.double() * s.double()[:, None]).t()
        torch.testing.assert_close(kernel.int8_mm(x, q, s).double(), ref, atol=1e-4, rtol=1e-5)
        w = torch.randn(N, K, generator=g)  # and the fp32 product the fast path uses
        torch.testing.assert_close(kernel.f32_mm(x, w).double(), x.double() @ w.double().t(),
                                   atol=1e-4, rtol=1e-5)


def test_int8_model_logits_close_to_fp32():
    ref = tiny_model()
    q8 = tiny_model()
    assert quantize_model(q8, "int8") == 2 * 7 + 1  # every linear, the head included
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        a, b = ref(ids), q8(ids)
    err = (a - b).abs().max().item()
    print(f"int8 max |logit error| on the tiny model: {err:.4f} (logits up to "
          f"{a.abs().max().item():.2f})")
    assert err < 0.03 * a.abs().max().item()  # measured 0.081 of 3.54 (2.3%)
    eng = Engine(q8, word_tokenizer(), Config(model=q8.cfg), eos_ids=[])
    slow = Engine(q8, word_tokenizer(), Config(model=q8.cfg), eos_ids=[])
    slow.use_fast = False
    sp = SamplingParams(max_new_tokens=10)
    assert [c.token_ids for c in eng.generate(PROMPTS, sp)] == \
        [c.token_ids for c in slow.generate(PROMPTS, sp)]
    with pytest.raises(UsageError, match="only weight-only quantisation is 'int8'"):
        quantize_model(tiny_model(), "int4")


@pytest.mark.slow
def test_int8_greedy_text_mostly_agrees_on_smollm2():
    fp = Engine.load("ref-smollm2")
    q8 = Engine.load("ref-smollm2", quantize="int8")
    prompts = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
    sp = SamplingParams(max_new_tokens=8)
    a, b = fp.generate(prompts, sp), q8.generate(prompts, sp)
    same = sum(x.token_ids[:4] == y.token_ids[:4] for x, y in zip(a, b, strict=True))
    print([x.text for x in a], [y.text for y in b])
    assert same >= 2


def lora_adapter(tiny_hf, tmp_path):
    """A LoRA adapter (rank 4 on q, v and down, non-zero B) for the tiny imported Llama."""
    from plinth.config.schema import FinetuneConfig
    from plinth.load import load_trained
    from plinth.peft import apply_method
    from plinth.peft.save import save_adapter

    _, path = tiny_hf
    net, _, _ = load_trained(path)
    apply_method(net, FinetuneConfig(method="lora", rank=4, alpha=8,
                                     target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return save_adapter(net, tmp_path / "adapter", str(path), format="plinth"), net


def test_lora_merged_equals_unmerged_and_changes_the_output(tiny_hf, tmp_path):
    adapter, net = lora_adapter(tiny_hf, tmp_path)
    _, path = tiny_hf
    merged = Engine.load(str(path), adapter=str(adapter))
    live = Engine.load(str(path), adapter=str(adapter), merge_adapter=False)
    base = Engine.load(str(path))
    assert FastDecoder.supports(merged.model) and not FastDecoder.supports(live.model)
    sp = SamplingParams(max_new_tokens=12, logprobs=0, ignore_eos=True)
    a, b = merged.generate(PROMPTS, sp), live.generate(PROMPTS, sp)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in a]),
                               torch.tensor([c.logprobs for c in b]), atol=1e-4, rtol=0)
    assert [c.token_ids for c in a] != [c.token_ids for c in base.generate(PROMPTS, sp)]
    # and both equal the adapted model's own full forward (greedy, first prompt)
    seq = torch.tensor([PROMPTS[0]])
    net.eval()
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, net(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert a[0].token_ids == seq[0, len(PROMPTS[0]):].tolist()
    with pytest.raises(UsageError, match="merge the adapter first"):
        Engine.load(str(path), adapter=str(adapter), merge_adapter=False, quantize="int8")
