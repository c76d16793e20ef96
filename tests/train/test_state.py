"""Checkpoints: atomic, verified, tied weights restored, RNG round trip, pruning keeps best."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from plinth.errors import PlinthError
from plinth.track.checkpoints import list_checkpoints, step_dir
from plinth.train import state as ckpt


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


def save(tmp_path, step, model=None):
    model = model or Tied()
    return ckpt.save_checkpoint(tmp_path, step, model, {"step": step, "x": torch.arange(3)}, {})


def test_round_trip_restores_tied_weights(tmp_path):
    torch.manual_seed(0)
    a = Tied()
    save(tmp_path, 5, a)
    loaded = ckpt.load_latest(tmp_path)
    assert list(loaded.weights) == ["embed.weight"]  # stored once
    b = Tied()
    ckpt.load_weights(b, loaded.weights)
    assert torch.equal(b.head.weight, a.embed.weight) and b.head.weight is b.embed.weight
    assert loaded.train_state["step"] == 5 and torch.equal(loaded.train_state["x"], torch.arange(3))


def test_no_tmp_left_and_tmp_leftovers_are_ignored(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "step_0000002.tmp").mkdir()  # a crash mid-write
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: p.write_bytes(p.read_bytes()[:10]), "truncated"),
        (lambda p: p.write_bytes(b"x" * p.stat().st_size), "corrupted"),
        (lambda p: p.unlink(), "missing"),
    ],
)
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, reason):
    save(tmp_path, 1)
    save(tmp_path, 2)
    damage(tmp_path / "step_0000002" / ckpt.MODEL_FILE)
    loaded = ckpt.load_latest(tmp_path)
    assert loaded.path.name == "step_0000001"
    assert loaded.skipped[0][0].name == "step_0000002" and reason in loaded.skipped[0][1]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(PlinthError, match="no usable checkpoint"):
        ckpt.load_latest(tmp_path)


def test_untrusted_pickles_are_refused(tmp_path):
    save(tmp_path, 1)
    path = tmp_path / "step_0000001" / ckpt.STATE_FILE

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"evil": Evil()}, path)
    with pytest.raises(PlinthError, match=r"train_state.pt is (truncated|corrupted)"):
        ckpt.load_checkpoint(tmp_path / "step_0000001")  # the checksum catches it first
    with pytest.raises(Exception, match="Weights only load failed"):  # and a forged meta.json
        ckpt.load_checkpoint(tmp_path / "step_0000001", check=False)


def test_rng_state_round_trip():
    torch.manual_seed(3)
    random.seed(3)
    state = ckpt.rng_state()
    a = (torch.rand(3), random.random())
    torch.manual_seed(99)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


def test_prune_keeps_last_n_and_best(tmp_path):
    for s in range(1, 6):
        save(tmp_path, s)
    ckpt.prune(tmp_path, keep_last=2, best=step_dir(tmp_path, 2))
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_0000002",
        "step_0000004",
        "step_0000005",
    ]
