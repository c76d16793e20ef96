"""Bad fine-tuning data and chat templates: exit 2 with the file, line and field named and the
fix, no traceback, nothing written (issue 16, "SFT / eval inputs")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"

GOOD = {"prompt": "What is two plus two?", "completion": " Four."}
CHAT_OK = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


CHATML = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _lines(*recs) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs)


def _msg(**m) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}, m]}


# (name, file text or bytes, what the message must contain)
CASES = [
    ("number completion", _lines(GOOD, {"prompt": "a", "completion": 5}),
     ["line 2", "'completion'", "int", "JSON string"]),
    ("null completion", _lines(GOOD, {"prompt": "a", "completion": None}),
     ["line 2", "'completion'", "null"]),
    ("list prompt", _lines({"prompt": ["a", "b"], "completion": "c"}),
     ["line 1", "'prompt'", "list"]),
    ("nested completion", _lines(GOOD, {"prompt": "a", "completion": {"text": "b"}}),
     ["line 2", "'completion'", "dict"]),
    ("missing completion", _lines(GOOD, "", {"prompt": "a"}),
     ["line 3", "missing field 'completion'", "finetune.format"]),
    ("alpaca number input", _lines({"instruction": "a", "input": 3, "output": "b"}),
     ["line 1", "'input'", "int"]),
    ("chat number content", _lines(CHAT_OK, _msg(role="assistant", content=42)),
     ["line 2", "messages[1].content", "int", "JSON string"]),
    ("chat null content", _lines(_msg(role="assistant", content=None)),
     ["line 1", "messages[1].content", "null"]),
    ("chat list content", _lines(_msg(role="assistant", content=[{"type": "text"}])),
     ["line 1", "messages[1].content", "list"]),
    ("chat wrong role", _lines(_msg(role="robot", content="x")),
     ["line 1", "messages[1].role", "'robot'", "system, user, assistant"]),
    ("chat missing role", _lines(_msg(content="x")),
     ["line 1", "messages[1].role is missing"]),
    ("chat message not an object", _lines({"messages": ["hi"]}),
     ["line 1", "messages[0] is str", "role"]),
    ("chat messages not a list", _lines({"messages": "hi"}),
     ["line 1", "field 'messages' is str", "non-empty list"]),
    ("chat no assistant", _lines({"messages": [{"role": "user", "content": "hi"}]}),
     ["line 1", "no assistant message"]),
    ("empty file", "", ["holds no examples", "one JSON object per line"]),
    ("blank file", "\n  \n\n", ["holds no examples"]),
    ("binary file", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", ["line 1", "binary", "UTF-8"]),
    ("latin-1 file", _lines(GOOD).encode() + '{"prompt": "caf\xe9"}\n'.encode("latin-1"),
     ["line 2", "not UTF-8", "save the file as UTF-8"]),
    ("not json", _lines(GOOD, "{oops"), ["line 2", "not valid JSON", "one object"]),
    ("array line", _lines(GOOD, [1, 2]), ["line 2", "JSON list, not an object"]),
    ("deeply nested", _lines(GOOD, "[" * 200_000 + "]" * 200_000),
     ["line 2", "nested too deeply"]),
]


def _tok():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[unk]": 0}, unk_token="[unk]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return t


@pytest.mark.parametrize("name,content,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_sft_data_is_named(tmp_path, name, content, expect):
    from plinth.data.sft import ChatTemplate, SFTOptions, load_sft
    from plinth.errors import UsageError

    bad = tmp_path / "bad.jsonl"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content, encoding="utf-8")
    before = bad.read_bytes()
    fmt = "messages" if name == "chat messages not a list" else "auto"
    chat = ChatTemplate(CHATML) if name.startswith("chat") else None
    with pytest.raises(UsageError) as e:
        load_sft(bad, _tok(), SFTOptions(format=fmt), chat_template=chat)
    err = str(e.value)
    assert str(bad) in err
    for part in expect:
        assert part in err, (part, err)
    assert len(err) < 600 and "\n" not in err  # one paragraph
    assert bad.read_bytes() == before


def test_bad_sft_data_through_finetune(base_run, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_lines(GOOD, {"prompt": "a", "completion": 5}))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={bad}",
                 f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "bad.jsonl line 2: field 'completion' is int" in err, err
    assert not (tmp_path / "runs").exists()  # refused before any run directory


def test_a_hold_out_that_leaves_nothing_to_train_on(base_run, tmp_path, capsys):
    tiny = tmp_path / "two.jsonl"
    tiny.write_text(_lines(GOOD, GOOD))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={tiny}",
                 "finetune.val_fraction=0.9", f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "leaves none to train on" in err and "val_fraction" in err, err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_an_oversized_line_is_refused(base_run, tmp_path, capsys, monkeypatch):
    import plinth.data.sft as sft

    monkeypatch.setattr(sft, "MAX_LINE", 1000)
    bad = tmp_path / "huge.jsonl"
    bad.write_text(_lines(GOOD, {"prompt": "x" * 5000, "completion": "y"}))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={bad}",
                 f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "huge.jsonl line 2 is longer than" in err and "one example per line" in err


def test_classification_text_that_is_not_a_string(base_run, tmp_path, capsys):
    bad = tmp_path / "cls.jsonl"
    bad.write_text(_lines({"text": "a", "label": 0}, {"text": None, "label": 1}))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={bad}",
                 "finetune.task=classification", "finetune.num_labels=2",
                 f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "cls.jsonl line 2" in err and "'text' is null" in err
    assert "finetune.text_field" in err


def test_a_binary_file_through_the_real_cli(base_run, tmp_path):
    bad = tmp_path / "bin.jsonl"
    bad.write_bytes(bytes(range(256)) * 4)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "plinth", "finetune", f"finetune.base={base_run}",
         f"finetune.dataset={bad}", f"tracking.output_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2, proc.stderr
    assert "bin.jsonl line 1" in err and "binary" in err and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------- hostile chat templates

HOSTILE = [
    ("dunder", "{{ ''.__class__ }}", "refused by the sandbox"),
    ("globals", "{{ cycler.__init__.__globals__ }}", "refused by the sandbox"),
    ("huge range", "{% for i in range(10**9) %}x{% endfor %}", "was stopped"),
    ("nested loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                     "{% endfor %}", "loop iterations"),
    ("recursion", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply"),
    ("output explosion", "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                         "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "characters"),
    ("syntax", "{% for m in messages %}", "not a valid Jinja2 template"),
]


@pytest.mark.parametrize("name,source,expect", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_chat_templates_are_refused(name, source, expect):
    import time

    from plinth.data.sft import ChatTemplate
    from plinth.data.templates import TemplateError

    t0 = time.monotonic()
    with pytest.raises(TemplateError) as e:
        ChatTemplate(source, origin="t.jinja").render(CHAT_OK["messages"])
    assert time.monotonic() - t0 < 15  # bounded, never a hang
    assert "t.jinja" in str(e.value) and expect in str(e.value)


def test_a_hostile_chat_template_in_finetune(base_run, tmp_path, capsys):
    tpl = tmp_path / "t.jinja"
    tpl.write_text("{{ ''.__class__.__mro__ }}")
    data = tmp_path / "chat.jsonl"
    data.write_text(_lines(CHAT_OK))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={data}",
                 f"finetune.chat_template={tpl}", f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert "finetune.chat_template" in err and str(tpl) in err
    assert "refused by the sandbox" in err and "__class__" in err
    assert not (tmp_path / "runs").exists()


def test_a_binary_chat_template_file_is_refused(base_run, tmp_path, capsys):
    tpl = tmp_path / "t.jinja"
    tpl.write_bytes(b"\xff\xfe\x00{{")
    data = tmp_path / "chat.jsonl"
    data.write_text(_lines(CHAT_OK))
    code = main(["finetune", f"finetune.base={base_run}", f"finetune.dataset={data}",
                 f"finetune.chat_template={tpl}", f"tracking.output_dir={tmp_path / 'runs'}"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(tpl) in err and "UTF-8 Jinja2 text file" in err
