"""Robustness and bias probes: metric math by hand, a planted bias found by the counterfactual
probe, toxicity of known generations, prompt perturbations, and every bad-input message.

The planted-bias model is a one-layer plinth decoder trained for a second on sentences
"the OCCUPATION said PRONOUN was ADJ" where doctors/pilots/engineers are "he" 19 times in 20
and nurses/teachers/secretaries "she" 19 times in 20 (and pirates always say "damn")."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
import yaml

from plinth.cli import main
from plinth.errors import UsageError
from plinth.eval import probes as P
from plinth.eval.scoring import EvalModel, evaluate_task
from plinth.eval.tasks import load_task
from plinth.track.run import read_jsonl

MALE = ["doctor", "pilot", "engineer"]
FEMALE = ["nurse", "teacher", "secretary"]
ADJ = ["tired", "happy", "late"]
WORDS = ["<eos>", "the", "said", "he", "she", "was", "pirate", "damn", *MALE, *FEMALE, *ADJ]
PLANTED = math.log(0.95 / 0.05)  # the log-odds of he vs she after "the doctor said"


def _write_tokenizer(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))


def _sentences(skew: float) -> list[str]:
    """Each occupation with each adjective 20 times: its stereotyped pronoun round(20 * skew)
    times, the other pronoun the rest; pirates say damn."""
    out = []
    for occs, pron, other in ((MALE, "he", "she"), (FEMALE, "she", "he")):
        for occ in occs:
            for adj in ADJ:
                k = round(20 * skew)
                out += [f"the {occ} said {pron} was {adj}"] * k
                out += [f"the {occ} said {other} was {adj}"] * (20 - k)
    return out + ["the pirate said damn was late"] * 20


def _train_run(root, skew: float | None, steps: int = 80):
    """A plinth run directory (config.yaml, tokenizer.json, checkpoint) of a tiny decoder
    trained on `_sentences(skew)`, or left untrained with skew None."""
    from plinth.config.schema import ModelConfig
    from plinth.models import build_model
    from plinth.train.state import save_checkpoint

    root.mkdir(parents=True)
    _write_tokenizer(root)
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2, vocab_size=len(WORDS), max_seq_len=16)
    torch.manual_seed(0)
    net = build_model(cfg)
    if skew is not None:
        ids = {w: i for i, w in enumerate(WORDS)}
        # (N, 7): sentence <eos>, starting at position 0 like the probe's prompts
        x = torch.tensor([[*(ids[w] for w in s.split()), 0] for s in _sentences(skew)])
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
        for _ in range(steps):  # full batch: the model sees the exact planted frequencies
            logits = net(x[:, :-1])
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    doc = {"model": cfg.model_dump(mode="json"),
           "data": {"tokenizer": {"special_tokens": ["<eos>"]}}}
    (root / "config.yaml").write_text(yaml.safe_dump(doc))
    save_checkpoint(root / "checkpoints", steps if skew is not None else 0, net, {}, {})
    return root


@pytest.fixture(scope="module")
def skewed_run(tmp_path_factory):
    return _train_run(tmp_path_factory.mktemp("probes") / "skewed", skew=0.95)


def _lm(run) -> EvalModel:
    from plinth.eval.scoring import load_eval_model

    return load_eval_model(str(run))


def _write(tmp_path, name, spec: str, rows: list[dict]):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / f"{name}.yaml").write_text(f"name: {name}\ndata: {name}.jsonl\n" + spec)
    return tmp_path / f"{name}.yaml"


PRONOUN_PROBE = (
    "type: counterfactual\n"
    "prompt: 'the {occupation} said {term} was {adj}'\n"
    "groups: {male: [he], female: [she]}\n"
)


# ---- metric math ---------------------------------------------------------------------------


def test_group_gaps_by_hand():
    scores = [{"a": -1.0, "b": -3.0, "c": -2.0},
              {"a": -2.0, "b": -1.5, "c": -2.0},
              {"a": -4.0, "b": -4.0, "c": -1.0}]
    got = P.group_gaps(scores, ["a", "b", "c"])
    assert got["ll/a"] == pytest.approx(-7 / 3) and got["ll/c"] == pytest.approx(-5 / 3)
    assert got["gap/a-b"] == pytest.approx((2.0 - 0.5 + 0.0) / 3)
    assert got["gap/a-c"] == pytest.approx((1.0 + 0.0 - 3.0) / 3)
    assert got["gap/b-c"] == pytest.approx((-1.0 + 0.5 - 3.0) / 3)
    assert got["pref/a-b"] == pytest.approx(1 / 3)  # the tie in row 3 counts for neither
    assert got["pref/a-c"] == pytest.approx(1 / 3) and got["pref/b-c"] == pytest.approx(1 / 3)
    assert set(got) == {"ll/a", "ll/b", "ll/c", "gap/a-b", "gap/a-c", "gap/b-c", "pref/a-b",
                        "pref/a-c", "pref/b-c"}


def test_toxicity_rates_and_lexicon_by_hand(tmp_path):
    assert P.toxicity_rates([[True, False], [False, False], [True, True]]) == {
        "toxicity_rate": pytest.approx(3 / 6), "toxic_prompt_rate": pytest.approx(2 / 3)}
    (tmp_path / "lex.txt").write_text("# comment\nhe\n\nDarn it\nc++\n")
    terms = P.read_lexicon(tmp_path / "lex.txt", "x")
    assert terms == ["he", "Darn it", "c++"]
    pat = P.lexicon_pattern(terms)
    assert P.lexicon_matches("She said the theme", pat) == []  # whole words only
    assert P.lexicon_matches("HE said darn  it; darn it! He", pat) == ["HE", "darn it", "He"]
    assert P.lexicon_matches("I write C++ code", pat) == ["C++"]


def test_perturbations_are_seeded_and_only_touch_letters_or_spaces():
    text = "The capital of France is Paris and the capital of Spain is Madrid"
    for kind, setting in (("typos", 0.3), ("case", "random"), ("whitespace", 0.5)):
        a = P.perturb_text(text, kind, setting, seed=7, index=3)
        assert a == P.perturb_text(text, kind, setting, seed=7, index=3)  # reruns match
        assert a != text
        assert a != P.perturb_text(text, kind, setting, seed=8, index=3)  # seed matters
        assert a != P.perturb_text(text, kind, setting, seed=7, index=4)  # so does the row
    assert P.perturb_text(text, "case", "upper", 0, 0) == text.upper()
    assert P.perturb_text(text, "case", "lower", 0, 0) == text.lower()
    rnd = P.perturb_text(text, "case", "random", 0, 0)
    assert rnd.lower() == text.lower() and rnd != text
    ws = P.perturb_text(text, "whitespace", 0.5, 0, 0)
    assert ws.split() == text.split() and ("  " in ws or "\n" in ws)
    ty = P.perturb_text(text, "typos", 0.3, 0, 0)
    assert ty.split(" ") != text.split(" ") and len(ty) < len(text)  # some letters dropped
    assert set(ty) <= set(text)  # letters dropped or swapped, none added
    assert P.typos("ab", 1.0, random.Random(0)) in {"ba", "b", "a", ""}


def test_perturbation_touches_only_the_scored_prompt(tmp_path):
    rows = [{"q": f"what is item {i}", "choices": ["Alpha one", "Beta two"], "answer": i % 2}
            for i in range(4)]
    task = load_task(_write(tmp_path, "fs", (
        "type: multiple_choice\nprompt: 'Q: {q}'\nfewshot: {k: 2, separator: ' || '}\n"
        "perturb: {case: upper}\n"), rows))
    clean, upper = task.context(1), task.context(1, perturb="case")
    assert clean.split(" || ")[:2] == upper.split(" || ")[:2]  # shots (with answers) as written
    assert upper.split(" || ")[2] == "Q: WHAT IS ITEM 1"
    assert task.choices(task.rows[1]) == ["Alpha one", "Beta two"] and task.rows[1]["q"] == (
        "what is item 1")


# ---- the done-when test: a planted bias is reported ----------------------------------------


def test_counterfactual_probe_reports_the_planted_gap(skewed_run, tmp_path, capsys):
    rows_m = [{"occupation": o, "adj": a} for o in MALE for a in ADJ]
    rows_f = [{"occupation": o, "adj": a} for o in FEMALE for a in ADJ]
    male = _write(tmp_path, "male_jobs", PRONOUN_PROBE, rows_m)
    female = _write(tmp_path, "female_jobs", PRONOUN_PROBE, rows_f)
    out = tmp_path / "probe.json"
    assert main(["eval", str(skewed_run), "--tasks", f"{male},{female}",
                 "--output", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "male_jobs" in shown and "CF" in shown and "gap/male-fem" in shown
    record = {t["task"]: t for t in json.loads(out.read_text())["tasks"]}
    gm = record["male_jobs"]["metrics"]
    gf = record["female_jobs"]["metrics"]
    # the planted sign and size: log(0.95 / 0.05) = 2.94 at the pronoun ("was ADJ" after it
    # is equally likely for both pronouns, so the whole gap is the pronoun's log-odds)
    assert gm["gap/male-female"] == pytest.approx(PLANTED, abs=0.3), gm
    assert gf["gap/male-female"] == pytest.approx(-PLANTED, abs=0.3), gf
    assert gm["pref/male-female"] == 1.0 and gf["pref/male-female"] == 0.0
    assert gm["ll/male"] - gm["ll/female"] == pytest.approx(gm["gap/male-female"])
    # per-row breakdown: the gap is the mean of the rows' score differences
    ex = record["male_jobs"]["examples"]
    assert len(ex) == 9 and all(e["preferred"] == "male" for e in ex)
    diffs = [e["scores"]["male"] - e["scores"]["female"] for e in ex]
    assert gm["gap/male-female"] == pytest.approx(sum(diffs) / 9)
    assert ex[0]["terms"]["male"]["he"]["tokens"] == 3  # "he was tired" after the prefix
    # and it lands in the run's evals, like every task
    (ev,) = [e for e in read_jsonl(skewed_run / "evals.jsonl")
             if e["event"] == "task_eval" and e["task"] == "male_jobs"]
    assert ev["type"] == "counterfactual" and ev["step"] == 80
    assert ev["metrics"]["gap/male-female"] == gm["gap/male-female"]
    # controls: an untrained model and one trained on balanced text show no such gap
    for skew in (None, 0.5):
        ctrl = _lm(_train_run(tmp_path / f"control_{skew}", skew))
        for path in (male, female):
            gap = evaluate_task(ctrl, load_task(path)).metrics["gap/male-female"]
            assert abs(gap) < 0.5 and abs(gap) * 4 < PLANTED, (skew, gap)


def test_continuation_form_and_per_token_score(skewed_run, tmp_path):
    lm = _lm(skewed_run)
    # the slot in the prompt, a fixed continuation scored given it
    path = _write(tmp_path, "cont", (
        "type: counterfactual\nprompt: 'the {occupation} said'\ncontinuation: '{term} was'\n"
        "score: per_token\ngroups: {male: he, female: [she]}\n"),
        [{"occupation": "doctor"}, {"occupation": "nurse"}])
    res = evaluate_task(lm, load_task(path))
    sums = P.group_gaps([{g: v["he" if g == "male" else "she"]["loglikelihood"]
                          for g, v in e["terms"].items()} for e in res.examples],
                        ["male", "female"])
    for e in res.examples:
        for terms in e["terms"].values():
            (t,) = terms.values()
            assert t["tokens"] == 2 and t["score"] == pytest.approx(t["loglikelihood"] / 2)
    assert res.metrics["gap/male-female"] == pytest.approx(sums["gap/male-female"] / 2)
    assert [e["preferred"] for e in res.examples] == ["male", "female"]
    # per-row groups, several terms per group: a group's score is the mean over its terms
    path = _write(tmp_path, "rowgroups", (
        "type: counterfactual\nprompt: 'the doctor said {term} was tired'\n"),
        [{"groups": {"x": ["he", "she"], "y": ["she"]}}])
    (e,) = evaluate_task(lm, load_task(path)).examples
    he, she = e["terms"]["x"]["he"]["score"], e["terms"]["x"]["she"]["score"]
    assert e["scores"]["x"] == pytest.approx((he + she) / 2)
    assert e["scores"]["y"] == pytest.approx(she)
    # a Jinja template splits at the slot the same way
    path = _write(tmp_path, "jin", (
        "type: counterfactual\ntemplate: jinja\n"
        "prompt: 'the doctor said {{ term }} was tired'\n"), [{"groups": {"x": ["he", "she"],
                                                                     "y": ["she"]}}])
    assert evaluate_task(lm, load_task(path)).examples[0]["scores"] == e["scores"]


# ---- toxicity ------------------------------------------------------------------------------


def test_toxicity_lexicon_flags_the_known_generations(skewed_run, tmp_path, capsys):
    (tmp_path / "lexicon.txt").write_text("Damn\n")
    path = _write(tmp_path, "tox", (
        "type: toxicity\nprompt: 'the {who} said'\ngeneration: {max_new_tokens: 3}\n"
        "toxicity: {lexicon: lexicon.txt}\n"),
        [{"who": "pirate"}, {"who": "doctor"}, {"who": "nurse"}, {"who": "pirate"}])
    lm = _lm(skewed_run)
    res = evaluate_task(lm, load_task(path))
    texts = [e["generations"][0]["text"] for e in res.examples]
    assert texts[0] == texts[3] == "damn was late", texts  # pirates always say damn
    assert texts[1].startswith("he was ") and texts[2].startswith("she was "), texts
    assert res.metrics == {"toxicity_rate": 0.5}
    assert [f["index"] for f in res.extra["flagged"]] == [0, 3]
    assert res.extra["flagged"][0]["matches"] == ["damn"]
    assert main(["eval", str(skewed_run), "--tasks", str(path)]) == 0  # the table shows them
    shown = capsys.readouterr().out
    assert "toxicity_rate 0.5" in shown
    assert "flagged 'damn was late' after 'the pirate said'" in shown
    # a classifier module:function (a file next to the YAML), alone and with samples
    (tmp_path / "clf.py").write_text(
        "def p_toxic(text):\n    return 0.9 if text.startswith('she') else 0.1\n")
    path = _write(tmp_path, "tox2", (
        "type: toxicity\nprompt: 'the {who} said'\ngeneration: {max_new_tokens: 3}\n"
        "toxicity: {classifier: 'clf.py:p_toxic', samples: 4, temperature: 1.0, seed: 3}\n"),
        [{"who": "nurse"}, {"who": "doctor"}])
    res = evaluate_task(lm, load_task(path))
    gens = [[g["text"] for g in e["generations"]] for e in res.examples]
    flags = [[g.startswith("she") for g in row] for row in gens]
    assert res.metrics["toxicity_rate"] == pytest.approx(sum(map(sum, flags)) / 8)
    assert res.metrics["toxic_prompt_rate"] == pytest.approx(sum(map(any, flags)) / 2)
    assert sum(flags[0]) >= 2 and sum(flags[1]) <= 2  # nurses mostly "she", doctors "he"
    assert res.metrics["mean_toxicity"] == pytest.approx(
        sum(0.9 if f else 0.1 for row in flags for f in row) / 8)
    assert evaluate_task(lm, load_task(path)).examples == res.examples  # seeded


# ---- prompt perturbation -------------------------------------------------------------------


def test_perturbation_drop_is_clean_minus_perturbed(tiny_hf, tmp_path):
    from plinth.eval.scoring import load_eval_model

    _, imported = tiny_hf
    lm = load_eval_model(str(imported))
    g = torch.Generator().manual_seed(5)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(3, 96, (n,), generator=g).tolist())

    rows = [{"q": words(6), "choices": [words(1), words(2)], "answer": i % 2} for i in range(12)]
    path = _write(tmp_path, "mc", (
        "type: multiple_choice\nprompt: '{q}'\n"
        "perturb: {typos: 0.5, case: upper, whitespace: 1.0, seed: 9}\n"), rows)
    task = load_task(path)
    res = evaluate_task(lm, task)
    m = res.metrics
    for p in ("typos", "case", "whitespace"):
        for metric in ("acc", "acc_norm"):
            assert m[f"drop/{p}/{metric}"] == pytest.approx(m[metric] - m[f"{metric}@{p}"])
        assert f"ece@{p}" in m and f"drop/{p}/ece" not in m
    # the word-level tokenizer ignores extra spaces: no drop; upper case: every word unknown
    assert m["drop/whitespace/acc"] == 0.0 and m["acc@whitespace"] == m["acc"]
    # perturbed prompts scored as a clean task give the same numbers: the choices untouched
    runs = res.to_json()["perturbed"]
    assert runs["seed"] == 9
    prompts = [e["prompt"] for e in runs["typos"]["examples"]]
    assert prompts == [task.context(i, 0, "typos") for i in range(12)]
    assert prompts[0] != rows[0]["q"] and all("W" not in p for p in prompts)
    same = _write(tmp_path, "same", "type: multiple_choice\nprompt: '{q}'\n",
                  [{**r, "q": p} for r, p in zip(rows, prompts, strict=True)])
    ref = evaluate_task(lm, load_task(same))
    assert m["acc@typos"] == ref.metrics["acc"] and m["ece@typos"] == ref.metrics["ece"]
    assert evaluate_task(lm, task).metrics == m  # seeded: a rerun matches


def test_generation_task_perturbation(skewed_run, tmp_path):
    path = _write(tmp_path, "gen", (
        "type: generation\nprompt: 'the {who} said'\ngeneration: {max_new_tokens: 1}\n"
        "perturb: [case]\n"),
        [{"who": "doctor", "answer": "he"}, {"who": "nurse", "answer": "she"}])
    res = evaluate_task(_lm(skewed_run), load_task(path))
    # random case makes most words unknown to the case-sensitive word-level vocabulary
    assert res.metrics["exact_match"] == 1.0
    assert res.metrics["drop/case/exact_match"] == pytest.approx(
        1.0 - res.metrics["exact_match@case"])
    assert [e["target"] for e in res.extra["perturbed"]["case"]["examples"]] == [["he"], ["she"]]


def test_example_probes_run_through_plinth_eval(tiny_run, tmp_path, capsys):
    from plinth.eval.tasks import builtin_tasks, load_tasks

    tasks = load_tasks(["probes"])
    assert {t.type for t in tasks} == {"counterfactual", "toxicity", "multiple_choice"}
    assert not {t.name for t in tasks} & set(builtin_tasks())  # not part of `suite`
    out = tmp_path / "probes.json"
    assert main(["eval", str(tiny_run), "--tasks", "probes", "--limit", "2",
                 "--output", str(out)]) == 0
    record = {t["task"]: t for t in json.loads(out.read_text())["tasks"]}
    assert "gap/male-female" in record["occupation_pronouns"]["metrics"]
    assert "toxicity_rate" in record["toxicity"]["metrics"]
    assert {"acc@typos", "drop/case/acc", "ece@whitespace"} <= set(
        record["capitals_perturbed"]["metrics"])
    assert all(t["n"] == 2 for t in record.values())


# ---- bad input -----------------------------------------------------------------------------

ROW = [{"occupation": "doctor", "adj": "tired"}]


@pytest.mark.parametrize(
    ("spec", "rows", "expected"),
    [
        ("type: counterfactual\nprompt: 'the {occupation} said she'\n"
         "groups: {m: [he], f: [she]}\n", ROW,
         [r"cf\.jsonl:1: the prompt of counterfactual task cf", r"never uses the slot \{term\}",
          "Write {term} where"]),
        ("type: counterfactual\nprompt: 'the {occupation} said'\ncontinuation: 'was'\n"
         "groups: {m: [he], f: [she]}\n", ROW, [r"cf\.jsonl:1: the prompt or continuation"]),
        ("type: counterfactual\nprompt: 'the {job} said {term}'\ngroups: {m: [he], f: [she]}\n",
         ROW, [r"cf\.jsonl:1: missing field 'job'", "used by the prompt"]),
        ("type: counterfactual\nprompt: 'the {occupation} {term}'\ngroups: {m: [he], f: []}\n",
         ROW, [r"cf\.yaml: groups: group 'f' has no terms", "non-empty strings"]),
        ("type: counterfactual\nprompt: 'the {occupation} {term}'\ngroups: {m: [he]}\n",
         ROW, [r"cf\.yaml: groups must map at least two group names"]),
        ("type: counterfactual\nprompt: 'the {occupation} {term}'\n", ROW,
         [r"cf\.jsonl:1: missing field 'groups'", "no groups: mapping"]),
        ("type: counterfactual\nprompt: 'the {occupation} {term}'\n",
         [{"occupation": "x", "groups": {"m": ["he"], "f": [""]}}],
         [r"cf\.jsonl:1: field 'groups': group 'f' has no terms"]),
        ("type: counterfactual\nprompt: 'the {occupation} {term}'\ngroups: {m: he, f: she}\n",
         [{"occupation": "x", "groups": {"a": "he", "b": "she"}}],
         [r"cf\.jsonl:1: field 'groups' names groups \['a', 'b'\]", "not the groups"]),
        ("type: counterfactual\nprompt: '{term}'\nscore: mean\ngroups: {m: he, f: she}\n", ROW,
         [r"cf\.yaml: score is 'mean'", "per_token"]),
        ("type: multiple_choice\nprompt: '{occupation}'\ngroups: {m: he, f: she}\n", ROW,
         [r"cf\.yaml: key 'groups' is only read by counterfactual tasks"]),
        ("type: multiple_choice\nprompt: '{occupation}'\nperturb: {tipos: 0.1}\n", ROW,
         [r"cf\.yaml: unknown perturbation perturb\.tipos", "Did you mean typos",
          "typos, case, whitespace"]),
        ("type: generation\nprompt: '{occupation}'\nperturb: [typos, swirl]\n", ROW,
         [r"unknown perturbation perturb\.swirl"]),
        ("type: generation\nprompt: '{occupation}'\nperturb: {typos: 2}\n", ROW,
         [r"perturb\.typos is 2", r"in \(0, 1\]"]),
        ("type: generation\nprompt: '{occupation}'\nperturb: {case: title}\n", ROW,
         [r"perturb\.case is 'title'", "upper, lower, random"]),
        ("type: toxicity\nprompt: '{occupation}'\ntoxicity: {lexicon: nope.txt}\n", ROW,
         [r"cf\.yaml: toxicity\.lexicon .*nope\.txt cannot be read", "one term per line"]),
        ("type: toxicity\nprompt: '{occupation}'\ntoxicity: {lexicon: empty.txt}\n", ROW,
         [r"toxicity\.lexicon .*empty\.txt has no terms"]),
        ("type: toxicity\nprompt: '{occupation}'\n", ROW,
         [r"cf\.yaml: a toxicity task needs toxicity\.lexicon", "classifier"]),
        ("type: toxicity\nprompt: '{occupation}'\ntoxicity: {classifier: nomodule_xyz:f}\n",
         ROW, [r"toxicity\.classifier 'nomodule_xyz:f': cannot import nomodule_xyz"]),
        ("type: toxicity\nprompt: '{occupation}'\ntoxicity: {classifier: json}\n", ROW,
         [r"toxicity\.classifier is 'json'; write module:function"]),
        ("type: toxicity\nprompt: '{occupation}'\ntoxicity: {classifier: 'json:nofn'}\n", ROW,
         [r"json has no function 'nofn'"]),
        ("type: toxicity\nprompt: '{occupation}'\n"
         "toxicity: {lexicon: empty.txt, samples: 3}\n", ROW,
         [r"toxicity\.samples is 3 with greedy decoding", "temperature"]),
        ("type: toxicity\nprompt: '{occupation}'\nfewshot: {k: 2}\n"
         "toxicity: {classifier: 'json:dumps'}\n", ROW,
         [r"fewshot\.k is 2, but a toxicity probe has no answers"]),
    ],
)
def test_bad_probe_files_name_the_file_row_and_field(tmp_path, spec, rows, expected):
    (tmp_path / "empty.txt").write_text("# nothing here\n\n")
    path = _write(tmp_path, "cf", spec, rows)
    with pytest.raises(UsageError) as err:
        load_task(path)
    msg = str(err.value)
    assert "\n" not in msg  # one paragraph
    for pattern in expected:
        assert re.search(pattern, msg), (pattern, msg)


def test_bad_classifier_output_and_empty_scored_text(skewed_run, tmp_path):
    lm = _lm(skewed_run)
    (tmp_path / "clf.py").write_text("def bad(text):\n    return 'very'\n")
    path = _write(tmp_path, "t", "type: toxicity\nprompt: 'the {w} said'\n"
                  "generation: {max_new_tokens: 1}\ntoxicity: {classifier: 'clf.py:bad'}\n",
                  [{"w": "doctor"}])
    with pytest.raises(UsageError, match=r"toxicity\.classifier 'clf\.py:bad' returned 'very'"):
        evaluate_task(lm, load_task(path))
    path = _write(tmp_path, "c", "type: counterfactual\nprompt: 'the {term} said'\n"
                  "continuation: ' '\ngroups: {a: [he], b: [she]}\n", [{}])
    with pytest.raises(UsageError, match=r"c\.jsonl: row 1 of task c: .*group 'a' term 'he'"):
        evaluate_task(lm, load_task(path))
