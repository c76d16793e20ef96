"""Per-token log-probs without stored logits (the decoder's `token_logps=True`) equal
log_softmax of the materialised logits, in value and in gradient."""

import pytest
import torch

from plinth.config.schema import ModelConfig
from plinth.models import build_model
from plinth.models.layers import IGNORE_INDEX


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_token_logps_match_log_softmax(dtype, tol):
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=300, max_seq_len=64)
    m = build_model(cfg).to(dtype)
    ids = torch.randint(0, 300, (3, 20))
    labels = ids.clone()
    labels[0, :5] = IGNORE_INDEX
    labels[2, 15:] = IGNORE_INDEX
    weights = torch.randn(3, 20, dtype=dtype)

    out = m(ids, labels=labels, token_logps=True)
    assert out.shape == (3, 20)
    assert (out[labels == IGNORE_INDEX] == 0).all()
    (out * weights).sum().backward()
    fused = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()

    logp = torch.log_softmax(m(ids).to(dtype), -1)
    ref = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    ref = torch.where(labels != IGNORE_INDEX, ref, 0.0)
    assert (ref - out).abs().max() < tol
    (ref * weights).sum().backward()
    diffs = [(a - p.grad).abs().max().item() for a, p in zip(fused, m.parameters(), strict=True)]
    assert max(diffs) < tol

    with torch.no_grad():  # the reference model's path: no autograd, same numbers
        assert torch.equal(m(ids, labels=labels, token_logps=True), out.detach())
