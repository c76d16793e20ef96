"""Parameter-efficient fine-tunes checkpoint only what trains (plus optimizer state) and a
fingerprinted reference to the base; loading rebuilds base + adapter and refuses another base.
Also: which limit (max_steps or epochs) ended a fine-tune, and resuming a finished one."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from plinth.cli import main

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


def _args(base: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"finetune.base={base}",
        f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
        "finetune.max_length=64",
        "finetune.method=lora",
        "finetune.rank=4",
        "finetune.target_modules=[q_proj, v_proj]",
        "finetune.epochs=2",
        "optim.micro_batch=4",
        "optim.global_batch=8",
        "optim.warmup_steps=1",
        "tracking.eval_every=100",
        "tracking.sample_every=100",
        "tracking.checkpoint_every=2",
        f"tracking.output_dir={out}",
        "tracking.run_name=lora",
        *extra,
    ]


def _snapshot(root: Path) -> dict[str, str]:
    # writer.json names the last process that opened the run (its liveness record), not data
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file() and f.name != "writer.json"}


@pytest.fixture(scope="module")
def lora_run(base_run, tmp_path_factory) -> tuple[Path, Path, str]:
    """(a copy of the tiny base, a 2-step LoRA run on it, the run's stdout)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("lora")
    base = tmp / "base"
    shutil.copytree(base_run, base)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["finetune", *_args(base, tmp / "runs", "finetune.max_steps=2"),
                     "--quiet"]) == 0
    return base, tmp / "runs" / "lora", buf.getvalue()


def test_checkpoint_holds_the_adapter_and_a_base_reference(lora_run):
    base, run, _ = lora_run
    ckpt = run / "checkpoints" / "step_0000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert weights and all("lora_" in k for k in weights)  # no frozen base weights
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["weights"] == "trainable" and meta["base"]["dir"] == str(base.resolve())
    assert meta["base"]["fingerprint"].startswith("sampled-sha256:")
    base_bytes = (base / "checkpoints" / "step_0000020" / "model.safetensors").stat().st_size
    assert (ckpt / "model.safetensors").stat().st_size < base_bytes / 10


def test_the_limit_that_ended_the_run_is_named(lora_run, base_run, tmp_path, capsys):
    out = lora_run[2]
    assert "training for 2 steps, set by finetune.max_steps=2 (before finetune.epochs=2" in out
    assert "ended by finetune.max_steps=2" in out
    # epochs ending first: max_steps is said not to be reached
    argv = ["finetune", *_args(base_run, tmp_path, "finetune.epochs=0.05",
                               "finetune.max_steps=50"), "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "training for 1 steps, set by finetune.epochs=0.05" in out
    assert "finetune.max_steps=50 is not reached" in out and "ended by finetune.epochs" in out


def test_generate_rebuilds_base_and_adapter(lora_run, capsys):
    _, run, _ = lora_run
    assert main(["generate", str(run), "--prompt", "What is 2 plus 2?",
                 "--max-new-tokens", "3"]) == 0
    assert main(["generate", str(run / "checkpoints" / "step_0000002"), "--prompt", "Hi",
                 "--max-new-tokens", "2"]) == 0


def test_export_merges_the_rebuilt_base_and_adapter(lora_run, tmp_path, capsys):
    _, run, _ = lora_run
    assert main(["export", str(run), str(tmp_path / "hf")]) == 0
    merged = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert merged and not any("lora_" in k for k in merged)


def test_a_different_base_is_refused_naming_the_expected_one(lora_run, tmp_path, capsys):
    base, run, _ = lora_run
    meta = json.loads((run / "checkpoints" / "step_0000002" / "meta.json").read_text())
    want = meta["base"]["fingerprint"]
    moved = tmp_path / "base-moved"
    shutil.move(base, moved)  # the recorded base is gone ...
    try:
        other = tmp_path / "other"  # ... and finetune.base now names a different model
        shutil.copytree(moved, other)
        b = other / "checkpoints" / "step_0000020"
        shutil.rmtree(other / "checkpoints" / "step_0000010", ignore_errors=True)
        from safetensors.torch import save_file

        w = load_file(str(b / "model.safetensors"))
        w = {k: v + 0.5 for k, v in w.items()}
        save_file(w, str(b / "model.safetensors"))
        m = json.loads((b / "meta.json").read_text())
        data = (b / "model.safetensors").read_bytes()
        m["files"]["model.safetensors"] = {"bytes": len(data),
                                           "sha256": hashlib.sha256(data).hexdigest()}
        (b / "meta.json").write_text(json.dumps(m))
        cfg = run / "config.yaml"
        text = cfg.read_text()
        cfg.write_text(text.replace(str(base), str(other)))
        before = _snapshot(run)
        assert main(["generate", str(run), "--prompt", "x", "--max-new-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert want in err and str(base.resolve()) in err and "fingerprint" in err
        assert "Traceback" not in err and _snapshot(run) == before
        cfg.write_text(text)
    finally:
        shutil.move(moved, base)


def test_resuming_a_finished_fine_tune_changes_nothing(lora_run, capsys):
    _, run, _ = lora_run
    before = _snapshot(run)
    assert main(["finetune", "--resume", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and "already finished (step 2" in out and "nan" not in out
    assert _snapshot(run) == before
