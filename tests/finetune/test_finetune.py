"""`plinth finetune` end to end on a tiny pretrained plinth run (fast) and the shipped recipes.

    python -m pytest tests/finetune -q                 # tiny base: SFT, heads, multitask, resume
    python -m pytest tests/finetune -q -m slow -s      # the shipped SmolLM2 LoRA recipe
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plinth.cli import main
from plinth.config.load import load_config
from plinth.finetune.config import load_finetune_config
from plinth.recipes.finetune import finetune, run_finetuning

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"


def _jsonl(path: Path, kind: str) -> list[dict]:
    return [json.loads(x) for x in (path / f"{kind}.jsonl").read_text().splitlines() if x]


def _sft_args(base_run: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"finetune.base={base_run}",
        f"finetune.dataset={DATA / 'json_answers.train.jsonl'}",
        f"finetune.val_dataset={DATA / 'json_answers.val.jsonl'}",
        "finetune.max_length=64",
        "finetune.method=lora",
        "finetune.rank=4",
        "finetune.alpha=8",
        "finetune.target_modules=[q_proj, v_proj, o_proj, down_proj]",
        "finetune.epochs=2",
        "optim.lr=3e-3",
        "optim.warmup_steps=2",
        "optim.micro_batch=4",
        "optim.global_batch=8",
        "tracking.log_every=1",
        "tracking.eval_every=8",
        "tracking.sample_every=100",
        "tracking.checkpoint_every=4",
        f"tracking.output_dir={tmp_path / 'runs'}",
        "tracking.run_name=sft",
        *extra,
    ]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _val(run: Path, key: str = "val/loss") -> list[tuple[int, float]]:
    return [(m["step"], m[key]) for m in _metrics(run) if key in m]


def test_lora_sft_from_a_plinth_run(base_run, tmp_path, capsys):
    assert finetune(None, _sft_args(base_run, tmp_path), quiet=True) == 0
    run = tmp_path / "runs" / "sft"
    out = capsys.readouterr().out
    assert re.search(r"lora: [\d,]+ of [\d,]+ parameters train", out) and "adapter:" in out
    val = _val(run)
    assert val[0][0] == 0  # the base model's score comes first
    assert val[-1][1] < val[0][1] - 0.3, val  # answers of held-out questions got likelier
    # the config is whole: the base's model section, with where it came from
    cfg = load_config([run / "config.yaml"]).config
    assert cfg.model.d_model == 64 and cfg.finetune.base == str(base_run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base"]["dir"] == str(base_run.resolve())
    assert manifest["data"]["tasks"]["main"]["train_kept"] == 141
    # tokens are counted without padding
    last = _metrics(run)[-1]
    assert 0.3 * last["step"] * 8 * 64 < last["tokens"] < 0.95 * last["step"] * 8 * 64
    # the adapter alone, in peft's layout, small
    adapter = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    tensors = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)
    # step-0 samples are the base's answers; generate loads the adapted run
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} >= {0}  # plain layout: the prompt as it is
    assert samples[0]["prompt"] == _jsonl(DATA, "json_answers.val")[0]["prompt"]
    assert main(["generate", str(run), "--prompt", "What is 2 plus 2?", "--max-new-tokens",
                 "4"]) == 0


def test_resume_continues_exactly(base_run, tmp_path):
    args = _sft_args(base_run, tmp_path, "finetune.max_steps=8", "tracking.run_name=whole")
    resolved, base_dir = load_finetune_config([], args)
    whole = run_finetuning(resolved, base_dir, progress=False)
    args = _sft_args(base_run, tmp_path, "finetune.max_steps=8", "tracking.run_name=cut")
    resolved, base_dir = load_finetune_config([], args)
    cut = run_finetuning(resolved, base_dir, progress=False, stop_after=4)
    assert cut.step == 4 < whole.step
    finetune(resume=str(cut.run_dir), quiet=True)
    a = [m["train/loss"] for m in _metrics(whole.run_dir) if "train/loss" in m]
    b = [m["train/loss"] for m in _metrics(cut.run_dir) if "train/loss" in m]
    assert a == b  # bit for bit on CPU, across the interruption


def _topics_with_scores(tmp_path: Path) -> tuple[Path, Path]:
    """A regression set derived from the topics data: a tenth of the number of words."""
    out = []
    for kind in ("train", "val"):
        rows = [{"sentence": r["text"], "score": len(r["text"].split()) / 10}
                for r in _jsonl(DATA, f"topics.{kind}")]
        p = tmp_path / f"words.{kind}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out.append(p)
    return out[0], out[1]


def test_multitask_heads_with_weights(base_run, tmp_path):
    words_train, words_val = _topics_with_scores(tmp_path)
    tasks = [
        {"name": "topic", "task": "classification",
         "dataset": str(DATA / "topics.train.jsonl"), "val_dataset": str(DATA / "topics.val.jsonl"),
         "labels": ["sports", "cooking", "weather", "computers"]},
        {"name": "words", "task": "regression", "dataset": str(words_train),
         "val_dataset": str(words_val), "text_field": "sentence", "label_field": "score",
         "weight": 0.1},
    ]
    args = [
        f"finetune.base={base_run}", f"finetune.tasks={json.dumps(tasks)}",
        "finetune.method=full", "finetune.max_length=32", "finetune.pooling=mean",
        "finetune.epochs=4", "optim.lr=2e-3", "optim.warmup_steps=2", "optim.micro_batch=8",
        "optim.global_batch=16", "tracking.eval_every=5", "tracking.sample_every=1000",
        "tracking.checkpoint_every=1000", f"tracking.output_dir={tmp_path / 'runs'}",
        "tracking.run_name=multi",
    ]
    assert finetune(None, args, quiet=True) == 0
    run = tmp_path / "runs" / "multi"
    evals = [m for m in _metrics(run) if "val/loss" in m]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0
    # the combined loss is the weighted mean of the tasks' losses
    assert last["val/loss"] == pytest.approx(
        (last["val/topic/loss"] + 0.1 * last["val/words/loss"]) / 1.1)
    assert last["val/topic/accuracy"] > max(0.5, first["val/topic/accuracy"])
    assert last["val/words/mae"] < first["val/words/mae"]
    assert 0 <= last["val/topic/f1"] <= 1
    state = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    assert state["heads.topic.weight"].shape == (4, 64)
    assert state["heads.words.weight"].shape == (1, 64)


def test_freeze_layers_keeps_the_embeddings_and_first_blocks(base_run, tmp_path):
    args = [
        f"finetune.base={base_run}", "finetune.task=classification",
        f"finetune.dataset={DATA / 'topics.train.jsonl'}", "finetune.num_labels=4",
        "finetune.label_field=label", "finetune.labels=[sports, cooking, weather, computers]",
        "finetune.num_labels=null", "finetune.method=full", "finetune.freeze_layers=1",
        "finetune.max_steps=3", "optim.micro_batch=8", "optim.global_batch=8",
        f"tracking.output_dir={tmp_path}", "tracking.run_name=frozen",
    ]
    assert finetune(None, args, quiet=True) == 0
    state = load_file(str(sorted((tmp_path / "frozen" / "checkpoints").iterdir())[-1]
                          / "model.safetensors"))
    base = load_file(str(sorted((base_run / "checkpoints").iterdir())[-1] / "model.safetensors"))
    for name in ("embed_tokens.weight", "layers.0.mlp.down_proj.weight"):
        assert torch.equal(state[name], base[name]), name
    assert not torch.equal(state["layers.1.mlp.down_proj.weight"],
                           base["layers.1.mlp.down_proj.weight"])


# ------------------------------------------------------------------------------------ bad input


def _error(capsys, *argv: str) -> str:
    assert main(["finetune", *argv]) != 0
    return capsys.readouterr().err


def test_a_label_outside_the_classes_is_named(base_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "sports"}\n{"text": "b", "label": "gardening"}\n')
    err = _error(capsys, f"finetune.base={base_run}", f"finetune.dataset={bad}",
                 "finetune.task=classification", "finetune.labels=[sports, cooking]",
                 f"tracking.output_dir={tmp_path}")
    assert f"{bad} line 2" in err and "'gardening'" in err and "sports, cooking" in err
    assert not (tmp_path / "finetune-lora").exists()  # nothing written


def test_integer_labels_out_of_range_and_missing_classes(base_run, tmp_path, capsys):
    bad = tmp_path / "ints.jsonl"
    bad.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 3}\n')
    common = [f"finetune.base={base_run}", f"finetune.dataset={bad}",
              "finetune.task=classification", f"tracking.output_dir={tmp_path}"]
    err = _error(capsys, *common, "finetune.num_labels=3")
    assert "label=3 is outside the configured classes 0..2" in err
    err = _error(capsys, *common)
    assert "needs its classes" in err and "finetune.labels" in err


def test_architecture_changes_and_missing_base_are_refused(base_run, tmp_path, capsys):
    data = f"finetune.dataset={DATA / 'json_answers.train.jsonl'}"
    err = _error(capsys, f"finetune.base={base_run}", data, "model.n_layers=3")
    assert "model.n_layers=3" in err and "base model's 2" in err and "command line" in err
    err = _error(capsys, data)
    assert "finetune.base is not set" in err
    err = _error(capsys, f"finetune.base={tmp_path / 'nope'}", data)
    assert "no such file or directory" in err and "ref-smollm2" in err


def test_overlong_examples_are_counted(base_run, tmp_path, capsys):
    args = _sft_args(base_run, tmp_path, "finetune.max_length=32", "finetune.overlong=drop",
                     "finetune.max_steps=1")
    assert finetune(None, args, quiet=True) == 0
    out = capsys.readouterr().out
    manifest = json.loads((tmp_path / "runs" / "sft" / "manifest.json").read_text())
    counts = manifest["data"]["tasks"]["main"]
    assert counts["train_dropped"] > 0 and counts["train_kept"] + counts["train_dropped"] == 141
    assert f"{counts['train_dropped']} dropped" in out


def test_chat_data_without_a_template_is_refused(base_run, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    err = _error(capsys, f"finetune.base={base_run}", f"finetune.dataset={chat}",
                 f"tracking.output_dir={tmp_path}")
    assert "no chat template" in err and "finetune.chat_template=PATH" in err


# --------------------------------------------------------------------------- shipped recipes


def test_shipped_minilm_classification_recipe(tmp_path, capsys):
    """ref-minilm (real, 22M) learns the shipped topics set: accuracy beats the base's head."""
    assert finetune("cls-minilm", [f"tracking.output_dir={tmp_path}"], quiet=True) == 0
    val = [m for m in _metrics(tmp_path / "cls-minilm") if "val/accuracy" in m]
    assert val[0]["step"] == 0 and val[-1]["val/accuracy"] >= 0.9
    assert val[-1]["val/loss"] < val[0]["val/loss"]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_shipped_smollm2_lora_recipe_learns_the_json_style(tmp_path):
    """ref-smollm2 answers in prose before and {"answer": ...} after (held-out questions)."""
    assert finetune("sft-smollm2-lora", [f"tracking.output_dir={tmp_path}"], quiet=True) == 0
    run = tmp_path / "sft-smollm2-lora"
    val = _val(run)
    assert val[0][0] == 0 and val[-1][1] < 0.5 * val[0][1], val
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    before = [s["text"] for s in samples if s["step"] == 0]
    after = [s["text"] for s in samples if s["step"] == val[-1][0]]
    print("before:", before, "\nafter:", after)

    def json_style(text: str) -> bool:
        try:
            return set(json.loads(text.replace("<|im_end|>", "").strip())) == {"answer"}
        except (ValueError, TypeError):
            return False

    assert before and not any(json_style(t) for t in before)
    assert after and all(json_style(t) for t in after)


def test_generate_chat_wraps_prompts_in_the_template(base_run, tmp_path, capsys):
    """--chat sends the prompt as a user turn (SmolLM2's ChatML here); without a template it is
    refused with the reason."""
    from plinth.load import resolve as resolve_base

    smol = resolve_base("ref-smollm2")
    assert main(["generate", str(smol), "--chat", "--prompt", "What is the capital of France?",
                 "--max-new-tokens", "8", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_start|>" not in out
    assert main(["generate", str(base_run), "--chat", "--prompt", "hi"]) == 2
    assert "has no chat template" in capsys.readouterr().err
