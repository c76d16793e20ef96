"""`plinth generate` (prompts, JSONL batch files, beams, logprobs) and `plinth chat` (stdin), on
the tiny imported Llama with a word-level tokenizer and a small chat template.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_commands.py -q
"""

from __future__ import annotations

import io
import json
import shutil

import pytest

from plinth.cli import main
from plinth.infer.engine import Engine, SamplingParams

# words only (the tokenizer is word-level): "w1" opens a turn, the role name follows
TEMPLATE = ("{% for m in messages %}w1 {{ 'w3' if m['role'] == 'user' else 'w4' }} "
            "{{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w1 w4{% endif %}")


@pytest.fixture
def model_dir(tiny_hf, tmp_path):
    """The imported tiny Llama, with a chat template."""
    d = tmp_path / "model"
    shutil.copytree(tiny_hf[1], d)
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


def test_generate_prompts_file_writes_jsonl(model_dir, tmp_path, capsys):
    rows = [{"prompt": "w5 w9 w13 w20", "id": 1}, {"prompt": "w7"},
            {"messages": [{"role": "user", "content": "w8 w9"}]},
            {"prompt": "w30 w31 w32 w33 w34 w35 w36"}]
    src, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["generate", str(model_dir), "--prompts-file", str(src), "--output", str(out),
                 "--max-new-tokens", "6", "--temperature", "0", "--batch-size", "3",
                 "--logprobs", "1", "--no-progress"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    eng = Engine.load(str(model_dir))
    texts = [r.get("prompt") or eng.apply_chat_template(r["messages"]) for r in rows]
    want = eng.generate(texts, SamplingParams(max_new_tokens=6, logprobs=1))
    assert [g["text"] for g in got] == [w.text for w in want]
    assert got[0]["id"] == 1 and got[2]["messages"] == rows[2]["messages"]  # input kept
    assert [g["completion_tokens"] for g in got] == [len(w.token_ids) for w in want]
    assert [g["prompt_tokens"] for g in got] == [4, 1, 7, 7]  # template: w1 w3 w8 w9 w2 w1 w4
    assert got[1]["logprobs"] == pytest.approx(want[1].logprobs, abs=1e-5)
    assert len(got[1]["top_logprobs"][0]) == 1
    for g in got:  # tokens are the text pieces top_logprobs are keyed by (greedy: the top one)
        assert [next(iter(top)) for top in g["top_logprobs"]] == g["tokens"]
        assert "".join(g["tokens"]).startswith(g["text"])
    assert "wrote 4 rows" in capsys.readouterr().err


def test_generate_prompt_flags_and_beams(model_dir, capsys):
    assert main(["generate", str(model_dir), "--prompt", "w5 w9", "--max-new-tokens", "5",
                 "--temperature", "0", "--stop", "w32", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    eng = Engine.load(str(model_dir))
    c = eng.generate(["w5 w9"], SamplingParams(max_new_tokens=5, stop=["w32"],
                                               ignore_eos=True))[0]
    assert out == f"--- 'w5 w9'\nw5 w9{c.text}\n"
    assert main(["generate", str(model_dir), "--prompt", "w5 w9", "--max-new-tokens", "5",
                 "--num-beams", "3", "--num-return-sequences", "2"]) == 0
    beams = eng.beam_search(["w5 w9"], num_beams=3, max_new_tokens=5, num_return_sequences=2)
    out = capsys.readouterr().out
    for i, b in enumerate(beams[0]):
        assert f"--- 'w5 w9' [beam {i + 1}, score {b.score:.4f}]\nw5 w9{b.text}\n" in out


def test_generate_bad_input(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w1"}\n{"text": "w2"}\n')
    assert main(["generate", str(model_dir), "--prompts-file", str(bad)]) == 2
    assert "line 2: each row needs \"prompt\"" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "w1", "--top-p", "2"]) == 2
    assert "top_p=2.0" in capsys.readouterr().err
    assert main(["generate", str(model_dir), "--prompt", "w1", "--max-new-tokens", "80"]) == 2
    assert "context of 64" in capsys.readouterr().err


def test_chat_reads_stdin_keeps_history_and_resets(model_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5 w6\nw7\n/reset\nw7\n/exit\nw9\n"))
    assert main(["chat", str(model_dir), "--temperature", "0", "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    replies = cap.out.splitlines()
    eng = Engine.load(str(model_dir))
    sp = SamplingParams(max_new_tokens=4)

    def reply(messages):
        return eng.generate([eng.apply_chat_template(messages)], sp)[0].text

    first = reply([{"role": "user", "content": "w5 w6"}])
    second = reply([{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": first},
                    {"role": "user", "content": "w7"}])
    fresh = reply([{"role": "user", "content": "w7"}])
    assert replies == [first, second, fresh]  # /exit stops before "w9"
    assert "(conversation reset)" in cap.err


def test_chat_without_a_template_is_refused(tiny_hf, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("w5\n"))
    assert main(["chat", str(tiny_hf[1])]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_generate_default_length_stops_at_the_context(model_dir, capsys):
    """A default max_new_tokens that does not fit after the prompt is lowered to what the
    context leaves, with a note (it was refused: quickstart's suggested command failed); a
    length the user asks for is still checked (test_generate_bad_input)."""
    assert main(["generate", str(model_dir), "--prompt", "w5 w9", "--temperature", "0",
                 "--ignore-eos", "--logprobs", "0"]) == 0
    captured = capsys.readouterr()
    assert "generating at most 62 tokens" in captured.err and "context of 64" in captured.err
    (line,) = [x for x in captured.out.splitlines() if x.startswith("{")]
    assert len(json.loads(line)["logprobs"]) == 62  # prompt 2 + 62 new = the context
