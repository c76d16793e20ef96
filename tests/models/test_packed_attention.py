"""Packed fine-tuning rows: each example computes exactly what it would alone."""

from __future__ import annotations

import torch

from plinth.config.schema import ModelConfig
from plinth.models import build_model
from plinth.models.decoder import segment_positions_and_mask
from plinth.models.layers import IGNORE_INDEX


def test_segment_positions_restart_and_mask_stays_inside():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    pos, mask = segment_positions_and_mask(seg)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    m = mask[0, 0]
    assert m[4].tolist() == [False, False, False, True, True, False]  # 2nd example, causal
    assert m[2].tolist() == [True, True, True, False, False, False]


def test_packed_row_equals_examples_alone():
    torch.manual_seed(0)
    for positional in ("rope", "learned"):
        cfg = ModelConfig(
            n_layers=2, d_model=32, n_heads=4, vocab_size=64, max_seq_len=16,
            positional=positional,
        )  # fmt: skip
        model = build_model(cfg).eval()
        a, b = torch.randint(0, 64, (1, 5)), torch.randint(0, 64, (1, 7))
        row = torch.cat([a, b, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # 2 pad tokens
        seg = torch.tensor([[1] * 5 + [2] * 7 + [0] * 2])
        packed = model(row, segment_ids=seg)
        assert torch.allclose(packed[:, :5], model(a), atol=1e-5)
        assert torch.allclose(packed[:, 5:12], model(b), atol=1e-5)
        # the fused loss path: summed CE over a packed row == the examples' sums
        labels = row.roll(-1, dims=1).clone()
        labels[:, [4, 11, 12, 13]] = IGNORE_INDEX  # no target across examples or in padding
        loss, _ = model(row, labels=labels, segment_ids=seg)
        la = model(a, labels=labels[:, :5])[0]
        lb = model(b, labels=labels[:, 5:12])[0]
        assert torch.allclose(loss, la + lb, atol=1e-4)
