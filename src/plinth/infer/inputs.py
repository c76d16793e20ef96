"""From a validated OpenAI request to what the engine runs: prompts as token ids and one
`SamplingParams` per prompt, checked against the model and the server's `Limits`.

    limits = Limits(max_batch=8, max_tokens_limit=4096)
    inputs = completion_inputs(engine, limits, CompletionRequest(prompt="Hi", max_tokens=8))
    prompts, params = rows(limits, inputs, n=1)     # prompts x n rows for the scheduler

Every refusal is an `APIError` naming the field (400 for what the model or server cannot do,
422 for a value out of range); checks run in the order a request's fields are read, so the
first problem is the one reported.
"""

from __future__ import annotations

from dataclasses import dataclass

from plinth.errors import UsageError
from plinth.infer.engine import SamplingParams
from plinth.infer.protocol import (
    MAX_STOP,
    APIError,
    ChatRequest,
    CompletionRequest,
    SamplingRequest,
    unsupported,
)


@dataclass(frozen=True)
class Limits:
    """What one server accepts; each is a `plinth serve` flag, named in the errors."""

    max_batch: int = 8  # rows decoded together, and the most rows one request may have
    max_queue: int = 64  # requests waiting for the batch; more get 429
    max_prompt_tokens: int | None = None  # None: the model's context bounds the prompt
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_body_bytes: int = 1_000_000  # larger request bodies get 413
    timeout_s: float = 300.0  # arrival to last token; 504 after


@dataclass
class Inputs:
    """A request's prompts (token ids), their sampling, and (completions) the prompts' texts,
    which echo puts before each answer and logprobs' text_offset counts from."""

    prompts: list[list[int]]
    params: list[SamplingParams]  # one per prompt
    texts: list[str] | None = None

    @property
    def prompt_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def check_token(engine, t: int, param: str) -> None:
    if not 0 <= t < engine.vocab_size:
        raise APIError(400, f"'{param}' has token id {t}, outside this model's vocabulary "
                       f"(0..{engine.vocab_size - 1}).", param=param, code="invalid_value")


def check_prompt(engine, limits: Limits, ids: list[int], max_tokens: int | None,
                 param: str) -> int:
    """max_tokens for this prompt (given, or what the context leaves) after the limits."""
    if not ids:
        raise APIError(400, f"'{param}' is empty: a prompt needs at least one token.",
                       param=param, code="invalid_value")
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise APIError(400, f"The prompt has {len(ids)} tokens; this server accepts at "
                       f"most {limits.max_prompt_tokens} (--max-prompt-tokens).", param=param,
                       code="context_length_exceeded")
    room = engine.max_context - len(ids)
    if max_tokens is None:
        max_tokens = min(limits.max_tokens_limit, room)
    if max_tokens > limits.max_tokens_limit:
        raise APIError(422, f"'max_tokens' is {max_tokens}; this server allows at most "
                       f"{limits.max_tokens_limit} (--max-tokens-limit).", param="max_tokens",
                       code="invalid_value")
    if max_tokens > room or room < 1:
        raise APIError(
            400, f"This model's maximum context length is {engine.max_context} tokens. "
            f"However, you requested {len(ids) + max(max_tokens, 1)} tokens ({len(ids)} in "
            f"the prompt, {max(max_tokens, 1)} for the completion). Please reduce the "
            "prompt or max_tokens.", param=param, code="context_length_exceeded")
    return max_tokens


def sampling_params(engine, req: SamplingRequest, max_tokens: int,
                    logprobs: int | None) -> SamplingParams:
    """The engine's SamplingParams for `req` (OpenAI's neutral values become None: off)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP or any(not s for s in stop):
        raise APIError(422, f"'stop' takes at most {MAX_STOP} non-empty strings.",
                       param="stop", code="invalid_value")
    if req.logit_bias:
        raise APIError(400, "'logit_bias' is not supported by this server.",
                       param="logit_bias", code="unsupported")
    for t in req.stop_token_ids or []:
        check_token(engine, t, "stop_token_ids")
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


def completion_inputs(engine, limits: Limits, req: CompletionRequest) -> Inputs:
    """The prompts of /v1/completions: a string, strings, token ids or lists of token ids."""
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
        raise APIError(400, "'prompt' is an empty list.", param="prompt", code="invalid_value")
    prompts, params = [], []
    max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
    for i, x in enumerate(raw):
        param = "prompt" if len(raw) == 1 else f"prompt.{i}"
        if isinstance(x, str):
            ids = engine.encode(x)
        else:
            for t in x:
                check_token(engine, t, param)
            ids = list(x)
        mt = check_prompt(engine, limits, ids, max_tokens, param)
        prompts.append(ids)
        params.append(sampling_params(engine, req, mt, req.logprobs))
    texts = [x if isinstance(x, str) else engine.decode(x) for x in raw]
    return Inputs(prompts, params, texts)


def chat_messages(req: ChatRequest) -> list[dict]:
    """The messages as the chat template takes them: text parts joined, developer -> system."""
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
    return messages


def chat_inputs(engine, limits: Limits, req: ChatRequest) -> Inputs:
    """The one prompt of /v1/chat/completions: the messages through the model's template."""
    unsupported(bool(req.tools), "tools", "Tool calling ('tools')")
    unsupported(req.tool_choice not in (None, "none", "auto"), "tool_choice", "'tool_choice'")
    fmt = (req.response_format or {}).get("type", "text")
    unsupported(fmt != "text", "response_format", f"response_format type '{fmt}'")
    unsupported(req.top_logprobs is not None and not req.logprobs, "top_logprobs",
                "'top_logprobs' without 'logprobs': true")
    messages = chat_messages(req)
    from plinth.data.templates import TemplateError

    try:
        text = engine.apply_chat_template(messages)
    except TemplateError as e:  # raise_exception(...), a sandbox refusal, a runaway template
        raise APIError(400, f"The model's chat template rejected the messages: {e}",
                       param="messages", code="invalid_value") from None
    except UsageError as e:
        raise APIError(400, str(e), param="messages", code="no_chat_template") from None
    except Exception as e:  # a template that raises (e.g. jinja's raise_exception)
        raise APIError(400, f"The model's chat template rejected the messages: {e}",
                       param="messages", code="invalid_value") from None
    ids = engine.encode(text)
    mt = check_prompt(engine, limits, ids, req.max_completion_tokens or req.max_tokens,
                      "messages")
    lp = (req.top_logprobs or 0) if req.logprobs else None
    return Inputs([ids], [sampling_params(engine, req, mt, lp)])


def rows(limits: Limits, inputs: Inputs, n: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """prompts x n rows; copies of a seeded request get seeds seed, seed+1, ... so that
    n > 1 gives n different samples, reproducibly."""
    count = len(inputs.prompts) * n
    if count > limits.max_batch:
        raise APIError(400, f"{len(inputs.prompts)} prompt(s) x n={n} is {count} "
                       f"sequences; this server runs at most {limits.max_batch} per request "
                       "(--max-batch).", param="n", code="invalid_value")
    rp, rs = [], []
    for p, sp in zip(inputs.prompts, inputs.params, strict=True):
        for j in range(n):
            rp.append(p)
            seed = None if sp.seed is None else sp.seed + j
            rs.append(SamplingParams(**{**sp.__dict__, "seed": seed}))
    return rp, rs
