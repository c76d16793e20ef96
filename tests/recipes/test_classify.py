"""`plinth classify` and `plinth export` of task heads, on two quickly trained fine-tunes:
all-MiniLM-L6-v2 with the shipped topics head (cls-minilm, 2 steps) and a tiny plinth decoder
with two heads (a topic classifier and a word-count regression, LoRA, 2 steps).

    python -m pytest tests/recipes/test_classify.py -q

Predictions must equal the training forward (plinth.models.heads.head_outputs) text by text;
exports must give transformers' AutoModelForSequenceClassification the same logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plinth.cli import main
from plinth.config.load import load_config
from plinth.load import load_model
from plinth.models.heads import head_outputs, resolve_pooling

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "configs" / "data"
TOPICS = ["sports", "cooking", "weather", "computers"]
TEXTS = [
    "The striker scored twice in the final.",
    "Bake the bread for twenty minutes, then let it cool.",
    "Heavy rain and strong winds are expected all weekend.",
    "Reinstall the graphics driver and reboot.",
]
TOL = 1e-5


def _quick(run_name: str, out: Path) -> list[str]:
    return ["finetune.max_steps=2", "finetune.max_length=32", "optim.micro_batch=8",
            "optim.global_batch=8", "optim.warmup_steps=1", "optim.lr=1e-2",
            "tracking.eval_every=1000", "tracking.sample_every=1000",
            "tracking.checkpoint_every=1000", "tracking.log_every=1",
            f"tracking.output_dir={out}", f"tracking.run_name={run_name}"]


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    """cls-minilm (ref-minilm encoder, mean pooling) after two steps."""
    from plinth.errors import UsageError
    from plinth.hf.importer import reference_path
    from plinth.recipes.finetune import finetune

    try:
        reference_path("ref-minilm")
    except UsageError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("cls")
    assert finetune("cls-minilm", _quick("minilm", out), quiet=True) == 0
    return out / "minilm"


@pytest.fixture(scope="module")
def base_run(tiny_base, tmp_path_factory) -> Path:
    """A tiny plinth decoder (no heads) pretrained for two steps."""
    from plinth.recipes.pretrain import run_pretraining

    out = tmp_path_factory.mktemp("base")
    over = [*tiny_base, "pretrain.max_steps=2", f"tracking.output_dir={out}",
            "tracking.run_name=base"]
    return run_pretraining(load_config(["quickstart"], over), progress=False).run_dir


@pytest.fixture(scope="module")
def multi_run(base_run, tmp_path_factory) -> Path:
    """Two heads on the tiny decoder (last-token pooling): topic (classification) and words
    (regression: a tenth of the number of words), trained with LoRA."""
    from plinth.recipes.finetune import finetune

    out = tmp_path_factory.mktemp("multi")
    rows = [json.loads(x) for x in (DATA / "topics.train.jsonl").read_text().splitlines()]
    words = out / "words.jsonl"
    words.write_text("".join(json.dumps({"sentence": r["text"],
                                         "score": len(r["text"].split()) / 10}) + "\n"
                             for r in rows))
    tasks = [
        {"name": "topic", "task": "classification", "dataset": str(DATA / "topics.train.jsonl"),
         "labels": TOPICS},
        {"name": "words", "task": "regression", "dataset": str(words),
         "text_field": "sentence", "label_field": "score"},
    ]
    args = [f"finetune.base={base_run}", f"finetune.tasks={json.dumps(tasks)}",
            "finetune.method=lora", "finetune.rank=4",
            "finetune.target_modules=[q_proj, v_proj]", *_quick("multi", out)]
    assert finetune(None, args, quiet=True) == 0
    return out / "multi"


_LOADED: dict = {}


def _loaded(run: Path):
    """The run loaded once per test module (load_model: weights, tokenizer, config)."""
    if run not in _LOADED:
        m = load_model(run, chat=False)
        m.tokenizer.no_padding()
        m.tokenizer.no_truncation()
        _LOADED[run] = m
    return _LOADED[run]


def _reference_outputs(run: Path, texts: list[str], task: str) -> torch.Tensor:
    """Each text alone through the training forward (head_outputs), as run by training."""
    m = _loaded(run)
    cfg = m.cfg
    pooling = resolve_pooling(cfg.finetune.pooling, cfg.model.arch)
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = m.tokenizer.encode(t).ids[: cfg.finetune.max_length]
            batch = {"input_ids": torch.tensor([ids]),
                     "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            rows.append(head_outputs(m.model, batch, task, pooling)[0])
    return torch.stack(rows)


def _plinth(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "plinth", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ classify


def test_classify_matches_the_training_forward(minilm_run, tmp_path):
    """A real `plinth classify` process: stdout has label + probability per --text, in order;
    --output has every label's probability, equal to the head's softmax text by text."""
    texts = [*TEXTS, "x " * 200]  # the last is longer than finetune.max_length: truncated
    args = [a for t in texts for a in ("--text", t)]
    r = _plinth("classify", str(minilm_run), *args, "--batch-size", "2")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "1 of 5 texts were longer" in r.stderr
    probs = _reference_outputs(minilm_run, texts, "main").softmax(-1)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == len(texts)
    for line, p, t in zip(lines, probs, texts, strict=True):
        label, prob, *_ = line.split()
        assert label == TOPICS[int(p.argmax())] and float(prob) == pytest.approx(
            float(p.max()), abs=1e-3)
        assert " ".join(t.split())[:20] in line
    out = tmp_path / "pred.jsonl"
    assert main(["classify", str(minilm_run), *args, "--output", str(out)]) == 0
    rows = _rows(out)
    assert [row["text"] for row in rows] == texts
    for row, p in zip(rows, probs, strict=True):
        assert list(row["probabilities"]) == TOPICS
        got = torch.tensor([row["probabilities"][k] for k in TOPICS])
        assert torch.allclose(got, p, atol=TOL), (got, p)
        assert row["label"] == TOPICS[int(p.argmax())]
        assert row["probability"] == pytest.approx(float(p.max()), abs=TOL)


def test_classify_reads_txt_and_jsonl_files(minilm_run, tmp_path, capsys):
    """A .txt file (blank lines skipped) to --output, a .jsonl file's --field to stdout: the
    same labels in input order, whatever the batch size."""
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join([TEXTS[0], "", TEXTS[1], "   ", *TEXTS[2:]]) + "\n")
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": t}) + "\n"
                             for i, t in enumerate(TEXTS)))
    out = tmp_path / "a.jsonl"
    assert main(["classify", str(minilm_run), "--file", str(txt), "--output", str(out),
                 "--batch-size", "3"]) == 0
    rows = _rows(out)
    assert [r["text"] for r in rows] == TEXTS
    probs = _reference_outputs(minilm_run, TEXTS, "main").softmax(-1)
    for row, p in zip(rows, probs, strict=True):
        assert row["probability"] == pytest.approx(float(p.max()), abs=TOL)
    capsys.readouterr()
    assert main(["classify", str(minilm_run), "--file", str(jsonl), "--field", "body",
                 "--batch-size", "1", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == [r["label"] for r in rows]
    assert [line.split("  ")[-1] for line in lines] == TEXTS


def test_classify_several_heads_and_regression(multi_run, tmp_path, capsys):
    out = tmp_path / "multi.jsonl"
    assert main(["classify", str(multi_run), *[a for t in TEXTS for a in ("--text", t)],
                 "--output", str(out)]) == 0
    topic = _reference_outputs(multi_run, TEXTS, "topic").softmax(-1)
    words = _reference_outputs(multi_run, TEXTS, "words")[:, 0]
    for row, p, w in zip(_rows(out), topic, words, strict=True):
        assert set(row["tasks"]) == {"topic", "words"}
        got = torch.tensor([row["tasks"]["topic"]["probabilities"][k] for k in TOPICS])
        assert torch.allclose(got, p, atol=TOL)
        assert row["tasks"]["words"]["value"] == pytest.approx(float(w), abs=TOL)
    capsys.readouterr()
    assert main(["classify", str(multi_run), "--text", TEXTS[0], "--task", "words"]) == 0
    value, *text = capsys.readouterr().out.split()
    assert float(value) == pytest.approx(float(words[0]), abs=1e-4)
    assert " ".join(text) == TEXTS[0]


# ------------------------------------------------------------------------------- bad input


def _refused(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    return " ".join(err.split())


def test_classify_bad_input_exits_2(minilm_run, base_run, tmp_path, capsys):
    run = str(minilm_run)
    err = _refused(capsys, "classify", str(base_run), "--text", "hello")
    assert "no classification or regression head (it is not a fine-tune)" in err
    assert "plinth finetune configs/cls-minilm.yaml" in err
    err = _refused(capsys, "classify", run)
    assert "--text" in err and "--file" in err
    err = _refused(capsys, "classify", run, "--text", "a", "--file", "x.txt")
    assert "one of the two" in err
    err = _refused(capsys, "classify", run, "--text", "a", "--batch-size", "0")
    assert "--batch-size 0" in err
    err = _refused(capsys, "classify", run, "--text", "a", "--device", "gpu0")
    assert "'gpu0' is not a device" in err
    assert "no such CUDA device" in _refused(capsys, "classify", run, "--text", "a",
                                             "--device", "cuda:7")
    err = _refused(capsys, "classify", run, "--text", "a", "--task", "nope")
    assert "'nope'" in err and "main" in err
    err = _refused(capsys, "classify", run, "--file", str(tmp_path / "missing.txt"))
    assert "missing.txt: no such file" in err
    assert "is not a regular file" in _refused(capsys, "classify", run, "--file", str(tmp_path))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "has no texts" in _refused(capsys, "classify", run, "--file", str(empty))
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary" * 20)
    assert "looks binary" in _refused(capsys, "classify", run, "--file", str(binary))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café crème\n".encode("latin-1"))
    assert "not UTF-8" in _refused(capsys, "classify", run, "--file", str(latin))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    err = _refused(capsys, "classify", run, "--file", str(rows))
    assert "rows.jsonl line 2 has no field 'text'" in err and "--field" in err
    err = _refused(capsys, "classify", run, "--text", "a", "--field", "body")
    assert "--field 'body'" in err and ".jsonl" in err
    rows.write_text('{"text": "fine"}\n{"text": 3}\n')
    assert "line 2: 'text' must be a string" in _refused(capsys, "classify", run, "--file",
                                                         str(rows))
    rows.write_text('{"text": "fine"}\nnot json\n')
    assert "line 2: not valid JSON" in _refused(capsys, "classify", run, "--file", str(rows))
    # the output is never the input, and a refused run leaves an existing output as it was
    good = tmp_path / "good.txt"
    good.write_text("a text\n")
    err = _refused(capsys, "classify", run, "--file", str(good), "--output", str(good))
    assert "is the input --file" in err and good.read_text() == "a text\n"
    out = tmp_path / "out.jsonl"
    out.write_text("kept\n")
    _refused(capsys, "classify", run, "--file", str(rows), "--output", str(out))
    assert out.read_text() == "kept\n" and not (tmp_path / "out.jsonl.tmp").exists()
    err = _refused(capsys, "classify", run, "--text", "a", "--output",
                   str(tmp_path / "no" / "dir" / "out.jsonl"))
    assert "does not exist" in err


def test_classify_a_text_without_tokens_is_named(multi_run, capsys):
    """The tiny decoder's tokenizer adds no special tokens: an empty text has none at all."""
    err = _refused(capsys, "classify", str(multi_run), "--text", "fine", "--text", "")
    assert "--text 2" in err and "no tokens" in err


# -------------------------------------------------------------------------------------- export


def _hf_logits(hf, ids: list[list[int]], pad: int = 0) -> torch.Tensor:
    width = max(map(len, ids))
    x = torch.tensor([i + [pad] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        return hf(input_ids=x, attention_mask=mask).logits


def _hf_model(out: Path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()


def _ids(run: Path, texts: list[str]) -> list[list[int]]:
    return [_loaded(run).tokenizer.encode(t).ids for t in texts]


def test_export_minilm_head_matches_transformers(minilm_run, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "hf-minilm"
    assert main(["export", str(minilm_run), str(out)]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["PlinthBertForSequenceClassification"]
    assert config["id2label"] == {str(i): t for i, t in enumerate(TOPICS)}
    assert config["label2id"] == {t: i for i, t in enumerate(TOPICS)}
    assert config["num_labels"] == 4 and config["problem_type"] == "single_label_classification"
    assert config["plinth_pooling"] == "mean" and config["hidden_size"] == 384
    state = load_file(str(out / "model.safetensors"))
    assert state["classifier.weight"].shape == (4, 384) and state["classifier.bias"].shape == (4,)
    assert "bert.embeddings.word_embeddings.weight" in state
    assert not any("pooler" in k or k.startswith("heads.") for k in state)
    hf = _hf_model(out)
    got = _hf_logits(hf, _ids(minilm_run, TEXTS))
    want = _reference_outputs(minilm_run, TEXTS, "main")
    assert (got - want).abs().max().item() <= TOL
    # the exported tokenizer gives the same ids, so transformers alone reproduces the run
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        again = hf(**tok(TEXTS, padding=True, return_tensors="pt")).logits
    assert (again - want).abs().max().item() <= TOL
    # without trust_remote_code transformers refuses, instead of building its own head
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False)


def test_export_decoder_heads_match_transformers(multi_run, tmp_path, capsys):
    from safetensors.torch import load_file

    err = _refused(capsys, "export", str(multi_run), str(tmp_path / "hf"))
    assert "several task heads (topic, words)" in err and "--head" in err
    assert not (tmp_path / "hf").exists()
    err = _refused(capsys, "export", str(multi_run), str(tmp_path / "hf"), "--head", "nope")
    assert "'nope'" in err and "topic, words" in err
    ids = _ids(multi_run, TEXTS)
    for head, kind in (("topic", "single_label_classification"), ("words", "regression")):
        out = tmp_path / f"hf-{head}"
        assert main(["export", str(multi_run), str(out), "--head", head]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["problem_type"] == kind and config["plinth_pooling"] == "last"
        assert config["architectures"][0].endswith("ForSequenceClassification")
        state = load_file(str(out / "model.safetensors"))
        assert "score.weight" in state and "score.bias" in state and "lm_head.weight" not in state
        assert all(k.startswith(("model.", "score.")) for k in state)
        got = _hf_logits(_hf_model(out), ids)
        want = _reference_outputs(multi_run, TEXTS, head)
        assert (got - want).abs().max().item() <= TOL, head
    assert config["num_labels"] == 1 and config["id2label"] == {"0": "value"}
    # --head none: the base alone, as before (LoRA folded in, heads left out)
    assert main(["export", str(multi_run), str(tmp_path / "base"), "--head", "none"]) == 0
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForCausalLM") and "id2label" not in config
    assert not (tmp_path / "base" / "modeling_plinth.py").exists()


def test_export_of_a_run_without_heads_refuses_a_head(base_run, tmp_path, capsys):
    err = _refused(capsys, "export", str(base_run), str(tmp_path / "hf"), "--head", "main")
    assert "has no task head" in err


def test_repeated_list_options_add_up():
    """`--text a --text b c` is [a, b, c] (argparse's default would keep only the last)."""
    import argparse

    from plinth.cli import _add_arguments

    def fn(model: str, *, text: list[str] = (), stop_token_ids: list[int] = ()) -> int:
        return 0

    parser = argparse.ArgumentParser()
    _add_arguments(parser, fn)
    args = parser.parse_args(["m", "--text", "a", "--text", "b", "c", "--stop-token-ids", "1"])
    assert args.text == ["a", "b", "c"] and args.stop_token_ids == ["1"]
    assert parser.parse_args(["m"]).text == []
