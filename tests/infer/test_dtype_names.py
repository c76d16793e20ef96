"""One dtype spelling everywhere, the config's (fp32, bf16, fp16), in help and messages; torch's
names (float32, bfloat16, float16) accepted as input by generate, serve and the config.
(chat and eval take no dtype.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth.config.dtypes import canonical_dtype
from plinth.config.sections.runtime import DistributedConfig, HardwareConfig
from plinth.errors import UsageError
from plinth.infer.engine import weight_dtype

SRC = str(Path(__file__).resolve().parents[2] / "src")


def plinth(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "plinth", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_both_spellings_name_one_dtype():
    for short, long_, dt in (("fp32", "float32", torch.float32),
                             ("bf16", "bfloat16", torch.bfloat16),
                             ("fp16", "float16", torch.float16)):
        assert weight_dtype(short) is weight_dtype(long_) is weight_dtype(long_.upper()) is dt
        assert canonical_dtype(long_) == canonical_dtype(f"torch.{long_}") == short
    with pytest.raises(UsageError, match=r"--dtype 'float64'.*fp32, bf16 or fp16"):
        weight_dtype("float64")


def test_config_accepts_torch_names_and_keeps_its_own():
    assert HardwareConfig(precision="bfloat16").precision == "bf16"
    dist = DistributedConfig(param_dtype="float16", reduce_dtype="bfloat16")
    assert (dist.param_dtype, dist.reduce_dtype) == ("fp16", "bf16")
    with pytest.raises(ValueError, match="precision"):
        HardwareConfig(precision="float64")


def test_help_says_fp32_bf16_fp16():
    for cmd in ("generate", "serve"):
        r = plinth(cmd, "--help")
        assert r.returncode == 0
        text = " ".join(r.stdout.split())
        assert "fp32, bf16 or fp16" in text, text
        assert "float32, bfloat16, float16 also accepted" in text


def test_generate_takes_both_spellings(tiny_hf):
    outs = []
    for name in ("bf16", "bfloat16"):
        r = plinth("generate", str(tiny_hf[1]), "--prompt", "w5 w6", "--max-new-tokens", "4",
                   "--temperature", "0", "--dtype", name)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] == outs[1]


@pytest.mark.parametrize("cmd", ["generate", "serve"])
def test_a_bad_dtype_is_refused_before_the_model_loads(cmd, tmp_path):
    # the model does not exist: the dtype is checked first
    r = plinth(cmd, str(tmp_path / "no-model"), "--dtype", "float64", *(
        ["--prompt", "x"] if cmd == "generate" else []))
    assert r.returncode == 2, r.stderr
    assert "--dtype 'float64'" in r.stderr and "fp32, bf16 or fp16" in r.stderr
    assert "Traceback" not in r.stderr and "no-model" not in r.stderr
