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
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from plinth.errors import UsageError
from plinth.infer.engine import Completion, SamplingParams
from plinth.infer.scheduler import Job, Metrics, QueueFull, Scheduler, SchedulerStopped

log = logging.getLogger("plinth.serve")

MAX_LOGPROBS = 20
MAX_STOP = 16


# ------------------------------------------------------------------------------ errors


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 413: "invalid_request_error",
             422: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ------------------------------------------------------------------------------ requests


class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool; extra="forbid": a misspelt field is an error,
    # not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by completions and chat completions (OpenAI's, then plinth's extras)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras beyond OpenAI's API (as vLLM names them)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


# what a field of several shapes accepts, for its error message
_SHAPES = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of content parts ({'type': 'text', 'text': ...})",
}


def _param(loc: tuple) -> str:
    """`messages.0.content` from a pydantic location, without its union-branch labels."""
    labels = ("str", "int", "float", "bool", "none")
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in p and p not in labels)]
    return ".".join(parts)


def _validation_error(e: ValidationError, model: type[BaseModel]) -> APIError:
    errors = e.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {first['msg']}.",
                        code="invalid_json")
    if first["type"] == "model_type" and not first["loc"]:
        return APIError(400, "The request body must be a JSON object, got "
                        f"{type(first['input']).__name__}.", code="invalid_json")
    param = _param(first["loc"])
    got = json.dumps(first.get("input"), default=str)
    if len(got) > 80:
        got = got[:77] + "..."
    same = [x for x in errors if _param(x["loc"]).split(".")[0] == param.split(".")[0]]
    leaf = param.split(".")[-1] if param else ""
    if first["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) if "." not in param else ""
        msg = f"Unknown field '{param}'." + (f" Supported fields: {known}." if known else "")
    elif first["type"] == "missing":
        msg = f"'{param}' is required."
    elif len(same) > 1 and (leaf in _SHAPES or param.split(".")[0] in _SHAPES):
        key = leaf if leaf in _SHAPES else param.split(".")[0]
        msg = f"'{key}' must be {_SHAPES[key]} (got {got})."
        param = param if leaf in _SHAPES else key
    else:
        msg = f"'{param}': {first['msg']} (got {got})."
    return APIError(422, msg, param=param or None, code="invalid_value")


# ------------------------------------------------------------------------------ the app


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
    name = served_name or engine.name
    metrics = Metrics()
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue,
                      batch_wait_s=batch_wait_s, metrics=metrics)
    created = int(time.time())
    fingerprint = "plinth-" + __import__("plinth").__version__

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sched.start()
        try:
            yield
        finally:
            sched.stop()

    app = FastAPI(title="plinth", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.model_name = name
    app.state.scheduler = sched
    app.state.metrics = metrics
    app.add_middleware(_Observe, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        msg = {404: f"No route {request.method} {request.url.path}; see /v1/models, "
                    "/v1/completions, /v1/chat/completions, /health, /metrics.",
               405: f"{request.method} is not allowed on {request.url.path}."}
        return APIError(e.status_code, msg.get(e.status_code, str(e.detail)),
                        code="not_found" if e.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def _crash(request: Request, e: Exception):
        log.exception("request failed")
        return APIError(500, f"Internal error: {e!r}", code="internal_error").response()

    # -- helpers ---------------------------------------------------------------------------
    def check_auth(request: Request) -> None:
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

    async def read_body(request: Request) -> bytes:
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > max_body_bytes:
            raise APIError(413, f"The request body has {int(size)} bytes; this server accepts "
                           f"at most {max_body_bytes} (--max-body-bytes).",
                           code="body_too_large")
        chunks, n = [], 0
        async for chunk in request.stream():
            n += len(chunk)
            if n > max_body_bytes:
                raise APIError(413, f"The request body is larger than {max_body_bytes} bytes "
                               "(--max-body-bytes).", code="body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def parse(request: Request, model: type[BaseModel]):
        check_auth(request)
        body = await read_body(request)
        try:
            req = model.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e, model) from None
        if req.model is not None and req.model != name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves "
                           f"'{name}' (GET /v1/models).", param="model", code="model_not_found")
        return req

    def sampling(req: _Sampling, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(422, f"'stop' takes at most {MAX_STOP} non-empty strings.",
                           param="stop", code="invalid_value")
        if req.logit_bias:
            raise APIError(400, "'logit_bias' is not supported by this server.",
                           param="logit_bias", code="unsupported")
        for t in req.stop_token_ids or []:
            check_token(t, "stop_token_ids")
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_k=req.top_k if req.top_k and req.top_k > 0 else None,
            top_p=req.top_p if req.top_p < 1 else None,
            min_p=req.min_p or None,
            repetition_penalty=req.repetition_penalty,
            frequency_penalty=req.frequency_penalty,
            presence_penalty=req.presence_penalty,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            seed=req.seed,
            logprobs=logprobs,
        )

    def check_token(t: int, param: str) -> None:
        if not 0 <= t < engine.vocab_size:
            raise APIError(400, f"'{param}' has token id {t}, outside this model's vocabulary "
                           f"(0..{engine.vocab_size - 1}).", param=param, code="invalid_value")

    def check_prompt(ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens for this prompt (given, or what the context leaves) after the limits."""
        if not ids:
            raise APIError(400, f"'{param}' is empty: a prompt needs at least one token.",
                           param=param, code="invalid_value")
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at "
                           f"most {max_prompt_tokens} (--max-prompt-tokens).", param=param,
                           code="context_length_exceeded")
        room = engine.max_context - len(ids)
        if max_tokens is None:
            max_tokens = min(max_tokens_limit, room)
        if max_tokens > max_tokens_limit:
            raise APIError(422, f"'max_tokens' is {max_tokens}; this server allows at most "
                           f"{max_tokens_limit} (--max-tokens-limit).", param="max_tokens",
                           code="invalid_value")
        if max_tokens > room or room < 1:
            raise APIError(
                400, f"This model's maximum context length is {engine.max_context} tokens. "
                f"However, you requested {len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in "
                f"the prompt, {max(max_tokens, 1)} for the completion). Please reduce the "
                "prompt or max_tokens.", param=param, code="context_length_exceeded")
        return max_tokens

    def unsupported(cond: bool, param: str, what: str) -> None:
        if cond:
            raise APIError(400, f"{what} is not supported by this server.", param=param,
                           code="unsupported")

    def rows_for(prompts: list[list[int]], params: list[SamplingParams], n: int):
        """prompts x n rows; copies of a seeded request get seeds seed, seed+1, ... so that
        n > 1 gives n different samples, reproducibly."""
        if len(prompts) * n > max_batch:
            raise APIError(400, f"{len(prompts)} prompt(s) x n={n} is {len(prompts) * n} "
                           f"sequences; this server runs at most {max_batch} per request "
                           "(--max-batch).", param="n", code="invalid_value")
        rp, rs = [], []
        for p, sp in zip(prompts, params, strict=True):
            for j in range(n):
                rp.append(p)
                seed = None if sp.seed is None else sp.seed + j
                rs.append(SamplingParams(**{**sp.__dict__, "seed": seed}))
        return rp, rs

    async def run(request: Request, prompts, params, n: int, stream: bool, render):
        """Queue the job; stream its events or wait for its end."""
        rp, rs = rows_for(prompts, params, n)
        loop = asyncio.get_running_loop()
        job = Job(prompts=rp, params=rs, loop=loop)
        deadline = time.monotonic() + timeout_s
        try:
            sched.submit(job)
        except QueueFull as e:
            raise APIError(429, f"The server is busy: {e} (--max-queue {max_queue}). Retry "
                           "shortly.", code="queue_full", headers={"Retry-After": "1"}) from None
        except SchedulerStopped as e:
            raise APIError(503, f"The server cannot take requests now: {e}.",
                           code="unavailable") from None
        if stream:
            return _JobStream(
                _guard(request, render.stream(job, deadline), job), job,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise APIError(504, f"The request took longer than {timeout_s:g} s "
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
                    raise _job_error(ev[1])
        finally:
            job.cancelled = True  # no-op when done; stops the rows on timeout / disconnect

    # -- routes ----------------------------------------------------------------------------
    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "plinth",
                "max_model_len": engine.max_context}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(request: Request, model_id: str):
        check_auth(request)
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server serves "
                           f"'{name}'.", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await parse(request, CompletionRequest)
        unsupported(req.suffix is not None, "suffix", "'suffix' (insertion)")
        unsupported(req.best_of is not None and req.best_of != req.n, "best_of",
                    "'best_of' other than n")
        unsupported(req.echo and req.logprobs is not None, "echo",
                    "'echo' together with 'logprobs'")
        p = req.prompt
        if isinstance(p, str):
            raw = [p]
        elif p and all(isinstance(x, int) for x in p):
            raw = [list(p)]
        else:
            raw = list(p)
        if not raw:
            raise APIError(400, "'prompt' is an empty list.", param="prompt",
                           code="invalid_value")
        prompts, params = [], []
        for i, x in enumerate(raw):
            param = "prompt" if len(raw) == 1 else f"prompt.{i}"
            if isinstance(x, str):
                ids = engine.encode(x)
            else:
                for t in x:
                    check_token(t, param)
                ids = list(x)
            mt = check_prompt(ids, req.max_tokens if req.max_tokens is not None else 16, param)
            prompts.append(ids)
            params.append(sampling(req, mt, req.logprobs))
        echo = [x if isinstance(x, str) else engine.decode(x) for x in raw] if req.echo else None
        render = _CompletionRender(engine, name, fingerprint, req, [len(p) for p in prompts],
                                   echo)
        return await run(request, prompts, params, req.n, req.stream, render)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req: ChatRequest = await parse(request, ChatRequest)
        unsupported(bool(req.tools), "tools", "Tool calling ('tools')")
        unsupported(req.tool_choice not in (None, "none", "auto"), "tool_choice",
                    "'tool_choice'")
        fmt = (req.response_format or {}).get("type", "text")
        unsupported(fmt != "text", "response_format", f"response_format type '{fmt}'")
        unsupported(req.top_logprobs is not None and not req.logprobs, "top_logprobs",
                    "'top_logprobs' without 'logprobs': true")
        messages = []
        for i, m in enumerate(req.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages.{i}.content.{j}: only text parts "
                                       "({'type': 'text', 'text': ...}) are supported, got "
                                       f"type {part.get('type')!r}.",
                                       param=f"messages.{i}.content", code="unsupported")
                    texts.append(part["text"])
                content = "".join(texts)
            role = "system" if m.role == "developer" else m.role
            msg = {"role": role, "content": content or ""}
            if m.name is not None:
                msg["name"] = m.name
            messages.append(msg)
        try:
            text = engine.apply_chat_template(messages)
        except UsageError as e:
            raise APIError(400, str(e), param="messages", code="no_chat_template") from None
        except Exception as e:  # a template that raises (e.g. jinja's raise_exception)
            raise APIError(400, f"The model's chat template rejected the messages: {e}",
                           param="messages", code="invalid_value") from None
        ids = engine.encode(text)
        max_tokens = req.max_completion_tokens or req.max_tokens
        mt = check_prompt(ids, max_tokens, "messages")
        lp = (req.top_logprobs or 0) if req.logprobs else None
        render = _ChatRender(engine, name, fingerprint, req, [len(ids)])
        return await run(request, [ids], [sampling(req, mt, lp)], req.n, req.stream, render)

    @app.get("/health")
    async def health():
        ok = sched.alive
        body = {"status": "ok" if ok else "unavailable", "model": name,
                "queue_depth": sched.queue_depth, "active_batch_size": metrics.active_rows,
                "max_batch": max_batch, "max_queue": max_queue}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.prometheus(queue_depth=sched.queue_depth, model=name),
                                 media_type="text/plain; version=0.0.4")

    return app


def _job_error(e: BaseException) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, UsageError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, SchedulerStopped):
        return APIError(503, f"The server cannot finish this request: {e}.", code="unavailable")
    return APIError(500, f"Generation failed: {e!r}", code="internal_error")


async def _guard(request: Request, events: AsyncIterator[str], job: Job) -> AsyncIterator[str]:
    """The SSE stream; whatever ends it early (client gone: the server cancels the generator)
    cancels the job's rows so the batch stops spending work on them."""
    finished = False
    try:
        async for chunk in events:
            yield chunk
        finished = True
    finally:
        job.cancelled = True
        if not finished:
            request.scope["plinth.status"] = 499


class _JobStream(StreamingResponse):
    """A stream that cancels its job however it ends (the generator itself may be closed
    only later, when it is garbage-collected)."""

    def __init__(self, content, job: Job, **kw):
        super().__init__(content, **kw)
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


# ------------------------------------------------------------------------------ rendering


class _Render:
    """OpenAI response bodies for one request: `full` for the JSON answer, `stream` for SSE."""

    object = chunk_object = prefix = ""

    def __init__(self, engine, model: str, fingerprint: str, req, prompt_lens: list[int]):
        self.engine, self.model, self.fingerprint, self.req = engine, model, fingerprint, req
        self.prompt_lens = prompt_lens
        self.id = f"{self.prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def usage(self, outs: list[Completion]) -> dict:
        prompt = sum(self.prompt_lens)  # each prompt once, however many choices share it
        done = sum(len(c.token_ids) for c in outs)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done}

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def full(self, outs: list[Completion]) -> dict:
        return {**self.head(self.object),
                "choices": [self.choice(i, c) for i, c in enumerate(outs)],
                "usage": self.usage(outs)}

    def token_text(self, tid: int) -> str:
        tok = getattr(self.engine, "tokenizer", None)
        t = tok.id_to_token(tid) if tok is not None else None
        return t if t is not None else self.engine.decode([tid])

    async def stream(self, job: Job, deadline: float) -> AsyncIterator[str]:
        opts = self.req.stream_options
        usage = bool(opts and opts.include_usage)
        extra = {"usage": None} if usage else {}
        sent: dict[int, str] = {}
        for i in range(job.rows):
            first = self.first_delta(i)
            if first is not None:
                yield _sse({**self.head(self.chunk_object), "choices": [first], **extra})
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise asyncio.TimeoutError
                ev = await asyncio.wait_for(job.events.get(), timeout=left)
            except asyncio.TimeoutError:
                job.cancelled = True
                e = APIError(504, "The request took longer than the server's timeout "
                             "(--timeout).", code="timeout")
                yield _sse(e.body())
                yield "data: [DONE]\n\n"
                return
            if ev[0] == "token":
                _, i, _, delta = ev
                if delta:
                    sent[i] = sent.get(i, "") + delta
                    yield _sse({**self.head(self.chunk_object),
                                "choices": [self.delta(i, delta, None)], **extra})
            elif ev[0] == "error":
                yield _sse(_job_error(ev[1]).body())
                yield "data: [DONE]\n\n"
                return
            else:
                outs: list[Completion] = ev[1]
                for i, c in enumerate(outs):
                    # text the stream held back (e.g. an unfinished character at the end)
                    streamed = sent.get(i, "")
                    rest = c.text[len(streamed):] if c.text.startswith(streamed) else ""
                    if rest:
                        yield _sse({**self.head(self.chunk_object),
                                    "choices": [self.delta(i, rest, None)], **extra})
                    last = self.delta(i, "", c.finish_reason, final=c)
                    yield _sse({**self.head(self.chunk_object), "choices": [last], **extra})
                if usage:
                    yield _sse({**self.head(self.chunk_object), "choices": [],
                                "usage": self.usage(outs)})
                yield "data: [DONE]\n\n"
                return

    def first_delta(self, i: int) -> dict | None:
        return None


class _CompletionRender(_Render):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, engine, model, fingerprint, req, prompt_lens, echo):
        super().__init__(engine, model, fingerprint, req, prompt_lens)
        self.echo = echo

    def choice(self, i: int, c: Completion) -> dict:
        text = c.text
        if self.echo is not None:
            text = self.echo[i // self.req.n] + text
        return {"text": text, "index": i, "logprobs": self.logprobs(c),
                "finish_reason": c.finish_reason}

    def logprobs(self, c: Completion) -> dict | None:
        if c.logprobs is None:
            return None
        ids = c.token_ids[:len(c.logprobs)]
        tokens = [self.token_text(t) for t in ids]
        # where each token starts in the text: the length of the text decoded before it
        offsets = [len(self.engine.decode(ids[:k])) for k in range(len(ids))]
        return {"tokens": tokens, "token_logprobs": c.logprobs,
                "top_logprobs": c.top_logprobs, "text_offset": offsets}

    def first_delta(self, i: int) -> dict | None:
        if self.echo is None:
            return None
        return {"text": self.echo[i // self.req.n], "index": i, "logprobs": None,
                "finish_reason": None}

    def delta(self, i: int, text: str, finish: str | None, final: Completion | None = None):
        return {"text": text, "index": i,
                "logprobs": self.logprobs(final) if final is not None else None,
                "finish_reason": finish}


class _ChatRender(_Render):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def choice(self, i: int, c: Completion) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(c), "finish_reason": c.finish_reason}

    def logprobs(self, c: Completion) -> dict | None:
        if c.logprobs is None:
            return None

        def entry(token: str, lp: float) -> dict:
            return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}

        content = []
        for k, (t, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=False)):
            item = entry(self.token_text(t), lp)
            tops = c.top_logprobs[k] if c.top_logprobs else {}
            item["top_logprobs"] = [entry(s, v) for s, v in tops.items()]
            content.append(item)
        return {"content": content}

    def first_delta(self, i: int) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, i: int, text: str, finish: str | None, final: Completion | None = None):
        return {"index": i, "delta": {"content": text} if text or final is None else {},
                "logprobs": self.logprobs(final) if final is not None else None,
                "finish_reason": finish}


# ------------------------------------------------------------------------------ middleware


class _Observe:
    """Pure ASGI middleware: counts every answered request by endpoint and status and times it
    to its last byte (streams included); a handler may override the status it recorded (499:
    the client went away)."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, recorded, started = [500], [False], [False]
        path = scope.get("path", "")
        endpoint = next((e for e in self.ENDPOINTS if path.startswith(e)), "other")

        def record():
            if not recorded[0]:
                recorded[0] = True
                code = scope.get("plinth.status", status[0])
                self.metrics.request_done(endpoint, code, time.perf_counter() - start)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                record()  # before the last byte leaves: a client that got it sees it counted
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if started[0] and not recorded[0]:  # a response cut off: the client went away
                scope.setdefault("plinth.status", 499)
            record()


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
