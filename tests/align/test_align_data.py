"""Alignment data (plinth.align.data): preference and unpaired JSONL -> rows of tokens.

Uses ref-smollm2's real tokenizer and chat template (ChatML) as build_task does, and the plain
layout (no template). Every bad input is a UsageError naming the file, line and field.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from plinth.align.data import load_align_data, read_preferences, read_unpaired
from plinth.errors import UsageError
from plinth.finetune.data import RowLoader
from plinth.models.layers import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "configs" / "data"
EOS = "<|im_end|>"
PAD = 2
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def smol():
    """(tokenizer, chat template) of ref-smollm2, as build_task reads them."""
    from plinth.data.sft import ChatTemplate
    from plinth.load import chat_template_source, read_tokenizer, resolve, token_text

    try:
        base = resolve("ref-smollm2")
    except UsageError as e:
        pytest.skip(str(e))
    tok = read_tokenizer(base)
    tok.no_padding()
    tok.no_truncation()
    template = ChatTemplate(chat_template_source("auto", base), token_text(base, "bos_token"),
                            token_text(base, "eos_token"))
    return tok, template


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def prefs(path, tok, template, **kw):
    opts = dict(template=template, eos_text=EOS, pad_id=PAD, max_length=256,
                overlong="truncate", system_prompt=None)
    return read_preferences(path, tok, **(opts | kw))


def unpaired(path, tok, template, **kw):
    opts = dict(template=template, eos_text=EOS, pad_id=PAD, max_length=256,
                overlong="truncate", system_prompt=None)
    return read_unpaired(path, tok, **(opts | kw))


def real(row_mask) -> int:
    return int(np.asarray(row_mask).sum())


def chatml(*turns, gen=True) -> str:
    out = "" if turns and turns[0][0] == "system" else f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    out += "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns)
    return out + ("<|im_start|>assistant\n" if gen else "")


# ------------------------------------------------------------------------- token layout


def test_preference_rows_with_chat_template(smol, tmp_path):
    """Prompt tokens shared exactly; labels only on the answer (end-of-turn included); padding
    masked; attention_mask the union; width the longest real row."""
    tok, template = smol
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "Well, let me think. It is 4."},
        {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Hmm. Paris, I think."},
    ])
    rows = prefs(f, tok, template)
    a = rows.arrays
    assert set(a) == {"chosen_ids", "chosen_labels", "chosen_mask", "rejected_ids",
                      "rejected_labels", "rejected_mask", "attention_mask"}
    assert all(v.dtype == np.int64 and v.shape == a["chosen_ids"].shape for v in a.values())
    assert rows.counts["kept"] == 2 and rows.counts["examples"] == 2
    prompt = enc(tok, chatml(("user", "What is 2+2?")))
    chosen = enc(tok, "4.<|im_end|>\n")
    rejected = enc(tok, "Well, let me think. It is 4.<|im_end|>\n")
    p = len(prompt)
    for side, answer in (("chosen", chosen), ("rejected", rejected)):
        n = p + len(answer)
        ids, labels, mask = a[f"{side}_ids"][0], a[f"{side}_labels"][0], a[f"{side}_mask"][0]
        assert ids[:n].tolist() == prompt + answer
        assert (labels[:p] == IGNORE_INDEX).all() and labels[p:n].tolist() == answer
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == PAD).all()
        assert mask[:n].all() and not mask[n:].any()
        assert tok.decode(labels[p:n].tolist(), skip_special_tokens=False).endswith("<|im_end|>\n")
    assert a["chosen_ids"][0, :p].tolist() == a["rejected_ids"][0, :p].tolist()
    assert (a["attention_mask"] == np.maximum(a["chosen_mask"], a["rejected_mask"])).all()
    longest = max(real(m) for side in ("chosen", "rejected") for m in a[f"{side}_mask"])
    assert a["chosen_ids"].shape[1] == longest < 256  # the file's longest row, not max_length
    assert rows.prompts[0] == (chatml(("user", "What is 2+2?")), "4.<|im_end|>\n")


def test_preference_rows_plain_layout(smol, tmp_path):
    """No template: the prompt as is, each answer followed by EOS."""
    tok, _ = smol
    f = jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"}])
    a = prefs(f, tok, None, system_prompt="ignored without a template").arrays
    prompt = enc(tok, "Q: 2+2?\nA:")
    for side, text in (("chosen", " 4"), ("rejected", " 5")):
        answer = enc(tok, text + EOS)
        assert answer[-1] == 2  # <|im_end|>: the model's EOS
        assert a[f"{side}_ids"][0].tolist()[: len(prompt) + len(answer)] == prompt + answer
        assert a[f"{side}_labels"][0, len(prompt):].tolist()[: len(answer)] == answer
        assert (a[f"{side}_labels"][0, : len(prompt)] == IGNORE_INDEX).all()


def test_system_prompt_and_message_prompts(smol, tmp_path):
    """finetune.system_prompt is prepended to string prompts (not to a prompt that has its own
    system message); a multi-turn prompt's earlier assistant turn carries no labels."""
    tok, template = smol
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "2+2?"}]
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2+2?", "chosen": "4", "rejected": "four, I believe"},
        {"prompt": [{"role": "system", "content": "Own."}, *convo[2:]], "chosen": "4",
         "rejected": "5"},
        {"prompt": convo, "chosen": [{"role": "assistant", "content": "4"}], "rejected": "5"},
    ])
    rows = prefs(f, tok, template, system_prompt="Be brief.")
    a = rows.arrays
    expected = [chatml(("system", "Be brief."), ("user", "2+2?")),
                chatml(("system", "Own."), ("user", "2+2?")),
                chatml(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"),
                       ("user", "2+2?"))]
    for i, text in enumerate(expected):
        prompt = enc(tok, text)
        assert a["chosen_ids"][i, : len(prompt)].tolist() == prompt
        assert (a["chosen_labels"][i, : len(prompt)] == IGNORE_INDEX).all()
        assert a["chosen_labels"][i, len(prompt):].tolist()[:3] == enc(tok, "4<|im_end|>\n")
        assert rows.prompts[i][0] == text


def test_implicit_prompt_form_matches_explicit(smol, tmp_path):
    """TRL's {chosen: [messages], rejected: [messages]}: the shared first messages are the
    prompt; the rows equal the explicit form's."""
    tok, template = smol
    user = {"role": "user", "content": "What colour is the sky?"}
    implicit = jsonl(tmp_path / "i.jsonl", [{
        "chosen": [user, {"role": "assistant", "content": "Blue."}],
        "rejected": [user, {"role": "assistant", "content": "It is green, or maybe blue."}],
    }])
    explicit = jsonl(tmp_path / "e.jsonl", [{
        "prompt": "What colour is the sky?", "chosen": "Blue.",
        "rejected": "It is green, or maybe blue.",
    }])
    a, b = prefs(implicit, tok, template), prefs(explicit, tok, template)
    assert a.arrays.keys() == b.arrays.keys()
    for k in a.arrays:
        assert (a.arrays[k] == b.arrays[k]).all(), k


def test_identical_pairs_are_counted_and_dropped(smol, tmp_path):
    tok, template = smol
    user = {"role": "user", "content": "Sky?"}
    same = [user, {"role": "assistant", "content": "Blue."}]
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Blue."},
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": [{"role": "assistant",
                                                           "content": "Blue."}]},
        {"chosen": same, "rejected": same},
        {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."},
    ])
    rows = prefs(f, tok, template)
    assert rows.counts["identical"] == 3 and rows.counts["kept"] == 1 and len(rows) == 1


def test_truncation_and_drop_counts(smol, tmp_path):
    """Too long: answers cut from the end (the prompt kept whole), or dropped; a prompt that
    leaves no answer token is dropped as prompt_too_long; answers equal once cut are dropped."""
    tok, _ = smol
    long_a, long_b = "one two three four five six seven", "one two three four five six eight"
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Count:", "chosen": " one two three four five", "rejected": " a b"},
        {"prompt": "Count:", "chosen": " a", "rejected": " b"},
        {"prompt": "word " * 20, "chosen": " a", "rejected": " b"},
        {"prompt": "Count:", "chosen": " " + long_a, "rejected": " " + long_b},
    ])
    p = len(enc(tok, "Count:"))
    rows = prefs(f, tok, None, max_length=p + 3)
    assert rows.counts == {"examples": 4, "kept": 2, "identical": 0,
                                "identical_after_truncation": 1, "truncated": 2, "dropped": 0,
                                "prompt_too_long": 1}
    a = rows.arrays
    assert real(a["chosen_mask"][0]) == p + 3
    assert a["chosen_ids"][0, p:p + 3].tolist() == enc(tok, " one two three four five" + EOS)[:3]
    assert a["chosen_ids"].shape[1] == p + 3
    dropped = prefs(f, tok, None, max_length=p + 3, overlong="drop")
    assert dropped.counts["dropped"] == 3 and dropped.counts["kept"] == 1
    assert dropped.counts["truncated"] == 0


def test_rowloader_cuts_to_the_longer_side(smol, tmp_path):
    """A batch is cut to the longest real row of EITHER side (attention_mask is the union)."""
    tok, _ = smol
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": " a", "rejected": " a much longer rejected answer here"},
        {"prompt": "Q", "chosen": " a", "rejected": " b"},
        {"prompt": "Q", "chosen": " a long chosen answer that is the longest of them all by far",
         "rejected": " b"},
    ])
    rows = prefs(f, tok, None)
    batch = RowLoader(rows, 2, 0, shuffle=False, loop=False).batch(np.array([0, 1]))
    width = real(rows.arrays["rejected_mask"][0])
    assert batch["chosen_ids"].shape[1] == width == batch["rejected_ids"].shape[1]
    assert width > real(rows.arrays["chosen_mask"][0])
    assert width < rows.arrays["chosen_ids"].shape[1]


# ---------------------------------------------------------------------------- unpaired


def test_unpaired_rows_and_kl_pairs(smol, tmp_path):
    """Each row: prompt + completion; its KL row: the same prompt + the completion of the next
    example (the last wraps to the first); label 1/0."""
    tok, template = smol
    data = [("2+2?", "4", True), ("Sky?", "Well, let me think... blue.", False),
            ("Capital of Peru?", "Lima.", True)]
    f = jsonl(tmp_path / "u.jsonl", [{"prompt": p, "completion": c, "label": y}
                                     for p, c, y in data])
    rows = unpaired(f, tok, template)
    a = rows.arrays
    assert a["label"].tolist() == [1, 0, 1] and a["label"].shape == (3,)
    assert rows.counts["desirable"] == 2 and rows.counts["undesirable"] == 1
    prompts = [enc(tok, chatml(("user", p))) for p, _, _ in data]
    answers = [enc(tok, c + "<|im_end|>\n") for _, c, _ in data]
    for i in range(3):
        j = (i + 1) % 3
        for pre, answer in (("", answers[i]), ("kl_", answers[j])):
            ids = a["input_ids" if not pre else "kl_ids"][i]
            labels = a["labels" if not pre else "kl_labels"][i]
            mask = a["seq_mask" if not pre else "kl_mask"][i]
            n = len(prompts[i]) + len(answer)
            assert ids[:n].tolist() == prompts[i] + answer and (ids[n:] == PAD).all()
            assert labels[len(prompts[i]):n].tolist() == answer
            assert (labels[: len(prompts[i])] == IGNORE_INDEX).all()
            assert (labels[n:] == IGNORE_INDEX).all() and real(mask) == n
    assert (a["attention_mask"] == np.maximum(a["seq_mask"], a["kl_mask"])).all()
    assert rows.prompts == [(chatml(("user", "2+2?")), "4<|im_end|>\n"),
                            (chatml(("user", "Capital of Peru?")), "Lima.<|im_end|>\n")]


def test_unpaired_kl_rows_fit_max_length(smol, tmp_path):
    tok, _ = smol
    f = jsonl(tmp_path / "u.jsonl", [
        {"prompt": "A long prompt of many words here", "completion": " x", "label": True},
        {"prompt": "Q", "completion": " a long completion with a good number of words",
         "label": False},
    ])
    rows = unpaired(f, tok, None, max_length=10)
    assert rows.arrays["kl_mask"].sum(1).max() <= 10 and rows.arrays["seq_mask"].sum(1).max() <= 10
    assert rows.counts["truncated"] == 1


def test_unpaired_all_one_kind_is_refused(smol, tmp_path):
    tok, _ = smol
    f = jsonl(tmp_path / "u.jsonl", [{"prompt": "Q", "completion": "A", "label": True}] * 3)
    with pytest.raises(UsageError) as e:
        unpaired(f, tok, None)
    msg = str(e.value)
    assert str(f) in msg and "3 with label true, 0 with label false" in msg and "both" in msg
    assert len(unpaired(f, tok, None, need_both=False)) == 3  # validation may be one kind


# ------------------------------------------------------------------------------ errors


def error(fn, path, tok, template, **kw) -> str:
    with pytest.raises(UsageError) as e:
        fn(path, tok, template, **kw)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


GOOD = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
MSGS = [{"role": "assistant", "content": "A."}]


@pytest.mark.parametrize("line, needles", [
    ("not json", ["line 2", "not valid JSON"]),
    ("[1, 2]", ["line 2", "not an object"]),
    ({"prompt": "Q?", "chosen": "A."}, ["line 2", "'rejected'", "prompt, chosen, rejected"]),
    ({"prompt": "Q?", "completion": "A.", "label": True}, ["line 2", "'chosen'", "kto"]),
    ({"prompt": "Q?"}, ["line 2", "'chosen'", "grpo"]),
    ({"chosen": "A.", "rejected": "B."}, ["line 2", "'prompt'", "implicit-prompt"]),
    ({"prompt": "Q?", "chosen": 3, "rejected": "B."}, ["line 2", "'chosen'", "int", "string"]),
    ({"prompt": {"text": "Q?"}, "chosen": "A.", "rejected": "B."}, ["line 2", "'prompt'", "dict"]),
    ({"prompt": "  ", "chosen": "A.", "rejected": "B."}, ["line 2", "'prompt' is empty"]),
    ({"prompt": "Q?", "chosen": "A.", "rejected": ""}, ["line 2", "'rejected' is empty"]),
    ({"prompt": "Q?", "chosen": [], "rejected": "B."}, ["line 2", "'chosen' is an empty list"]),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": ""}], "rejected": "B."},
     ["line 2", "'chosen' has only empty messages"]),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A"}], "rejected": "B."},
     ["line 2", "chosen[0].role", "assistant messages only"]),
    ({"prompt": "Q?", "chosen": [{"role": "bot", "content": "A"}], "rejected": "B."},
     ["line 2", "chosen[0].role", "'bot'"]),
    ({"prompt": "Q?", "chosen": [{"role": "assistant", "content": 5}], "rejected": "B."},
     ["line 2", "chosen[0].content", "int"]),
    ({"prompt": "Q?", "chosen": ["A"], "rejected": "B."}, ["line 2", "chosen[0]", "str"]),
    ({"chosen": [{"role": "user", "content": "Q"}, *MSGS],
      "rejected": [{"role": "user", "content": "R"}, *MSGS]}, ["line 2", "no shared prompt"]),
    ({"chosen": [{"role": "user", "content": "Q"}, *MSGS],
      "rejected": [{"role": "user", "content": "Q"}]}, ["line 2", "rejected", "empty"]),
    ({"chosen": [{"role": "user", "content": "Q"}, *MSGS],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "user", "content": "more"}, *MSGS]},
     ["line 2", "differ before their answers", "'user'"]),
])
def test_preference_errors_name_file_line_field(smol, tmp_path, line, needles):
    tok, template = smol
    f = jsonl(tmp_path / "bad.jsonl", [GOOD, line, GOOD])
    msg = error(prefs, f, tok, template)
    assert str(f) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("field", ["prompt", "rejected"])
def test_messages_without_template_are_refused(smol, tmp_path, field):
    tok, _ = smol
    line = dict(GOOD, **{field: [{"role": "user" if field == "prompt" else "assistant",
                                  "content": "X"}]})
    f = jsonl(tmp_path / "bad.jsonl", [GOOD, line])
    msg = error(prefs, f, tok, None)
    assert f"{f} line 2" in msg and "no chat template" in msg and "chat_template" in msg
    assert f"{field!r}" in msg


@pytest.mark.parametrize("label", [1, "true", None, 0.0])
def test_unpaired_label_must_be_boolean(smol, tmp_path, label):
    tok, template = smol
    good = {"prompt": "Q", "completion": "A", "label": False}
    f = jsonl(tmp_path / "bad.jsonl", [good, good, {"prompt": "Q", "completion": "A",
                                                    "label": label}])
    msg = error(unpaired, f, tok, template)
    assert f"{f} line 3" in msg and "'label'" in msg and "true" in msg and "boolean" in msg


@pytest.mark.parametrize("line, needles", [
    ({"prompt": "Q", "completion": "A"}, ["'label'", "prompt, completion, label"]),
    ({"prompt": "Q", "chosen": "A", "rejected": "B"}, ["'completion'", "dpo"]),
    ({"prompt": "Q", "completion": "", "label": True}, ["'completion' is empty"]),
    ({"prompt": "Q", "completion": None, "label": True}, ["'completion' is null"]),
])
def test_unpaired_errors(smol, tmp_path, line, needles):
    tok, template = smol
    good = {"prompt": "Q", "completion": "A", "label": False}
    f = jsonl(tmp_path / "bad.jsonl", [good, line])
    msg = error(unpaired, f, tok, template)
    assert f"{f} line 2" in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_nothing_usable_says_how_many_and_why(smol, tmp_path):
    tok, _ = smol
    f = jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "A", "rejected": "A"},
        {"prompt": "word " * 30, "chosen": "A", "rejected": "B"},
    ])
    msg = error(prefs, f, tok, None, max_length=8)
    assert str(f) in msg and "align.dataset" in msg and "2 read" in msg
    assert "1 chosen and rejected are the same" in msg and "1 the prompt alone fills" in msg
    msg = error(prefs, f, tok, None, max_length=8, overlong="drop")
    assert "overlong=drop" in msg and "finetune.max_length=8" in msg


def test_missing_empty_and_binary_files(smol, tmp_path):
    tok, template = smol
    msg = error(prefs, tmp_path / "nope.jsonl", tok, template, key="align.val_dataset")
    assert "align.val_dataset" in msg and "nope.jsonl" in msg and "does not exist" in msg
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "holds no examples" in error(unpaired, tmp_path / "empty.jsonl", tok, template)
    (tmp_path / "bin.jsonl").write_bytes(b"\x00\x01\x02")
    assert "binary" in error(prefs, tmp_path / "bin.jsonl", tok, template)


# ---------------------------------------------------------------------- load_align_data


def _cfg(*over):
    from plinth.config.load import load_config

    return load_config([], list(over)).config


def test_load_align_data_preference_with_val_file(smol, tmp_path):
    tok, template = smol
    train = jsonl(tmp_path / "t.jsonl", [
        {"prompt": f"What is {i} plus 1?", "chosen": f"{i + 1}.",
         "rejected": f"Let me think. It is {i + 1}."} for i in range(10)])
    val = jsonl(tmp_path / "v.jsonl", [
        {"prompt": f"What is {i} plus 2?", "chosen": f"{i + 2}.",
         "rejected": f"Hmm, it is {i + 2}."} for i in range(5)])
    cfg = _cfg(f"align.dataset={train}", f"align.val_dataset={val}")
    data = load_align_data(cfg, tok, template, EOS, PAD)
    assert len(data.train) == 10 and len(data.val) == 5
    assert data.prompts == [chatml(("user", f"What is {i} plus 2?")) for i in range(3)]
    assert data.answers == [f"{i + 2}.<|im_end|>\n" for i in range(3)]
    cfg = _cfg(f"align.dataset={train}", "finetune.val_fraction=0.3", "finetune.max_length=64")
    data = load_align_data(cfg, tok, template, EOS, PAD)
    assert len(data.train) == 7 and len(data.val) == 3 and len(data.prompts) == 3
    held = {p for p, _ in data.val.prompts}
    assert not held & {p for p, _ in data.train.prompts}
    cfg = _cfg(f"align.dataset={train}", "finetune.val_fraction=0")
    data = load_align_data(cfg, tok, template, EOS, PAD)
    assert data.val is None and data.prompts == [] and data.answers == []


def test_load_align_data_unpaired_and_refusals(smol, tmp_path):
    tok, template = smol
    rows = [{"prompt": f"Q{i}", "completion": f"A{i}", "label": i % 2 == 0} for i in range(6)]
    train = jsonl(tmp_path / "u.jsonl", rows)
    val = jsonl(tmp_path / "uv.jsonl", [rows[1], rows[0], rows[2]])  # first desirable: Q0, Q2
    data = load_align_data(_cfg("align.method=kto", f"align.dataset={train}",
                                f"align.val_dataset={val}"), tok, template, EOS, PAD)
    assert data.train.arrays["label"].tolist() == [1, 0, 1, 0, 1, 0]
    assert data.prompts == [chatml(("user", "Q0")), chatml(("user", "Q2"))]
    assert data.answers == ["A0<|im_end|>\n", "A2<|im_end|>\n"]
    one_kind = jsonl(tmp_path / "one.jsonl", rows[1:2])
    data = load_align_data(_cfg("align.method=kto", f"align.dataset={train}",
                                f"align.val_dataset={one_kind}"), tok, template, EOS, PAD)
    assert data.val.counts["undesirable"] == 1 and data.prompts == []
    with pytest.raises(UsageError, match=r"align\.dataset is not set.*kto"):
        load_align_data(_cfg("align.method=kto"), tok, template, EOS, PAD)
    with pytest.raises(UsageError, match="prompt-only"):
        load_align_data(_cfg("align.method=grpo", "align.reward_funcs=[exact_match]",
                             f"align.dataset={train}"), tok, template, EOS, PAD)
    two = jsonl(tmp_path / "two.jsonl", rows[:2])
    with pytest.raises(UsageError, match=r"leaves none for training.*val_fraction"):
        load_align_data(_cfg("align.method=kto", f"align.dataset={two}",
                             "finetune.val_fraction=0.9"), tok, template, EOS, PAD)
    with pytest.raises(UsageError, match=r"align\.val_dataset: .*missing\.jsonl does not exist"):
        load_align_data(_cfg(f"align.dataset={two}", f"align.val_dataset={tmp_path}/missing.jsonl"),
                        tok, template, EOS, PAD)


# -------------------------------------------------------------------------- shipped data


def test_shipped_files_are_what_the_generator_writes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("make_align_data", DATA / "make_align_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "HERE", tmp_path)
    mod.main()
    names = ("concise_prefs.train.jsonl", "concise_prefs.val.jsonl", "concise_kto.train.jsonl")
    for name in names:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    assert sum((DATA / n).stat().st_size for n in names) < 300_000


def test_shipped_preference_set(smol):
    """Every pair is usable; chosen is short (<= 12 words), rejected rambling (40-80 words)
    around the same answer, much longer in tokens; no question is in both train and val."""
    tok, template = smol
    train = prefs(DATA / "concise_prefs.train.jsonl", tok, template, max_length=512)
    val = prefs(DATA / "concise_prefs.val.jsonl", tok, template, max_length=512)
    assert train.counts == {"examples": 402, "kept": 402, "identical": 0,
                            "identical_after_truncation": 0, "truncated": 0, "dropped": 0,
                            "prompt_too_long": 0}
    assert val.counts["kept"] == val.counts["examples"] == 60
    for rows in (train, val):
        chosen, rejected = ((rows.arrays[f"{s}_labels"] != IGNORE_INDEX).sum(1)
                            for s in ("chosen", "rejected"))
        assert (rejected > 2 * chosen).all()
    recs = [json.loads(x) for n in ("train", "val")
            for x in (DATA / f"concise_prefs.{n}.jsonl").read_text().splitlines()]
    assert all(len(r["chosen"].split()) <= 12 for r in recs)
    assert all(40 <= len(r["rejected"].split()) <= 80 for r in recs)
    assert len({r["rejected"] for r in recs}) == len(recs)  # filler varies
    assert len({r["prompt"] for r in recs}) == len(recs)


def test_shipped_kto_set(smol):
    tok, template = smol
    rows = unpaired(DATA / "concise_kto.train.jsonl", tok, template, max_length=512)
    assert rows.counts["kept"] == 402 and rows.counts["truncated"] == 0
    assert rows.counts["desirable"] == rows.counts["undesirable"] == 201
    pairs = {json.loads(x)["prompt"]: json.loads(x) for x in
             (DATA / "concise_prefs.train.jsonl").read_text().splitlines()}
    for line in (DATA / "concise_kto.train.jsonl").read_text().splitlines():
        r = json.loads(line)
        assert r["completion"] == pairs[r["prompt"]]["chosen" if r["label"] else "rejected"]
