"""The shipped alignment recipes on the real SmolLM2-135M-Instruct (slow: minutes on a CPU).

    python -m pytest tests/align/test_align_smollm2.py -q -m slow -s

- DPO + LoRA (configs/dpo-smollm2-lora.yaml) raises held-out preference accuracy and margin over
  the starting model, and its greedy answers to held-out questions are concise where the base's
  are not.
- A reward model (the same recipe with align.method=reward) ranks >= 90% of held-out pairs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from plinth.recipes.align import align

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]  # minutes on a busy CPU
REPO = Path(__file__).resolve().parents[2]
VAL = REPO / "configs" / "data" / "concise_prefs.val.jsonl"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _words(engine, prompts: list[str]) -> list[int]:
    from plinth.infer.engine import SamplingParams

    texts = [engine.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    outs = engine.generate(texts, SamplingParams(max_new_tokens=80))
    return [len(o.text.split()) for o in outs]


def test_dpo_prefers_concise_answers(tmp_path):
    from plinth.infer.engine import Engine

    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.perf_counter()
    assert align("dpo-smollm2-lora", [f"tracking.output_dir={tmp_path}"], quiet=True) == 0
    run = tmp_path / "dpo-smollm2-lora"
    val = [m for m in _metrics(run) if "val/accuracy" in m]
    first, last = val[0], val[-1]
    print(f"\nDPO {time.perf_counter() - t0:.0f}s: held-out accuracy {first['val/accuracy']:.2f}"
          f" -> {last['val/accuracy']:.2f}, margin {first['val/margin']:.2f} -> "
          f"{last['val/margin']:.2f}")
    assert first["step"] == 0 and first["val/margin"] == 0
    assert last["val/accuracy"] >= 0.9 and last["val/margin"] > 1.0
    prompts = [json.loads(x)["prompt"] for x in VAL.read_text().splitlines()[:10]]
    base = _words(Engine.load("ref-smollm2"), prompts)
    tuned = _words(Engine.load(str(run)), prompts)
    print(f"greedy answer words, base: {base}\n                   aligned: {tuned}")
    assert sum(tuned) < 0.5 * sum(base) and max(tuned) <= 20, (base, tuned)


def test_reward_model_ranks_held_out_pairs(tmp_path):
    over = [f"tracking.output_dir={tmp_path}", "align.method=reward",
            "tracking.run_name=rm", "finetune.max_steps=15",
            "tracking.eval_every=15", "tracking.eval_batches=15"]
    t0 = time.perf_counter()
    assert align("dpo-smollm2-lora", over, quiet=True) == 0
    val = [m for m in _metrics(tmp_path / "rm") if "val/accuracy" in m]
    print(f"\nreward model {time.perf_counter() - t0:.0f}s: held-out accuracy "
          f"{val[0]['val/accuracy']:.2f} -> {val[-1]['val/accuracy']:.2f}")
    assert val[-1]["val/accuracy"] >= 0.9
