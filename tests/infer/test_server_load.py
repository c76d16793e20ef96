"""plinth serve under load: many requests at a fixed concurrency on loopback (completions, chat
and streams mixed) end with zero failures, correct greedy texts, batches larger than one, and a
healthy server.

    OMP_NUM_THREADS=1 python -m pytest tests/infer/test_server_load.py -q
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from test_server import PROMPTS, make_model_dir, metric  # noqa: E402

from plinth.infer.engine import Engine, SamplingParams  # noqa: E402
from plinth.infer.server import BackgroundServer, create_app  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return Engine.load(str(make_model_dir(tmp_path_factory.mktemp("load"))))


def _body(i: int) -> tuple[str, dict]:
    """Request i of the load: a third chat, a quarter streamed, all greedy, 8 new tokens."""
    p = PROMPTS[i % len(PROMPTS)]
    common = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": i % 4 == 1}
    if i % 3 == 0:
        return "chat/completions", {"messages": [{"role": "user", "content": p}], **common}
    return "completions", {"prompt": p, **common}


def _text(route: str, r) -> str:
    """The answer's text, from a JSON body or an SSE stream."""
    if r.headers["content-type"].startswith("text/event-stream"):
        events = r.text.split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e[6:]) for e in events[:-2]]
        key = "text" if route == "completions" else "delta"
        parts = [c["choices"][0][key] for c in chunks]
        return "".join(p if key == "text" else p.get("content", "") for p in parts)
    c = r.json()["choices"][0]
    return c["text"] if route == "completions" else c["message"]["content"]


async def _load(url: str, n: int, concurrency: int):
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, limits=limits) as c:
        async def one(i):
            route, body = _body(i)
            async with sem:
                r = await c.post(f"{url}/v1/{route}", json=body)
                await r.aread()
                return i, route, r

        return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def _expected(engine) -> dict[tuple[str, str], str]:
    """(route, prompt) -> greedy text of 8 tokens, from the engine directly."""
    sp = SamplingParams(max_new_tokens=8, ignore_eos=True)
    out = {}
    for p in PROMPTS:
        chat = engine.apply_chat_template([{"role": "user", "content": p}])
        a, b = engine.generate([p, chat], sp)
        out["completions", p], out["chat/completions", p] = a.text, b.text
    return out


def _run_load(engine, n: int, concurrency: int) -> float:
    app = create_app(engine, max_batch=8, max_queue=64)
    expect = _expected(engine)
    with BackgroundServer(app) as srv:
        t0 = time.perf_counter()
        results = asyncio.run(_load(srv.url, n, concurrency))
        wall = time.perf_counter() - t0
        failures = [r for r in results if isinstance(r, BaseException)
                    or r[2].status_code != 200]
        assert failures == [], failures[:3]
        for i, route, r in results:
            assert _text(route, r) == expect[route, PROMPTS[i % len(PROMPTS)]], (i, route)
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.json()["queue_depth"] == 0
        assert metric(srv, "plinth_requests_total", 'status="200"') == n + 1  # + /health
        assert metric(srv, "plinth_batch_size_max") > 1
        # batched, not one by one: fewer decode steps than generated tokens (plinth_batch_size
        # counts the live rows of each step)
        assert metric(srv, "plinth_batch_size_count") < 8 * n
        assert metric(srv, "plinth_batch_size_sum") == 8 * n
        assert metric(srv, "plinth_generated_tokens_total") == 8 * n
    return wall


def test_load_500_requests_at_concurrency_32(engine):
    wall = _run_load(engine, 500, 32)
    print(f"500 requests at concurrency 32: {wall:.1f} s, {500 / wall:.0f} requests/s")


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_64(engine):
    _run_load(engine, 2000, 64)
