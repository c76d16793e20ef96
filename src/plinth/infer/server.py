"""An OpenAI-compatible HTTP server over an `Engine`, with continuous batching.

    from plinth.infer.engine import Engine
    from plinth.infer.server import create_app, BackgroundServer
    app = create_app(Engine.load("ref-smollm2"), api_key="secret")
    with BackgroundServer(app) as srv:        # uvicorn on a free loopback port, in a thread
        openai.OpenAI(base_url=srv.url + "/v1", api_key="secret").completions.create(...)

(`plinth serve MODEL` runs the same app in the foreground.) Routes:

- GET  /v1/models, /v1/models/{id}     the served model
- POST /v1/completions                 prompt (string, strings, token ids) -> text
- POST /v1/chat/completions            messages through the model's chat template
- GET  /health                         200 {"status": "ok", queue depth, ...}; 503 when down
- GET  /metrics                        Prometheus text: requests by status, tokens, tokens/s,
                                       queue depth, batch sizes, latency quantiles

Requests and responses follow OpenAI's shapes, streaming included (`data: {chunk}` events, a
final chunk with finish_reason, an optional usage chunk, then `data: [DONE]`). Unknown fields,
wrong types and out-of-range values are refused (422) with the field named; malformed JSON is
400; limits answer 400 (prompt longer than the context or --max-prompt-tokens), 413 (body), 429
(queue full, with Retry-After) and 504 (timeout). Errors use OpenAI's body:
{"error": {"message", "type", "param", "code"}}. Generation itself runs in the one worker
thread of `plinth.infer.scheduler.Scheduler`, one decode loop that requests join between steps.

This module is the app and its routes; each route is a few calls into the modules beside it:
`protocol` (request shapes, errors), `inputs` (request -> prompts and SamplingParams under the
limits), `responses` (response bodies, SSE) and `metrics` (/metrics, /health counters).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from plinth import __version__
from plinth.infer.inputs import Inputs, Limits, chat_inputs, completion_inputs, rows
from plinth.infer.metrics import Metrics, ObserveRequests
from plinth.infer.protocol import APIError, ChatRequest, CompletionRequest, validation_error
from plinth.infer.responses import ChatRender, CompletionRender, JobStream, Render, job_error
from plinth.infer.scheduler import Job, QueueFull, Scheduler, SchedulerStopped

log = logging.getLogger("plinth.serve")


@dataclass
class Served:
    """What the routes serve: the engine under its name, the limits, the batching worker."""

    engine: Any
    name: str
    limits: Limits
    scheduler: Scheduler
    metrics: Metrics
    api_key: str | None = None  # None: no authentication
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: str = "plinth-" + __version__

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "plinth", "max_model_len": self.engine.max_context}


def _served(request: Request) -> Served:
    return request.app.state.served


# ------------------------------------------------------------------------------ requests


def check_auth(request: Request, api_key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer API_KEY` (when a key is set)."""
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise APIError(401, "Missing API key: send the header `Authorization: Bearer KEY`.",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused (413) past `max_bytes` whether it says its length or not."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > max_bytes:
        raise APIError(413, f"The request body has {int(size)} bytes; this server accepts "
                       f"at most {max_bytes} (--max-body-bytes).", code="body_too_large")
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > max_bytes:
            raise APIError(413, f"The request body is larger than {max_bytes} bytes "
                           "(--max-body-bytes).", code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, served: Served, model: type[BaseModel]):
    """The authorised, size-checked, validated body as `model`, asking for the served model."""
    check_auth(request, served.api_key)
    body = await read_body(request, served.limits.max_body_bytes)
    try:
        req = model.model_validate_json(body)
    except ValidationError as e:
        raise validation_error(e, model) from None
    if req.model is not None and req.model != served.name:
        raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                       f"'{served.name}' (GET /v1/models).", param="model",
                       code="model_not_found")
    return req


# ------------------------------------------------------------------------------ jobs


async def answer(request: Request, served: Served, inputs: Inputs, n: int, stream: bool,
                 render: Render) -> Response:
    """Queue the request's rows as one job; stream its events or wait for its end."""
    rp, rs = rows(served.limits, inputs, n)
    job = Job(prompts=rp, params=rs, loop=asyncio.get_running_loop())
    deadline = time.monotonic() + served.limits.timeout_s
    try:
        served.scheduler.submit(job)
    except QueueFull as e:
        raise APIError(429, f"The server is busy: {e} (--max-queue {served.limits.max_queue}). "
                       "Retry shortly.", code="queue_full", headers={"Retry-After": "1"}) from None
    except SchedulerStopped as e:
        raise APIError(503, f"The server cannot take requests now: {e}.",
                       code="unavailable") from None
    if stream:
        return JobStream(request, render, job, deadline)
    return await _wait(request, served, job, deadline, render)


async def _wait(request: Request, served: Served, job: Job, deadline: float,
                render: Render) -> Response:
    """The JSON answer once the job is done; 504 past the deadline, 499 if the client left."""
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise APIError(504, f"The request took longer than {served.limits.timeout_s:g} s "
                               "(--timeout).", code="timeout")
            try:
                ev = await asyncio.wait_for(job.events.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    request.scope["plinth.status"] = 499  # client gone
                    return Response(status_code=499)
                continue
            if ev[0] == "done":
                return JSONResponse(render.full(ev[1]))
            if ev[0] == "error":
                raise job_error(ev[1])
    finally:
        job.cancelled = True  # no-op when done; stops the rows on timeout / disconnect


# ------------------------------------------------------------------------------ routes

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request):
    served = _served(request)
    check_auth(request, served.api_key)
    return {"object": "list", "data": [served.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    served = _served(request)
    check_auth(request, served.api_key)
    if model_id != served.name:
        raise APIError(404, f"The model '{model_id}' does not exist; this server serves "
                       f"'{served.name}'.", param="model", code="model_not_found")
    return served.model_card()


@router.post("/v1/completions")
async def completions(request: Request):
    served = _served(request)
    req: CompletionRequest = await parse(request, served, CompletionRequest)
    inputs = completion_inputs(served.engine, served.limits, req)
    render = CompletionRender(served.engine, served.name, served.fingerprint, req,
                              inputs.prompt_lens, inputs.texts)
    return await answer(request, served, inputs, req.n, req.stream, render)


@router.post("/v1/chat/completions")
async def chat(request: Request):
    served = _served(request)
    req: ChatRequest = await parse(request, served, ChatRequest)
    inputs = chat_inputs(served.engine, served.limits, req)
    render = ChatRender(served.engine, served.name, served.fingerprint, req, inputs.prompt_lens)
    return await answer(request, served, inputs, req.n, req.stream, render)


@router.get("/health")
async def health(request: Request):
    served = _served(request)
    ok = served.scheduler.alive
    body = {"status": "ok" if ok else "unavailable", "model": served.name,
            "queue_depth": served.scheduler.queue_depth,
            "active_batch_size": served.metrics.active_rows,
            "max_batch": served.limits.max_batch, "max_queue": served.limits.max_queue}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def prometheus(request: Request):
    served = _served(request)
    text = served.metrics.prometheus(queue_depth=served.scheduler.queue_depth, model=served.name)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


# ------------------------------------------------------------------------------ errors


async def _api_error(request: Request, e: APIError):
    return e.response()


async def _http_error(request: Request, e: StarletteHTTPException):
    msg = {404: f"No route {request.method} {request.url.path}; see /v1/models, "
                "/v1/completions, /v1/chat/completions, /health, /metrics.",
           405: f"{request.method} is not allowed on {request.url.path}."}
    return APIError(e.status_code, msg.get(e.status_code, str(e.detail)),
                    code="not_found" if e.status_code == 404 else None).response()


async def _crash(request: Request, e: Exception):
    log.exception("request failed")
    return APIError(500, f"Internal error: {e!r}", code="internal_error").response()


# ------------------------------------------------------------------------------ the app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    """The batching worker runs while the app does."""
    app.state.scheduler.start()
    try:
        yield
    finally:
        app.state.scheduler.stop()


def create_app(
    engine,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 4096,
    max_body_bytes: int = 1_000_000,
    timeout_s: float = 300.0,
    served_name: str | None = None,
    batch_wait_s: float = 0.005,
) -> FastAPI:
    """The FastAPI app serving `engine` (see the module docstring). The batching worker starts
    with the app (ASGI lifespan) and stops with it."""
    limits = Limits(max_batch=max_batch, max_queue=max_queue,
                    max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
                    max_body_bytes=max_body_bytes, timeout_s=timeout_s)
    metrics = Metrics()
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue,
                      batch_wait_s=batch_wait_s, metrics=metrics)
    served = Served(engine, served_name or engine.name, limits, sched, metrics, api_key)

    app = FastAPI(title="plinth", lifespan=_lifespan, docs_url=None, redoc_url=None)
    app.state.served = served
    app.state.model_name = served.name
    app.state.scheduler = sched
    app.state.metrics = metrics
    app.add_middleware(ObserveRequests, metrics=metrics)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _crash)
    app.include_router(router)
    return app


# ------------------------------------------------------------------------------ running


class BackgroundServer:
    """uvicorn serving `app` from a daemon thread on `host`:`port` (0: a free port), for tests,
    benchmarks and notebooks. `with BackgroundServer(app) as srv: srv.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", backlog=4096)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="plinth-uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
