"""`plinth align` for the offline methods (dpo, simpo, orpo, kto, reward) on a tiny pretrained
plinth run, through the one loop: metrics, exact resume, the reference model's three forms,
reward models as heads, and the config checks.

    python -m pytest tests/align/test_align_loop.py -q
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plinth.cli import main
from plinth.finetune.config import load_finetune_config
from plinth.recipes.align import align, run_alignment

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


def _args(base_run: Path, tmp_path: Path, method: str, *extra: str) -> list[str]:
    data = "concise_kto.train.jsonl" if method == "kto" else "concise_prefs.train.jsonl"
    return [
        f"finetune.base={base_run}",
        f"align.method={method}",
        f"align.dataset={DATA / data}",
        "finetune.val_fraction=0.1",
        "finetune.max_length=48",
        "finetune.method=lora",
        "finetune.rank=4",
        "finetune.alpha=8",
        "finetune.lora_dropout=0.0",
        "finetune.target_modules=[q_proj, v_proj, o_proj, down_proj]",
        "finetune.max_steps=6",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "optim.micro_batch=4",
        "optim.global_batch=8",
        "tracking.log_every=1",
        "tracking.eval_every=3",
        "tracking.eval_batches=2",
        "tracking.sample_every=100",
        "tracking.checkpoint_every=3",
        f"tracking.output_dir={tmp_path / 'runs'}",
        f"tracking.run_name={method}",
        *extra,
    ]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(run: Path, key: str) -> list[float]:
    return [m[key] for m in _metrics(run) if key in m]


EXPECTED = {
    "dpo": {"margin", "accuracy", "chosen_reward", "rejected_reward", "chosen_logp"},
    "simpo": {"margin", "accuracy", "chosen_reward", "rejected_reward"},
    "orpo": {"margin", "accuracy", "log_odds_ratio", "nll"},
    "kto": {"kl", "chosen_reward", "rejected_reward"},
    "reward": {"accuracy", "margin", "chosen_score", "rejected_score"},
}


@pytest.mark.parametrize("method,extra", [
    ("dpo", []), ("simpo", []), ("orpo", []), ("kto", []), ("reward", []),
    # a full fine-tune's reference is a frozen copy, rebuilt from the base on resume
    ("dpo", ["finetune.method=full", "optim.lr=1e-4", "model.dropout=0.1"]),
])
def test_method_runs_and_resumes_exactly(method, extra, base_run, tmp_path):
    """N + resume + N == 2N bit for bit (losses, metrics, weights), and the method's own metrics
    are in metrics.jsonl, finite."""
    resolved, base_dir = load_finetune_config([], _args(base_run, tmp_path, method, *extra))
    whole = run_alignment(resolved, base_dir, progress=False)
    args = _args(base_run, tmp_path, method, *extra, f"tracking.run_name={method}-cut")
    resolved, base_dir = load_finetune_config([], args)
    cut = run_alignment(resolved, base_dir, progress=False, stop_after=3)
    assert cut.step == 3 < whole.step == 6
    assert align(resume=str(cut.run_dir), quiet=True) == 0
    for key in ["train/loss", *(f"train/{k}" for k in EXPECTED[method])]:
        a, b = _train(whole.run_dir, key), _train(cut.run_dir, key)
        assert len(a) == 6 and a == b, key
        assert all(math.isfinite(x) for x in a), key
    val = [m for m in _metrics(whole.run_dir) if "val/loss" in m]
    assert val[0]["step"] == 0 and {f"val/{k}" for k in EXPECTED[method]} <= set(val[0])
    last = sorted((whole.run_dir / "checkpoints").iterdir())[-1]
    cut_last = sorted((cut.run_dir / "checkpoints").iterdir())[-1]
    wa, wb = load_file(str(last / "model.safetensors")), load_file(
        str(cut_last / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_dpo_learns_the_preference(base_run, tmp_path):
    """Training pushes chosen above rejected on held-out pairs: at step 0 the policy is the
    reference (margin 0); after training the held-out margin and accuracy rise."""
    args = _args(base_run, tmp_path, "dpo", "finetune.max_steps=16", "tracking.eval_every=16",
                 "tracking.eval_batches=4")
    resolved, base_dir = load_finetune_config([], args)
    result = run_alignment(resolved, base_dir, progress=False)
    val = [m for m in _metrics(result.run_dir) if "val/margin" in m]
    assert val[0]["val/margin"] == 0 and val[0]["val/accuracy"] == 0
    assert val[-1]["val/margin"] > 0.5 and val[-1]["val/accuracy"] > 0.7, val[-1]
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("form", ["precompute", "copy"])
def test_reference_forms_agree(form, base_run, tmp_path):
    """The reference log-probs are the same numbers whether they come from switching the
    adapters off (LoRA), a frozen copy (full fine-tune) or a precomputed cache: step 1 of a
    LoRA run sees identical rewards with adapters-off and with a precomputed cache, and a full
    fine-tune's frozen copy starts at margin 0 like the adapters do."""
    base = _args(base_run, tmp_path, "dpo", "finetune.max_steps=2", "tracking.eval_every=100")
    resolved, base_dir = load_finetune_config([], base)
    free = run_alignment(resolved, base_dir, progress=False)
    if form == "precompute":
        extra = ["align.precompute_ref=true", "tracking.run_name=pre"]
    else:
        extra = ["finetune.method=full", "optim.lr=1e-4", "tracking.run_name=full"]
    resolved, base_dir = load_finetune_config([], [*base, *extra])
    other = run_alignment(resolved, base_dir, progress=False)
    a, b = _metrics(free.run_dir), _metrics(other.run_dir)
    first_a = next(m for m in a if "train/chosen_reward" in m)
    first_b = next(m for m in b if "train/chosen_reward" in m)
    # step 1: the policy equals the reference, so every implicit reward is 0
    assert first_a["train/chosen_reward"] == 0 and first_a["train/margin"] == 0
    assert abs(first_b["train/chosen_reward"]) < 1e-6 and abs(first_b["train/margin"]) < 1e-6
    if form == "precompute":  # same numbers from the cache as from the live reference
        assert _train(free.run_dir, "train/loss") == pytest.approx(
            _train(other.run_dir, "train/loss"), abs=1e-5)
        cache = list(DATA.glob("concise_prefs.train.jsonl.ref-*.safetensors"))
        try:
            assert cache, "the reference log-probs are stored beside the dataset"
        finally:
            for f in cache:
                f.unlink()


def test_reward_model_is_a_head_that_scores(base_run, tmp_path, capsys):
    """A reward model is saved like any head: `plinth classify` loads it and scores texts."""
    resolved, base_dir = load_finetune_config([], _args(base_run, tmp_path, "reward"))
    result = run_alignment(resolved, base_dir, progress=False)
    capsys.readouterr()
    assert main(["classify", str(result.run_dir), "--text", "Paris."]) == 0
    score, text = capsys.readouterr().out.split(maxsplit=1)
    assert math.isfinite(float(score)) and text.strip() == "Paris."
    assert main(["classify", str(result.run_dir), "--text", "Paris.", "--output",
                 str(tmp_path / "scores.jsonl")]) == 0
    row = json.loads((tmp_path / "scores.jsonl").read_text())
    assert row["value"] == pytest.approx(float(score), abs=1e-4)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("align.beta=0", "align.beta"),
        ("align.beta=-1", "align.beta"),
        ("align.loss_type=ipo2", "align.loss_type"),
        ("align.method=simpo align.loss_type=ipo", "align.loss_type"),
        ("align.method=grpo align.num_generations=1", "align.num_generations"),
        ("align.dataset=nowhere.jsonl", "align.dataset"),
        ("finetune.dataset=x.jsonl", "finetune.dataset"),
        ("align.method=simpo align.precompute_ref=true", "align.precompute_ref"),
        ("distributed.strategy=fsdp", "distributed.strategy"),
    ],
)
def test_bad_align_config_is_refused_before_anything_is_written(
        override, needle, base_run, tmp_path, capsys):
    args = [a for a in _args(base_run, tmp_path, "dpo") if not (
        a.startswith("align.method=") and "align.method=" in override)]
    args += override.split()
    assert main(["align", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override,needle", [
    ("align.beta=0", "align.beta"),
    ("align.method=grpo align.loss_type=dapo", "align.reward_funcs"),
    ("align.dataset=nowhere.jsonl", "align.dataset"),
    ("distributed.strategy=fsdp", "distributed.strategy"),
])
def test_config_validate_refuses_what_align_refuses(override, needle, capsys):
    assert main(["config", "validate", "dpo-smollm2-lora", *override.split()]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_config_validate_accepts_the_shipped_dpo_recipe(capsys):
    assert main(["config", "validate", "dpo-smollm2-lora"]) == 0
    assert "align dpo (lora) of ref-smollm2" in capsys.readouterr().out


def test_sft_then_dpo_then_compare(base_run, tmp_path, capsys):
    """The usual path: LoRA SFT, then DPO on top of that run (its adapter folded into its base),
    then the aligned run beside its SFT base in `plinth compare`, and generation from it."""
    from plinth.recipes.finetune import finetune

    sft = [f"finetune.base={base_run}", f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
           "finetune.max_length=48", "finetune.method=lora", "finetune.rank=4",
           "finetune.max_steps=3", "optim.micro_batch=4", "optim.global_batch=4",
           "tracking.eval_every=100", "tracking.sample_every=100",
           f"tracking.output_dir={tmp_path / 'runs'}", "tracking.run_name=sft"]
    assert finetune(None, sft, quiet=True) == 0
    sft_run = tmp_path / "runs" / "sft"
    args = _args(sft_run, tmp_path, "dpo", "finetune.max_steps=2", "tracking.eval_every=2")
    assert align(None, args, quiet=True) == 0
    dpo_run = tmp_path / "runs" / "dpo"
    val = [m for m in _metrics(dpo_run) if "val/margin" in m]
    assert val[0]["step"] == 0 and val[0]["val/margin"] == 0  # reference == the SFT model
    capsys.readouterr()
    html = tmp_path / "cmp.html"
    assert main(["compare", str(sft_run), str(dpo_run), "--output", str(html)]) == 0
    page = html.read_text()
    assert "sft" in page and "dpo" in page and "align" in page
    assert main(["generate", str(dpo_run), "--prompt", "What is 2 plus 2?",
                 "--max-new-tokens", "4"]) == 0


def test_an_unmergeable_fine_tune_is_refused_as_a_base(base_run, tmp_path, capsys):
    from plinth.recipes.finetune import finetune

    sft = [f"finetune.base={base_run}", f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
           "finetune.max_length=48", "finetune.method=prefix", "finetune.rank=4",
           "finetune.max_steps=1", "optim.micro_batch=4", "optim.global_batch=4",
           "tracking.eval_every=100", "tracking.sample_every=100",
           f"tracking.output_dir={tmp_path / 'runs'}", "tracking.run_name=prefix"]
    assert finetune(None, sft, quiet=True) == 0
    capsys.readouterr()
    args = _args(tmp_path / "runs" / "prefix", tmp_path, "dpo", "tracking.run_name=on-prefix")
    assert main(["align", *args]) == 2
    err = capsys.readouterr().err
    assert "prefix cannot be folded" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "on-prefix").exists()


def test_grpo_with_a_trained_reward_model(base_run, tmp_path):
    """A reward model trained by `align.method=reward` scores GRPO's completions: its score is
    logged as train/reward/reward_model and weighted into the reward with the functions."""
    resolved, base_dir = load_finetune_config([], _args(base_run, tmp_path, "reward",
                                                        "finetune.max_steps=2"))
    rm = run_alignment(resolved, base_dir, progress=False).run_dir
    args = [f"finetune.base={base_run}", "align.method=grpo",
            f"align.dataset={DATA / 'arithmetic.train.jsonl'}", "align.num_generations=2",
            "align.max_new_tokens=4", "align.reward_funcs=[exact_match]",
            f"align.reward_model={rm}", "align.reward_weights=[1.0, 0.5]",
            "finetune.max_length=48", "finetune.max_steps=2", "finetune.rank=4",
            "optim.micro_batch=2", "optim.global_batch=2", "tracking.log_every=1",
            "tracking.eval_every=100", "tracking.eval_batches=1", "tracking.sample_every=100",
            f"tracking.output_dir={tmp_path / 'runs'}", "tracking.run_name=grpo-rm"]
    assert align(None, args, quiet=True) == 0
    recs = [m for m in _metrics(tmp_path / "runs" / "grpo-rm") if "train/reward" in m]
    assert len(recs) == 2
    for m in recs:
        assert math.isfinite(m["train/reward/reward_model"]) and m["train/reward/reward_model"]
        want = m["train/reward/exact_match"] + 0.5 * m["train/reward/reward_model"]
        assert m["train/reward"] == pytest.approx(want, abs=1e-5)
