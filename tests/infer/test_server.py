"""plinth serve: the official `openai` client against the real server (uvicorn on a loopback
port, a tiny imported Llama loaded by Engine.load), streaming equal to non-streaming, every bad
input answered with its status and message, batching, queue limits, disconnects, timeouts.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_server.py -q

The model's tokenizer is word-level over `w0 .. w95`, so prompts are written in those words.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from plinth.errors import UsageError  # noqa: E402
from plinth.infer.engine import Engine, SamplingParams  # noqa: E402
from plinth.infer.server import BackgroundServer, create_app  # noqa: E402

V, CONTEXT = 96, 256
KEY = "test-key"
# ChatML-like, in the model's words: w3 opens a turn, w4 closes it; role names encode as w0
CHAT_TEMPLATE = (
    "{% for m in messages %}w3 {{ m['role'] }} {{ m['content'] }} w4 {% endfor %}"
    "{% if add_generation_prompt %}w3 assistant {% endif %}"
)
PROMPTS = ["w5 w6 w7", "w10 w11", "w20 w21 w22 w23", "w30", "w40 w41", "w50 w51 w52",
           "w60 w61", "w70"]


def make_model_dir(root, *, chat_template: bool = True):
    """A tiny random Llama saved by transformers and imported with `plinth import`."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from plinth.hf import import_model

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=CONTEXT,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the init: sharper, distinct greedy choices
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
    src = root / "hf"
    hf.save_pretrained(src)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(src / "tokenizer.json"))
    out = import_model(src, root / "tiny-llama")
    if chat_template:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.load(str(model_dir))


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, api_key=KEY, max_batch=8, max_queue=64, max_body_bytes=20_000)
    with BackgroundServer(app) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def greedy(engine, prompt, n, **kw) -> str:
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return engine.generate([ids], SamplingParams(max_new_tokens=n, **kw))[0]


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(server.url + "/metrics").text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total += float(m.group(2))
    return total


def auth(**extra) -> dict:
    return {"Authorization": f"Bearer {KEY}", **extra}


# ------------------------------------------------------------------------------ the client


def test_openai_client_completes_like_the_engine(engine, client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-llama"] == [engine.name]
    ref = greedy(engine, PROMPTS[0], 12)
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == "tiny-llama" and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref.text and r.choices[0].text.startswith("w")
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == 3
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == 3 + len(ref.token_ids)
    # token-id prompts, and a list of prompts (one choice each, in order)
    ids = engine.encode(PROMPTS[1])
    r = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == greedy(engine, ids, 6).text
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[:3], max_tokens=5,
                                  temperature=0)
    assert [c.text for c in r.choices] == [greedy(engine, p, 5).text for p in PROMPTS[:3]]
    assert [c.index for c in r.choices] == [0, 1, 2]


def test_chat_and_streaming_equal_the_non_streamed_greedy_text(engine, client):
    messages = [{"role": "system", "content": "w8 w9"}, {"role": "user", "content": "w12 w13"}]
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=10,
                                       temperature=0)
    rendered = engine.apply_chat_template(messages)
    assert rendered == "w3 system w8 w9 w4 w3 user w12 w13 w4 w3 assistant "
    ref = greedy(engine, rendered, 10)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text
    assert r.usage.prompt_tokens == len(engine.encode(rendered)) == 12

    stream = client.chat.completions.create(model="tiny-llama", messages=messages,
                                            max_tokens=10, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[-2].choices[0].finish_reason == ref.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3  # incremental

    for prompt in PROMPTS[:3]:
        full = client.completions.create(model="tiny-llama", prompt=prompt, max_tokens=16,
                                          temperature=0)
        parts = list(client.completions.create(model="tiny-llama", prompt=prompt,
                                               max_tokens=16, temperature=0, stream=True))
        assert "".join(p.choices[0].text for p in parts) == full.choices[0].text
        assert parts[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_sse_wire_format(server):
    body = {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    for e in events[:-2]:
        assert e.startswith("data: {")
        chunk = json.loads(e[len("data: "):])
        assert chunk["object"] == "text_completion" and len(chunk["choices"]) == 1
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_seeds_n_logprobs_and_echo(engine, client):
    ref = greedy(engine, PROMPTS[2], 12, ignore_eos=True)
    words = ref.text.split()
    stop = words[4]
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[2], max_tokens=12,
                                  temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text[: ref.text.index(stop)]
    assert r.choices[0].finish_reason == "stop"

    def sample(seed, n=1):
        return client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=12,
                                         temperature=1.0, seed=seed, n=n,
                                         extra_body={"ignore_eos": True})

    a, b = sample(7, n=2), sample(7, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text  # n copies get seeds 7 and 8
    assert sample(8).choices[0].text == a.choices[1].text
    assert a.usage.prompt_tokens == 3 and a.usage.completion_tokens == 24

    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=5,
                                  temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    # tokens are text pieces that add up to the text (" w8" after the first), as OpenAI's
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.token_logprobs) == 5
    assert [t.strip() for t in lp.tokens] == r.choices[0].text.split()
    for tok, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(chosen)  # greedy: the top
        assert top[tok] == pytest.approx(chosen) and chosen < 0
    # text_offset counts from the start of the prompt, as OpenAI's legacy completions
    assert lp.text_offset[0] == len(PROMPTS[0])
    assert lp.text_offset[1:] == [lp.text_offset[k] + len(lp.tokens[k]) for k in range(4)]

    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[0], max_tokens=5,
                                  temperature=0, echo=True)
    assert r.choices[0].text == PROMPTS[0] + greedy(engine, PROMPTS[0], 5).text

    r = client.chat.completions.create(model="tiny-llama", max_tokens=4, temperature=0,
                                       messages=[{"role": "user", "content": "w1"}],
                                       logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(c.token for c in content) == r.choices[0].message.content
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
               for c in content)


# ------------------------------------------------------------------------------ bad input

BIG = "w1 " * 300  # 300 tokens: more than the 256-token context
BAD = [
    # (route, raw body or JSON, headers, status, code, param, words in the message)
    ("completions", b'{"prompt": "w1", ', None, 400, "invalid_json", None, "not valid JSON"),
    ("completions", b"[1, 2]", None, 400, "invalid_json", None, "must be a JSON object"),
    ("completions", {"prompt": 5}, None, 422, "invalid_value", "prompt",
     "'prompt' must be a string, a list of strings"),
    ("completions", {"prompt": "w1", "max_tokens": "5"}, None, 422, "invalid_value",
     "max_tokens", "valid integer"),
    ("completions", {"prompt": "w1", "temperature": "hot"}, None, 422, "invalid_value",
     "temperature", "valid number"),
    ("completions", {"prompt": "w1", "stream": 1}, None, 422, "invalid_value", "stream",
     "valid boolean"),
    ("completions", {"prompt": "w1", "max_tokens": -3}, None, 422, "invalid_value",
     "max_tokens", "greater than or equal to 1 (got -3)"),
    ("completions", {"prompt": "w1", "max_tokens": 10**9}, None, 422, "invalid_value",
     "max_tokens", "at most 4096"),
    ("completions", {"prompt": "w1", "max_tokens": 256}, None, 400, "context_length_exceeded",
     "prompt", "maximum context length is 256 tokens"),
    ("completions", {"prompt": BIG, "max_tokens": 1}, None, 400, "context_length_exceeded",
     "prompt", "(300 in the prompt, 1 for the completion)"),
    ("completions", {"prompt": "w1", "model": "gpt-4"}, None, 404, "model_not_found", "model",
     "The model 'gpt-4' does not exist; this server serves 'tiny-llama'"),
    ("completions", {"prompt": "w1", "max_token": 5}, None, 422, "invalid_value", "max_token",
     "Unknown field 'max_token'"),
    ("completions", {"prompt": [5, 96]}, None, 400, "invalid_value", "prompt",
     "token id 96, outside this model's vocabulary (0..95)"),
    ("completions", {"prompt": []}, None, 400, "invalid_value", "prompt", "empty list"),
    ("completions", {"prompt": "w1", "n": 9}, None, 400, "invalid_value", "n",
     "at most 8 per request"),
    ("completions", {"prompt": "w1", "temperature": 3}, None, 422, "invalid_value",
     "temperature", "less than or equal to 2"),
    ("completions", {"prompt": "w1", "seed": 2**70}, None, 422, "invalid_value", "seed",
     "less than 9223372036854775808"),
    ("completions", {"prompt": "w1", "logit_bias": {"5": 10}}, None, 400, "unsupported",
     "logit_bias", "not supported"),
    ("completions", {"prompt": "w1 " * 7000}, None, 413, "body_too_large", None,
     "at most 20000"),
    ("completions", {"prompt": "w1"}, {"Authorization": None}, 401, "invalid_api_key", None,
     "Missing API key"),
    ("completions", {"prompt": "w1"}, {"Authorization": "Bearer nope"}, 401, "invalid_api_key",
     None, "Incorrect API key"),
    ("chat/completions", {"messages": "hi"}, None, 422, "invalid_value", "messages",
     "valid array"),
    ("chat/completions", {"messages": []}, None, 422, "invalid_value", "messages",
     "at least 1 item"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "w1"}]}, None, 422,
     "invalid_value", "messages.0.role", "'user'"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, None, 400, "unsupported",
     "messages.0.content", "only text parts"),
    ("chat/completions", {"messages": [{"role": "user", "content": "w1"}],
                          "tools": [{"type": "function"}]}, None, 400, "unsupported", "tools",
     "Tool calling"),
    ("chat/completions", {"messages": [{"role": "user", "content": BIG}]}, None, 400,
     "context_length_exceeded", "messages", "maximum context length"),
]


@pytest.mark.parametrize("route,body,headers,status,code,param,words", BAD,
                         ids=[f"{i}-{b[3]}-{b[4]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_status_and_message(server, route, body, headers, status, code,
                                               param, words):
    h = auth(**{"Content-Type": "application/json"})
    for k, v in (headers or {}).items():
        h.pop(k) if v is None else h.update({k: v})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/{route}", content=content, headers=h)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["param"] == param
    assert words in err["message"], err["message"]
    assert err["type"] == "invalid_request_error"


def test_errors_reach_the_openai_client_and_the_server_keeps_serving(engine, server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="w1", max_tokens=2)
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny-llama", max_tokens=10,
                                       messages=[{"role": "user", "content": BIG}])
    with pytest.raises(openai.UnprocessableEntityError, match="max_tokens"):
        client.completions.create(model="tiny-llama", prompt="w1", max_tokens=-1)
    # unknown routes and /health: OpenAI's error shape; health needs no key
    r = httpx.get(server.url + "/v1/nothing", headers=auth())
    assert r.status_code == 404 and "No route GET /v1/nothing" in r.json()["error"]["message"]
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == "tiny-llama"
    r = client.completions.create(model="tiny-llama", prompt=PROMPTS[3], max_tokens=6,
                                  temperature=0)
    assert r.choices[0].text == greedy(engine, PROMPTS[3], 6).text


def test_a_model_without_chat_template_refuses_chat_clearly(tmp_path, model_dir):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    with BackgroundServer(create_app(Engine.load(str(plain)))) as srv:  # no key: open
        r = httpx.post(srv.url + "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "w1"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "no_chat_template"
        assert "has no chat template" in r.json()["error"]["message"]
        assert httpx.post(srv.url + "/v1/completions", json={"prompt": "w1"}).status_code == 200


# ------------------------------------------------------------------------------ batching, limits


async def _post_all(url, bodies, concurrency, headers=None):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits, headers=headers) as c:
        async def one(body):
            async with sem:
                return await c.post(url, json=body)

        return await asyncio.gather(*(one(b) for b in bodies))


def test_concurrent_requests_share_a_batch_with_unchanged_outputs(engine, server):
    batches0 = metric(server, "plinth_batch_size_count")
    rows0 = metric(server, "plinth_batch_size_sum")
    bodies = [{"prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
              for p in PROMPTS]
    rs = asyncio.run(_post_all(server.url + "/v1/completions", bodies, 8, auth()))
    texts = [r.json()["choices"][0]["text"] for r in rs]
    assert texts == [greedy(engine, p, 24, ignore_eos=True).text for p in PROMPTS]
    assert metric(server, "plinth_batch_size_max") > 1
    # decode steps ran more than one row on average (plinth_batch_size: live rows per step)
    rows = metric(server, "plinth_batch_size_sum") - rows0
    assert rows / (metric(server, "plinth_batch_size_count") - batches0) > 1


def test_a_request_sent_mid_batch_joins_it_and_finishes_first(engine, server):
    """Continuous batching: while a long request decodes, short ones (a prompt shorter and one
    longer than the running row's position) join the running loop and finish before it ends;
    every text equals its solo greedy text."""
    long_prompt = "w5 w6 w7"
    shorts = ["w10 w11", " ".join(f"w{10 + i}" for i in range(40))]
    ref_long = greedy(engine, long_prompt, 200, ignore_eos=True).text
    ref_short = [greedy(engine, p, 8, ignore_eos=True).text for p in shorts]
    finished: dict[str, float] = {}

    async def scenario():
        async with httpx.AsyncClient(timeout=60, headers=auth()) as c:
            started = asyncio.Event()

            async def long():
                body = {"prompt": long_prompt, "max_tokens": 200, "ignore_eos": True,
                        "temperature": 0, "stream": True}
                text = ""
                async with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                            started.set()
                finished["long"] = time.monotonic()
                return text

            async def short(i):
                await started.wait()  # the long request is decoding
                r = await c.post(server.url + "/v1/completions", json={
                    "prompt": shorts[i], "max_tokens": 8, "ignore_eos": True, "temperature": 0})
                finished[f"short{i}"] = time.monotonic()
                return r.json()["choices"][0]["text"]

            return await asyncio.gather(long(), short(0), short(1))

    text_long, *texts = asyncio.run(scenario())
    assert text_long == ref_long and texts == ref_short
    assert finished["short0"] < finished["long"] and finished["short1"] < finished["long"]


def test_queue_flood_gets_429s_and_the_server_stays_healthy(engine):
    app = create_app(engine, max_batch=2, max_queue=2)
    with BackgroundServer(app) as srv:
        bodies = [{"prompt": PROMPTS[i % 8], "max_tokens": 40, "ignore_eos": True}
                  for i in range(40)]
        rs = asyncio.run(_post_all(srv.url + "/v1/completions", bodies, 40))
        codes = [r.status_code for r in rs]
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) >= 2
        busy = next(r for r in rs if r.status_code == 429)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        assert "--max-queue 2" in busy.json()["error"]["message"]
        ok = next(r for r in rs if r.status_code == 200).json()
        assert ok["usage"]["completion_tokens"] == 40
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["queue_depth"] == 0
        assert httpx.post(srv.url + "/v1/completions",
                          json={"prompt": "w1", "max_tokens": 3}).status_code == 200
        assert metric(srv, "plinth_requests_total", 'status="429"') == codes.count(429)


def test_a_client_leaving_mid_stream_cancels_its_row_and_others_finish(engine, server):
    tokens0 = metric(server, "plinth_generated_tokens_total")
    gone0 = metric(server, "plinth_requests_total", 'status="499"')
    ref = greedy(engine, PROMPTS[1], 40, ignore_eos=True)

    async def scenario():
        async with httpx.AsyncClient(timeout=60, headers=auth()) as c:
            async def leave():
                body = {"prompt": PROMPTS[0], "max_tokens": 250, "ignore_eos": True,
                        "temperature": 0, "stream": True}
                async with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            return  # closes the connection after the first token

            async def stay():
                await asyncio.sleep(0.002)
                return await c.post(server.url + "/v1/completions", json={
                    "prompt": PROMPTS[1], "max_tokens": 40, "ignore_eos": True,
                    "temperature": 0})

            return await asyncio.gather(leave(), stay())

    _, other = asyncio.run(scenario())
    assert other.status_code == 200 and other.json()["choices"][0]["text"] == ref.text
    end = time.monotonic() + 30
    while metric(server, "plinth_requests_total", 'status="499"') == gone0:
        assert time.monotonic() < end, "the disconnect was never recorded"
        time.sleep(0.05)
    while metric(server, "plinth_active_batch_size") > 0 and time.monotonic() < end:
        time.sleep(0.05)
    # the leaver's row stopped long before its 250 tokens (a few tokens after it left)
    assert metric(server, "plinth_generated_tokens_total") - tokens0 < 40 + 125
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_timeouts_answer_504_and_an_error_event(engine):
    app = create_app(engine, timeout_s=1e-3)
    with BackgroundServer(app) as srv:
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 200})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert "longer than 0.001 s" in r.json()["error"]["message"]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError, match="timeout"):
            list(c.chat.completions.create(model="tiny-llama", max_tokens=200, stream=True,
                                           messages=[{"role": "user", "content": "w1"}]))
        assert httpx.get(srv.url + "/health").status_code == 200


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model="tiny-llama", prompt="w1", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    assert httpx.get(server.url + "/metrics").headers["content-type"].startswith("text/plain")
    for line in text.splitlines():
        assert line.startswith("# ") or re.match(r"^plinth_\w+(\{[^}]*\})? \S+$", line), line
    assert metric(server, "plinth_requests_total", 'endpoint="/v1/completions",status="200"') >= 1
    assert metric(server, "plinth_generated_tokens_total") >= 3
    assert metric(server, "plinth_prompt_tokens_total") >= 1
    assert metric(server, "plinth_tokens_per_second") > 0
    assert metric(server, "plinth_request_latency_seconds_count") >= 1
    assert "plinth_queue_depth 0" in text and 'plinth_model_info{model="tiny-llama"} 1' in text


def test_a_failing_request_does_not_fail_its_batch_mates(engine):
    """The scheduler on its own: a job the engine refuses (a token id outside the vocabulary,
    which the HTTP layer would have caught) is taken in one round with a good one; it is
    refused as it joins the decode loop, so only the bad job gets the error."""
    from plinth.infer.scheduler import Job, Scheduler

    sched = Scheduler(engine, max_batch=8, batch_wait_s=0.5)  # long wait: one batch of both
    sched.start()

    async def scenario():
        loop = asyncio.get_running_loop()
        good = Job(prompts=[engine.encode(PROMPTS[0])], params=[SamplingParams(6)], loop=loop)
        bad = Job(prompts=[[5, 10_000]], params=[SamplingParams(6)], loop=loop)
        sched.submit(good)
        sched.submit(bad)

        async def last(job):
            while True:
                ev = await job.events.get()
                if ev[0] != "token":
                    return ev

        return await last(good), await last(bad)

    try:
        good, bad = asyncio.run(scenario())
    finally:
        sched.stop()
    assert good[0] == "done" and good[1][0].text == greedy(engine, PROMPTS[0], 6).text
    assert bad[0] == "error" and isinstance(bad[1], UsageError)
    assert "token id 10000 outside the vocabulary" in str(bad[1])


def test_a_failing_decode_step_fails_its_jobs_and_the_worker_goes_on(engine):
    """A decode step that raises fails the jobs running in it; the worker starts a fresh
    decode loop and the next job is answered normally."""
    from plinth.infer.scheduler import Job, Scheduler

    class Flaky:  # the engine, whose first session step raises
        fail = True

        def session(self, max_rows=None):
            s = engine.session(max_rows)
            step = s.step

            def flaky_step():
                if Flaky.fail:
                    Flaky.fail = False
                    raise RuntimeError("device lost")
                return step()

            s.step = flaky_step
            return s

    sched = Scheduler(Flaky(), max_batch=8)
    sched.start()

    async def last(job):
        while True:
            ev = await job.events.get()
            if ev[0] != "token":
                return ev

    async def scenario():
        loop = asyncio.get_running_loop()
        first = Job(prompts=[engine.encode(PROMPTS[0])], params=[SamplingParams(6)], loop=loop)
        sched.submit(first)
        a = await last(first)
        second = Job(prompts=[engine.encode(PROMPTS[1])], params=[SamplingParams(6)], loop=loop)
        sched.submit(second)
        return a, await last(second)

    try:
        a, b = asyncio.run(scenario())
    finally:
        sched.stop()
    assert a[0] == "error" and "device lost" in str(a[1])
    assert b[0] == "done" and b[1][0].text == greedy(engine, PROMPTS[1], 6).text


def test_a_stopped_worker_answers_503(engine):
    app = create_app(engine)
    with BackgroundServer(app) as srv:
        app.state.scheduler.stop()  # what shutdown does; a crashed worker looks the same
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "w1", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert "batching worker is not running" in r.json()["error"]["message"]


# ------------------------------------------------------------------------------ the command


def test_plinth_serve_command(model_dir, tmp_path):
    import socket

    with pytest.warns(UserWarning, match="without an API key"), \
            pytest.raises(UsageError, match="--max-batch"):
        from plinth.recipes.serve import serve

        serve(str(model_dir), host="0.0.0.0", max_batch=0)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "plinth", "serve", str(model_dir), "--port", str(port),
         "--log-level", "warning"],
        env={**__import__("os").environ, "PLINTH_API_KEY": "from-env", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.stdout.read()
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        c = openai.OpenAI(base_url=url + "/v1", api_key="from-env", max_retries=0)
        assert c.models.list().data[0].id == "tiny-llama"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert f"tiny-llama on http://127.0.0.1:{port}/v1 (API key required)" in out
