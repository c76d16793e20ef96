"""GRPO / RLOO through the one training loop on a tiny pretrained decoder (fast): metrics,
reproducible rollouts, exact resume, the reference model, and bad input.

    python -m pytest tests/align/test_grpo.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth.align.rl import build_rl_task
from plinth.config.load import load_config
from plinth.errors import ConfigError, UsageError
from plinth.finetune.config import load_finetune_config
from plinth.track.run import RunDir
from plinth.train.hooks import Hooks
from plinth.train.loop import train

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


@pytest.fixture(scope="module")
def base_run(tiny_base, tmp_path_factory) -> Path:
    """A tiny decoder pretrained for a few steps (no chat template: plain prompts)."""
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("rl_base")
    over = [*tiny_base, "model.max_seq_len=128", "pretrain.max_steps=10",
            f"tracking.output_dir={out}", "tracking.run_name=base"]
    return run_pretraining(load_config(["quickstart"], over), progress=False).run_dir


def _args(base: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"finetune.base={base}",
        "align.method=grpo",
        f"align.dataset={DATA / 'arithmetic.train.jsonl'}",
        f"align.val_dataset={DATA / 'arithmetic.val.jsonl'}",
        "align.reward_funcs=[exact_match]",
        "align.num_generations=4",
        "align.max_new_tokens=4",
        "finetune.max_length=40",
        "finetune.method=lora",
        "finetune.rank=4",
        "finetune.max_steps=4",
        "optim.micro_batch=2",
        "optim.global_batch=4",
        "optim.lr=1e-3",
        "tracking.log_every=1",
        "tracking.eval_every=2",
        "tracking.eval_batches=2",
        "tracking.sample_every=2",
        "tracking.checkpoint_every=2",
        f"tracking.output_dir={tmp_path / 'runs'}",
        *extra,
    ]


def _task(base, tmp_path, *extra):
    resolved, base_dir = load_finetune_config([], _args(base, tmp_path, *extra))
    return resolved.config, build_rl_task(resolved.config, base_dir)


def _train(base, tmp_path, name, *extra, resume=False, stop_after=None):
    cfg, task = _task(base, tmp_path, *extra)
    run = RunDir(tmp_path / "runs" / name)
    result = train(cfg, task, run, hooks=Hooks(sample=task.samples), resume=resume,
                   progress=False, stop_after=stop_after)
    run.close()
    return result, task


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_and_logs_its_metrics(base_run, tmp_path):
    result, task = _train(base_run, tmp_path, "g", "align.reward_funcs=[exact_match, "
                          "length_penalty]", "align.reward_weights=[1.0, 0.5]")
    assert result.step == 4
    records = _metrics(result.run_dir)
    train_recs = [m for m in records if "train/loss" in m]
    assert len(train_recs) == 4
    for m in train_recs:
        for k in ("reward", "reward_std", "reward/exact_match", "reward/length_penalty",
                  "completion_length", "frac_zero_std", "clip_ratio", "truncated"):
            assert f"train/{k}" in m, k
        assert "train/kl" not in m  # kl_beta=0: no reference computed
        assert 1 <= m["train/completion_length"] <= 4
        assert 0 <= m["train/frac_zero_std"] <= 1
        # the weighted sum of the per-function means
        want = m["train/reward/exact_match"] + 0.5 * m["train/reward/length_penalty"]
        assert m["train/reward"] == pytest.approx(want, abs=1e-6)
    val = [m for m in records if "val/reward" in m]
    assert val[0]["step"] == 0 and val[-1]["step"] == 4  # the start policy, then training
    assert all(m["val/loss"] == -m["val/reward"] for m in val)
    samples = [json.loads(x) for x in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[0]["prompt"].startswith("What is ")
    assert "[reward " in samples[0]["text"] and "exact_match" in samples[0]["text"]
    # LoRA: the policy's adapters are what changes; the base stays
    assert task.summary is not None and task.reference is None


def test_rollouts_are_reproducible_from_the_seeded_generator(base_run, tmp_path):
    _, task = _task(base_run, tmp_path, "align.temperature=1.5")
    model = task.build_model(torch.device("cpu"))
    model.train()
    rows = task.train.rows[:2]

    def sample(seed):
        g = torch.Generator().manual_seed(seed)
        seeds = torch.randint(0, 2**62, (8,), generator=g).tolist()
        return [c.token_ids for c in task.generate(model, rows, seeds)]

    a, b, c = sample(1), sample(1), sample(2)
    assert a == b and a != c
    assert model.training  # back in training mode after generating
    greedy = task.generate(model, rows, None)
    assert len(greedy) == 2 and all(1 <= len(x.token_ids) <= 4 for x in greedy)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_resume_continues_exactly_rollouts_included(base_run, tmp_path, method):
    extra = [f"align.method={method}", "align.temperature=1.2", "optim.lr=3e-3"]
    whole, t1 = _train(base_run, tmp_path, "whole", *extra)
    cut, _ = _train(base_run, tmp_path, "cut", *extra, stop_after=2)
    assert cut.step == 2
    resumed, t2 = _train(base_run, tmp_path, "cut", *extra, resume=True)
    assert resumed.step == 4
    keys = ("train/loss", "train/reward", "train/completion_length", "train/reward_std")
    a = [[m.get(k) for k in keys] for m in _metrics(whole.run_dir) if "train/loss" in m]
    b = [[m.get(k) for k in keys] for m in _metrics(cut.run_dir) if "train/loss" in m]
    assert a == b  # the same completions (lengths, rewards) and losses, bit for bit
    sa, sb = t1.model.state_dict(), t2.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _chars_reward(tmp_path) -> str:
    """A reward that differs between completions (so advantages are not all zero)."""
    f = tmp_path / "chars.py"
    f.write_text("def chars(prompt, completion, **row):\n    return float(len(completion))\n",
                 encoding="utf-8")
    return f"align.reward_funcs=[{f}:chars]"


def test_kl_to_the_reference_lora_and_full(base_run, tmp_path):
    common = [_chars_reward(tmp_path), "align.kl_beta=0.05", "align.temperature=1.5",
              "finetune.max_steps=3"]
    result, task = _train(base_run, tmp_path, "kl_lora", *common, "optim.lr=3e-2",
                          "optim.warmup_steps=0")
    recs = [m for m in _metrics(result.run_dir) if "train/loss" in m]
    assert task.reference is None  # adapters switched off: no second model
    assert recs[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA starts at the base
    assert recs[-1]["train/kl"] > 1e-6  # ... and moves away from it
    result, task = _train(base_run, tmp_path, "kl_full", *common, "finetune.method=full",
                          "optim.lr=3e-3", "optim.warmup_steps=0", "align.loss_type=dr_grpo")
    recs = [m for m in _metrics(result.run_dir) if "train/loss" in m]
    assert task.reference is not None  # a full fine-tune: a frozen copy of the start
    assert not any(p.requires_grad for p in task.reference.parameters())
    assert recs[0]["train/kl"] == pytest.approx(0.0, abs=1e-6) and recs[-1]["train/kl"] > 1e-6


def test_a_reward_function_that_raises_mid_run_stops_it_cleanly(base_run, tmp_path):
    rewards = tmp_path / "picky.py"
    rewards.write_text(
        "def picky(prompt, completion, **row):\n"
        "    if row.get('bad'):\n"
        "        raise ValueError('cannot score this one')\n"
        "    return 0.0\n", encoding="utf-8")
    data = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    rows[5]["bad"] = True
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(UsageError) as e:
        _train(base_run, tmp_path, "picky", f"align.dataset={data}",
               f"align.val_dataset={DATA / 'arithmetic.val.jsonl'}",
               f"align.reward_funcs=[{rewards}:picky]", "finetune.max_steps=8")
    msg = str(e.value)
    assert f"{rewards}:picky" in msg and f"{data} line 6" in msg
    assert "ValueError: cannot score this one" in msg
    run = tmp_path / "runs" / "picky"
    # what was written stays readable: whole metric lines, only complete checkpoints
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    for d in (run / "checkpoints").glob("*"):
        assert not d.name.startswith(".") and "tmp" not in d.name


def _write(tmp_path, rows, name="p.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return f


@pytest.mark.parametrize(
    ("rows", "pattern"),
    [
        ([{"question": "2+2?", "answer": "4"}], r"line 1: missing field 'prompt'.*question"),
        ([{"prompt": "  ", "answer": "4"}], r"line 1: field 'prompt' is empty"),
        ([{"prompt": [], "answer": "4"}], r"line 1: field 'prompt' is an empty list"),
        ([{"prompt": 7, "answer": "4"}], r"line 1: field 'prompt' is int"),
        ([{"prompt": "ok", "answer": "1"}, {"prompt": "2+2?"}],
         r"line 2 has no field 'answer', which reward function exact_match needs"),
        ([{"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"}],
         r"chat \(messages\) prompt but the model has no chat template"),
        ([{"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
           "answer": "4"}], r"ends with an assistant message"),
    ],
)
def test_bad_prompt_rows_are_named(base_run, tmp_path, rows, pattern):
    f = _write(tmp_path, rows)
    with pytest.raises(UsageError, match=pattern) as e:
        _task(base_run, tmp_path, f"align.dataset={f}", f"align.val_dataset={f}")
    assert str(f) in str(e.value)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


def test_overlong_prompts_are_truncated_or_dropped_and_counted(base_run, tmp_path):
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"},
            {"prompt": "Please tell me, " * 30 + "what is 2 + 2?", "answer": "4"}]
    f = _write(tmp_path, rows)
    _, task = _task(base_run, tmp_path, f"align.dataset={f}", f"align.val_dataset={f}")
    assert task.train.counts == {"examples": 2, "truncated": 1, "dropped": 0, "kept": 2}
    assert max(len(r.ids) for r in task.train.rows) == 40 - 4  # max_length - max_new_tokens
    tail = task.tokenizer.decode(task.train.rows[1].ids)
    assert tail.endswith("what is 2 + 2?")  # the end of the prompt is kept
    _, task = _task(base_run, tmp_path, f"align.dataset={f}", f"align.val_dataset={f}",
                    "finetune.overlong=drop")
    assert task.train.counts == {"examples": 2, "truncated": 0, "dropped": 1, "kept": 1}
    with pytest.raises(UsageError, match=r"leaves no room for a prompt"):
        _task(base_run, tmp_path, "align.max_new_tokens=40")


def test_settings_refused_before_training(base_run, tmp_path):
    with pytest.raises(UsageError, match=r"align.dataset=.*nope.jsonl does not exist"):
        _task(base_run, tmp_path, f"align.dataset={tmp_path / 'nope.jsonl'}")
    with pytest.raises(UsageError, match=r"has no reward: set align.reward_funcs"):
        _task(base_run, tmp_path, "align.reward_funcs=[]")
    with pytest.raises(UsageError, match=r"reward_funcs\[0\]='exact_mach'.*exact_match\?"):
        _task(base_run, tmp_path, "align.reward_funcs=[exact_mach]")
    with pytest.raises(UsageError, match=r"distributed.strategy=fsdp"):
        _task(base_run, tmp_path, "distributed.strategy=fsdp")


def test_a_run_that_is_not_a_reward_model_is_refused(base_run, tmp_path):
    with pytest.raises(UsageError) as e:
        _task(base_run, tmp_path, f"align.reward_model={base_run}")
    msg = str(e.value)
    assert f"align.reward_model={base_run} is not a reward model" in msg
    assert "trained with `plinth pretrain`" in msg and "align.method=reward" in msg
    assert not (tmp_path / "runs").exists()


def test_num_generations_of_one_is_refused_by_the_config(write_yaml):
    f = write_yaml("align:\n  method: grpo\n  num_generations: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config([f])
    msg = str(e.value)
    assert "align.num_generations=1" in msg and "2 or more" in msg
    assert load_config([], ["align.method=dpo", "align.num_generations=1"])  # dpo: unused


def _plinth(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "plinth", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_refuses_bad_rewards_with_exit_2_and_writes_nothing(base_run, tmp_path):
    common = [f"finetune.base={base_run}", f"tracking.output_dir={tmp_path / 'runs'}",
              "finetune.max_length=40", "align.max_new_tokens=4"]
    cfg = str(REPO / "configs" / "grpo-arithmetic.yaml")
    cases = [
        (["config", "validate", cfg, "align.reward_funcs=[no_such_mod_xyz:score]"],
         "cannot import 'no_such_mod_xyz'"),
        (["align", cfg, *common, "align.reward_funcs=[no_such_mod_xyz:score]"],
         "cannot import 'no_such_mod_xyz'"),
        (["align", cfg, *common, f"align.reward_model={base_run}"],
         "is not a reward model"),
        (["align", cfg, *common, "align.num_generations=1"], "align.num_generations=1"),
    ]
    for args, message in cases:
        p = _plinth(*args, cwd=tmp_path)
        assert p.returncode == 2, (args, p.stderr[-2000:])
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert not (tmp_path / "runs").exists()
