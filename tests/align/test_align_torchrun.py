"""DPO under torchrun (2 CPU ranks, gloo, DDP) follows the one-process run within 1e-5: loss,
margins, accuracy, rewards and held-out metrics, step by step.

    python -m pytest tests/align/test_align_torchrun.py -q -m slow
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.track.run import read_jsonl

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


def _align(nproc: int, args: list[str]) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "plinth", "align", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per rank
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow  # 2 torchrun launches, ~90 s; run with -m slow
def test_ddp_dpo_matches_one_process(base_run, tmp_path):
    common = [
        f"finetune.base={base_run}", "align.method=dpo",
        f"align.dataset={DATA / 'concise_prefs.train.jsonl'}",
        f"align.val_dataset={DATA / 'concise_prefs.val.jsonl'}",
        "finetune.max_length=48", "finetune.method=lora", "finetune.rank=4",
        "finetune.lora_dropout=0", "finetune.max_steps=6", "model.dropout=0",
        "optim.schedule=constant", "optim.lr=3e-3", "optim.micro_batch=2",
        "optim.global_batch=8", "hardware.device=cpu", "tracking.log_every=1",
        "tracking.eval_every=3", "tracking.eval_batches=4", "tracking.sample_every=1000",
        "--quiet", f"tracking.output_dir={tmp_path}",
    ]
    _align(1, [*common, "tracking.run_name=one"])
    _align(2, [*common, "tracking.run_name=two", "distributed.strategy=ddp"])

    def curve(name: str, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_jsonl(tmp_path / name / "metrics.jsonl")
                if key in r}

    keys = ("train/loss", "train/margin", "train/accuracy", "train/chosen_reward",
            "train/rejected_logp", "val/loss", "val/margin", "val/accuracy", "tokens")
    for key in keys:
        one, two = curve("one", key), curve("two", key)
        assert one.keys() == two.keys() and len(one) >= 3, key
        assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (key, one, two)
    assert curve("one", "train/margin")[6] != 0  # it trained: the comparison is not of zeros
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").is_file()
