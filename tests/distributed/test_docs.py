"""The multi-GPU and multi-node commands in the docs use real config keys and valid shell."""

from __future__ import annotations

import re
import subprocess

from plinth.config.load import load_config


def overrides_in(text: str) -> list[str]:
    return sorted(set(re.findall(r"(?<![-\w])((?:preset|[a-z_]+\.[a-z_.]+)=[\w.]+)", text)))


def test_documented_commands_use_valid_config(repo_root):
    doc = (repo_root / "docs" / "distributed.md").read_text()
    sbatch = (repo_root / "examples" / "slurm" / "pretrain.sbatch").read_text()
    found = overrides_in(doc + sbatch)
    assert "distributed.strategy=fsdp" in found and "distributed.strategy=hsdp" in found
    for override in found:  # each documented key=value resolves (unknown keys would raise)
        load_config([], [override])
    for flag in ("--nnodes", "--node_rank", "--rdzv_endpoint", "--nproc_per_node"):
        assert flag in doc
    assert "srun torchrun" in sbatch and "--rdzv_backend=c10d" in sbatch


def test_slurm_script_is_valid_bash(repo_root):
    script = repo_root / "examples" / "slurm" / "pretrain.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
