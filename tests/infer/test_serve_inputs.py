"""The server's request layer without HTTP: OpenAI request bodies validated (protocol) and turned
into prompts and SamplingParams under the limits (inputs), against a stub engine.

    python -m pytest tests/infer/test_serve_inputs.py -q
"""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")

from pydantic import ValidationError

from plinth.infer.inputs import Limits, chat_inputs, completion_inputs, rows
from plinth.infer.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    validation_error,
)


class StubEngine:
    """Words `wN` are token N; the chat template keeps the messages it got and joins their text."""

    vocab_size, max_context = 96, 32

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids)

    def apply_chat_template(self, messages: list[dict]) -> str:
        self.messages = messages
        return " ".join(m["content"] for m in messages)


def refused(fn, *args) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*args)
    return e.value


def test_completion_prompts_default_max_tokens_and_echo():
    engine, limits = StubEngine(), Limits()
    req = CompletionRequest(prompt=[[5, 6], [7]], echo=True, seed=3)
    inputs = completion_inputs(engine, limits, req)
    assert inputs.prompts == [[5, 6], [7]] and inputs.prompt_lens == [2, 1]
    assert [p.max_new_tokens for p in inputs.params] == [16, 16]  # OpenAI's default
    assert inputs.texts == ["w5 w6", "w7"]  # what echo shows and text_offset counts from
    e = refused(completion_inputs, engine, limits, CompletionRequest(prompt=[[5], [500]]))
    assert (e.status, e.param, e.code) == (400, "prompt.1", "invalid_value")
    e = refused(completion_inputs, engine, limits, CompletionRequest(prompt="w1", max_tokens=40))
    assert (e.status, e.code) == (400, "context_length_exceeded")


def test_rows_give_each_copy_its_own_seed_and_respect_max_batch():
    engine = StubEngine()
    inputs = completion_inputs(engine, Limits(), CompletionRequest(prompt="w1 w2", seed=7))
    prompts, params = rows(Limits(max_batch=3), inputs, n=3)
    assert prompts == [[1, 2]] * 3 and [p.seed for p in params] == [7, 8, 9]
    e = refused(rows, Limits(max_batch=2), inputs, 3)
    assert (e.status, e.param) == (400, "n") and "(--max-batch)" in e.message


def test_chat_messages_through_the_template():
    engine = StubEngine()
    req = ChatRequest(messages=[{"role": "developer", "content": "w1"},
                                {"role": "user", "content": [{"type": "text", "text": "w2"}]}],
                      logprobs=True, max_completion_tokens=4)
    inputs = chat_inputs(engine, Limits(), req)
    assert engine.messages == [{"role": "system", "content": "w1"},
                               {"role": "user", "content": "w2"}]
    assert inputs.prompts == [[1, 2]] and inputs.params[0].max_new_tokens == 4
    assert inputs.params[0].logprobs == 0
    e = refused(chat_inputs, engine, Limits(), ChatRequest(messages=req.messages, tools=[{}]))
    assert (e.status, e.param, e.code) == (400, "tools", "unsupported")


@pytest.mark.parametrize(("body", "status", "message"), [
    (b"{", 400, "The request body is not valid JSON"),
    (b"[1]", 400, "The request body must be a JSON object, got list."),
    (b'{"prompt": "w1", "tempreature": 1}', 422, "Unknown field 'tempreature'. Supported"),
    (b'{"prompt": 5}', 422, "'prompt' must be a string, a list of strings"),
    (b'{}', 422, "'prompt' is required."),
])
def test_validation_errors_name_the_field(body, status, message):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json(body)
    err = validation_error(e.value, CompletionRequest)
    assert err.status == status and err.message.startswith(message)
