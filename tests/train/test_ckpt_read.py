"""Checkpoint files that pass size and checksum checks but do not deserialize (fast, in
process): load_latest skips them naming the file, load_checkpoint refuses them (UsageError,
exit 2), partial (trainable-only) checkpoints check their base, and DCP's pickled metadata is
read with a restricted unpickler."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import zipfile

import pytest
import torch
from torch import nn

from plinth.errors import UsageError
from plinth.train import state as ckpt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.lora = nn.Linear(4, 2, bias=False)


def _save(tmp_path, step, model=None, base=None):
    model = model or Net()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    state = {k: {} for k in ("scheduler", "loader", "guard", "counters")}
    return ckpt.save_checkpoint(tmp_path, step, model, state, {}, optimizer=opt,
                                rank_state={"rng": ckpt.rng_state()}, base=base)


def _record(d, name, data: bytes):
    (d / name).write_bytes(data)
    meta = json.loads((d / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "meta.json").write_text(json.dumps(meta))


def _zip(d):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("x.txt", "not torch")
    _record(d, ckpt.STATE_FILE, buf.getvalue())
    return "train_state.pt does not deserialize"


def _header(d):
    data = bytearray((d / ckpt.MODEL_FILE).read_bytes())
    data[8:16] = b"!!!!!!!!"
    _record(d, ckpt.MODEL_FILE, bytes(data))
    return "model.safetensors does not deserialize"


def _random_state(d):
    _record(d, ckpt.STATE_FILE, os.urandom(2048))
    return "train_state.pt does not deserialize"


def _not_a_state(d):
    buf = io.BytesIO()
    torch.save({"just": torch.zeros(2)}, buf)
    _record(d, ckpt.STATE_FILE, buf.getvalue())
    return "train_state.pt lacks scheduler"


def _rank(d):
    _record(d, "ranks/rank_00000.pt", b"PK\x03\x04" + os.urandom(100))
    return "rank_00000.pt does not deserialize"


def _meta_files_list(d):
    (d / "meta.json").write_text('{"files": ["model.safetensors"]}')
    return "not a checkpoint manifest"


def _meta_entry(d):
    (d / "meta.json").write_text('{"files": {"model.safetensors": {"bytes": "12"}}}')
    return "not a checkpoint manifest"


def _meta_string(d):
    (d / "meta.json").write_text('"hello"')
    return "not a checkpoint manifest"


KINDS = [_zip, _header, _random_state, _not_a_state, _rank, _meta_files_list, _meta_entry,
         _meta_string]


@pytest.mark.parametrize("damage", KINDS, ids=lambda f: f.__name__.strip("_"))
def test_latest_that_does_not_load_is_skipped_and_explicit_is_refused(tmp_path, damage):
    _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    why = damage(bad)
    loaded = ckpt.load_latest(tmp_path, ckpt.RESUME_KEYS)
    assert loaded.path.name == "step_0000001"
    assert loaded.skipped[0][0] == bad and why in loaded.skipped[0][1]
    with pytest.raises(UsageError, match="unusable") as e:
        ckpt.load_checkpoint(bad, required=ckpt.RESUME_KEYS)
    assert str(bad) in str(e.value) and why in str(e.value)
    assert ckpt.problem(bad, ckpt.RESUME_KEYS) is not None


def test_nothing_usable_is_a_usage_error(tmp_path):
    _zip(_save(tmp_path, 1))
    with pytest.raises(UsageError, match=r"no usable checkpoint.*train_state\.pt does not"):
        ckpt.load_latest(tmp_path)


def test_trainable_only_checkpoint_checks_its_base(tmp_path):
    torch.manual_seed(0)
    model = Net()
    model.base.requires_grad_(False)
    model.peft_base_fingerprint = "sampled-sha256:aaa"
    base = {"name": "b", "dir": "/models/b", "fingerprint": "sampled-sha256:aaa"}
    path = _save(tmp_path, 1, model, base)
    loaded = ckpt.load_checkpoint(path)
    assert set(loaded.weights) == {"lora.weight"} and loaded.base == base
    torch.manual_seed(1)
    other = Net()
    other.base.load_state_dict(model.base.state_dict())  # the same base, another adapter
    other.base.requires_grad_(False)
    other.peft_base_fingerprint = "sampled-sha256:aaa"
    loaded.load_into(other)
    assert torch.equal(other.lora.weight, model.lora.weight)
    other.peft_base_fingerprint = "sampled-sha256:bbb"
    with pytest.raises(UsageError, match=r"'b' \(/models/b\), fingerprint sampled-sha256:aaa"):
        loaded.load_into(other)
    plain = Net()
    with pytest.raises(UsageError, match="holds only the trained weights"):
        loaded.load_into(plain)


def test_dcp_metadata_is_unpickled_safely(tmp_path):
    import torch.distributed.checkpoint as dcp

    m = nn.Linear(3, 2)
    dcp.save({"model": m.state_dict()}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    ckpt._check_dcp_metadata(tmp_path / "ok" / ".metadata")  # a real one reads

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ValueError, match="does not deserialize safely"):
        ckpt._check_dcp_metadata(tmp_path / "evil")
    assert not marker.exists()
