"""Scoring with a real model: log-likelihoods equal transformers' on the same imported model,
truncation, generation metrics, perplexity, and `plinth eval` end to end (JSON + run events)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from plinth.cli import main
from plinth.errors import UsageError
from plinth.eval.lm import evaluate_text, sequences_nll
from plinth.eval.scoring import evaluate_task, load_eval_model, loglikelihoods
from plinth.eval.tasks import load_task
from plinth.hf import reference_path
from plinth.track.run import read_jsonl

TOL = 1e-4


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


@torch.no_grad()
def _hf_loglikelihood(hf, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    lp = hf(ids).logits[0].float().log_softmax(-1)  # (T, V)
    return sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


def _mc_task(tmp_path, n=6, shots=0):
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        q = torch.randint(3, 96, (4 + i,), generator=g).tolist()
        choices = [_words(torch.randint(3, 96, (1 + j,), generator=g).tolist()) for j in range(3)]
        rows.append({"q": _words(q), "choices": choices, "answer": i % 3})
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "name: mc\ntype: multiple_choice\ndata: mc.jsonl\nprompt: '{q}'\n"
        f"fewshot: {{k: {shots}, separator: ' '}}\n"
    )
    return load_task(tmp_path / "mc.yaml")


def test_choice_loglikelihoods_equal_transformers(tiny_hf, tmp_path):
    hf, imported = tiny_hf
    lm = load_eval_model(str(imported))
    task = _mc_task(tmp_path, shots=1)
    res = evaluate_task(lm, task, batch_size=4)  # several batches, choices of 1-3 tokens
    assert res.n == 6 and res.truncated == 0
    for ex in res.examples:
        row = task.rows[ex["index"]]
        ctx = lm.encode(task.context(ex["index"]))
        for c, got in zip(task.choices(row), ex["loglikelihoods"], strict=True):
            ref = _hf_loglikelihood(hf, ctx, lm.encode(c))
            assert abs(got - ref) <= TOL, (got, ref)
    # the metrics are the metric functions of those numbers
    accs = [ex["acc"] for ex in res.examples]
    assert res.metrics["acc"] == pytest.approx(sum(accs) / len(accs))
    assert 0.0 <= res.metrics["acc_norm"] <= 1.0 and 0.0 <= res.metrics["ece"] <= 1.0


def test_long_contexts_are_cut_from_the_left_and_counted(tiny_hf, tmp_path):
    hf, imported = tiny_hf
    lm = load_eval_model(str(imported), max_len=8)
    ctx, cont = list(range(3, 15)), [20, 21]  # 14 tokens: 13 inputs > 8
    scored, truncated = loglikelihoods(lm, [(ctx, cont), ([5], [6])])
    assert truncated == 1
    kept = (ctx + cont)[:-1][-8:]  # the model sees the last 8 input tokens
    ref = _hf_loglikelihood(hf, kept[:-1], cont)
    assert abs(scored[0][0] - ref) <= TOL
    # a task reports the count and warns
    row = {"q": _words(range(3, 20)), "choices": ["w1", "w2"], "answer": 0}
    (tmp_path / "t.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "t.yaml").write_text(
        "name: t\ntype: multiple_choice\ndata: t.jsonl\nprompt: '{q}'\n")
    with pytest.warns(UserWarning, match="cut from the left"):
        res = evaluate_task(lm, load_task(tmp_path / "t.yaml"))
    assert res.truncated == 2  # both choices' requests


def test_perplexity_matches_transformers_with_and_without_windows(tiny_hf):
    hf, imported = tiny_hf
    lm = load_eval_model(str(imported))
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(3, 96, (41,), generator=g).tolist()  # 1 context + 40 targets

    @torch.no_grad()
    def hf_nll(ids):
        lp = hf(torch.tensor([ids])).logits[0].log_softmax(-1)
        return -sum(lp[j, ids[j + 1]].item() for j in range(len(ids) - 1))

    nll, n = sequences_nll(lm, [seq], window=64, stride=64)
    assert n == 40 and abs(nll - hf_nll(seq)) <= TOL * 40
    # stride = window = 10: four independent chunks, each predicting from its own start
    nll, n = sequences_nll(lm, [seq], window=10, stride=10)
    ref = sum(hf_nll(seq[b : b + 11]) for b in range(0, 40, 10))
    assert n == 40 and abs(nll - ref) <= TOL * 40
    # overlapping windows: each token scored once, with more context -> a different total
    _, n = sequences_nll(lm, [seq, seq[:7]], window=10, stride=3)
    assert n == 46


def test_text_file_metrics(tiny_hf, tmp_path):
    _, imported = tiny_hf
    lm = load_eval_model(str(imported))
    text = "w5 w6 w7 w8 w9 w10 w11 w12 w13 w14 " * 10
    (tmp_path / "a.txt").write_text(text)
    res = evaluate_text(lm, tmp_path / "a.txt", window=16, stride=8)
    assert res.tokens == 100 and res.bytes == len(text.encode())
    assert res.perplexity == pytest.approx(math.exp(res.loss))
    assert res.bits_per_byte == pytest.approx(res.loss * 100 / math.log(2) / res.bytes)


def test_generation_task_scores_greedy_output(tiny_hf, tmp_path):
    from plinth.infer.sampling import generate

    _, imported = tiny_hf
    lm = load_eval_model(str(imported))
    prompts = ["w3 w4 w5", "w10 w11", "w20 w30 w40 w50"]
    greedy = [lm.decode(o) for o in generate(lm.model, [lm.encode(p) for p in prompts], 3)]
    rows = [{"q": p, "answer": g} for p, g in zip(prompts, greedy, strict=True)]
    rows[1]["answer"] = "w99 w98 w97"  # wrong on purpose
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for metric, key, expected in [("exact_match", "exact_match", 2 / 3), ("f1", "f1", 2 / 3),
                                  ("regex", "regex", 2 / 3)]:
        extra = ", pattern: '^(.*)$'" if metric == "regex" else ""
        (tmp_path / "g.yaml").write_text(
            "name: g\ntype: generation\ndata: g.jsonl\nprompt: '{q}'\n"
            f"generation: {{max_new_tokens: 3, stop: [], metric: {metric}{extra}}}\n"
        )
        res = evaluate_task(lm, load_task(tmp_path / "g.yaml"), batch_size=2)
        assert res.metrics[key] == pytest.approx(expected), (metric, res.examples)
        assert [e["prediction"] for e in res.examples] == greedy
    # a stop string cuts the prediction: stop at the first token's text
    first = greedy[0].split()[0]
    (tmp_path / "g.yaml").write_text(
        "name: g\ntype: generation\ndata: g.jsonl\nprompt: '{q}'\n"
        f"generation: {{max_new_tokens: 3, stop: ['{first}']}}\n"
    )
    res = evaluate_task(lm, load_task(tmp_path / "g.yaml"))
    assert first not in res.examples[0]["prediction"]


def test_plinth_eval_end_to_end_writes_json_and_run_events(tiny_run, tmp_path, capsys):
    task = _mc_task(tmp_path)
    out = tmp_path / "out" / "eval.json"
    (tmp_path / "doc.txt").write_text("w4 w5 w6 w7 " * 5)
    rc = main(["eval", str(tiny_run), "--tasks", f"{task.path},capitals", "--limit", "3",
               "--shots", "0", "--output", str(out), "--text", str(tmp_path / "doc.txt")])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "mc" in shown and "capitals" in shown and "acc_norm" in shown and "bits/byte" in shown
    record = json.loads(out.read_text())
    assert record["step"] == 7
    assert [t["task"] for t in record["tasks"]] == ["mc", "capitals"]
    assert all(t["n"] == 3 and t["shots"] == 0 for t in record["tasks"])
    assert record["lm"][0]["tokens"] == 20
    events = read_jsonl(tiny_run / "evals.jsonl")  # never the training events
    assert not (tiny_run / "events.jsonl").exists()
    evals = [e for e in events if e["event"] == "task_eval"]
    assert [e["task"] for e in evals] == ["mc", "capitals"]
    assert evals[0]["step"] == 7 and evals[0]["limit"] == 3 and evals[0]["n"] == 3
    assert set(evals[0]["metrics"]) == {"acc", "acc_norm", "ece"}
    assert next(e for e in events if e["event"] == "lm_eval")["tokens"] == 20


def test_plinth_eval_bad_input_exits_2(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--tasks", "nosuch"]) == 2
    assert "unknown task 'nosuch'" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--tasks", "capitals"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["eval", str(tiny_run)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert not (tiny_run / "evals.jsonl").exists()


@pytest.mark.slow
def test_ref_smollm2_suite_prints_a_table(capsys, tmp_path):
    # ref-smollm2's package is installed with --no-deps (README), so importing it fails on its
    # own runtime (llm); plinth finds its GGUF file without importing it, and so does this test
    reference_path("ref-smollm2")
    out = tmp_path / "suite.json"
    assert main(["eval", "ref-smollm2", "--tasks", "suite", "--limit", "10",
                 "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    with capsys.disabled():  # the table is the point of this test: show it
        print("\n" + shown)
    for name in ("arithmetic", "capitals", "code", "facts", "json_answer"):
        assert name in shown
    record = json.loads(out.read_text())
    by_task = {t["task"]: t["metrics"] for t in record["tasks"]}
    assert by_task["capitals"]["acc"] >= 0.5  # a real pretrained model knows most capitals


def test_prepared_dataset_split_every_token_scored_once(tiny_data_dir):
    from plinth.config.schema import ModelConfig
    from plinth.data import open_dataset
    from plinth.eval.lm import evaluate_dataset
    from plinth.eval.scoring import EvalModel
    from plinth.models import build_model

    ds = open_dataset(tiny_data_dir)
    torch.manual_seed(0)
    net = build_model(ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=ds.vocab_size,
                                  max_seq_len=32)).eval()
    lm = EvalModel(net, ds.tokenizer, max_len=32, eos_id=ds.eos_id, name="tiny")
    res = evaluate_dataset(lm, tiny_data_dir, "val", batch_size=64)
    assert res.docs == ds.num_docs("val") and res.tokens == ds.num_tokens("val")
    assert res.bytes == round(ds.bytes_per_token("val") * res.tokens)
    assert res.window == 32 and res.stride == 32
    # an untrained model is close to uniform over the vocabulary
    assert abs(res.loss - math.log(ds.vocab_size)) < 0.5
    part = evaluate_dataset(lm, tiny_data_dir, "val", limit=1, stride=16, batch_size=64)
    assert part.docs == 1 and part.tokens == len(ds.doc_tokens("val", 0))
    assert part.bytes == len(ds.decode(ds.doc_tokens("val", 0)).encode())
    assert part.stride == 16


def test_code_exec_metric_runs_the_rows_tests(tmp_path):
    from plinth.eval.scoring import score_generation

    row = {"prompt": "def add(a, b):\n", "tests": "assert add(2, 3) == 5\n"}
    (tmp_path / "c.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "c.yaml").write_text(
        "name: c\ntype: generation\ndata: c.jsonl\nprompt: '{prompt}'\ntarget_delimiter: ''\n"
        "generation: {metric: code_exec}\n")
    task = load_task(tmp_path / "c.yaml")
    assert score_generation(task, "    return a + b\n", task.rows[0]) == {"code_exec": 1.0}
    assert score_generation(task, "    return a - b\n", task.rows[0]) == {"code_exec": 0.0}
    (tmp_path / "c.jsonl").write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(UsageError, match=r"c\.jsonl:1: missing field 'tests'"):
        load_task(tmp_path / "c.yaml")


def test_a_checkpoint_directory_records_its_step(tiny_run, capsys):
    ckpt = next((tiny_run / "checkpoints").glob("step_*"))
    assert main(["eval", str(ckpt), "--tasks", "capitals", "--limit", "2"]) == 0
    (ev,) = [e for e in read_jsonl(tiny_run / "evals.jsonl") if e["event"] == "task_eval"]
    assert ev["step"] == 7 and ev["model"] == str(ckpt) and ev["n"] == 2


def test_chat_wraps_prompts_in_the_models_template(tiny_hf, tiny_run, tmp_path):
    hf, _ = tiny_hf
    with pytest.raises(UsageError, match="has no chat template"):
        load_eval_model(str(tiny_run), chat=True)
    (tiny_run / "chat_template.jinja").write_text(
        "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
        "{% if add_generation_prompt %} w5 {% endif %}")
    lm = load_eval_model(str(tiny_run), chat=True)
    assert lm.wrap("w9 w10") == "w3 w9 w10 w4 w5 "
    task = _mc_task(tmp_path, n=2)
    res = evaluate_task(lm, task)
    assert res.chat
    ex = res.examples[0]
    ctx = lm.encode(lm.wrap(task.context(0)))
    assert lm.decode(ctx).startswith("w3") and lm.decode(ctx).endswith("w4 w5")
    for c, got in zip(task.choices(task.rows[0]), ex["loglikelihoods"], strict=True):
        assert abs(got - _hf_loglikelihood(hf, ctx, lm.encode(c))) <= TOL


def test_task_metrics_for_a_model_in_memory(tiny_hf):
    from plinth.eval.scoring import task_metrics
    from plinth.eval.tasks import load_tasks

    _, imported = tiny_hf
    lm = load_eval_model(str(imported))
    lm.model.train()
    got = task_metrics(lm.model, lm.tokenizer, load_tasks(["capitals"]), lm.eos_id, lm.max_len,
                       limit=4)
    assert set(got) == {"capitals/acc", "capitals/acc_norm", "capitals/ece"}
    assert lm.model.training  # mode restored
    ref = evaluate_task(lm, load_tasks(["capitals"])[0], limit=4).metrics
    assert got["capitals/acc"] == ref["acc"] and got["capitals/ece"] == ref["ece"]
