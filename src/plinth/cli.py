"""The `plinth` command: one table of command name -> plain function, nothing else.

    plinth --help
    plinth config explain optim.lr

Each command is a plain Python function (also usable from Python). Its signature becomes the
arguments: ordinary parameters are positional (optional when they have a default, several
values when typed `list`), keyword-only ones (after `*`) are `--options` (`bool` ones are
flags), and the docstring's `Args:` section is the help text.
Targets are imported only when their command runs, so `plinth --help` never imports torch.
Exit codes: 0 ok, 1 the work failed, 2 bad input (see plinth.errors).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import typing
from collections.abc import Callable, Sequence

# command -> ("module:function", one-line summary shown by `plinth --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": (
        "plinth.recipes.quickstart:quickstart",
        "prepare the built-in corpus, train a small model on this machine, show what it learned",
    ),
    "data prepare": (
        "plinth.data.commands:prepare",
        "clean, deduplicate and tokenize a corpus into packed shards",
    ),
    "data inspect": (
        "plinth.data.commands:inspect",
        "statistics and samples of a prepared dataset",
    ),
    "data contamination": (
        "plinth.eval.contam_cmd:contamination_cmd",
        "n-gram overlap between a prepared dataset and evaluation sets, per set",
    ),
    "data tokenizer train": (
        "plinth.data.commands:tokenizer_train",
        "train a BPE, WordPiece or Unigram tokenizer",
    ),
    "pretrain": (
        "plinth.recipes.pretrain:pretrain",
        "train a decoder, encoder or encoder-decoder from scratch (resumable)",
    ),
    "finetune": (
        "plinth.recipes.finetune:finetune",
        "adapt a pretrained model: full, LoRA/QLoRA/..., SFT or task heads (resumable)",
    ),
    "align": (
        "plinth.recipes.align:align",
        "align a model: DPO/SimPO/ORPO/KTO on preferences, reward models, GRPO/RLOO (resumable)",
    ),
    "plan": (
        "plinth.recipes.plan:plan_cmd",
        "memory per device, largest micro-batch, tokens/s and wall time before a run",
    ),
    "generate": (
        "plinth.recipes.generate:generate_cmd",
        "generate text from a model: prompts or a JSONL file, sampling controls, beam search",
    ),
    "chat": (
        "plinth.recipes.chat:chat_cmd",
        "chat with a model in the terminal (its chat template, streamed replies)",
    ),
    "serve": (
        "plinth.recipes.serve:serve",
        "OpenAI-compatible HTTP server (completions, chat, streaming) with continuous batching",
    ),
    "classify": (
        "plinth.recipes.classify:classify_cmd",
        "label texts with a fine-tuned classification/regression head (--text or --file)",
    ),
    "eval": (
        "plinth.eval.commands:eval_cmd",
        "score a model on tasks (multiple choice, generation) and perplexity / bits per byte",
    ),
    "import": (
        "plinth.recipes.convert:import_cmd",
        "import a Hugging Face model directory or GGUF file as a plinth model",
    ),
    "export": (
        "plinth.recipes.convert:export_cmd",
        "export a run, checkpoint or imported model in the Hugging Face layout",
    ),
    "config explain": (
        "plinth.recipes.config:explain",
        "what an option does, its default and source",
    ),
    "config show": (
        "plinth.recipes.config:show",
        "print a resolved config with where each value came from",
    ),
    "config validate": (
        "plinth.recipes.config:validate",
        "check config files without running anything",
    ),
    "config schema": (
        "plinth.recipes.config:schema",
        "write the JSON Schema of the config (for editors)",
    ),
    "config presets": ("plinth.recipes.config:presets", "list the named presets and their sizes"),
    "report": ("plinth.report.report:report", "write a self-contained HTML overview of a run"),
    "compare": (
        "plinth.report.compare:compare",
        "compare runs: config/version diff, overlaid curves, final metrics, divergence",
    ),
    "runs": ("plinth.report.runs:runs", "list runs under a directory with status and metrics"),
}


def _target(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def _doc_parts(fn: Callable) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (description, {param: help})."""
    doc = inspect.getdoc(fn) or ""
    description, _, args_block = doc.partition("\nArgs:\n")
    helps: dict[str, str] = {}
    current = None
    for line in args_block.splitlines():
        m = re.match(r"^\s{2,4}(\w+)(?: \(.*?\))?: (.*)$", line)
        if m:
            current = m.group(1)
            helps[current] = m.group(2).strip()
        elif current and line.strip() and line.startswith(" " * 6):
            helps[current] += " " + line.strip()
        elif not line.strip():
            current = None
    return description.strip(), helps


def _add_arguments(parser: argparse.ArgumentParser, fn: Callable) -> None:
    hints = typing.get_type_hints(fn)
    _, helps = _doc_parts(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = hints.get(name, str)
        help_text = helps.get(name, "")
        origin = typing.get_origin(tp)
        choices = list(typing.get_args(tp)) if origin is typing.Literal else None
        if param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            # positional: required unless it has a default; lists take several values
            if name == "overrides":
                help_text = help_text or "config overrides, e.g. optim.lr=3e-4 model.n_layers=4"
            optional = param.default is not inspect.Parameter.empty
            nargs = ("*" if optional else "+") if origin is list else ("?" if optional else None)
            parser.add_argument(
                name,
                nargs=nargs,
                choices=choices,
                help=help_text,
                metavar="KEY=VALUE" if name == "overrides" else name.upper(),
                **({"default": param.default} if optional else {}),
            )
        elif tp is bool:
            if param.default:
                parser.add_argument(
                    f"--no-{name.replace('_', '-')}",
                    dest=name,
                    action="store_false",
                    help=help_text,
                )
            else:
                parser.add_argument(
                    f"--{name.replace('_', '-')}", dest=name, action="store_true", help=help_text
                )
        else:
            scalar = _scalar_type(tp)
            kwargs: dict = {
                "dest": name,
                "default": param.default,
                "help": _with_default(help_text, param.default),
            }
            if origin is list or scalar is list:
                # `--text a --text b` and `--text a b` both give [a, b] (repeats add up)
                kwargs.update(nargs="*", action="extend")
                if isinstance(param.default, tuple):
                    kwargs["default"] = list(param.default)
            elif choices:
                kwargs["choices"] = choices
            elif scalar in (int, float):
                kwargs["type"] = scalar
            parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)


def _scalar_type(tp: typing.Any) -> typing.Any:
    """int | None -> int; plain types pass through."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _scalar_type(args[0]) if len(args) == 1 else str
    return typing.get_origin(tp) or tp


def _with_default(text: str, default: typing.Any) -> str:
    return f"{text} (default: {default})" if default not in (None, (), "") else text


def build_parser(selected: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser; only the command named in `selected` imports its function."""
    from plinth import __version__

    parser = argparse.ArgumentParser(
        prog="plinth",
        description="plinth: train, adapt, evaluate, compress and serve foundation models.",
        epilog="Run `plinth COMMAND --help` for a command's arguments. Exit codes: 0 ok, "
        "1 failure, 2 bad input.",
    )
    parser.add_argument("--version", action="version", version=f"plinth {__version__}")
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {
        (): parser.add_subparsers(dest="command", metavar="COMMAND")
    }
    made: dict[tuple[str, ...], argparse.ArgumentParser] = {(): parser}
    for name, (spec, summary) in COMMANDS.items():
        words = tuple(name.split())
        for i in range(1, len(words)):  # group parsers such as `config`
            prefix = words[:i]
            if prefix not in made:
                members = [c.split()[i] for c in COMMANDS if tuple(c.split()[:i]) == prefix]
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=", ".join(members))
                made[prefix] = sub
                groups[prefix] = sub.add_subparsers(dest=f"command_{i}", metavar="COMMAND")
        is_selected = list(words) == list(selected[: len(words)])
        fn = _target(spec) if is_selected else None
        description = _doc_parts(fn)[0] if fn else summary
        sub = groups[words[:-1]].add_parser(
            words[-1],
            help=summary,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(_command=name)
        if fn is not None:
            _add_arguments(sub, fn)
        made[words] = sub
    return parser


def _selected(argv: Sequence[str]) -> list[str]:
    words = [a for a in argv if not a.startswith("-")]
    for n in range(len(words), 0, -1):
        if " ".join(words[:n]) in COMMANDS:
            return words[:n]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    from plinth.errors import EXIT_USAGE, PlinthError

    argv = list(sys.argv[1:] if argv is None else argv)
    selected = _selected(argv)
    if selected and argv[: len(selected)] == selected:
        # the command's own parser, so options and key=value overrides may come in any order
        # (argparse's intermixed parsing does not work through subparsers)
        command = " ".join(selected)
        fn = _target(COMMANDS[command][0])
        leaf = argparse.ArgumentParser(
            prog=f"plinth {command}",
            description=_doc_parts(fn)[0],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_arguments(leaf, fn)
        args = leaf.parse_intermixed_args(argv[len(selected) :])
    else:
        parser = build_parser(selected)
        args = parser.parse_args(argv)
        command = getattr(args, "_command", None)
    if command is None:  # `plinth` or `plinth config` alone: show what exists
        group = [a for a in argv if not a.startswith("-")][:1]
        if group and group[0] in {c.split()[0] for c in COMMANDS}:
            try:
                parser.parse_args([*group, "--help"])  # prints the group's help
            except SystemExit:
                return EXIT_USAGE
        parser.print_help()
        return EXIT_USAGE
    kwargs = {k: v for k, v in vars(args).items() if not k.startswith(("_", "command"))}
    try:
        result = _target(COMMANDS[command][0])(**kwargs)
    except PlinthError as e:
        _print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except BrokenPipeError:  # `plinth ... | head`: the reader left, which is not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(result or 0)


def _print_error(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/] {escape(message)}"
    )
