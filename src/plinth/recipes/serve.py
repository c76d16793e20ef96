"""`plinth serve`: an OpenAI-compatible HTTP server for a model, with dynamic batching.

    plinth serve ref-smollm2                                   # http://127.0.0.1:8000/v1
    PLINTH_API_KEY=secret plinth serve runs/quickstart --port 9000 --max-batch 16

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /health, /metrics.
The app itself is `plinth.infer.server.create_app`; this is only the command around it.
"""

from __future__ import annotations

import errno
import os
import socket
import warnings

from plinth.errors import UsageError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def serve(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_name: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    max_prompt_tokens: int | None = None,
    max_tokens_limit: int = 4096,
    max_body_bytes: int = 1_000_000,
    timeout: float = 300.0,
    device: str = "cpu",
    dtype: str | None = None,
    quantize: str | None = None,
    adapter: str | None = None,
    log_level: str = "info",
) -> int:
    """Serve a model over an OpenAI-compatible HTTP API until interrupted (Ctrl-C).

    Concurrent requests are batched: one worker runs up to --max-batch waiting requests as one
    decode loop; requests arriving meanwhile wait for the next batch. Beyond --max-queue
    waiting requests the server answers 429 instead of queueing more.

    Args:
        model: run directory, checkpoint directory, `plinth import` directory, or a reference
            model name (ref-smollm2)
        host: interface to bind; the default serves this machine only. Binding another address
            without an API key is allowed but warned about
        port: TCP port, 1-65535 (0: any free port, shown in the banner)
        api_key: require `Authorization: Bearer KEY` on every /v1 route (default: the
            PLINTH_API_KEY environment variable; no key means no authentication)
        served_name: model name clients send and /v1/models lists (default: the engine's)
        max_batch: most sequences decoded together in one batch
        max_queue: most requests waiting for a batch; more get 429 with Retry-After
        max_prompt_tokens: longest prompt accepted, in tokens (default: the model's context)
        max_tokens_limit: largest max_tokens a request may ask for
        max_body_bytes: largest request body; larger ones get 413
        timeout: seconds a request may take from arrival to its last token (504 after)
        device: torch device (cpu, cuda, cuda:1, ...)
        dtype: fp32, bf16 or fp16 weights (float32, bfloat16, float16 also accepted;
            default: as stored)
        quantize: weight quantization (int8)
        adapter: a LoRA adapter directory applied on top of the model
        log_level: uvicorn log level (debug, info, warning, error)
    """
    import uvicorn

    from plinth.infer.engine import Engine, weight_dtype
    from plinth.infer.server import create_app

    key = api_key if api_key is not None else os.environ.get("PLINTH_API_KEY") or None
    if host not in LOOPBACK and not key:
        warnings.warn(
            f"plinth serve binds {host} without an API key: anyone who can reach this address "
            "can use the model. Set --api-key or PLINTH_API_KEY, or bind 127.0.0.1.",
            stacklevel=1,
        )
    _check_limits(max_batch=max_batch, max_queue=max_queue, max_prompt_tokens=max_prompt_tokens,
                  max_tokens_limit=max_tokens_limit, max_body_bytes=max_body_bytes,
                  timeout=timeout)
    if dtype is not None:
        weight_dtype(dtype)  # a bad --dtype is refused before the port is taken
    sock = bind(host, port)  # before the model loads: a taken port fails at once
    try:
        engine = Engine.load(model, device=device, dtype=dtype, quantize=quantize,
                             adapter=adapter)
    except BaseException:
        sock.close()
        raise
    app = create_app(
        engine,
        api_key=key,
        max_batch=max_batch,
        max_queue=max_queue,
        max_prompt_tokens=max_prompt_tokens,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        timeout_s=timeout,
        served_name=served_name,
    )
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"plinth serve: {app.state.model_name} on http://{shown}:{port}/v1"
          + (" (API key required)" if key else ""), flush=True)
    config = uvicorn.Config(app, log_level=log_level, lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a UsageError naming the port (or host) and the fix:
    out of range, already in use, not permitted, or an address this machine does not have."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UsageError(f"--port {str(port)[:20]} is not a TCP port: give 1-65535 (e.g. "
                         "--port 8000), or 0 for any free port.")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"--host {host[:100]!r} is not an address of this machine ({e}); "
                         "give an IP address or name such as 127.0.0.1 or 0.0.0.0.") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)  # held from now on: a second server on the port fails to bind
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"Port {port} on {host} is already in use (another plinth serve "
                             "or server?): stop that process, or choose another port with "
                             "--port N (--port 0 picks a free one).") from None
        if e.errno == errno.EACCES:
            raise UsageError(f"Binding port {port} on {host} is not permitted (ports below 1024 "
                             "need privileges): choose a port above 1023 with --port N.") from None
        raise UsageError(f"Cannot listen on {host}:{port}: {e.strerror or e}. Choose another "
                         "--host or --port.") from None
    return sock


def _check_limits(**values) -> None:
    """Each server limit at least 1 (--timeout: above 0, finite), before the model loads."""
    import math

    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if name == "timeout":
            if not (math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} must be a positive number of seconds, got {value}")
        elif value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
