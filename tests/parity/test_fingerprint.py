"""One fingerprint of a model's weights (plinth.hf.fingerprints) for import.json and adapters: the
same value from the file, the model, another process and a bf16 copy; any change to a row shows;
cheap on the 135M-parameter reference model.

    python -m pytest tests/parity/test_fingerprint.py -q            # -m slow: ref-smollm2
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from plinth.errors import UsageError
from plinth.hf import fingerprint, import_model, reference_path
from plinth.load import load_trained
from plinth.peft import base_fingerprint

GOLDEN = "sampled-sha256:db66d861cbe6e32b09397cf82afa768634678bd5c43ae89bfd94e91fa6509f59"


def _golden_state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(12.0).reshape(3, 4) / 7, "b": torch.arange(5000.0) / 3}


def test_the_scheme_is_pinned_and_dtype_independent():
    """A fixed value: any change to the scheme must rename it (old adapters then say so)."""
    state = _golden_state()
    assert fingerprint(state) == GOLDEN
    assert fingerprint({k: v.bfloat16() for k, v in reversed(state.items())}) == GOLDEN
    code = ("import torch; from plinth.hf import fingerprint; print(fingerprint("
            "{'w': torch.arange(12.0).reshape(3, 4) / 7, 'b': torch.arange(5000.0) / 3}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == GOLDEN  # another process


def test_every_row_and_every_name_counts():
    base = {"embed": torch.randn(20000, 8, generator=torch.Generator().manual_seed(0))}
    fp = fingerprint(base)
    for row in (0, 777, 19999):  # one token's embedding changed: far more rows than SAMPLE
        changed = {"embed": base["embed"].clone()}
        changed["embed"][row] += 0.5
        assert fingerprint(changed) != fp, row
    assert fingerprint({"other": base["embed"]}) != fp
    assert fingerprint({"embed": base["embed"].reshape(8, 20000)}) != fp


def _reference(name: str):
    try:
        return reference_path(name)
    except UsageError as e:
        pytest.skip(str(e))


def _check_import(out) -> tuple[str, float]:
    """import.json's fingerprint is the file's and the loaded model's; returns it and the time
    base_fingerprint takes on the model."""
    info = json.loads((out / "import.json").read_text())
    net, _, _ = load_trained(out)
    assert fingerprint(load_file(str(out / "model.safetensors"))) == info["fingerprint"]
    start = time.perf_counter()
    got = base_fingerprint(net)
    seconds = time.perf_counter() - start
    assert got == info["fingerprint"]
    assert base_fingerprint(net.bfloat16()) == info["fingerprint"]
    return info["fingerprint"], seconds


def test_minilm_import_json_fingerprint_is_the_models(tmp_path):
    _reference("ref-minilm")
    import_model("ref-minilm", tmp_path / "m")
    fp, seconds = _check_import(tmp_path / "m")
    print(f"\nref-minilm: {fp} in {seconds * 1e3:.1f} ms")


@pytest.mark.slow  # importing (dequantising) the GGUF takes ~20 s here
def test_smollm2_fingerprint_is_cheap_and_matches_import_json(tmp_path):
    pytest.importorskip("gguf")
    _reference("ref-smollm2")
    import_model("ref-smollm2", tmp_path / "m")
    fp, seconds = _check_import(tmp_path / "m")
    print(f"\nref-smollm2 (135M parameters): base_fingerprint {seconds * 1e3:.1f} ms ({fp})")
    assert seconds < 1.0
