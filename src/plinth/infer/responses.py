"""OpenAI's response bodies for a finished or streaming job: completions and chat completions,
their logprobs and usage, and the server-sent events of a stream.

    render = ChatRender(engine, "my-model", "plinth-0.1.0", req, prompt_lens=[12])
    render.full(completions)                  # the JSON answer
    async for event in render.stream(job, deadline): ...   # "data: {chunk}\\n\\n" ... [DONE]

A stream sends, per choice, an opening chunk (chat: the assistant role; completions with echo:
the prompt), a chunk per text delta, the text the stream held back (an unfinished character),
a last chunk with finish_reason and logprobs, an optional usage chunk, then `data: [DONE]`. An
error or timeout mid-stream is sent as an error event in OpenAI's body, then [DONE].
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from plinth.errors import UsageError
from plinth.infer.engine import Completion
from plinth.infer.protocol import APIError
from plinth.infer.scheduler import Job, SchedulerStopped

DONE = "data: [DONE]\n\n"


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as compact JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def job_error(e: BaseException) -> APIError:
    """The APIError for what failed a job in the worker."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, UsageError):
        return APIError(400, str(e), code="invalid_value")
    if isinstance(e, SchedulerStopped):
        return APIError(503, f"The server cannot finish this request: {e}.", code="unavailable")
    return APIError(500, f"Generation failed: {e!r}", code="internal_error")


async def next_event(job: Job, deadline: float) -> tuple | None:
    """The job's next event, or None once `deadline` (time.monotonic) has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        return None
    try:
        return await asyncio.wait_for(job.events.get(), timeout=left)
    except asyncio.TimeoutError:
        return None


# ------------------------------------------------------------------------------ bodies


class Render:
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

    def pieces(self, c: Completion) -> tuple[list[str], list[list[tuple[int, str, float]]]]:
        """The text of each logprob'd token, and of each top alternative at its step (what it
        would have added there): (texts, [[(id, text, logprob)] per step])."""
        ids = c.token_ids[:len(c.logprobs or [])]
        texts = [self.engine.token_text(t, ids[max(0, k - 6):k]) for k, t in enumerate(ids)]
        tops = [[(t, self.engine.token_text(t, ids[max(0, k - 6):k]), v) for t, v in step]
                for k, step in enumerate(c.top_ids or [])]
        return texts, tops

    def entry(self, tid: int, text: str, lp: float) -> dict:
        """A chat logprob entry: the token's text, its logprob and raw bytes."""
        return {"token": text, "logprob": lp, "bytes": self.engine.token_bytes(tid, text)}

    # -- streaming -------------------------------------------------------------------------
    def chunk(self, choices: list[dict], usage: bool) -> str:
        """A chunk event; with include_usage every chunk carries "usage": null."""
        return sse({**self.head(self.chunk_object), "choices": choices,
                    **({"usage": None} if usage else {})})

    async def stream(self, job: Job, deadline: float) -> AsyncIterator[str]:
        opts = self.req.stream_options
        usage = bool(opts and opts.include_usage)
        sent: dict[int, str] = {}  # text streamed so far, per choice
        for i in range(job.rows):
            first = self.first_delta(i)
            if first is not None:
                yield self.chunk([first], usage)
        while True:
            ev = await next_event(job, deadline)
            if ev is None:
                job.cancelled = True
                e = APIError(504, "The request took longer than the server's timeout "
                             "(--timeout).", code="timeout")
                yield sse(e.body())
                yield DONE
                return
            if ev[0] == "token":
                _, i, _, delta = ev
                if delta:
                    sent[i] = sent.get(i, "") + delta
                    yield self.chunk([self.delta(i, delta, None)], usage)
            elif ev[0] == "error":
                yield sse(job_error(ev[1]).body())
                yield DONE
                return
            else:
                for event in self.last_chunks(ev[1], sent, usage):
                    yield event
                return

    def last_chunks(self, outs: list[Completion], sent: dict[int, str], usage: bool):
        """The end of a stream: per choice the text held back and its finish; usage; [DONE]."""
        for i, c in enumerate(outs):
            # text the stream held back (e.g. an unfinished character at the end)
            streamed = sent.get(i, "")
            rest = c.text[len(streamed):] if c.text.startswith(streamed) else ""
            if rest:
                yield self.chunk([self.delta(i, rest, None)], usage)
            yield self.chunk([self.delta(i, "", c.finish_reason, final=c)], usage)
        if usage:
            yield sse({**self.head(self.chunk_object), "choices": [], "usage": self.usage(outs)})
        yield DONE

    def first_delta(self, i: int) -> dict | None:
        return None


class CompletionRender(Render):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def __init__(self, engine, model, fingerprint, req, prompt_lens, prompt_texts):
        super().__init__(engine, model, fingerprint, req, prompt_lens)
        self.prompt_texts = prompt_texts
        self.echo = prompt_texts if req.echo else None

    def choice(self, i: int, c: Completion) -> dict:
        text = c.text
        if self.echo is not None:
            text = self.echo[i // self.req.n] + text
        return {"text": text, "index": i, "logprobs": self.logprobs(i, c),
                "finish_reason": c.finish_reason}

    def logprobs(self, i: int, c: Completion) -> dict | None:
        """OpenAI's legacy logprobs: tokens as text pieces ("bytes:\\xNN" for part of a
        character), and text_offset counting from the start of the prompt, as OpenAI's does
        (with echo the choice's text starts with the prompt, so the offsets index it)."""
        if c.logprobs is None:
            return None
        ids = c.token_ids[:len(c.logprobs)]
        texts, tops = self.pieces(c)
        name = self.engine.token_legacy
        offsets, at = [], len(self.prompt_texts[i // self.req.n])
        for text in texts:
            offsets.append(at)
            at += len(text)
        top = None
        if c.top_ids is not None:
            top = [{name(t, s): v for t, s, v in step} for step in tops]
        return {"tokens": [name(t, s) for t, s in zip(ids, texts, strict=True)],
                "token_logprobs": c.logprobs, "top_logprobs": top, "text_offset": offsets}

    def first_delta(self, i: int) -> dict | None:
        if self.echo is None:
            return None
        return {"text": self.echo[i // self.req.n], "index": i, "logprobs": None,
                "finish_reason": None}

    def delta(self, i: int, text: str, finish: str | None, final: Completion | None = None):
        return {"text": text, "index": i,
                "logprobs": self.logprobs(i, final) if final is not None else None,
                "finish_reason": finish}


class ChatRender(Render):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    prefix = "chatcmpl"

    def choice(self, i: int, c: Completion) -> dict:
        return {"index": i, "message": {"role": "assistant", "content": c.text},
                "logprobs": self.logprobs(i, c), "finish_reason": c.finish_reason}

    def logprobs(self, i: int, c: Completion) -> dict | None:
        if c.logprobs is None:
            return None
        content = []
        texts, tops = self.pieces(c)
        for k, (t, lp) in enumerate(zip(c.token_ids, c.logprobs, strict=False)):
            item = self.entry(t, texts[k], lp)
            item["top_logprobs"] = [self.entry(a, s, v) for a, s, v in (tops[k] if tops else [])]
            content.append(item)
        return {"content": content}

    def first_delta(self, i: int) -> dict:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def delta(self, i: int, text: str, finish: str | None, final: Completion | None = None):
        return {"index": i, "delta": {"content": text} if text or final is None else {},
                "logprobs": self.logprobs(i, final) if final is not None else None,
                "finish_reason": finish}


# ------------------------------------------------------------------------------ SSE response


async def _cancel_on_close(request: Request, events: AsyncIterator[str],
                           job: Job) -> AsyncIterator[str]:
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


class JobStream(StreamingResponse):
    """A stream that cancels its job however it ends (the generator itself may be closed
    only later, when it is garbage-collected)."""

    def __init__(self, request: Request, render: Render, job: Job, deadline: float):
        super().__init__(_cancel_on_close(request, render.stream(job, deadline), job),
                         media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled = True
