"""The lm-eval-harness adapter: PlinthLM's answers equal transformers' and plinth's own on the
tiny imported Llama, and the same local task scored by lm-eval and by plinth's harness agrees."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from plinth.cli import main
from plinth.eval.lm import sequences_nll
from plinth.eval.scoring import evaluate_task, load_eval_model
from plinth.eval.tasks import load_task
from plinth.infer.sampling import generate
from plinth.track.run import read_jsonl

pytest.importorskip("lm_eval", reason="the adapter needs lm-eval (pip install 'plinth[eval]')")
from lm_eval.api.instance import Instance

from plinth.eval.harness import PlinthLM, run_lm_eval

TOL = 1e-4


def _words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def _req(kind: str, args: tuple, task: str = "t") -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=(task, 0, 1))


@pytest.fixture(scope="module")
def plm(tiny_hf):
    return PlinthLM(str(tiny_hf[1]), batch_size=3)


@torch.no_grad()
def _hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)


def _rows(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        q = torch.randint(3, 96, (3 + i % 4,), generator=g).tolist()
        # choices of 1-3 words: acc_norm (per byte) can pick another choice than acc
        choices = [_words(torch.randint(3, 96, (1 + (i + j) % 3,), generator=g).tolist())
                   for j in range(3)]
        rows.append({"q": _words(q), "choices": choices, "answer": i % 3})
    return rows


def _write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _lm_eval_yaml(path, name: str, data, body: str) -> None:
    path.write_text(
        f"task: {name}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files: {{test: {json.dumps(str(data))}}}\n"
        f"test_split: test\n{body}"
    )


MC_BODY = (
    "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\n"
    "doc_to_target: '{{answer}}'\n"
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
)


def test_multiple_choice_task_agrees_with_plinths_harness(tiny_hf, tmp_path):
    lm = load_eval_model(str(tiny_hf[1]))
    _write_jsonl(tmp_path / "mc.jsonl", _rows(8, seed=5))
    _lm_eval_yaml(tmp_path / "le_mc.yaml", "le_mc", tmp_path / "mc.jsonl", MC_BODY)
    (tmp_path / "mc.yaml").write_text(
        "name: mc\ntype: multiple_choice\ndata: mc.jsonl\nprompt: '{q}'\n")
    (res,), raw = run_lm_eval(lm, [str(tmp_path / "le_mc.yaml")], batch_size=4)
    ref = evaluate_task(lm, load_task(tmp_path / "mc.yaml"), batch_size=4)
    assert res.task == "le_mc" and res.type == "multiple_choice" and res.n == ref.n == 8
    assert res.metrics["acc"] == ref.metrics["acc"]
    assert res.metrics["acc_norm"] == ref.metrics["acc_norm"]
    assert 0 < ref.metrics["acc"] < 1 and ref.metrics["acc"] != ref.metrics["acc_norm"]
    samples = sorted(raw["samples"]["le_mc"], key=lambda s: s["doc_id"])
    for s, ex in zip(samples, ref.examples, strict=True):
        lls = [r[0][0] for r in s["resps"]]  # lm-eval's per-choice (logprob, is_greedy)
        assert max(abs(a - b) for a, b in zip(lls, ex["loglikelihoods"], strict=True)) <= TOL
        assert s["acc"] == ex["acc"]
    assert [ex["loglikelihoods"] for ex in res.examples] == [
        [r[0][0] for r in s["resps"]] for s in raw["samples"]["le_mc"]]


def test_plinth_eval_lm_eval_prints_and_records_task_eval_events(tiny_run, tmp_path, capsys):
    _write_jsonl(tmp_path / "mc.jsonl", _rows(4, seed=6))
    (tmp_path / "tasks").mkdir()
    _lm_eval_yaml(tmp_path / "tasks" / "le_mc.yaml", "le_mc", tmp_path / "mc.jsonl", MC_BODY)
    out = tmp_path / "eval.json"
    rc = main(["eval", str(tiny_run), "--lm-eval", "le_mc", "--lm-eval-include",
               str(tmp_path / "tasks"), "--limit", "3", "--output", str(out)])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "le_mc" in shown and "acc_norm" in shown
    (task,) = json.loads(out.read_text())["tasks"]
    assert task["task"] == "le_mc" and task["n"] == 3 and task["limit"] == 3
    assert len(task["examples"]) == 3 and len(task["examples"][0]["loglikelihoods"]) == 3
    (ev,) = [e for e in read_jsonl(tiny_run / "evals.jsonl") if e["event"] == "task_eval"]
    assert ev["step"] == 7 and ev["task"] == "le_mc" and ev["n"] == 3
    assert ev["metrics"] == task["metrics"] and set(ev["metrics"]) == {"acc", "acc_norm"}


def test_loglikelihood_equals_transformers(tiny_hf, plm):
    hf, _ = tiny_hf
    reqs = [
        ("w5 w6 w7", " w8"),
        ("w5 w6 w7 ", "w8 w9"),  # trailing space moves to the continuation
        ("", "w10 w11"),  # empty context: scored after end-of-text
        (_words(range(3, 40)), " " + _words(range(40, 45))),
    ]
    got = plm.loglikelihood([_req("loglikelihood", r) for r in reqs])
    for (ctx, cont), (ll, greedy) in zip(reqs, got, strict=True):
        c = [plm.eot_token_id] if not ctx.strip() else plm.lm.encode(ctx)
        t = plm.lm.encode(cont)
        lp = _hf_logprobs(hf, c + t)[len(c) - 1 : -1]  # predictions of the continuation
        ref = lp.gather(-1, torch.tensor(t)[:, None]).sum().item()
        assert abs(ll - ref) <= TOL, (ctx, cont, ll, ref)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(t)).all())
    assert plm.truncated["t"] == 0
    # the model's own greedy continuation is reported as greedy
    lp = _hf_logprobs(hf, plm.lm.encode("w5 w6 w7"))
    best = f" w{int(lp[-1].argmax())}"
    ((_, greedy),) = plm.loglikelihood([_req("loglikelihood", ("w5 w6 w7", best))])
    assert greedy


def test_loglikelihood_rolling_short_and_long_documents(tiny_hf, plm):
    hf, _ = tiny_hf
    short = _words(range(10, 30))
    ids = [plm.eot_token_id, *plm.lm.encode(short)]
    lp = _hf_logprobs(hf, ids)[:-1]
    ref = lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    g = torch.Generator().manual_seed(1)
    long = _words(torch.randint(3, 96, (150,), generator=g).tolist())  # > 64-token context
    long_ids = [plm.eot_token_id, *plm.lm.encode(long)]
    got = plm.loglikelihood_rolling([_req("loglikelihood_rolling", (d,)) for d in
                                     (short, long, "")])
    assert abs(got[0] - ref) <= TOL
    nll, n = sequences_nll(plm.lm, [long_ids], window=64, stride=64)
    assert n == 150 and abs(got[1] + nll) <= TOL
    assert got[2] == 0.0  # nothing to score
    # a smaller stride gives each token more context: plinth's sliding windows
    strided = PlinthLM(plm.lm, stride=16)
    (ll16,) = strided.loglikelihood_rolling([_req("loglikelihood_rolling", (long,))])
    nll16, _ = sequences_nll(plm.lm, [long_ids], window=64, stride=16)
    assert abs(ll16 + nll16) <= TOL and abs(ll16 - got[1]) > 1e-3


def test_perplexity_task_agrees_with_plinth_text_metrics(tiny_hf, tmp_path):
    from plinth.eval.lm import evaluate_text

    lm = load_eval_model(str(tiny_hf[1]))
    g = torch.Generator().manual_seed(2)
    doc = _words(torch.randint(3, 96, (100,), generator=g).tolist())
    (tmp_path / "doc.txt").write_text(doc)
    _write_jsonl(tmp_path / "docs.jsonl", [{"text": doc}])
    _lm_eval_yaml(tmp_path / "le_ppl.yaml", "le_ppl", tmp_path / "docs.jsonl",
                  "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                  "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: bits_per_byte\n")
    (res,), _ = run_lm_eval(lm, [str(tmp_path / "le_ppl.yaml")])
    ref = evaluate_text(lm, tmp_path / "doc.txt")
    assert res.type == "loglikelihood_rolling"
    assert res.metrics["bits_per_byte"] == pytest.approx(ref.bits_per_byte, abs=1e-6)
    assert res.examples[0]["loglikelihood"] == pytest.approx(-ref.loss * ref.tokens, abs=TOL)


def test_generate_until_equals_plinth_generation_and_stops(plm):
    prompts = ["w5 w6 w7", "w40 w41", _words(range(60, 70))]
    ids = [plm.lm.encode(p) for p in prompts]
    full = [plm.lm.decode(o) for o in generate(plm.lm.model, ids, 6, eos_id=plm.eot_token_id)]
    assert all(len(f.split()) == 6 and "w2" not in f.split() for f in full)  # no early eos
    words = full[0].split()
    reqs = [
        _req("generate_until", (prompts[0], {"until": [" " + words[3]], "max_gen_toks": 6})),
        _req("generate_until", (prompts[1], {"until": "\n\n", "max_gen_toks": 6})),
        _req("generate_until", (prompts[2], {"until": ["\n\n"], "max_gen_toks": 2})),
        _req("generate_until", (prompts[1], {"until": ["\n\n"], "max_gen_toks": 6,
                                             "do_sample": False, "temperature": 0.7})),
    ]
    got = plm.generate_until(reqs)
    assert got[0] == " ".join(words[:3])  # cut before the stop string
    assert got[1] == full[1]
    assert got[2] == " ".join(full[2].split()[:2])  # max_gen_toks
    assert got[3] == full[1]  # do_sample=False: greedy whatever the temperature
    # sampling: plinth's sampler with the adapter's seed
    (sampled,) = plm.generate_until([_req("generate_until", (
        prompts[0], {"until": [], "max_gen_toks": 6, "do_sample": True, "temperature": 1.5}))])
    gen = torch.Generator().manual_seed(plm.seed)
    (ref,) = generate(plm.lm.model, ids[:1], 6, temperature=1.5, eos_id=plm.eot_token_id,
                      generator=gen)
    if ref and ref[-1] == plm.eot_token_id:
        ref = ref[:-1]
    assert sampled == plm.lm.decode(ref)


def test_generation_task_agrees_with_plinths_harness(tiny_hf, tmp_path):
    lm = load_eval_model(str(tiny_hf[1]))
    g = torch.Generator().manual_seed(7)
    qs = [torch.randint(3, 96, (3 + i % 3,), generator=g).tolist() for i in range(6)]
    outs = generate(lm.model, qs, 3, eos_id=lm.eos_id)
    # even rows: the model's own first word (a hit), odd rows: another word (a miss)
    rows = [{"q": _words(q), "answer": f"w{o[0]}" if i % 2 == 0 else f"w{(o[0] + 1) % 96}"}
            for i, (q, o) in enumerate(zip(qs, outs, strict=True))]
    _write_jsonl(tmp_path / "gen.jsonl", rows)
    _lm_eval_yaml(tmp_path / "le_gen.yaml", "le_gen", tmp_path / "gen.jsonl",
                  "output_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{answer}}'\n"
                  "generation_kwargs: {until: [' '], max_gen_toks: 3, do_sample: false}\n"
                  "metric_list:\n  - metric: exact_match\n")
    (tmp_path / "gen.yaml").write_text(
        "name: gen\ntype: generation\ndata: gen.jsonl\nprompt: '{q}'\n"
        "generation: {max_new_tokens: 3, stop: [' '], metric: exact_match}\n")
    (res,), _ = run_lm_eval(lm, [str(tmp_path / "le_gen.yaml")], batch_size=4)
    ref = evaluate_task(lm, load_task(tmp_path / "gen.yaml"), batch_size=4)
    assert res.type == "generation" and res.n == 6
    assert res.metrics["exact_match"] == ref.metrics["exact_match"] == 0.5
    assert [e["prediction"] for e in res.examples] == [e["prediction"] for e in ref.examples]


def test_model_args_string_and_registry(tiny_hf):
    from lm_eval.api.registry import get_model

    cls = get_model("plinth")
    assert cls is PlinthLM
    plm = cls.create_from_arg_string(f"model={tiny_hf[1]},max_length=32,stride=8",
                                     {"batch_size": "4", "device": None})
    assert plm.max_length == 32 and plm.batch_size == 4 and plm.stride == 8
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models still resolve
    with pytest.warns(UserWarning, match=r"unknown model args \['batchsize'\]"):
        cls.create_from_arg_string(f"model={tiny_hf[1]},batchsize=4")


def test_bad_input_and_missing_lm_eval_are_usage_errors(tiny_run, tmp_path, capsys, monkeypatch):
    (tmp_path / "tasks").mkdir()
    assert main(["eval", str(tiny_run), "--lm-eval", str(tmp_path / "tasks")]) == 2
    assert "--lm-eval-include" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--lm-eval-include", str(tmp_path)]) == 2
    assert "add --lm-eval" in capsys.readouterr().err
    with pytest.raises(Exception, match="model=PATH"):
        PlinthLM()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["eval", str(tiny_run), "--lm-eval", "x.yaml"]) == 2
    err = capsys.readouterr().err
    assert 'pip install "plinth[eval]"' in err and "lm-eval" in err
    assert not (tiny_run / "evals.jsonl").exists()


def test_chat_template_multiple_choice_agrees_with_plinth_chat(tiny_run, tmp_path):
    # the same template as plinth's chat test: prompt -> "w3 PROMPT w4 w5 ", answers follow
    (tiny_run / "chat_template.jinja").write_text(
        "{% for m in messages %}w3 {{ m['content'] }} w4{% endfor %}"
        "{% if add_generation_prompt %} w5 {% endif %}")
    lm = load_eval_model(str(tiny_run), chat=True)
    _write_jsonl(tmp_path / "mc.jsonl", _rows(5, seed=8))
    _lm_eval_yaml(tmp_path / "le_mc.yaml", "le_mc", tmp_path / "mc.jsonl", MC_BODY)
    (tmp_path / "mc.yaml").write_text(
        "name: mc\ntype: multiple_choice\ndata: mc.jsonl\nprompt: '{q}'\n")
    (res,), raw = run_lm_eval(lm, [str(tmp_path / "le_mc.yaml")], chat=True)
    ref = evaluate_task(lm, load_task(tmp_path / "mc.yaml"))
    assert res.chat and ref.chat
    (s0,) = [s for s in raw["samples"]["le_mc"] if s["doc_id"] == 0]
    assert s0["arguments"][0][0] == lm.wrap(json.loads(
        (tmp_path / "mc.jsonl").read_text().splitlines()[0])["q"])
    assert res.metrics["acc"] == ref.metrics["acc"]
    for got, ex in zip(res.examples, ref.examples, strict=True):
        assert max(abs(a - b) for a, b in
                   zip(got["loglikelihoods"], ex["loglikelihoods"], strict=True)) <= TOL


def test_a_hub_data_set_is_refused_offline(tiny_run, tmp_path, capsys):
    (tmp_path / "hub.yaml").write_text(
        "task: hub\ndataset_path: plinth-tests/no-such-dataset\ntest_split: test\n" + MC_BODY)
    assert main(["eval", str(tiny_run), "--lm-eval", str(tmp_path / "hub.yaml")]) == 2
    err = capsys.readouterr().err
    assert "could not load its data set" in err and "dataset_path: json" in err


@pytest.mark.slow
def test_unknown_lm_eval_task_names_close_ones(tiny_run, capsys):
    # an unknown name makes plinth read lm-eval's whole task index (~10 s)
    assert main(["eval", str(tiny_run), "--lm-eval", "hellaswg"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'hellaswg'" in err and "Close names: hellaswag" in err
