"""The engine on a CUDA device: same tokens as on the CPU, int8 within its rounding error,
batched equals one-by-one. Skipped without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
from infer_helpers import tiny_model, word_tokenizer

from plinth.config.schema import Config
from plinth.infer.engine import Engine, SamplingParams
from plinth.infer.quant import Int8Linear, quantize_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PROMPTS = [[5, 9, 2, 17, 3], [40, 41], [7, 7, 8, 1, 2, 3, 30, 31]]


def engine(device: str, quantize: bool = False, dtype=None) -> Engine:
    model = tiny_model()
    if quantize:
        quantize_model(model, "int8")
    model.to(device=device, dtype=dtype)
    return Engine(model, word_tokenizer(), Config(model=model.cfg), eos_ids=[], device=device)


def test_cuda_tokens_and_logprobs_equal_cpu():
    sp = SamplingParams(max_new_tokens=12, logprobs=0)
    cpu, gpu = engine("cpu").generate(PROMPTS, sp), engine("cuda").generate(PROMPTS, sp)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in gpu]),
                               torch.tensor([c.logprobs for c in cpu]), atol=2e-4, rtol=0)
    one = [engine("cuda").generate([p], sp)[0].token_ids for p in PROMPTS]
    assert one == [c.token_ids for c in gpu]  # batched == one by one on the GPU too


def test_cuda_int8_linear_within_rounding_of_dequantised():
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 40)
    q = Int8Linear.from_linear(lin).cuda()
    for x in (torch.randn(5, 96, device="cuda"), torch.randn(96, 5, device="cuda").t()):
        # dense, and a strided view
        ref = x.double() @ q.dequantized().double().t().cuda() + lin.bias.double().cuda()
        torch.testing.assert_close(q(x).double(), ref, atol=1e-3, rtol=1e-3)


def test_cuda_int8_engine_matches_cpu_int8():
    sp = SamplingParams(max_new_tokens=10, logprobs=0)
    cpu = engine("cpu", quantize=True).generate(PROMPTS, sp)
    gpu = engine("cuda", quantize=True).generate(PROMPTS, sp)
    assert [c.token_ids for c in gpu] == [c.token_ids for c in cpu]
    torch.testing.assert_close(torch.tensor([c.logprobs for c in gpu]),
                               torch.tensor([c.logprobs for c in cpu]), atol=0.02, rtol=0)


def test_cuda_bf16_greedy_close_to_fp32():
    sp = SamplingParams(max_new_tokens=8)
    a = engine("cuda").generate(PROMPTS, sp)
    b = engine("cuda", dtype=torch.bfloat16).generate(PROMPTS, sp)
    same = sum(x.token_ids[:3] == y.token_ids[:3] for x, y in zip(a, b, strict=True))
    assert same >= 2


def test_cuda_rows_joining_a_session_equal_their_solo_generation():
    eng = engine("cuda")
    sp = SamplingParams(max_new_tokens=16, logprobs=0)
    long = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7]  # longer than the running position
    solo = [eng.generate([p], sp)[0] for p in [*PROMPTS, long]]
    s = eng.session()
    hs = [s.add(PROMPTS[0], sp)]
    done = {}
    for _ in range(3):
        done.update(s.step())
    hs += [s.add(p, sp) for p in [*PROMPTS[1:], long]]
    while s.live:
        done.update(s.step())
    for h, ref in zip(hs, solo, strict=True):
        assert done[h].token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(done[h].logprobs), torch.tensor(ref.logprobs),
                                   atol=1e-5, rtol=0)
