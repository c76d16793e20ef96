"""Templates from files plinth does not control (chat templates, eval task prompts), rendered so
that a hostile or broken one is refused with a clear error instead of running code or hanging.

    tpl = compile_jinja(source, "runs/x/chat_template.jinja", trim_blocks=True)
    text = render_jinja(tpl, "runs/x/chat_template.jinja", messages=[...])
    text = safe_format("Q: {question}\\nA:", row, "task.yaml: prompt")   # Python format

Jinja2 runs in `BoundedEnvironment`: Jinja's immutable sandbox (no attribute that reaches
Python internals, such as `''.__class__` or `cycler.__init__.__globals__`; as transformers
renders chat templates) plus bounds on work: at most `MAX_STEPS` loop iterations, calls and
filter applications per render, `MAX_SECONDS` of wall time, `MAX_CHARS` characters in the
output and in any string built on the way, `MAX_ITEMS` items in any list, `MAX_INT_BITS` bits
in any integer, and Python's recursion limit for recursive macros. Every refusal is a
`TemplateError` (a UsageError: exit 2) naming the template and the limit.

Python format strings (`safe_format`) take plain field names only: `{question}`, not
`{question.__class__}` or `{row[0]}`, and no width or precision above `MAX_CHARS`.
"""

from __future__ import annotations

import functools
import re
import string
import threading
import time
from typing import Any

from plinth.errors import UsageError

MAX_STEPS = 2_000_000  # loop iterations + calls + filter applications in one render
MAX_SECONDS = 10.0  # wall time of one render
MAX_CHARS = 16_000_000  # characters of the output, and of any string built while rendering
MAX_ITEMS = 1_000_000  # items of any list/tuple/dict built; any integer argument of a call
MAX_INT_BITS = 65_536  # bits of any integer built by * or **
MAX_SOURCE = 1_000_000  # characters of a template's own text
QUOTE = 200  # characters of user text quoted in a message


class TemplateError(UsageError):
    """A template that cannot be compiled or rendered (exit 2, with the template's origin)."""


class _Limit(Exception):
    """Raised inside a render when a bound is passed (becomes a TemplateError)."""


def _short(text: Any) -> str:
    s = str(text)
    return s if len(s) <= QUOTE else s[:QUOTE] + "..."


# ---- the per-render budget ------------------------------------------------------------------

_local = threading.local()


class _Budget:
    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS


def _tick() -> None:
    b = getattr(_local, "budget", None)
    if b is None:
        return
    b.steps += 1
    if b.steps > MAX_STEPS:
        raise _Limit(f"it ran more than {MAX_STEPS:,} loop iterations and calls")
    if time.monotonic() > b.deadline:
        raise _Limit(f"it ran longer than {MAX_SECONDS:g} seconds")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | bytes) and len(value) > MAX_CHARS:
        raise _Limit(f"it built a string of more than {MAX_CHARS:,} characters")
    if isinstance(value, list | tuple | dict | set) and len(value) > MAX_ITEMS:
        raise _Limit(f"it built a collection of more than {MAX_ITEMS:,} items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _Limit(f"it built an integer of more than {MAX_INT_BITS:,} bits")
    return value


def _check_args(args, kwargs) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_ITEMS:
            raise _Limit(f"it passed a number above {MAX_ITEMS:,} ({_short(a)}) to a call")


_DIGITS = re.compile(r"\d{7,}")


def _check_spec(fmt: str) -> None:
    """Widths/precisions in a format string (`%...d`, `{:>N}`) within MAX_ITEMS."""
    for m in _DIGITS.finditer(fmt):
        if int(m.group()) > MAX_ITEMS:
            raise _Limit(f"its format string asks for a width of {_short(m.group())} characters")


def _bounded_iter(value):
    for item in value:
        _tick()
        yield item


def _bounded_filter(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _tick()
        _check_args(args[1:], kwargs)  # the first is the value (or context/environment)
        if getattr(fn, "__name__", "") in ("do_replace", "do_format"):
            _precheck_text_call(fn.__name__, args, kwargs)
        return _check_size(fn(*args, **kwargs))

    return wrapper


def _precheck_text_call(name: str, args, kwargs) -> None:
    texts = [a for a in args if isinstance(a, str)]
    if "format" in name and texts:
        _check_spec(texts[0])
    if "replace" in name and len(texts) >= 3:
        s, old, new = texts[-3:]
        count = s.count(old) if old else len(s) + 1
        if len(s) + count * len(new) > MAX_CHARS:
            raise _Limit(f"a replace would build more than {MAX_CHARS:,} characters")


# ---- the environment ------------------------------------------------------------------------


def _environment_class():
    import jinja2
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        """The immutable sandbox with bounds on work (see the module doc)."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.globals.pop("lipsum", None)  # lipsum(n=10**6): megabytes of text
            self.filters = {k: _bounded_filter(f) for k, f in self.filters.items()}
            self.filters["_plinth_steps"] = _bounded_iter
            self.filters["_plinth_size"] = _check_size

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            # every loop's iterable (and each recursive loop(...) call's) is counted per item
            for node in tree.find_all(nodes.For):
                node.iter = nodes.Filter(node.iter, "_plinth_steps", [], [], None, None)
            for call in tree.find_all(nodes.Call):
                if isinstance(call.node, nodes.Name) and call.node.name == "loop" and call.args:
                    call.args[0] = nodes.Filter(call.args[0], "_plinth_steps", [], [], None, None)
            # a ~ b ~ ... is built without an operator hook: check what it built
            for node in list(tree.find_all(nodes.Concat)):
                node.nodes = [nodes.Filter(n, "_plinth_size", [], [], None, None)
                              for n in node.nodes]
            return tree

        def unsafe_undefined(self, obj, attribute):
            """Refuse at once (Jinja's sandbox returns an undefined value that prints as
            nothing, so `{{ ''.__class__ }}` would pass silently)."""
            raise SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe"
            )

        def call(__self, __context, __obj, *args, **kwargs):
            _tick()
            _check_args(args, kwargs)
            name = getattr(__obj, "__name__", "")
            if isinstance(getattr(__obj, "__self__", None), str) and name == "replace":
                _precheck_text_call("replace", (__obj.__self__, *args), kwargs)
            return _check_size(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            _tick()
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left) > 1 and right * left.bit_length() > MAX_INT_BITS:
                    raise _Limit(f"it raised a number to the power {_short(right)}")
            elif operator == "*":
                for a, b in ((left, right), (right, left)):
                    if isinstance(b, int) and not isinstance(b, bool):
                        if isinstance(a, str | list | tuple) and len(a) * b > MAX_CHARS:
                            raise _Limit(f"it repeated a value {_short(b)} times")
                        if isinstance(a, int) and a.bit_length() + b.bit_length() > MAX_INT_BITS:
                            raise _Limit(f"it built an integer of more than {MAX_INT_BITS:,} bits")
            elif operator == "%" and isinstance(left, str):
                _check_spec(left)
                _check_args(right if isinstance(right, tuple) else (right,), {})
            return _check_size(super().call_binop(context, operator, left, right))

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is None:
                return None
            _check_spec(value.__self__)
            return fmt

    BoundedEnvironment.jinja2 = jinja2
    return BoundedEnvironment


@functools.cache
def bounded_environment_class():
    return _environment_class()


def compile_jinja(source: str, origin: str, **env_kwargs):
    """A jinja2.Template of `source` in the bounded sandbox, or a TemplateError naming
    `origin` (where the template came from) and what is wrong."""
    import jinja2

    if not isinstance(source, str):
        raise TemplateError(f"{origin}: the template is a {type(source).__name__}, not text")
    if len(source) > MAX_SOURCE:
        raise TemplateError(
            f"{origin}: the template is {len(source):,} characters long; templates are limited "
            f"to {MAX_SOURCE:,}. Give the template itself, not data."
        )
    env = bounded_environment_class()(**env_kwargs)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(
            f"{origin}: not a valid Jinja2 template (line {e.lineno}: {_short(e.message)}); "
            "fix its syntax"
        ) from None
    except (RecursionError, MemoryError, SyntaxError, ValueError, jinja2.TemplateError) as e:
        raise TemplateError(
            f"{origin}: cannot compile the template ({type(e).__name__}: {_short(e)}); it is "
            "nested too deeply or malformed. Simplify it."
        ) from None


def render_jinja(template, origin: str, **values) -> str:
    """The template rendered with `values` under the per-render bounds; a TemplateError naming
    `origin` when the sandbox or a bound refuses it, or the template itself fails."""
    import jinja2
    from jinja2.sandbox import SecurityError

    outer = getattr(_local, "budget", None)
    _local.budget = _Budget()
    try:
        out, size = [], 0
        for chunk in template.generate(**values):
            size += len(chunk)
            if size > MAX_CHARS:
                raise _Limit(f"its output passed {MAX_CHARS:,} characters")
            _tick()
            out.append(chunk)
        return "".join(out)
    except SecurityError as e:
        raise TemplateError(
            f"{origin}: the template was refused by the sandbox ({_short(e)}): templates may "
            "only read the values they are given, not Python internals. Use a template that "
            "does not touch attributes such as __class__ or __globals__."
        ) from None
    except _Limit as e:
        raise TemplateError(
            f"{origin}: the template was stopped: {e}. A template should only format its "
            "input; fix or replace the template."
        ) from None
    except RecursionError:
        raise TemplateError(
            f"{origin}: the template recursed too deeply (a macro or recursive loop that does "
            "not end); fix or replace the template."
        ) from None
    except jinja2.TemplateError as e:  # raise_exception(...), undefined values, ...
        raise TemplateError(f"{origin}: the template failed: {_short(e)}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
            MemoryError) as e:
        raise TemplateError(
            f"{origin}: the template failed ({type(e).__name__}: {_short(e)}); fix the template "
            "or the values it is given"
        ) from None
    finally:
        _local.budget = outer


# ---- Python format strings ------------------------------------------------------------------


def check_format(fmt: str, origin: str) -> list[str]:
    """The field names of a Python format string, refusing anything but plain names
    ({question}): no attribute or index access, positional fields, conversions into code, or
    widths above MAX_ITEMS. TemplateError names `origin` and the field."""
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as e:
        raise TemplateError(
            f"{origin}: not a valid format string ({e}); write fields as {{name}} and literal "
            "braces as {{ and }}"
        ) from None
    names = []
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise TemplateError(
                f"{origin}: the field {{{_short(name)}}} is not a plain field name; templates "
                "may only name a row's fields, e.g. {question} (no attribute access, indexing "
                "or positional fields). Write literal braces as {{ and }}."
            )
        if spec and ("{" in spec or "}" in spec):
            raise TemplateError(
                f"{origin}: the field {{{name}:{_short(spec)}}} has a nested format spec; use a "
                "fixed one such as {name:>8}"
            )
        try:
            _check_spec(spec or "")
        except _Limit as e:
            raise TemplateError(f"{origin}: the field {{{name}}}: {e}") from None
        names.append(name)
    return names


def safe_format(fmt: str, values: dict, origin: str) -> str:
    """`fmt.format(**values)` for plain field names only (see check_format)."""
    names = check_format(fmt, origin)
    missing = [n for n in names if n not in values]
    if missing:
        raise TemplateError(
            f"{origin}: the field {{{missing[0]}}} is not among the values given "
            f"({', '.join(sorted(map(str, values)))[:QUOTE]})"
        )
    try:
        return fmt.format_map({n: values[n] for n in names})
    except (ValueError, TypeError) as e:
        raise TemplateError(f"{origin}: cannot format ({_short(e)}); fix the format spec") from None
