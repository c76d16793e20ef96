"""Bad eval inputs (issue 16, "SFT / eval inputs"): task files, prompt templates, --text files
and numeric options are refused with exit 2, the file/key/flag named and the fix, no traceback;
hostile chat templates are refused wherever a template renders (eval --chat, generate --chat,
serve's chat completions)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from plinth.errors import UsageError
from plinth.eval.tasks import load_task

SRC = Path(__file__).resolve().parents[2] / "src"

TASK = """name: t
type: multiple_choice
data: t.jsonl
prompt: "Q: {question}"
"""
ROW = {"question": "w1 w2", "choices": ["w3", "w4"], "answer": 0}


def _task(tmp_path, yaml_text=TASK, rows=(ROW,), data: bytes | None = None) -> Path:
    (tmp_path / "t.yaml").write_text(yaml_text) if isinstance(yaml_text, str) else \
        (tmp_path / "t.yaml").write_bytes(yaml_text)
    d = tmp_path / "t.jsonl"
    d.write_bytes(data if data is not None else
                  "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows).encode())
    return tmp_path / "t.yaml"


def _refused(path: Path, *parts: str) -> str:
    before = {p: p.read_bytes() for p in path.parent.iterdir()}
    with pytest.raises(UsageError) as e:
        load_task(path)
    msg = str(e.value)
    for part in parts:
        assert part in msg, (part, msg)
    assert "\n" not in msg and len(msg) < 700
    assert {p: p.read_bytes() for p in path.parent.iterdir()} == before  # nothing changed
    return msg


# ---- task files -----------------------------------------------------------------------------

def test_binary_task_yaml(tmp_path):
    _refused(_task(tmp_path, b"\x7fELF\x02\x01\x01\x00\x00\x00"), "t.yaml", "binary")


def test_non_utf8_task_yaml(tmp_path):
    _refused(_task(tmp_path, TASK.encode() + "description: caf\xe9\n".encode("latin-1")),
             "t.yaml", "not UTF-8", "line 5")


def test_malformed_yaml(tmp_path):
    _refused(_task(tmp_path, "name: t\ntype: [unclosed\n"), "t.yaml", "not valid YAML")


@pytest.mark.parametrize("key,value,expect", [
    ("prompt", "12", "prompt is a int"),
    ("prompt", "{a: 1}", "prompt is a dict"),
    ("name", "[a, b]", "name is a list"),
    ("data", "7", "data is a int"),
])
def test_keys_that_must_be_text(tmp_path, key, value, expect):
    text = "\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line
                     for line in TASK.splitlines()) + "\n"
    _refused(_task(tmp_path, text), "t.yaml", expect, "quote it")


@pytest.mark.parametrize("extra,expect", [
    ("fewshot: {k: many}", "fewshot.k is 'many'"),
    ("fewshot: {k: -1}", "fewshot.k is -1"),
    ("fewshot: {seed: 1.5}", "fewshot.seed"),
    ("fewshot: {separator: [1]}", "fewshot.separator"),
    ("generation: {max_new_tokens: 0}", "generation.max_new_tokens is 0"),
    ("generation: {max_new_tokens: lots}", "generation.max_new_tokens"),
    ("generation: {stop: 5}", "generation.stop"),
    ("generation: {metric: [f1]}", "generation.metric"),
])
def test_sub_keys_of_the_wrong_type(tmp_path, extra, expect):
    _refused(_task(tmp_path, TASK + extra + "\n"), "t.yaml", expect)


def test_binary_data_file(tmp_path):
    _refused(_task(tmp_path, data=b"\x00\x01\x02\xff" * 64), "t.jsonl", "binary")


def test_non_utf8_data_file(tmp_path):
    data = (json.dumps(ROW) + "\n").encode() + b'{"question": "\xe9"}\n'
    _refused(_task(tmp_path, data=data), "t.jsonl", "not UTF-8", "line 2")


@pytest.mark.parametrize("line,expect", [
    ("{oops\n", "t.jsonl:2: not valid JSON"),
    ("[1, 2]\n", "t.jsonl:2: each line must be a JSON object"),
    ("[" * 100_000 + "]" * 100_000 + "\n", "t.jsonl:2: nested too deeply"),
    ('{"choices": ["a", "b"], "answer": 0}\n', "t.jsonl:2: missing field 'question'"),
    ('{"question": "q", "choices": "ab", "answer": 0}\n', "field 'choices' must be a list"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 7}\n', "field 'answer' is 7"),
])
def test_bad_rows_are_named(tmp_path, line, expect):
    _refused(_task(tmp_path, rows=(ROW, line)), expect)


def test_empty_data_file(tmp_path):
    _refused(_task(tmp_path, rows=()), "t.jsonl", "no rows")


# ---- prompt templates ------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,expect", [
    ("{question.__class__}", "{question.__class__} is not a plain field name"),
    ("{question.__class__.__mro__}", "not a plain field name"),
    ("{question[0]}", "{question[0]} is not a plain field name"),
    ("{0}", "{0} is not a plain field name"),
    ("{question:>999999999}", "width of 999999999"),
    ("{question:{question}}", "nested format spec"),
    ("{question", "not a valid format string"),
])
def test_python_prompt_templates_take_plain_names_only(tmp_path, prompt, expect):
    text = TASK.replace('"Q: {question}"', json.dumps(prompt))
    _refused(_task(tmp_path, text), "t.yaml: prompt", expect)


def test_fewshot_answer_format_is_sandboxed_too(tmp_path):
    _refused(_task(tmp_path, TASK + 'fewshot: {answer: "{answer.__doc__}"}\n'),
             "fewshot.answer", "not a plain field name")


@pytest.mark.parametrize("prompt,expect", [
    ("{{ question.__class__ }}", "refused by the sandbox"),
    ("{{ cycler.__init__.__globals__ }}", "refused by the sandbox"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "loop iterations"),
    ("{{ 'x' * 10**9 }}", "repeated a value"),
])
def test_jinja_prompt_templates_are_sandboxed_and_bounded(tmp_path, prompt, expect):
    text = TASK.replace('"Q: {question}"', json.dumps(prompt)) + "template: jinja\n"
    _refused(_task(tmp_path, text), "t.jsonl:1", expect)


# ---- the command line -----------------------------------------------------------------------

def _plinth(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-m", "plinth", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    return proc.returncode, " ".join(proc.stderr.split()), proc.stderr


def _main(capsys, *args):
    """`plinth ARGS` in this process (cheap); a traceback would fail the test as an error."""
    from plinth.cli import main

    code = main(list(args))
    raw = capsys.readouterr().err
    return code, " ".join(raw.split()), raw


def test_bad_numeric_options_and_text_files(tmp_path, capsys):
    """All refused before any model loads: the model argument does not even exist."""
    empty, binary, latin = tmp_path / "empty.txt", tmp_path / "bin.txt", tmp_path / "l1.txt"
    empty.write_text("  \n")
    binary.write_bytes(bytes(range(256)))
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 3)
    good = tmp_path / "ok.txt"
    good.write_text("w1 w2 w3\n")
    model = str(tmp_path / "no-model")
    cases = [
        (["--text", str(good), "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--text", str(good), "--batch-size", "-3"], "--batch-size must be at least 1"),
        (["--text", str(good), "--window", "0"], "--window must be at least 1"),
        (["--text", str(good), "--stride", "0"], "--stride must be at least 1"),
        (["--text", str(good), "--window", "8", "--stride", "16"], "--stride 16 is larger"),
        (["--tasks", "suite", "--limit", "-2"], "--limit must be at least 1"),
        (["--tasks", "suite", "--shots", "-1"], "--shots must be at least 0"),
        (["--text", str(empty)], "is empty"),
        (["--text", str(binary)], "binary"),
        (["--text", str(latin)], "not UTF-8"),
        (["--text", str(tmp_path / "missing.txt")], "no such file"),
    ]
    for args, expect in cases:
        code, err, raw = _main(capsys, "eval", model, *args)
        assert code == 2, (args, raw)
        assert expect in err, (args, err)
        assert "Traceback" not in raw


def test_a_binary_task_file_through_the_cli(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\x00\x01binary\xff")
    code, err, raw = _plinth("eval", str(tmp_path / "no-model"), "--tasks", str(bad))
    assert code == 2 and "bad.yaml" in err and "binary" in err and "Traceback" not in raw


def test_generate_options_and_prompt_files(tmp_path, capsys):
    binary = tmp_path / "p.jsonl"
    binary.write_bytes(b"\x00\xff" * 10)
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": 5}]}) + "\n")
    model = str(tmp_path / "no-model")
    for args, expect in [
        (["--prompt", "w1", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--prompt", "w1", "--num-beams", "0"], "--num-beams must be at least 1"),
        (["--prompt", "w1", "--num-beams", "2", "--num-return-sequences", "3"],
         "is more than --num-beams 2"),
        (["--prompt", "w1", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1"),
        (["--prompts-file", str(binary)], "binary"),
        (["--prompts-file", str(chat)], "line 1"),
    ]:
        code, err, raw = _main(capsys, "generate", model, *args)
        assert code == 2, (args, raw)
        assert expect in err and "Traceback" not in raw, (args, err)


def test_sampling_values_no_sampler_can_honour():
    from plinth.infer.params import SamplingParams

    for kw, expect in [({"temperature": float("nan")}, "temperature=nan"),
                       ({"top_p": float("inf")}, "top_p=inf"),
                       ({"seed": 2**64}, "seed=")]:
        with pytest.raises(UsageError, match=expect):
            SamplingParams(8, **kw).check()


# ---- hostile chat templates wherever one renders ---------------------------------------------

@pytest.fixture
def hostile_model(tiny_hf, tmp_path):
    """The tiny imported model with a chat template that reaches for Python internals."""
    _, imported = tiny_hf
    d = tmp_path / "model"
    shutil.copytree(imported, d)
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.content.__class__.__mro__ }}{% endfor %}")
    return d


def test_hostile_chat_template_in_eval_and_generate(hostile_model, tmp_path, capsys):
    task = _task(tmp_path)
    code, err, raw = _main(capsys, "eval", str(hostile_model), "--tasks", str(task), "--chat")
    assert code == 2 and "chat_template.jinja" in err and "refused by the sandbox" in err, raw
    code, err, raw = _plinth("generate", str(hostile_model), "--prompt", "w1", "--chat")
    assert code == 2 and "chat_template.jinja" in err and "refused by the sandbox" in err, raw
    assert "Traceback" not in raw


def test_hostile_chat_template_in_serve(hostile_model):
    from plinth.infer.engine import Engine
    from plinth.infer.inputs import Limits, chat_inputs
    from plinth.infer.protocol import APIError, ChatRequest

    eng = Engine.load(str(hostile_model))
    req = ChatRequest(messages=[{"role": "user", "content": "w1"}])
    with pytest.raises(APIError) as e:
        chat_inputs(eng, Limits(), req)
    assert e.value.status == 400 and "refused by the sandbox" in str(e.value)


@pytest.mark.parametrize("flag,value,expect", [
    ("--max-batch", "0", "--max-batch must be at least 1"),
    ("--max-queue", "-1", "--max-queue must be at least 1"),
    ("--max-prompt-tokens", "0", "--max-prompt-tokens must be at least 1"),
    ("--max-tokens-limit", "0", "--max-tokens-limit must be at least 1"),
    ("--max-body-bytes", "-5", "--max-body-bytes must be at least 1"),
    ("--timeout", "0", "--timeout must be a positive number"),
    ("--timeout", "nan", "--timeout must be a positive number"),
])
def test_serve_limits_are_checked_before_loading(tmp_path, capsys, flag, value, expect):
    code, err, _ = _main(capsys, "serve", str(tmp_path / "no-model"), flag, value)
    assert code == 2 and expect in err, err


def test_chat_sampling_options_are_checked(capsys, tiny_hf, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_hf[1], d)
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    for args, expect in [(["--max-new-tokens", "0"], "max_new_tokens=0"),
                         (["--temperature", "-1"], "temperature=-1"),
                         (["--top-p", "nan"], "top_p=nan")]:
        code, err, _ = _main(capsys, "chat", str(d), *args)
        assert code == 2 and expect in err, (args, err)


def test_a_yaml_alias_bomb_in_a_task_key_is_refused_quickly(tmp_path):
    import time

    levels = ["&a ['lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol', 'lol']"]
    for i in range(1, 9):
        levels.append(f"&{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]")
    text = TASK.replace('"Q: {question}"', "*i") + f"provenance: [{', '.join(levels)}]\n"
    text = text.replace("prompt: *i\n", "") + "prompt: *i\n"  # the anchor comes first
    t0 = time.monotonic()
    _refused(_task(tmp_path, text), "t.yaml", "alias expansion bombs")
    assert time.monotonic() - t0 < 10
