"""The base of every config section: strict keys, docstrings as descriptions, numbers that are
numbers.

YAML's `true`/`false` are not numbers here (pydantic's lax mode would read `micro_batch: true`
as 1), NaN and infinities are refused, and every integer must fit the 64-bit integers torch and
numpy compute with, so a value that passes validation cannot fail deep inside a library.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

INT64_MAX = 2**63 - 1

SEED_MAX = 2**32 - 1
"""Largest seed: numpy's generators take 0 .. 2**32-1 (and torch up to 2**64-1)."""


def _accepts_bool(tp: Any) -> bool:
    """True when a bool is a legitimate value of the annotation (bool, Any, or a union with
    either at the top level)."""
    if tp is bool or tp is Any:
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_accepts_bool(a) for a in typing.get_args(tp))
    if origin is typing.Annotated:
        return _accepts_bool(typing.get_args(tp)[0])
    return False


def _element_type(tp: Any) -> Any:
    """The element annotation of list[X]/tuple[X, ...] (through Optional), else None."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        for a in typing.get_args(tp):
            el = _element_type(a)
            if el is not None:
                return el
        return None
    if origin in (list, tuple, set):
        args = [_unwrap(a) for a in typing.get_args(tp) if a is not Ellipsis]
        if args and all(a == args[0] for a in args):
            return args[0]
    return None


def _unwrap(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _is_numeric(tp: Any) -> bool:
    tp = _unwrap(tp)
    if tp in (int, float):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return any(_is_numeric(a) for a in typing.get_args(tp))
    return False


def check_number(value: Any, annotation: Any) -> None:
    """ValueError for a bool given where a number is expected, or an int beyond 64 bits."""
    if isinstance(value, bool):
        if _is_numeric(annotation) and not _accepts_bool(annotation):
            raise ValueError(
                f"expects a number, not the boolean {str(value).lower()} (YAML reads true/false, "
                "yes/no, on/off as booleans); write a number"
            )
        return
    if isinstance(value, int) and _is_numeric(annotation) and abs(value) > INT64_MAX:
        raise ValueError("is too large: integers must fit in 64 bits (|value| < 2**63)")
    el = _element_type(annotation)
    if el is not None and isinstance(value, (list, tuple)):
        for item in value:
            check_number(item, el)


class Section(BaseModel):
    """Base of every section: strict keys, docstrings as descriptions, validated assignment."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
        allow_inf_nan=False,
    )

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            check_number(value, field.annotation)
        return value
