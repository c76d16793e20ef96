"""OpenAI's wire shapes for the server: the request bodies it accepts and its error body.

    req = CompletionRequest.model_validate_json(body)   # strict: unknown fields, wrong types
    except ValidationError as e: raise validation_error(e, CompletionRequest)   # -> 422 / 400
    raise APIError(429, "...", code="queue_full")       # {"error": {message, type, param, code}}

The request models are strict on purpose: a misspelt field or a "5" where a number belongs is
answered with the field named, never silently ignored. Fields beyond OpenAI's (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids) are named as vLLM names them.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


def unsupported(cond: bool, param: str, what: str) -> None:
    """Refuse (400) a field the server parses but does not implement, naming it."""
    if cond:
        raise APIError(400, f"{what} is not supported by this server.", param=param,
                       code="unsupported")


# ------------------------------------------------------------------------------ requests


class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool; extra="forbid": a misspelt field is an error,
    # not silently ignored
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingRequest(_Strict):
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


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None


# ------------------------------------------------------------------------------ validation


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


def validation_error(e: ValidationError, model: type[BaseModel]) -> APIError:
    """The APIError for a body `model` refused: 400 for malformed JSON or a non-object, else 422
    naming the first wrong field (a union field's error lists the shapes it accepts)."""
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
