"""Instruction-tuning data: formats, chat templates, answer-only labels, truncation, packing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from plinth.data.sft import ChatTemplate, SFTOptions, load_sft
from plinth.errors import UsageError
from plinth.models.layers import IGNORE_INDEX

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator(["What is two plus two? Four. Name a colour: red, blue."] * 5, trainer)
    return t


def write(tmp_path, records, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in records))
    return p


def answer_text(tok, ids, labels) -> str:
    """Tokens the loss covers (labels[t] is the target of position t)."""
    return tok.decode([int(x) for x in labels if x != IGNORE_INDEX], skip_special_tokens=False)


def test_prompt_completion_trains_only_on_the_completion(tok, tmp_path):
    p = write(tmp_path, [{"prompt": "What is two plus two? ", "completion": "Four."}])
    data = load_sft(p, tok, eos_token="<eos>")
    assert data.format == "prompt_completion" and len(data) == 1
    ids, labels = data.ids[0], data.labels[0]
    assert len(ids) == len(labels) and labels[-1] == IGNORE_INDEX
    assert answer_text(tok, ids, labels).replace(" ", "") == "Four.<eos>"
    n_prompt = len(tok.encode("What is two plus two? ").ids)
    assert (labels[: n_prompt - 1] == IGNORE_INDEX).all()  # no loss on predicting prompt tokens
    assert labels[n_prompt - 1] == ids[n_prompt]  # the first answer token is a target


def test_alpaca_with_and_without_input(tok, tmp_path):
    p = write(
        tmp_path,
        [
            {"instruction": "Name a colour", "input": "", "output": "red"},
            {"instruction": "Name a colour", "input": "not blue", "output": "red"},
        ],
    )
    data = load_sft(p, tok, eos_token="<eos>")
    assert data.format == "alpaca"
    texts = [tok.decode(list(i)) for i in data.ids]
    assert "### Input" not in texts[0] and "not blue" in texts[1]
    assert all(answer_text(tok, i, lab).replace(" ", "") == "red<eos>" for i, lab in
               zip(data.ids, data.labels, strict=True))  # fmt: skip


def test_chat_template_trains_every_assistant_turn_and_nothing_else(tok, tmp_path):
    msgs = [
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "Name a colour"},
        {"role": "assistant", "content": "red"},
    ]
    p = write(tmp_path, [{"messages": msgs}])
    data = load_sft(p, tok, chat_template=ChatTemplate(CHATML))
    rendered = tok.decode(list(data.ids[0]), skip_special_tokens=False).replace(" ", "")
    assert rendered.startswith("<|im_start|>system")  # the template's default system turn
    trained = answer_text(tok, data.ids[0], data.labels[0]).replace(" ", "")
    assert trained == "Four.<|im_end|>\nred<|im_end|>\n".replace(" ", "")
    assert "two" not in trained and "colour" not in trained


def test_chat_data_without_a_template_is_a_clear_error(tok, tmp_path):
    p = write(tmp_path, [{"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "hello"}]}])  # fmt: skip
    with pytest.raises(UsageError, match=r"has no chat template.*finetune\.chat_template"):
        load_sft(p, tok)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tok, tmp_path):
    recs = [{"prompt": "Name a colour: ", "completion": "red, blue. " * 20},
            {"prompt": "Name a colour: ", "completion": "red"}]  # fmt: skip
    p = write(tmp_path, recs)
    cut = load_sft(p, tok, SFTOptions(max_length=16))
    assert cut.counts == {"examples": 2, "truncated": 1, "dropped": 0, "kept": 2}
    assert max(len(i) for i in cut.ids) == 16
    dropped = load_sft(p, tok, SFTOptions(max_length=16, overlong="drop"))
    assert dropped.counts["dropped"] == 1 and dropped.counts["kept"] == 1
    with pytest.raises(UsageError, match=r"no example .* survived"):
        load_sft(p, tok, SFTOptions(max_length=2, overlong="drop"))


def test_packing_keeps_examples_whole_with_their_own_positions(tok, tmp_path):
    recs = [{"prompt": f"Name {i}: ", "completion": "red" * (1 + i % 3)} for i in range(12)]
    data = load_sft(write(tmp_path, recs), tok, eos_token="<eos>")
    packed = data.pack(32)
    seg, pos = packed["segment_ids"], packed["position_ids"]
    assert packed["input_ids"].shape[1] == 32 and len(packed["input_ids"]) < len(data)
    # every example appears exactly once, contiguous, positions 0..n-1, labels intact
    found = []
    for r in range(len(seg)):
        for s in range(1, seg[r].max() + 1):
            where = np.flatnonzero(seg[r] == s)
            assert (np.diff(where) == 1).all() and (pos[r, where] == np.arange(len(where))).all()
            found.append((tuple(packed["input_ids"][r, where]), tuple(packed["labels"][r, where])))
    assert sorted(found) == sorted((tuple(i), tuple(lab)) for i, lab in
                                   zip(data.ids, data.labels, strict=True))  # fmt: skip
    assert (packed["labels"][seg == 0] == IGNORE_INDEX).all()


def test_bad_files_say_where(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(UsageError, match=r"bad\.jsonl line 2 is not valid JSON"):
        load_sft(bad, tok)
    with pytest.raises(UsageError, match=r"cannot tell the format .* keys \['question'\]"):
        load_sft(write(tmp_path, [{"question": "?"}]), tok)
    with pytest.raises(UsageError, match="does not exist"):
        load_sft(tmp_path / "missing.jsonl", tok)
    with pytest.raises(UsageError, match="no assistant message"):
        load_sft(write(tmp_path, [{"messages": [{"role": "user", "content": "hi"}]}]), tok,
                 chat_template=ChatTemplate(CHATML))  # fmt: skip
