"""Reward functions for GRPO/RLOO: the built-ins, `module:function` and file imports, and the
errors a bad function gives (named function, named row, the fix).

    python -m pytest tests/align/test_rewards.py -q
"""

from __future__ import annotations

import math

import pytest

from plinth.align.prompts import PromptRow
from plinth.align.rewards import (
    check_fields,
    exact_match,
    json_valid,
    length_penalty,
    resolve_reward_funcs,
)
from plinth.errors import UsageError


@pytest.mark.parametrize(
    ("completion", "answer", "want"),
    [
        ("42", "42", 1.0),
        ("  42\n", "42", 1.0),
        ("The sum is 42.", "42", 1.0),  # numeric answer: the last number counts
        ("= 42.0", "42", 1.0),  # compared by value
        ("-7", "-7", 1.0),
        ("5 - 12 = -7", "-7", 1.0),
        ("42 or 43", "42", 0.0),  # the LAST number is the answer
        ("41", "42", 0.0),
        ("no number here", "42", 0.0),
        ("", "42", 0.0),
        ("1,234", "1234", 1.0),  # comma thousands separators are read as one number
        ("1, 2, 3", "3", 1.0),  # a list is several numbers
        ("Paris", "paris", 1.0),  # text: case and whitespace do not matter
        ("  New   York ", "new york", 1.0),
        ("Paris, France", "Paris", 0.0),  # text answers must match whole
        ("42", 42, 1.0),  # a JSON number in the row
        ("3.50", "3.5", 1.0),
    ],
)
def test_exact_match(completion, answer, want):
    assert exact_match("q", completion, answer=answer) == want


def test_json_valid_and_length_penalty():
    assert json_valid("q", ' {"answer": "5"} ') == 1.0
    assert json_valid("q", "[1, 2]") == 1.0
    assert json_valid("q", '{"answer": 5') == 0.0
    assert json_valid("q", "answer: 5") == 0.0
    assert json_valid("q", "") == 0.0
    assert length_penalty("q", "x" * 150) == 0.0
    assert length_penalty("q", "x" * 300) == pytest.approx(-0.5)
    assert length_penalty("q", "x" * 600) == pytest.approx(-2.0)
    assert length_penalty("q", "x" * 30, target_length=10) == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="target_length"):
        length_penalty("q", "x", target_length=0)


ROW = PromptRow([1, 2], "What is 2 + 3?", {"answer": "5", "source": "test"}, "data.jsonl line 7")


def test_builtins_and_weights_by_name():
    funcs = resolve_reward_funcs(["exact_match", "json_valid", "length_penalty"])
    assert [f.name for f in funcs] == ["exact_match", "json_valid", "length_penalty"]
    assert [f("p", "5", ROW.fields, ROW.where) for f in funcs] == [1.0, 1.0, 0.0]


def _module(tmp_path, name: str, text: str):
    f = tmp_path / f"{name}.py"
    f.write_text(text, encoding="utf-8")
    return f


def test_module_function_and_file_path(tmp_path, monkeypatch):
    _module(tmp_path, "my_rewards", (
        "def starts_with_answer(prompt, completion, answer):\n"  # no **kwargs: gets answer only
        "    return float(completion.startswith(str(answer)))\n"
        "def everything(prompt, completion, **fields):\n"
        "    return float(len(fields))\n"
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    funcs = resolve_reward_funcs(
        ["my_rewards:starts_with_answer", "my_rewards:everything",
         f"{tmp_path / 'my_rewards.py'}:starts_with_answer"])
    assert [f.name for f in funcs][1] == "everything"
    # two functions of one name get their full spec as the metric name
    assert funcs[0].name != funcs[2].name
    assert funcs[0]("p", "5 apples", ROW.fields, ROW.where) == 1.0
    assert funcs[1]("p", "x", ROW.fields, ROW.where) == 2.0  # answer and source
    assert funcs[2]("p", "6", ROW.fields, ROW.where) == 0.0
    assert funcs[0].required == ("answer",)
    # a row without the field a function needs is refused up front, naming row and function
    bad = PromptRow([1], "q", {"source": "x"}, "prompts.jsonl line 3")
    with pytest.raises(UsageError, match=r"prompts.jsonl line 3 has no field 'answer'.*"
                                         r"my_rewards:starts_with_answer"):
        check_fields(funcs, [ROW, bad])


@pytest.mark.parametrize(
    ("spec", "pattern"),
    [
        ("exact_mach", r"not a built-in reward \(did you mean exact_match\?\)"),
        ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz' \(ModuleNotFoundError: "
                                 r"No module named 'no_such_module_xyz'\).*PYTHONPATH"),
        ("os.path:no_such_function", r"has no function 'no_such_function'.*isfile"),
        ("math:pi", r"pi in math is a float, not a function"),
        ("missing_dir/r.py:f", r"missing_dir/r.py is not a file.*current directory"),
    ],
)
def test_unimportable_functions_are_named_with_the_fix(spec, pattern):
    with pytest.raises(UsageError, match=pattern) as e:
        resolve_reward_funcs(["exact_match", spec])
    assert "align.reward_funcs[1]" in str(e.value)


def test_a_module_that_fails_on_import(tmp_path):
    f = _module(tmp_path, "broken", "def f(prompt, completion):\n    return 1.0 +\n")
    with pytest.raises(UsageError, match=r"reward_funcs\[0\].*SyntaxError"):
        resolve_reward_funcs([f"{f}:f"])
    g = _module(tmp_path, "raises", "raise RuntimeError('no network here')\n")
    with pytest.raises(UsageError, match=r"RuntimeError: no network here"):
        resolve_reward_funcs([f"{g}:f"])


def test_a_function_that_raises_or_returns_a_non_number(tmp_path):
    f = _module(tmp_path, "bad_rewards", (
        "def boom(prompt, completion, **kw):\n    raise KeyError('score')\n"
        "def text(prompt, completion, **kw):\n    return 'good'\n"
        "def nothing(prompt, completion, **kw):\n    return None\n"
        "def nan(prompt, completion, **kw):\n    return float('nan')\n"
        "def flag(prompt, completion, **kw):\n    return True\n"
    ))
    boom, text, nothing, nan, flag = resolve_reward_funcs(
        [f"{f}:{n}" for n in ("boom", "text", "nothing", "nan", "flag")])
    with pytest.raises(UsageError) as e:
        boom("p", "c", ROW.fields, ROW.where)
    msg = str(e.value)
    assert "bad_rewards.py:boom" in msg and "data.jsonl line 7" in msg and "KeyError" in msg
    assert "'score'" in msg and "\n" not in msg
    for fn, kind in ((text, "returned str"), (nothing, "returned NoneType"),
                     (nan, "non-finite number nan")):
        with pytest.raises(UsageError, match=kind) as e:
            fn("p", "c", ROW.fields, ROW.where)
        assert "data.jsonl line 7" in str(e.value) and fn.spec in str(e.value)
    assert flag("p", "c", ROW.fields, ROW.where) == 1.0
    assert not math.isnan(flag("p", "c", {}, "x"))
