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


def export_cmd(model: str, out: str, *, format: Literal["hf"] = "hf", head: str = "auto",
               force: bool = False) -> int:
    """Export a plinth model in the Hugging Face layout.

    MODEL is a run directory (its latest checkpoint), a checkpoint directory or an imported
    model directory. OUT gets config.json (model_type and architectures of the matching
    family), model.safetensors under Hugging Face names and the tokenizer files, loadable with
    transformers' AutoModel*.from_pretrained(OUT). A fine-tune with a classification/regression
    head exports as a sequence classifier: id2label, label2id, num_labels and problem_type in
    config.json, the head as `classifier` (BERT) or `score` (decoders), and modeling_plinth.py
    for plinth's pooling, loaded with AutoModelForSequenceClassification.from_pretrained(OUT,
    trust_remote_code=True).

    Args:
        model: run, checkpoint or imported model directory
        out: directory to write the Hugging Face model to
        format: output format
        head: the task head to export with the model: auto (the run's only head, if any), a
            task name (a run with several heads), or none (the base model alone)
        force: replace OUT if it already exists
    """
    path = export_model(model, out, format=format, force=force, head=head)
    config = json.loads((Path(path) / "config.json").read_text())
    print(f"exported {model} -> {path}: {config['architectures'][0]} ({config['model_type']})")
    if "plinth_task" in config:
        labels = ", ".join(config["id2label"].values())
        print(f"head {config['plinth_task']} ({config['problem_type']}; {labels[:200]}), "
              f"pooling {config['plinth_pooling']}; load it with transformers' "
              f"AutoModelForSequenceClassification.from_pretrained({str(path)!r}, "
              "trust_remote_code=True)")
    return 0


def export_model(
    model: str | Path, out: str | Path, format: str = "hf", force: bool = False,
    head: str = "auto",
) -> Path:
    """Write a run, checkpoint or imported directory as a Hugging Face model directory (with
    its task head `head`: auto, a task name or none; see export_cmd)."""
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
    chosen = _export_head(net, cfg, head, model)
    base_dir = None
    if cfg.finetune.base is not None:  # adapters folded in, heads exported or left out
        net = merged_base(net, cfg, note=chosen is None)
        base_dir = _base_dir(cfg.finetune.base)
    return export_hf(net, cfg, run, out, force=force, head=chosen, base_dir=base_dir)


def _export_head(net, cfg, head: str, model):
    """The ExportHead `head` selects (None: export the base alone)."""
    from plinth.config.tasks import head_labels
    from plinth.errors import UsageError
    from plinth.hf.exporter import ExportHead
    from plinth.models.heads import resolve_pooling

    heads = head_labels(cfg) if getattr(net, "heads", None) is not None else {}
    if head == "none" or (head == "auto" and not heads):
        return None
    if head == "auto":
        if len(heads) > 1:
            raise UsageError(
                f"{model} has several task heads ({', '.join(heads)}); a Hugging Face "
                "sequence classifier holds one: choose it with --head NAME (or --head none for "
                "the base model alone)"
            )
        head = next(iter(heads))
    if head not in heads:
        has = f"its heads: {', '.join(heads)}" if heads else "it has no task head"
        raise UsageError(f"--head {head[:200]!r}: {model} has no such head ({has}); use "
                         "--head auto, a head's name, or none")
    kind, labels = heads[head]
    linear = net.heads[head]
    return ExportHead(task=head, kind=kind, labels=labels,
                      pooling=resolve_pooling(cfg.finetune.pooling, cfg.model.arch),
                      weight=linear.weight, bias=linear.bias)


def _base_dir(base: str) -> Path | None:
    """The fine-tune's base directory, resolved like finetune.base (None if it is gone: the
    export then has no original config.json to start from)."""
    from plinth.errors import UsageError
    from plinth.load import resolve

    try:
        return resolve(base, "finetune.base")
    except UsageError:
        return None
