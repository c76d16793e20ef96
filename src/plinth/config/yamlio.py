"""The one YAML reader of plinth: `yaml.safe_load` plus limits an untrusted file cannot pass.

    from plinth.config.yamlio import read_yaml_file, safe_load
    spec = read_yaml_file("my_task.yaml", "task file")   # UsageError names the file and line

Every YAML plinth reads (config files, `key=value` overrides, eval task files, the
decontamination task list, a run's config.yaml read back by the report) goes through here.
On top of `yaml.safe_load` (no Python objects are ever built), it refuses:

- alias expansion bombs: a few KB of anchors (`&a`) and aliases (`*a`) that expand to
  billions of nodes; the expanded size is counted on the composed graph (each shared node once,
  so counting is cheap) and capped at MAX_NODES, aliases at MAX_ALIASES;
- nesting deeper than MAX_DEPTH (PyYAML's composer recurses and would hit RecursionError);
- duplicate keys in one mapping (YAML says keys are unique; PyYAML keeps the last silently).

`safe_load` raises `yaml.YAMLError` subclasses (drop-in for `yaml.safe_load`); `read_yaml_file`
and `describe_error` turn any of them into one paragraph naming the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from plinth.errors import UsageError

MAX_DEPTH = 64
"""Deepest nesting of sequences/mappings; plinth's own files nest at most 5 levels."""

MAX_ALIASES = 1_000
"""Aliases (`*name`) in one document."""

MAX_NODES = 200_000
"""Nodes of the document once every alias is expanded (a config file has a few hundred)."""

QUOTE_LIMIT = 200
"""Characters of user input any message quotes."""


def quote(value: Any, limit: int = QUOTE_LIMIT) -> str:
    """repr(value), cut to `limit` characters (with how much was left out), for messages."""
    try:
        text = repr(value)
    except RecursionError:  # a self-referencing structure
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit:,} more characters)"


class LimitError(yaml.MarkedYAMLError):
    """A document plinth refuses to expand: too deep, too many aliases, or duplicate keys."""


class _Composer(Composer):
    def compose_document(self):
        self._depth = 0
        self._aliases = 0
        node = super().compose_document()
        _check_size(node)
        return node

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                event = self.peek_event()
                raise LimitError(
                    None, None,
                    f"more than {MAX_ALIASES} aliases (*name); plinth does not expand documents "
                    "built from that many references (an alias expansion bomb looks like this). "
                    "Write the values out",
                    event.start_mark,
                )
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            event = self.peek_event()
            raise LimitError(
                None, None,
                f"nesting deeper than {MAX_DEPTH} levels; plinth's files nest a few levels. "
                "Flatten the structure",
                event.start_mark,
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_size(root: Node | None) -> None:
    """Expanded node count of the composed graph, each distinct node counted once (memoised)."""
    if root is None:
        return
    sizes: dict[int, int] = {}
    # iterative post-order over distinct nodes; aliases share node objects
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, ScalarNode):
            sizes[id(node)] = 1
            continue
        children = _children(node)
        if not done:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
            continue
        total = 1 + sum(sizes.get(id(c), 0) for c in children)
        sizes[id(node)] = total
        if total > MAX_NODES:
            raise LimitError(
                None, None,
                f"the document expands to more than {MAX_NODES:,} values once its aliases "
                "(*name) are resolved; plinth refuses alias expansion bombs. Write the values "
                "out, or use fewer aliases",
                node.start_mark,
            )


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, _Composer,
              yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        _Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable: SafeConstructor reports it
                    continue
                if first is not None:
                    raise LimitError(
                        None, None,
                        f"duplicate key {quote(key, 80)} (first at line {first.line + 1}); YAML "
                        "keys must be unique and plinth will not silently keep the last one. "
                        "Remove one of them",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.add_constructor(
    "tag:yaml.org,2002:map", yaml.constructor.SafeConstructor.construct_yaml_map
)


def safe_load(text: str | bytes) -> Any:
    """`yaml.safe_load` with plinth's limits; raises yaml.YAMLError (LimitError for limits)."""
    loader = _Loader(text)
    try:
        return loader.get_single_data()
    except RecursionError:  # a structure the limits above did not foresee
        raise LimitError(
            None, None, f"nesting too deep to read (keep it under {MAX_DEPTH} levels)", None
        ) from None
    finally:
        loader.dispose()


def describe_error(err: yaml.YAMLError) -> str:
    """' at line L, column C: problem' for a YAML error, one line, input quoted briefly."""
    mark = getattr(err, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    text = f"{context}; {problem}" if context and not isinstance(err, LimitError) else problem
    text = " ".join(str(text).split())
    if len(text) > 2 * QUOTE_LIMIT:
        text = text[: 2 * QUOTE_LIMIT] + "..."
    return f"{at}: {text}"


def read_yaml_file(path: str | Path, what: str = "YAML file") -> Any:
    """Read and safely parse one YAML file; any problem is a one-paragraph UsageError."""
    p = Path(path)
    if p.exists() and not p.is_file():  # a FIFO or device would block or never end
        raise UsageError(f"{what} {p} is not a regular file; give the path of a YAML file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{what} {p} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {what} {p}: {e.strerror or e}") from None
    try:
        return safe_load(text)
    except yaml.YAMLError as e:
        fix = (
            "" if isinstance(e, LimitError)
            else " Check the indentation and quoting there (values with ':' or '#' need quotes)."
        )
        raise UsageError(f"{what} {p} is not valid YAML{describe_error(e)}.{fix}") from None
