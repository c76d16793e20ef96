"""The pretrained model a fine-tune starts from (`finetune.base`).

A base is any model argument plinth.load resolves (a run, checkpoint, `plinth import`
directory, Hugging Face directory, GGUF file or reference model by name).

The base decides the architecture and the tokenizer: `base_defaults` turns its config into the
lowest config layer of the fine-tune ("base model DIR" in `plinth config show`), so the run's own
config.yaml holds the whole model and resumes/loads without the base.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from plinth.config.bases import (  # noqa: F401 (the pure half lives in the config layer)
    CHANGEABLE,
    base_defaults,
    check_architecture,
)
from plinth.errors import UsageError
from plinth.hf.layout import IMPORT_FILE


def base_info(base_dir: Path) -> dict:
    """What the manifest records about the base: path, and its import record if any."""
    from plinth.load import read_json

    info: dict = {"dir": str(base_dir.resolve())}
    rec = base_dir / IMPORT_FILE
    if rec.is_file():
        data = read_json(rec)
        keep = ("source", "family", "fingerprint", "params", "special_tokens")
        info.update({k: data.get(k) for k in keep})
    return info


def merged_base(model: nn.Module, cfg, note: bool = True) -> nn.Module:
    """A fine-tuned model as a plain model of the base architecture: LoRA/DoRA/IA3 folded into
    the weights, task heads left out (they stay in the run's checkpoints). What `plinth export`
    writes (`note`: say the heads are left out). Methods that add computation a plain model
    cannot hold are refused."""
    from plinth.models import build_model
    from plinth.peft.apply import merge

    method = getattr(model, "peft_method", None)
    heads = getattr(model, "heads", None)
    if method in (None, "full") and heads is None:
        return model
    if method in ("adapter", "prefix", "qlora"):
        why = {
            "adapter": "bottleneck adapters add layers",
            "prefix": "prefixes add key/value positions",
            "qlora": "its base weights are 4-bit",
        }[method]
        raise UsageError(
            f"this run was fine-tuned with finetune.method={method}, which cannot be folded into "
            f"a plain model ({why}). Export the base and ship the run's adapter/ directory next "
            "to it (peft and plinth load it), or fine-tune with lora, dora, ia3 or full."
        )
    if method not in (None, "full"):
        merge(model)
    plain = build_model(cfg.model)
    state = model.state_dict()
    plain.load_state_dict({k: state[k] for k in plain.state_dict()})
    if heads is not None and note:
        print(f"note: task heads ({', '.join(heads)}) are not part of the base architecture; "
              "they stay in the run's checkpoints")
    return plain.eval()
