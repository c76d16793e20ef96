"""`plinth serve`: an OpenAI-compatible HTTP server for a model, with dynamic batching.

    plinth serve ref-smollm2                                   # http://127.0.0.1:8000/v1
    PLINTH_API_KEY=secret plinth serve runs/quickstart --port 9000 --max-batch 16

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /health, /metrics.
The app itself is `plinth.infer.server.create_app`; this is only the command around it.
"""

from __future__ import annotations

import os
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
        port: TCP port
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
        dtype: weight dtype (float32, bfloat16, float16; default: the model's)
        quantize: weight quantization (int8)
        adapter: a LoRA adapter directory applied on top of the model
        log_level: uvicorn log level (debug, info, warning, error)
    """
    import uvicorn

    from plinth.infer.engine import Engine
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
    engine = Engine.load(model, device=device, dtype=dtype, quantize=quantize, adapter=adapter)
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
    print(f"plinth serve: {app.state.model_name} on http://{host}:{port}/v1"
          + (" (API key required)" if key else ""), flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0


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
