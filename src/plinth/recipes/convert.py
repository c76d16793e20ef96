"""`plinth import` and `plinth export`: Hugging Face checkpoints in and out.

    plinth import ref-smollm2 models/smollm2
    plinth export models/smollm2 hf/smollm2 --format hf

Import is plinth.hf.importer's alone; export loads the model first (plinth.load), folds a
fine-tune's adapters in (plinth.finetune.base.merged_base) and hands the plain model to
plinth.hf.exporter. Imports happen inside the functions, so `--help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal


def import_cmd(source: str, out: str, *, force: bool = False) -> int:
    """Import a Hugging Face model into a plinth model directory.

    Reads a Hugging Face model directory (config.json + model.safetensors or
    pytorch_model.bin + tokenizer.json) or a GGUF file (dequantised to fp32), for the Llama
    family (llama, SmolLM, mistral, qwen2, qwen3), GPT-2 and BERT. OUT gets config.yaml,
    model.safetensors (plinth names), tokenizer.json, hf_config.json and import.json; plinth
    generate and fine-tuning load it like a run directory. Nothing is downloaded.

    Args:
        source: model directory, .gguf file, or a reference model (ref-smollm2, ref-minilm)
        out: directory to write the plinth model to
        force: replace OUT if it already exists
    """
    from plinth.config.yamlio import read_yaml_file
    from plinth.hf.importer import import_model
    from plinth.hf.layout import IMPORT_FILE

    path = import_model(source, out, force=force)
    info = json.loads((path / IMPORT_FILE).read_text())
    print(
        f"imported {source} -> {path}: {info['family']} ({info['model_type']}), "
        f"{info['params']:,} parameters, {info['format']}"
    )
    print(f"fingerprint {info['fingerprint']}")
    for note in info["notes"]:
        print(f"note: {note}")
    if read_yaml_file(path / "config.yaml", "config")["model"]["arch"] == "decoder":
        print(f'try: plinth generate {path} --prompt "Hello" --temperature 0')
    print(f"back to Hugging Face: plinth export {path} OUT --format hf")
    return 0


def export_cmd(model: str, out: str, *, format: Literal["hf"] = "hf", force: bool = False) -> int:
    """Export a plinth model in the Hugging Face layout.

    MODEL is a run directory (its latest checkpoint), a checkpoint directory or an imported
    model directory. OUT gets config.json (model_type and architectures of the matching
    family), model.safetensors under Hugging Face names and the tokenizer files, loadable with
    transformers' AutoModel*.from_pretrained(OUT).

    Args:
        model: run, checkpoint or imported model directory
        out: directory to write the Hugging Face model to
        format: output format
        force: replace OUT if it already exists
    """
    path = export_model(model, out, format=format, force=force)
    config = json.loads((Path(path) / "config.json").read_text())
    print(f"exported {model} -> {path}: {config['architectures'][0]} ({config['model_type']})")
    return 0


def export_model(
    model: str | Path, out: str | Path, format: str = "hf", force: bool = False
) -> Path:
    """Write a run, checkpoint or imported directory as a Hugging Face model directory."""
    from plinth.errors import UsageError
    from plinth.finetune.base import merged_base
    from plinth.hf.exporter import export_hf
    from plinth.hf.layout import check_out
    from plinth.load import find_run, load_trained

    if format != "hf":
        raise UsageError(f"export format {format!r} is not supported; use --format hf")
    out = Path(out)
    check_out(out, force)  # before loading anything
    run, _ = find_run(Path(model))
    net, _, cfg = load_trained(model)
    if cfg.finetune.base is not None:  # adapters folded in, heads left out
        net = merged_base(net, cfg)
    return export_hf(net, cfg, run, out, force=force)
