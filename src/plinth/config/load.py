"""Resolve a config from layers, remembering where every value came from.

    plinth config show configs/quickstart.yaml model.n_layers=4

Precedence, lowest first: schema defaults < preset < YAML files (in order) < `key=value`
overrides. Each layer is flattened to dotted keys, so a file that sets `optim.lr` leaves the
rest of `optim` to lower layers. Files are read with plinth.config.yamlio (`yaml.safe_load`
with limits on aliases, depth and duplicate keys). Every problem
becomes a `ConfigError`: one paragraph naming the key, where its value came from, and the fix.
"""

from __future__ import annotations

import difflib
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from plinth.config.presets import PRESETS
from plinth.config.schema import Config, Section
from plinth.config.yamlio import LimitError, describe_error, quote, safe_load
from plinth.errors import ConfigError

DEFAULT = "default"
CLI = "command line"

# Shipped recipes live in configs/ at the repository root (editable installs) and inside the
# package (wheels), so `plinth pretrain quickstart` works either way.
_PACKAGE_DIR = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG_DIRS = (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent.parent / "configs")


@dataclass
class Resolved:
    """A validated config plus the source of each leaf value (dotted key -> source)."""

    config: Config
    sources: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # adjustments made at start, said once

    def source(self, key: str) -> str:
        return self.sources.get(key, DEFAULT)

    def non_default(self) -> dict[str, str]:
        return {k: s for k, s in self.sources.items() if s != DEFAULT}


# ------------------------------------------------------------------------------ schema walking


def _section_type(info: FieldInfo) -> type[Section] | None:
    ann = info.annotation
    return ann if isinstance(ann, type) and issubclass(ann, Section) else None


def leaf_fields(
    model: type[BaseModel] = Config, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo]]:
    """Every settable leaf of the schema as (dotted key, field info), in declaration order."""
    for name, info in model.model_fields.items():
        sub = _section_type(info)
        if sub is not None:
            yield from leaf_fields(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def sections(
    model: type[BaseModel] = Config, prefix: str = ""
) -> Iterator[tuple[str, type[Section]]]:
    """Every section (nested ones too) as (dotted key, class)."""
    for name, info in model.model_fields.items():
        sub = _section_type(info)
        if sub is not None:
            yield f"{prefix}{name}", sub
            yield from sections(sub, f"{prefix}{name}.")


def lookup(key: str) -> tuple[type[BaseModel], str, FieldInfo]:
    """(owning class, field name, field info) for a dotted key; ConfigError if unknown."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            raise ConfigError(_unknown_key_message(key, model, parts[:i]))
        if i == len(parts) - 1:
            return model, part, info
        sub = _section_type(info)
        if sub is None:
            raise ConfigError(
                f"'{key}' is not a config key: '{'.'.join(parts[: i + 1])}' is a value, not a "
                f"section. Set it directly, e.g. {'.'.join(parts[: i + 1])}=..."
            )
        model = sub
    raise ConfigError(f"empty config key {key!r}")  # unreachable for non-empty keys


def all_keys() -> list[str]:
    return [k for k, _ in sections()] + [k for k, _ in leaf_fields()]


def _unknown_key_message(key: str, model: type[BaseModel], parent: list[str]) -> str:
    where = ".".join(parent) or "the top level"
    siblings = [".".join([*parent, n]) for n in model.model_fields]
    guess = difflib.get_close_matches(key, siblings, n=2, cutoff=0.6)
    guess = guess or difflib.get_close_matches(key, all_keys(), n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(g) for g in guess)}?" if guess else ""
    valid = ", ".join(n for n in model.model_fields)
    return f"unknown config key '{key}'.{hint} Valid keys in {where}: {valid}."


def get_value(obj: BaseModel, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------------------------- layers


def _flatten(data: dict, source: str, prefix: str = "", model: type[BaseModel] = Config) -> dict:
    """Nested mapping -> {dotted key: value}; sections recurse, everything else is a leaf."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if not isinstance(k, str):
            raise ConfigError(
                f"{source}: key {quote(k, 80)} under '{prefix or 'top level'}' must be a string; "
                "quote it or rename it"
            )
        key = f"{prefix}{k}"
        info = model.model_fields.get(k)
        if info is None:
            raise ConfigError(
                f"{source}: {_unknown_key_message(key, model, prefix.split('.')[:-1])}"
            )
        sub = _section_type(info)
        if sub is not None:
            if v is None:
                continue  # `optim:` with nothing under it
            if not isinstance(v, dict):
                raise ConfigError(
                    f"{source}: '{key}' is a section and needs a mapping of its keys, got "
                    f"{type(v).__name__} {quote(v, 80)}. Write e.g. `{key}: {{...}}` or set "
                    f"`{key}.<field>`."
                )
            flat.update(_flatten(v, source, f"{key}.", sub))
        else:
            flat[key] = v
    return flat


def read_yaml(path: str | Path) -> tuple[Path, dict]:
    """Safely read one YAML config file; missing, unreadable or malformed ones are ConfigErrors."""
    p = resolve_config_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"config file {p} is not UTF-8 text ({e.reason}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    try:
        data = safe_load(text)
    except yaml.YAMLError as e:
        fix = (
            "" if isinstance(e, LimitError)
            else " Check the indentation and quoting there (values with ':' or '#' need quotes)."
        )
        raise ConfigError(f"config file {p} is not valid YAML{describe_error(e)}.{fix}") from None
    if data is None:
        return p, {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {p} must hold a mapping of sections (e.g. `model:` / `optim:`), but its "
            f"top level is a {type(data).__name__}"
        )
    return p, data


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, else a shipped recipe by name (`quickstart` -> configs/quickstart.yaml)."""
    p = Path(path)
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"config path {p} is a directory; give a YAML file inside it")
    for d in SHIPPED_CONFIG_DIRS:
        for cand in (d / p.name, d / f"{p.name}.yaml"):
            if len(p.parts) == 1 and cand.is_file():
                return cand
    shipped = sorted({f.stem for d in SHIPPED_CONFIG_DIRS if d.is_dir() for f in d.glob("*.yaml")})
    guess = difflib.get_close_matches(p.stem, shipped, n=1)
    hint = f" Did you mean the shipped recipe '{guess[0]}'?" if guess else ""
    raise ConfigError(
        f"config file {p} does not exist.{hint} Shipped recipes (usable by name): "
        f"{', '.join(shipped) or 'none found'}."
    )


def split_args(*groups: Sequence[str]) -> tuple[list[str], list[str]]:
    """Command-line words -> (config files, key=value overrides); an existing file wins."""
    files: list[str] = []
    overrides: list[str] = []
    for group in groups:
        for word in group:
            (overrides if "=" in word and not Path(word).is_file() else files).append(word)
    return files, overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=3e-4` -> ('optim.lr', 3e-4); values are YAML, so lists and null work too."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(
            f"override {text!r} must look like key=value (e.g. optim.lr=3e-4 or "
            "model.n_layers=4); run `plinth config explain` for the keys"
        )
    try:
        value = safe_load(raw) if raw.strip() else None
    except LimitError as e:
        raise ConfigError(
            f"override {quote(key, 80)}=...: the value is not valid YAML{describe_error(e)}."
        ) from None
    except yaml.YAMLError:
        value = raw  # e.g. "a: b" - keep the text and let the schema judge it
    return key, value


# -------------------------------------------------------------------------------------- resolve


def load_config(
    files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
    defaults_source: str = "recipe",
) -> Resolved:
    """Resolve files + overrides into a validated Config with per-key provenance.

    `defaults` lets a recipe set its own starting values (above the schema defaults and
    below the preset); they are reported with `defaults_source`.
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if defaults:
        layers.append((defaults_source, dict(defaults)))
    paths = []
    for f in files:
        p, data = read_yaml(f)
        paths.append(p)
        layers.append((f"file {p}", _flatten(data, f"config file {p}")))
    cli: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        lookup(key)  # unknown keys fail here with a suggestion
        if _section_type(lookup(key)[2]) is not None:
            raise ConfigError(
                f"'{key}' is a section; override one of its keys, e.g. {key}.<field>=..."
            )
        cli[key] = value
    if cli:
        layers.append((CLI, cli))

    preset_name, preset_source = None, None
    for source, flat in layers:
        if flat.get("preset") is not None:
            preset_name, preset_source = flat["preset"], source
    if preset_name is not None:
        preset = PRESETS.get(str(preset_name))
        if preset is None:
            guess = difflib.get_close_matches(str(preset_name), PRESETS, n=1)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            raise ConfigError(
                f"unknown preset '{preset_name}' (from {preset_source}).{hint} Presets: "
                f"{', '.join(PRESETS)} (see `plinth config presets`)."
            )
        insert_at = 1 if defaults else 0
        layers.insert(insert_at, (f"preset {preset.name}", dict(preset.values)))

    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, flat in layers:
        for key, value in flat.items():
            merged[key] = value
            sources[key] = source

    nested: dict[str, Any] = {}
    for key, value in merged.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        config = Config.model_validate(nested)
    except ValidationError as e:
        raise ConfigError(_validation_message(e, merged, sources)) from None
    return Resolved(config=config, sources=sources, files=paths)


def _validation_message(err: ValidationError, values: dict, sources: dict) -> str:
    lines = []
    for item in err.errors():
        loc = [str(p) for p in item["loc"]]
        dotted = ".".join(loc)
        # find the deepest dotted key we know a source for (list items have numeric parts)
        key = dotted
        while key and key not in sources and "." in key:
            key = key.rsplit(".", 1)[0]
        msg = _short(item["msg"].removeprefix("Value error, ").rstrip("."))
        if key in sources:
            src = sources[key]
            if item["type"] == "missing":
                lines.append(
                    f"{dotted} is missing (in {key} from {src}): it is required. Fix: add "
                    f"{loc[-1]} there; see `plinth config explain {key}`."
                )
                continue
            shown = values.get(key) if key == dotted else item.get("input", values.get(key))
            lines.append(f"{dotted} = {quote(shown, 100)} (from {src}): {msg}.{_fix(key)}")
        else:
            where = key or "config (across sections)"
            related = sorted({s for k, s in sources.items() if k.startswith(f"{where}.")})
            origin = f" (values from {', '.join(related)})" if related else ""
            lines.append(f"{where}{origin}: {msg}.")
    if len(lines) > 5:
        lines = [*lines[:5], f"(and {len(lines) - 5} more)"]
    n = len(err.errors())
    head = "invalid config: " if n == 1 else f"invalid config ({n} problems): "
    return head + " ".join(lines)


def _short(msg: str) -> str:
    """A pydantic or validator message, cut so a huge quoted input cannot flood the paragraph."""
    msg = " ".join(msg.split())
    return msg if len(msg) <= 400 else msg[:400] + "..."


def _fix(key: str) -> str:
    try:
        _, _, info = lookup(key)
    except ConfigError:
        return ""
    allowed = allowed_values(info)
    bounds = bounds_text(info)
    parts = []
    if allowed:
        parts.append(f"allowed: {', '.join(map(str, allowed))}")
    if bounds:
        parts.append(f"must be {bounds}")
    if info.is_required():
        parts.append("required")
    else:
        default = to_jsonable_python(info.get_default(call_default_factory=True))
        parts.append(f"default {quote(default, 60)}")
    return (
        f" Fix: set {key} to a valid value ({'; '.join(parts)}); see `plinth config explain {key}`."
    )


def allowed_values(info: FieldInfo) -> list[Any]:
    """The choices of a Literal field (also inside Optional/list), else []."""
    out: list[Any] = []

    def visit(tp: Any) -> None:
        if typing.get_origin(tp) is typing.Literal:
            out.extend(typing.get_args(tp))
        for arg in typing.get_args(tp):
            if typing.get_origin(tp) is not typing.Literal:
                visit(arg)

    visit(info.annotation)
    return out


def bounds_text(info: FieldInfo) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for meta in info.metadata:
        for attr, op in ops.items():
            v = getattr(meta, attr, None)
            if v is not None:
                parts.append(f"{op} {v}")
    return " and ".join(parts)


def type_text(info: FieldInfo) -> str:
    """A short human type: 'int', 'float or null', 'one of: a | b', 'list of str'."""

    def name(tp: Any) -> str:
        origin = typing.get_origin(tp)
        if origin is typing.Literal:
            return "one of: " + " | ".join(map(str, typing.get_args(tp)))
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            return " or ".join("null" if a is type(None) else name(a) for a in typing.get_args(tp))
        if origin in (list, tuple):
            args = typing.get_args(tp)
            inner = ", ".join(name(a) for a in args if a is not Ellipsis)
            return f"list of {inner}" if origin is list else f"pair of ({inner})"
        return getattr(tp, "__name__", str(tp))

    return name(info.annotation)
