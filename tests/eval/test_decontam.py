"""Decontamination: planted 13-gram overlaps are found per evaluation set, near misses are not."""

from __future__ import annotations

import json
import re

import pytest

from plinth.data.decontam import NgramIndex, load_eval_sets, words
from plinth.errors import UsageError
from plinth.eval.decontam import contamination, format_reports

QUESTION = (
    "Which river flows through the ancient city of Avalon before it reaches the northern sea "
    "at the port of Brindle?"
)  # 22 words
FILLER = "the weather was mild and the market opened early for the traders from the hills. "


def test_words_normalise_case_punctuation_and_whitespace():
    assert words("Hello,  World!\n(it's)\tFINE--ok") == ["hello", "world", "it", "s", "fine", "ok"]


def test_planted_overlap_found_and_near_miss_ignored():
    ws = QUESTION.split()
    planted = " ".join(ws[4:17])  # exactly 13 consecutive words of the example
    near_miss = " ".join(ws[5:17])  # 12 of them: one short of an n-gram
    broken = " ".join([*ws[4:10], "suddenly", *ws[10:17]])  # 13 words with one inserted
    train = [
        FILLER * 3,
        FILLER + planted.upper().replace(" ", "   ") + "!!! " + FILLER,  # case/space/punct
        FILLER + near_miss + " " + FILLER,
        FILLER + broken + " " + FILLER,
        FILLER + QUESTION + " " + FILLER,  # the whole example
    ]
    evals = {
        "geo": [
            "What is the capital of France and why is it called that, asked the teacher?",
            QUESTION,
            "short one",
        ],
        "other": [
            "a completely unrelated question about music letters paper and the story of "
            "a friend who writes slowly and carefully"
        ],
    }
    reports = contamination(train, evals, n=13)
    geo, other = reports["geo"], reports["other"]
    assert geo.contaminated_examples == [1] and geo.contaminated == 1
    assert geo.fraction == pytest.approx(1 / 3)
    assert geo.train_docs == [1, 4] and geo.doc_matches == {1: [1, 4]}
    assert len(geo.example_ngram[1].split()) == 13 and geo.example_ngram[1] in QUESTION.lower()
    assert geo.too_short == 1 and geo.examples == 3 and geo.clean_examples == [0, 2]
    assert other.contaminated == 0 and other.train_docs == [] and other.fraction == 0.0
    assert json.loads(json.dumps(geo.to_dict()))["doc_matches"] == {"1": [1, 4]}
    table = format_reports(reports)
    assert "geo" in table and "33.3%" in table and "13-grams" in table
    # a shorter n makes the 12-word near miss count too
    assert contamination(train, evals, n=12)["geo"].train_docs == [1, 2, 4]


def test_index_first_match_is_the_filter_check():
    index = NgramIndex.build({"geo": [QUESTION]}, n=13)
    assert index.first_match(FILLER * 5) is None
    hit = index.first_match("x " + QUESTION.lower())
    assert hit is not None and hit.startswith("geo example 0: 'which river")


def test_eval_files_jsonl_fields_yaml_task_text_and_dirs(tmp_path):
    rows = [
        {"question": "q one two", "choices": ["alpha", "beta"], "answer": 1},
        {"question": "q three", "choices": ["gamma"], "answer": 0},
    ]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "task.yaml").write_text("name: mytask\ntype: multiple_choice\ndata: mc.jsonl\n")
    (tmp_path / "plain.txt").write_text("first line example\n\nsecond line example\n")
    sets = load_eval_sets([tmp_path / "mc.jsonl", tmp_path / "plain.txt"])
    assert sets == {
        "mc": ["q one two alpha beta", "q three gamma"],
        "plain": ["first line example", "second line example"],
    }
    assert load_eval_sets([tmp_path / "mc.jsonl"], fields=["question"]) == {
        "mc": ["q one two", "q three"]
    }
    assert load_eval_sets([tmp_path]) == {"mytask": ["q one two alpha beta", "q three gamma"]}
    with pytest.raises(UsageError, match="does not exist"):
        load_eval_sets([tmp_path / "missing.jsonl"])
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\nnot json\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl:2"):
        load_eval_sets([tmp_path / "bad.jsonl"])


def test_prepared_dataset_is_decoded_and_checked(tiny_data_dir):
    from plinth.data import open_dataset
    from plinth.eval.decontam import contamination_of_dataset, dataset_texts

    ds = open_dataset(tiny_data_dir)
    texts = list(dataset_texts(tiny_data_dir))
    assert len(texts) == ds.num_docs("train")
    doc = texts[3]
    assert ds.decode(ds.doc_tokens("train", 3)) == doc
    example = " ".join(words(doc)[:40])
    assert len(words(example)) >= 13
    reports = contamination_of_dataset(tiny_data_dir, {"leak": [example, FILLER * 2]})
    assert reports["leak"].contaminated_examples == [0]
    assert 3 in reports["leak"].train_docs


def test_contamination_command(tiny_data_dir, tmp_path, capsys):
    """`plinth data contamination`: per-set table, the leaked example with its n-gram and
    document, the full JSON report; built-in task names resolve; bad paths are named."""
    from plinth.cli import main
    from plinth.eval.decontam import dataset_texts

    doc = list(dataset_texts(tiny_data_dir))[5]
    leak = " ".join(words(doc)[:30])
    (tmp_path / "mine.jsonl").write_text(
        json.dumps({"q": leak}) + "\n" + json.dumps({"q": FILLER * 2}) + "\n"
    )
    out = tmp_path / "c.json"
    argv = ["data", "contamination", str(tiny_data_dir), str(tmp_path / "mine.jsonl"),
            "capitals", "--output", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert re.search(r"mine\s+│\s+2\s+│\s+0\s+│\s+1\s+│\s+50\.0%", text), text
    assert re.search(r"capitals\s+│\s+\d+\s+│\s+\d+\s+│\s+0\s+│\s+0\.0%", text), text
    assert "mine #0" in text and "document(s) 5" in text.replace("\n", " ")
    report = json.loads(out.read_text())
    assert report["n"] == 13 and report["reports"]["mine"]["contaminated_examples"] == [0]
    assert 5 in report["reports"]["mine"]["train_docs"]
    assert main(["data", "contamination", str(tmp_path), "capitals"]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err
    assert main(["data", "contamination", str(tiny_data_dir), str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
