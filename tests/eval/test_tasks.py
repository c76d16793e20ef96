"""Task files: loading, few-shot prompts, the built-in suite, and one-paragraph errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from plinth.errors import UsageError
from plinth.eval.tasks import SUITE_DIR, builtin_tasks, load_task, load_tasks


def _task(tmp_path, rows, yaml_text=None, name="t"):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml_text = yaml_text or (
        f"name: {name}\ntype: multiple_choice\ndata: {name}.jsonl\n"
        'prompt: "Q: {q}"\nfewshot: {k: 2, seed: 5}\n'
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml_text)
    return path


MC_ROWS = [{"q": f"q{i}", "choices": ["a", "b", "c"], "answer": i % 3} for i in range(6)]


def test_few_shot_prompts_are_fixed_by_seed_and_never_include_the_row(tmp_path):
    task = load_task(_task(tmp_path, MC_ROWS))
    for i in range(len(task.rows)):
        ctx = task.context(i)
        parts = ctx.split("\n\n")
        assert len(parts) == 3 and parts[-1] == f"Q: q{i}"
        assert f"Q: q{i} " not in ctx  # the scored row is never one of its own shots
        for p in parts[:2]:  # a shot is prompt + delimiter + the gold choice
            q = int(p.split()[1][1:])
            assert p == f"Q: q{q} " + "abc"[q % 3]
        assert task.context(i) == ctx  # same seed, same prompt
    assert task.context(0, k=0) == "Q: q0"
    other = load_task(_task(tmp_path, MC_ROWS, name="u", yaml_text=(
        "name: u\ntype: multiple_choice\ndata: u.jsonl\nprompt: 'Q: {q}'\n"
        "fewshot: {k: 2, seed: 6}\n")))
    assert [other.context(i) for i in range(6)] != [task.context(i) for i in range(6)]
    with pytest.raises(UsageError, match="only 5 example rows"):
        task.context(0, k=6)


def test_answer_given_as_choice_text_and_fewshot_file(tmp_path):
    (tmp_path / "shots.jsonl").write_text(json.dumps({"q": "s", "choices": ["x", "y"],
                                                      "answer": 1}) + "\n")
    path = _task(tmp_path, [{"q": "q", "choices": ["no", "yes"], "answer": "yes"}], yaml_text=(
        "name: t\ntype: multiple_choice\ndata: t.jsonl\nprompt: '{q}?'\n"
        "fewshot: {k: 1, file: shots.jsonl, separator: ' | '}\n"))
    task = load_task(path)
    assert task.gold(task.rows[0]) == 1
    assert task.context(0) == "s? y | q?"


def test_builtin_suite_loads_and_its_generator_reproduces_the_files(tmp_path):
    assert {"arithmetic", "capitals", "code", "facts", "json_answer"} <= set(builtin_tasks())
    tasks = load_tasks(["suite"])
    assert {t.type for t in tasks} == {"multiple_choice", "generation"}
    for t in tasks:
        assert len(t.rows) >= 24 and t.provenance and t.description
    assert [t.name for t in load_tasks(["capitals,arithmetic"])] == ["capitals", "arithmetic"]
    js = next(t for t in tasks if t.name == "json_answer")
    assert '{"answer": "' in js.context(0)  # shots show the JSON shape the regex expects
    before = {p.name: p.read_bytes() for p in SUITE_DIR.glob("*.jsonl")}
    copy = tmp_path / "suite"
    copy.mkdir()
    (copy / "generate_suite.py").write_bytes((SUITE_DIR / "generate_suite.py").read_bytes())
    subprocess.run([sys.executable, str(copy / "generate_suite.py")], check=True)
    assert {p.name: p.read_bytes() for p in copy.glob("*.jsonl")} == before


@pytest.mark.parametrize(
    ("rows", "yaml_text", "expected"),
    [
        ([{"q": "x", "choices": ["a", "b"], "answer": 2}], None,
         [r"t.jsonl:1: field 'answer' is 2", r"0\.\.1", "2 choices"]),
        ([{"q": "x", "choices": ["a", "b"], "answer": 0}, {"choices": ["a", "b"], "answer": 0}],
         None, [r"t.jsonl:2: missing field 'q'", "used by the prompt", "add the field"]),
        ([{"q": "x", "answer": 0}], None, [r"t.jsonl:1: missing field 'choices'"]),
        ([{"q": "x", "choices": ["a", "b"]}], None,
         [r"t.jsonl:1: missing field 'answer'", "gold choice index"]),
        ([{"q": "x", "choices": "ab", "answer": 0}], None, ["list of at least two choices"]),
        ([], "name: t\ntype: multiple_choice\ndata: t.jsonl\n",
         [r"t.yaml: missing required key 'prompt'"]),
        ([], "name: t\ntype: mc\ndata: t.jsonl\nprompt: x\n", ["type is 'mc'", "generation"]),
        ([], "name: t\ntype: generation\ndata: t.jsonl\nprompt: x\nfewshot: {kk: 1}\n",
         ["unknown key fewshot.kk", "Did you mean fewshot.k"]),
        ([], "name: t\ntype: generation\ndata: t.jsonl\nprompt: x\ngeneration: {metric: regex}\n",
         ["generation.pattern is missing"]),
        ([], "name: t\ntype: generation\ndata: nope.jsonl\nprompt: x\n",
         [r"nope.jsonl does not exist"]),
    ],
)
def test_bad_task_files_name_the_file_line_field_and_fix(tmp_path, rows, yaml_text, expected):
    path = _task(tmp_path, rows, yaml_text)
    with pytest.raises(UsageError) as err:
        load_task(path)
    for pattern in expected:
        assert re.search(pattern, str(err.value)), (pattern, err.value)


def test_bad_json_line_and_jinja_template(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"q": "x", "answer": "y"}\n{"q": \n')
    (tmp_path / "t.yaml").write_text("name: t\ntype: generation\ndata: t.jsonl\nprompt: '{q}'\n")
    with pytest.raises(UsageError, match=r"t.jsonl:2: not valid JSON"):
        load_task(tmp_path / "t.yaml")
    (tmp_path / "t.jsonl").write_text('{"q": "x", "answer": "y"}\n{"answer": "z"}\n')
    (tmp_path / "t.yaml").write_text(
        "name: t\ntype: generation\ndata: t.jsonl\ntemplate: jinja\nprompt: 'Q {{ q }}'\n")
    with pytest.raises(UsageError, match=r"t.jsonl:2: the prompt template fails.*'q'"):
        load_task(tmp_path / "t.yaml")


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(UsageError) as err:
        load_tasks(["capitols"])
    msg = str(err.value)
    assert "unknown task 'capitols'" in msg and "Did you mean 'capitals'" in msg
    for name in builtin_tasks():
        assert name in msg
