"""Plinth's linear layers <-> the modules of the model's Hugging Face equivalent, as peft names
them: the map adapters are saved and loaded under (plinth.peft.save), and the hint a Hugging Face
target pattern gets (plinth.peft.apply).

    python -c "from plinth.config.schema import ModelConfig as C; from plinth.models import \
build_model; from plinth.peft.names import hf_names; \
print(hf_names(build_model(C(n_layers=2))).hf('layers.0.attn.q_proj'))"

The family's parameter names (plinth.hf.families) give each layer its module; an adapted layer
(a WrappedLinear) is placed by the name of the linear layer it wraps, and an adapter's own
layers (lora_A, adapter_up, ...) are not placed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from plinth.config.schema import ModelConfig
from plinth.hf.families import Family, Unsupported, families_for_config
from plinth.models import unwrap
from plinth.peft.wrap import WrappedLinear

Part = tuple[int, int] | None  # (index, count): a row block of a fused Hugging Face module


@dataclass
class HFNames:
    """Plinth's linear layers <-> the modules of the model's Hugging Face equivalent."""

    family: Family
    architecture: str  # e.g. GPT2LMHeadModel
    prefix: str  # in front of the base model's module names (never the head's)
    places: dict[str, tuple[str, Part, bool]]  # plinth layer -> (HF module, part, is Conv1D)
    unplaced: list[str] = field(default_factory=list)  # plinth layers without an HF module

    def __post_init__(self) -> None:
        self._parts: dict[str, list[tuple[str, Part]]] = {}
        for name, (hf, part, _) in self.places.items():
            self._parts.setdefault(hf, []).append((name, part))
        for members in self._parts.values():
            members.sort(key=lambda m: m[1][0] if m[1] else 0)

    def hf(self, name: str) -> str | None:
        """The Hugging Face module that plinth layer `name` is (a part of), or None."""
        place = self.places.get(name)
        return None if place is None else place[0]

    def parts(self, hf: str) -> list[tuple[str, Part]]:
        """The plinth layers that make up Hugging Face module `hf`, in row order."""
        return self._parts[hf]

    def find(self, hf: str) -> str | None:
        """`hf` as this map spells it: peft adapters of a task model carry the family's own
        prefix (`bert.`), those of the bare base model none."""
        candidates = [hf, self.prefix + hf]
        if hf.startswith(self.family.prefix):
            candidates.append(self.prefix + hf[len(self.family.prefix):])
        return next((c for c in candidates if c in self._parts), None)

    def modules(self) -> list[str]:
        """Every Hugging Face module that has a plinth counterpart."""
        return list(self._parts)

    def conv1d(self, hf: str) -> bool:
        return self.places[self._parts[hf][0][0]][2]


def hf_names(model: nn.Module, prefix: str | None = None) -> HFNames | None:
    """The name map for `model` (plinth.hf.families, the architecture `plinth export` writes;
    `prefix` overrides its base-model prefix), or None when no Hugging Face family fits it."""
    model = unwrap(model)
    cfg = getattr(model, "cfg", None)
    choices = families_for_config(cfg) if isinstance(cfg, ModelConfig) else []
    if not choices:
        return None
    family, model_type = choices[0]
    architecture, default = family.architectures[model_type]
    prefix = default if prefix is None else prefix
    wrapped = [n + "." for n, m in model.named_modules() if isinstance(m, WrappedLinear)]
    places, unplaced = {}, []
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, WrappedLinear)) or name.startswith(tuple(wrapped)):
            continue  # not a linear layer, or an adapter's own (lora_A, adapter_up, ...)
        try:
            src = family.source(f"{name}.weight")
        except (KeyError, Unsupported):
            unplaced.append(name)
            continue
        module = src.name.removesuffix(".weight")
        places[name] = (module if src.head else prefix + module, src.part, src.transpose)
    return HFNames(family, architecture, prefix, places, unplaced)
