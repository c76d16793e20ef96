"""LoRA instruction tuning under torchrun (2 CPU ranks, gloo, DDP) follows the one-process run.

    python -m pytest tests/finetune/test_finetune_torchrun.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from plinth.track.run import read_jsonl

DATA = Path(__file__).resolve().parents[2] / "configs" / "data"


def _finetune(nproc: int, args: list[str]) -> None:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc > 1 else []), "-m", "plinth", "finetune", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 cores: one thread per rank
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_lora_sft_matches_one_process(base_run, tmp_path):
    common = [
        f"finetune.base={base_run}",
        f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
        f"finetune.val_dataset={DATA / 'json_answers.val.jsonl'}",
        "finetune.max_length=64", "finetune.method=lora", "finetune.rank=4",
        "finetune.lora_dropout=0", "finetune.max_steps=6", "model.dropout=0",
        "optim.schedule=constant", "optim.lr=3e-3", "optim.micro_batch=2",
        "optim.global_batch=8", "hardware.device=cpu", "tracking.log_every=1",
        "tracking.eval_every=3", "tracking.sample_every=1000", "--quiet",
        f"tracking.output_dir={tmp_path}",
    ]
    _finetune(1, [*common, "tracking.run_name=one"])
    _finetune(2, [*common, "tracking.run_name=two", "distributed.strategy=ddp"])

    def curve(name: str, key: str) -> dict[int, float]:
        return {r["step"]: r[key] for r in read_jsonl(tmp_path / name / "metrics.jsonl")
                if key in r}

    for key in ("train/loss", "val/loss", "tokens"):
        one, two = curve("one", key), curve("two", key)
        assert one.keys() == two.keys() and len(one) >= 3, key
        assert all(abs(one[s] - two[s]) < 1e-5 for s in one), (key, one, two)
    assert (tmp_path / "two" / "adapter" / "adapter_config.json").is_file()


def test_fsdp_lora_writes_the_adapter(base_run, tmp_path):
    """Sharded runs write adapter/ too (it was only written under none/ddp), with the trained
    weights: the adapter equals the final checkpoint's LoRA tensors."""
    from safetensors.torch import load_file

    from plinth.load import load_trained
    from plinth.peft.save import load_adapter

    args = [
        f"finetune.base={base_run}",
        f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
        "finetune.max_length=64", "finetune.method=lora", "finetune.rank=4",
        "finetune.max_steps=2", "optim.micro_batch=2", "optim.global_batch=4",
        "hardware.device=cpu", "tracking.eval_every=1000", "tracking.sample_every=1000",
        "--quiet", f"tracking.output_dir={tmp_path}", "tracking.run_name=fsdp",
        "distributed.strategy=fsdp",
    ]
    _finetune(2, args)
    run = tmp_path / "fsdp"
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert load_file(str(run / "adapter" / "adapter_model.safetensors"))
    trained, _, _ = load_trained(run)  # the final checkpoint, adapters included
    fresh, _, _ = load_trained(run)
    lora = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    assert lora and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    with torch.no_grad():
        for k, v in fresh.state_dict().items():
            if "lora_" in k:
                v.zero_()
    load_adapter(fresh, run / "adapter")
    for k, v in fresh.state_dict().items():
        if "lora_" in k:
            assert torch.equal(v, lora[k]), k
