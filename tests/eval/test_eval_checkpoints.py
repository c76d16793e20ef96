"""Which checkpoint `plinth eval` scores, and the step it reports for it (plinth.load)."""

from __future__ import annotations

from plinth.eval.scoring import load_eval_model
from plinth.load import load_trained
from plinth.train.state import save_checkpoint


def test_leftover_tmp_checkpoint_is_ignored(tiny_run):
    """A crash mid-save leaves step_XXXXXXX.tmp; the lookup once parsed it as a step."""
    (tiny_run / "checkpoints" / "step_0000009.tmp").mkdir()
    m = load_eval_model(str(tiny_run))
    assert m.step == 7 and m.run_dir == tiny_run


def test_step_label_names_the_checkpoint_loaded(tiny_run):
    """A damaged newest checkpoint is skipped on load; the label must follow (it named 11)."""
    net, _, _ = load_trained(tiny_run)
    bad = save_checkpoint(tiny_run / "checkpoints", 11, net, {"step": 11}, {})
    (bad / "model.safetensors").write_bytes(b"damaged")
    m = load_eval_model(str(tiny_run))
    assert m.step == 7
    explicit = load_eval_model(str(tiny_run / "checkpoints" / "step_0000007"))
    assert explicit.step == 7
