"""`plinth config ...`: explain, show, validate, schema, presets.

plinth config explain                  # sections
plinth config explain optim            # the fields of a section
plinth config explain optim.lr configs/quickstart.yaml optim.lr=3e-4
plinth config show configs/quickstart.yaml model.n_layers=4
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from plinth.config.bases import load_with_base_dir, peek_base, relative_to_config
from plinth.config.checks import cuda_visible, environment_warnings, reject_unsupported
from plinth.config.load import (
    DEFAULT,
    Resolved,
    allowed_values,
    bounds_text,
    get_value,
    leaf_fields,
    load_config,
    lookup,
    sections,
    split_args,
    type_text,
)
from plinth.config.preflight import UNSUPPORTED_BY, preflight
from plinth.config.presets import PRESETS
from plinth.config.render import format_value, render_yaml
from plinth.config.schema import Config, ModelConfig, Section
from plinth.config.yamlio import quote
from plinth.errors import ConfigError


def _console() -> Console:
    # piped output (tests, `| less`) would otherwise wrap tables at 80 columns
    width = max(110, shutil.get_terminal_size((120, 24)).columns)
    return Console(highlight=False, width=width)


def _first_sentence(text: str | None) -> str:
    """The first sentence (or two, when the first is a bare label like "Optimizer.")."""
    text = " ".join((text or "").split())
    ends = [m.end() for m in re.finditer(r"[.:] (?=[A-Z])", text)]
    for end in ends:
        if end >= 30:
            return text[:end].strip()
    return text


def load_with_base(files, overrides, notes: list[str] | None = None) -> Resolved:
    """load_config, with a fine-tune's base model (finetune.base) as the lowest layer, so the
    model shown is the one that will train. Never imports a model or torch: a base not imported
    yet is left out (a note in `notes` says so)."""
    resolved = load_config(files, overrides)
    base = resolved.config.finetune.base
    if base is None:
        return resolved
    base_dir, note = peek_base(base)
    if base_dir is None:
        if notes is not None and note:
            notes.append(note)
        relative_to_config(resolved)
        return resolved
    return load_with_base_dir(files, overrides, base_dir)


def explain(key: str | None = None, configs: list[str] = ()) -> int:
    """Explain config options: what each does, its trade-off, type, default and current value.

    With no KEY, lists the sections; with a section (e.g. `optim`), its fields; with a field
    (e.g. `optim.lr`), the whole story, including where its current value came from.

    Args:
        key: a section or dotted field, e.g. optim or optim.lr
        configs: config files and key=value overrides that set the current values
    """
    if key is not None and ("=" in key or key.endswith((".yaml", ".yml"))):
        configs, key = [key, *configs], None  # no key given, only config files/overrides
    files, overrides = split_args(configs)
    notes: list[str] = []
    resolved = load_with_base(files, overrides, notes)
    con = _console()
    for note in notes:
        con.print(f"[yellow]note:[/] {escape(note)}")
    if key is None:
        _explain_overview(con, resolved)
    else:
        _, _, info = lookup(key)
        sub = (
            info.annotation
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
            else None
        )
        if sub is not None:
            _explain_section(con, key, sub, resolved)
        else:
            _explain_field(con, key, info, resolved)
    return 0


def _explain_overview(con: Console, resolved: Resolved) -> None:
    con.print(
        "[bold]plinth config[/] — sections (run `plinth config explain SECTION` for fields)\n"
    )
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("key")
    table.add_column("fields", justify="right")
    table.add_column("what it covers")
    for name, info in Config.model_fields.items():
        sub = (
            info.annotation
            if isinstance(info.annotation, type) and issubclass(info.annotation, Section)
            else None
        )
        if sub is None:
            table.add_row(name, "", escape(_first_sentence(info.description)))
    for key, sub in sections():
        n = sum(1 for _ in leaf_fields(sub))
        table.add_row(key, str(n), escape(_first_sentence(sub.__doc__)))
    con.print(table)
    changed = resolved.non_default()
    if changed:
        con.print(
            f"\n{len(changed)} value(s) differ from the defaults; `plinth config show` lists them."
        )


def _explain_section(con: Console, key: str, sub: type[Section], resolved: Resolved) -> None:
    con.print(f"[bold]{key}[/] — {escape(_first_sentence(sub.__doc__))}\n")
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("key", "type", "default", "current", "what it does"):
        table.add_column(col)
    for name, info in sub.model_fields.items():
        full = f"{key}.{name}"
        if isinstance(info.annotation, type) and issubclass(info.annotation, Section):
            table.add_row(
                escape(full), "section", "", "", escape(_first_sentence(info.description))
            )
            continue
        current = get_value(resolved.config, full)
        src = resolved.source(full)
        cur = escape(format_value(current))
        if src != DEFAULT:
            cur += f" [dim]({escape(src)})[/]"
        default = info.get_default(call_default_factory=True)
        table.add_row(
            escape(full),
            escape(type_text(info)),
            escape(format_value(default)),
            cur,
            escape(_first_sentence(info.description)),
        )
    con.print(table)


def _explain_field(con: Console, key: str, info: Any, resolved: Resolved) -> None:
    default = info.get_default(call_default_factory=True)
    current = get_value(resolved.config, key)
    con.print(f"[bold]{key}[/]\n")
    con.print(escape(" ".join((info.description or "").split())) + "\n")
    rows = [("type", type_text(info))]
    allowed = allowed_values(info)
    if allowed:
        rows.append(("allowed", ", ".join(map(str, allowed))))
    bounds = bounds_text(info)
    if bounds:
        rows.append(("range", bounds))
    rows.append(("default", format_value(default)))
    rows.append(("current", f"{format_value(current)}   (from {resolved.source(key)})"))
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        con.print(f"  {label.ljust(width)}  {escape(value)}")


def show(config: str | None = None, overrides: list[str] = (), *, all: bool = False) -> int:
    """Print the resolved config as YAML, each non-default value annotated with its source.

    Sources are: default < preset < file < command line. The output is valid YAML that
    reproduces the config.

    Args:
        config: a YAML config file or a shipped recipe name (omit for the defaults)
        overrides: key=value pairs applied last, e.g. model.n_layers=4
        all: annotate every value with its source, defaults included
    """
    files, overs = split_args([config] if config else [], overrides)
    notes: list[str] = []
    resolved = load_with_base(files, overs, notes)
    print(render_yaml(resolved, annotate_defaults=all))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def validate(configs: list[str], *, quiet: bool = False) -> int:
    """Check config files without running anything; each file is checked on its own.

    Refuses what `plinth pretrain` (or `plinth finetune`, when finetune.base is set) would
    refuse before training: the schema, the batch and vocab arithmetic, options the recipe
    does not honour, data sources and the run directory, as one paragraph with the key, the
    file and the fix (exit code 2). Otherwise prints a one-line summary per file plus any
    warnings about running it on this machine. Imports no model and no torch (a second or so).

    Args:
        configs: YAML files (or shipped recipe names), then key=value overrides for each
        quiet: print nothing on success
    """
    files, overrides = split_args(configs)
    if not files:
        raise ConfigError("give at least one config file to validate, e.g. configs/quickstart.yaml")
    con = _console()
    for file in files:
        notes: list[str] = []
        resolved = load_with_base([file], overrides, notes)
        recipe = recipe_of(resolved.config)
        check_recipe(resolved, recipe)
        cfg, m = resolved.config, resolved.config.model
        if not quiet:
            model = "" if notes else (
                f"{m.arch} {m.n_layers}x{m.d_model}, {m.param_count() / 1e6:.1f}M parameters, "
            )
            con.print(
                f"[green]ok[/] {escape(str(resolved.files[0]))}: {model}"
                + (f"objective {cfg.objective}" if recipe == "pretrain" else
                   f"align {cfg.align.method} ({cfg.finetune.method}) of "
                   f"{escape(cfg.finetune.base)}" if recipe == "align" else
                   f"finetune {cfg.finetune.method} of {escape(cfg.finetune.base)}")
                + f", optimizer {cfg.optim.name}"
            )
        for n in resolved.notes:  # what pretrain/finetune would adjust at start
            con.print(f"note: {escape(n)}")
        for w in [*notes, *environment_warnings(resolved, cuda_available=cuda_visible())]:
            con.print(f"[yellow]warning:[/] {escape(w)}")
    return 0


def recipe_of(cfg) -> str:
    """Which training command a config is for: pretrain, finetune or align."""
    if cfg.finetune.base is None:
        return "pretrain"
    return "align" if cfg.align.dataset is not None else "finetune"


def check_recipe(resolved: Resolved, recipe: str) -> None:
    """What `plinth pretrain`/`plinth finetune` refuse before any work (one process)."""
    reject_unsupported(resolved, UNSUPPORTED_BY[recipe], recipe)
    preflight(resolved, 1, recipe)
    cfg = resolved.config
    if recipe == "pretrain":  # the checks `plinth data prepare` makes before reading anything
        from plinth.data.sources import check_source_config

        if not cfg.data.sources:
            raise ConfigError(
                "data.sources is empty; add at least one source (e.g. kind: stdlib_code)"
            )
        for i, src in enumerate(cfg.data.sources):
            check_source_config(src, f"data.sources[{i}]")
        if cfg.data.decontaminate:  # the evaluation sets exist and are readable
            from plinth.data.clean import decontam_spec

            decontam_spec(cfg.data, build=False)
    elif recipe == "align":
        _check_align(resolved)
    else:
        from plinth.config.tasks import head_sizes, task_specs

        for spec in task_specs(cfg):
            key = "finetune" if spec.name == "main" else f"finetune.tasks[{spec.name}]"
            for field, path in (("dataset", spec.dataset), ("val_dataset", spec.val_dataset)):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(
                        f"{key}.{field} {quote(path)} (from {resolved.source(f'finetune.{field}')})"
                        " does not exist; point it at a JSONL file (relative paths are read "
                        "from the working directory or next to the config file)."
                    )
        head_sizes(cfg)


def _check_align(resolved: Resolved) -> None:
    """The files `plinth align` reads exist; reward functions import (before any training)."""
    cfg = resolved.config
    for field in ("dataset", "val_dataset"):
        path = getattr(cfg.align, field)
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                f"align.{field} {quote(path)} (from {resolved.source(f'align.{field}')}) does "
                "not exist; point it at a JSONL file (relative paths are read from the working "
                "directory or next to the config file)."
            )
    if cfg.align.data_kind == "prompt":
        from plinth.align.rewards import check_rewards

        check_rewards(cfg)


def schema(*, output: str | None = None) -> int:
    """Write the JSON Schema of the config, for editor completion and validation of YAML files.

    Args:
        output: file to write (default: print to stdout)
    """
    text = json.dumps(Config.model_json_schema(), indent=2)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


def presets() -> int:
    """List the named presets (`preset=NAME`), with the parameter count each one builds."""
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    for col in ("preset", "parameters", "what it is"):
        table.add_column(col)
    for p in PRESETS.values():
        model_values = {
            k.split(".", 1)[1]: v for k, v in p.values.items() if k.startswith("model.")
        }
        n = ModelConfig(**model_values).param_count()
        table.add_row(p.name, f"{n / 1e6:,.1f}M", escape(p.summary))
    _console().print(table)
    return 0
