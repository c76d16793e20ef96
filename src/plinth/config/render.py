"""The resolved config as YAML, each non-default value annotated with its source.

    python -c "from plinth.config.load import load_config; from plinth.config.render import \
render_yaml; print(render_yaml(load_config(['configs/quickstart.yaml'], [])))"

This is what `plinth config show` prints and what every run writes as its config.yaml; the
report reads the `# source` comments back (plinth.report.rundata).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from plinth.config.load import DEFAULT, Resolved
from plinth.config.schema import Section


def format_value(value: Any) -> str:
    """One value as inline YAML (flow style), e.g. `[1, 2]` or `null`."""
    value = to_jsonable_python(value)  # sections inside lists, tuples -> plain YAML types
    return (
        yaml.safe_dump(value, default_flow_style=True, width=10_000)
        .strip()
        .removesuffix("...")
        .strip()
    )


def render_yaml(resolved: Resolved, annotate_defaults: bool = False) -> str:
    """The config as YAML with `# source` comments (what `config show` prints)."""
    lines: list[str] = []

    def emit(model: BaseModel, prefix: str, indent: int) -> None:
        for name, _info in type(model).model_fields.items():
            value = getattr(model, name)
            full = f"{prefix}{name}"
            pad = "  " * indent
            if isinstance(value, Section):
                lines.append(f"{pad}{name}:")
                emit(value, f"{full}.", indent + 1)
                continue
            src = resolved.source(full)
            note = f"  # {src}" if (src != DEFAULT or annotate_defaults) else ""
            lines.append(f"{pad}{name}: {format_value(value)}{note}")

    emit(resolved.config, "", 0)
    return "\n".join(lines)
