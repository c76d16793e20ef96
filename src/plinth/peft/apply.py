"""Fine-tuning methods applied to a built model from outside, configured by `finetune.*`.

    python -c "from plinth.config.schema import ModelConfig, FinetuneConfig; \
from plinth.models import build_model; from plinth.peft import apply_method; \
print(apply_method(build_model(ModelConfig(n_layers=2)), FinetuneConfig(method='lora')))"

`apply_method(model, cfg.finetune)` swaps modules in place and sets `requires_grad`, so the
optimizer (which takes trainable parameters only) and checkpoints need nothing special:

- full: every weight trains, except the embeddings and the first `freeze_layers` blocks when
  that is set; non-empty `trainable` patterns train only the parameters they match.
- lora / dora / qlora: the linear layers whose names match `target_modules` become
  `LoRALinear` (plinth.peft.lora); qlora stores their base weights in 4-bit NF4.
- adapter: a bottleneck MLP (size `rank`) after every attention and MLP output (o_proj,
  down_proj).
- prefix: `rank` learned key/value pairs per self-attention layer.
- ia3: scaling vectors on k_proj, v_proj and the MLP intermediate (down_proj's input).

For the parameter-efficient methods the base is frozen: only the method's parameters train, plus
any the `trainable` patterns name (e.g. "*norm*"). With `freeze_layers` = K the first K blocks
get no adapters. Patterns are fnmatch patterns over full names that may also match a trailing or
leading part: "q_proj" matches "layers.3.attn.q_proj", "*_proj" every projection, "layers.1*"
blocks 1 and 10-19.

Base parameter names never change (see plinth.peft.wrap), so a base checkpoint loads into an
adapted model and the adapted model's state dict is the base's plus the new entries (QLoRA's 4-bit
layers store `weight_nf4`/`weight_absmax` instead of `weight`). `disable_adapters(model)` runs
the base model for the duration of a `with` (a DPO reference model without a second copy);
`merge`/`unmerge` fold LoRA/DoRA/IA3 into the base weights and out again.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from plinth.config.schema import FinetuneConfig
from plinth.errors import NotSupportedError, UsageError
from plinth.hf.fingerprints import fingerprint
from plinth.models import unwrap
from plinth.models.layers import MLP, Attention, Block
from plinth.peft.adapters import BottleneckAdapter
from plinth.peft.ia3 import IA3Linear
from plinth.peft.lora import LoRALinear
from plinth.peft.names import hf_names
from plinth.peft.prefix import PrefixKV
from plinth.peft.wrap import WrappedLinear, adapter_parameters

PEFT_METHODS = ("lora", "dora", "qlora", "adapter", "prefix", "ia3")


@dataclass
class Summary:
    """What `apply_method` did: parameter counts and the modules that were changed."""

    method: str
    trainable: int
    total: int
    modules: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.trainable / max(1, self.total)

    def __str__(self) -> str:
        where = f" in {len(self.modules)} modules" if self.modules else ""
        return (
            f"{self.method}: {self.trainable:,} of {self.total:,} parameters train "
            f"({100 * self.fraction:.3g}%){where}"
        )


def apply_method(model: nn.Module, cfg: FinetuneConfig) -> Summary:
    """Turn `model` (in place) into what `cfg.method` trains; see the module doc."""
    model = unwrap(model)
    if getattr(model, "peft_method", None) is not None:
        raise UsageError(
            f"this model already has a fine-tuning method applied ({model.peft_method}); "
            "apply_method runs once per model. Build or load a fresh base model first."
        )
    fingerprint = base_fingerprint(model)  # before QLoRA replaces dense weights
    frozen = _frozen_prefixes(model, cfg.freeze_layers)
    if cfg.method == "full":
        modules: list[str] = []
    else:
        _check_targets_apply(cfg)
        modules = _insert(model, cfg, frozen)
    _set_trainable(model, cfg, frozen)
    model.peft_method = cfg.method
    model.peft_base_fingerprint = fingerprint
    # what save_adapter needs to rebuild the same layers (plinth's own adapter layout)
    model.peft_settings = cfg.model_dump(
        include={"rank", "alpha", "lora_dropout", "target_modules", "freeze_layers"}
    )
    trainable, total = count_parameters(model)
    if trainable == 0:
        raise UsageError(
            f"finetune.method={cfg.method} with freeze_layers={cfg.freeze_layers} and "
            f"trainable={cfg.trainable} leaves no parameter to train (the patterns match only "
            "frozen parts). Lower finetune.freeze_layers or change finetune.trainable."
        )
    return Summary(cfg.method, trainable, total, modules)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, shared tensors once; 4-bit base weights count as theirs."""
    seen: set[int] = set()
    trainable = total = 0
    for p in unwrap(model).parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in unwrap(model).modules():
        if isinstance(m, LoRALinear) and m.quantized:
            total += m.weight_shape.numel()
    return trainable, total


# ------------------------------------------------------------------------------------ insertion


def _insert(model: nn.Module, cfg: FinetuneConfig, frozen: tuple[str, ...]) -> list[str]:
    """Swap in the method's layers; returns the names of the modules that changed."""
    method = cfg.method
    if method in ("lora", "dora", "qlora"):
        names = match_linears(model, cfg.target_modules, frozen)
        for name in names:
            _check_rank(name, _get(model, name), cfg.rank, "target_modules")
        for name in names:
            base = _get(model, name)
            lora = LoRALinear(
                base, cfg.rank, cfg.alpha, cfg.lora_dropout,
                dora=method == "dora", quantize=method == "qlora",
            )
            _set(model, name, lora)
        return names
    live = [(n, m) for n, m in model.named_modules() if not n.startswith(frozen)]
    if method == "adapter":
        names = [f"{n}.o_proj" for n, m in live if isinstance(m, Attention)]
        names += [f"{n}.down_proj" for n, m in live if isinstance(m, MLP)]
        for name in names:
            _check_rank(name, _get(model, name), cfg.rank, None)
        for name in names:
            _set(model, name, BottleneckAdapter(_get(model, name), cfg.rank, cfg.lora_dropout))
    elif method == "ia3":
        attn = [n for n, m in live if isinstance(m, Attention)]
        names = [f"{n}.{leaf}" for n in attn for leaf in ("k_proj", "v_proj")]
        ff = [f"{n}.down_proj" for n, m in live if isinstance(m, MLP)]
        for name in names:
            _set(model, name, IA3Linear(_get(model, name), feedforward=False))
        for name in ff:
            _set(model, name, IA3Linear(_get(model, name), feedforward=True))
        names += ff
    elif method == "prefix":
        names = []
        for n, m in live:
            if isinstance(m, Attention) and not m.cross:
                p = m.o_proj.weight
                m.prefix_kv = PrefixKV(
                    m.n_kv_heads, cfg.rank, m.head_dim, device=p.device, dtype=p.dtype
                )
                names.append(f"{n}.prefix_kv")
    else:
        raise NotSupportedError(f"unknown fine-tuning method {method!r}")
    if not names:
        raise UsageError(
            f"finetune.method={method} found no layer to adapt: the model has no attention or MLP "
            f"outside the first {cfg.freeze_layers} frozen blocks. Lower finetune.freeze_layers."
        )
    return sorted(names, key=_natural)


def _check_targets_apply(cfg: FinetuneConfig) -> None:
    default = FinetuneConfig.model_fields["target_modules"].get_default(call_default_factory=True)
    explicit = "target_modules" in cfg.model_fields_set and cfg.target_modules != default
    if cfg.method in ("adapter", "prefix", "ia3") and explicit:
        places = {
            "adapter": "after every attention and MLP output (o_proj, down_proj)",
            "prefix": "in every self-attention layer",
            "ia3": "on k_proj, v_proj and down_proj's input",
        }[cfg.method]
        raise UsageError(
            f"finetune.target_modules={cfg.target_modules} applies to lora, dora and qlora; "
            f"method {cfg.method} places its parameters {places}. Remove "
            "finetune.target_modules, or use finetune.freeze_layers to leave the lower "
            "blocks alone."
        )


def match_linears(
    model: nn.Module, patterns: list[str], frozen: tuple[str, ...] = ()
) -> list[str]:
    """Names of the nn.Linear layers matched by `patterns` (each must match something)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    linears = [n for n in linears if not _inside_adapter(model, n)]
    unmatched = [p for p in patterns if not any(matches(n, p) for n in linears)]
    if unmatched or not patterns:
        raise UsageError(
            f"finetune.target_modules pattern(s) {unmatched or patterns} match no linear layer "
            f"of this model. Its linear layers are: {', '.join(compact_names(linears))}. "
            "Patterns are fnmatch patterns that match a full name or its last parts, e.g. "
            "q_proj, attn.*, *_proj, layers.0.mlp.*; fix or remove the pattern(s)."
            + _hf_hint(model, unmatched)
        )
    names = [n for n in linears if any(matches(n, p) for p in patterns)]
    live = [n for n in names if not n.startswith(frozen)]
    if not live:
        raise UsageError(
            f"finetune.target_modules={patterns} match only layers inside the first frozen "
            "blocks (finetune.freeze_layers); lower freeze_layers or target other layers."
        )
    return live


def _hf_hint(model: nn.Module, patterns: list[str]) -> str:
    """For patterns in Hugging Face names (c_attn, query, ...): the plinth layers they mean."""
    names = hf_names(model)
    if names is None:
        return ""
    hints = []
    for pat in patterns:
        mods = [m for m in names.modules() if matches(m, pat)]
        layers = [n for m in mods for n, _ in names.parts(m)]
        if layers:
            hints.append(f"{pat} ({names.architecture}) is plinth's "
                         f"{', '.join(compact_names(layers))}")
    return f" In Hugging Face names: {'; '.join(hints)}." if hints else ""


def _check_rank(name: str, layer: nn.Module, rank: int, key: str | None) -> None:
    limit = min(layer.in_features, layer.out_features)
    if rank > limit:
        drop = f" or leave {name} out of finetune.{key}" if key else ""
        raise UsageError(
            f"finetune.rank={rank} is larger than layer {name} allows ({layer.in_features} in, "
            f"{layer.out_features} out: a rank above {limit} adds parameters but no capacity). "
            f"Set finetune.rank to at most {limit}{drop}."
        )


def _inside_adapter(model: nn.Module, name: str) -> bool:
    """True for the adapter's own linears (lora_A, adapter_up, ...) inside a wrapped layer."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(_get(model, ".".join(parts[:i])), WrappedLinear):
            return True
    return False


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# ------------------------------------------------------------------------------------- freezing


def _frozen_prefixes(model: nn.Module, k: int) -> tuple[str, ...]:
    """Name prefixes of the first k blocks of every block stack ("layers.0.", ...)."""
    if k == 0:
        return ()
    stacks = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and all(isinstance(b, Block) for b in m)
    ]
    depth = min(len(m) for _, m in stacks) if stacks else 0
    if k > depth:
        raise UsageError(
            f"finetune.freeze_layers={k} is more than the model's {depth} blocks; set it to at "
            f"most {depth} (freezing everything leaves nothing to train)."
        )
    return tuple(f"{n}.{i}." if n else f"{i}." for n, _ in stacks for i in range(k))


def _set_trainable(model: nn.Module, cfg: FinetuneConfig, frozen: tuple[str, ...]) -> None:
    adapters = {id(p) for p in adapter_parameters(model).values()}
    embeddings = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    names: dict[int, list[str]] = {}  # a tied tensor has several names
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        params[id(p)] = p
    base = [n for i, ns in names.items() if i not in adapters for n in ns]
    unmatched = [pat for pat in cfg.trainable if not any(matches(n, pat) for n in base)]
    if unmatched:
        raise UsageError(
            f"finetune.trainable pattern(s) {unmatched} match no parameter of this model. Its "
            f"parameters are: {', '.join(compact_names(base))}. Fix or remove the pattern(s)."
        )
    for i, p in params.items():
        if i in adapters:
            p.requires_grad_(True)
            continue
        ns = names[i]
        frozen_here = any(n.startswith(frozen) for n in ns) or (
            cfg.freeze_layers > 0 and i in embeddings
        )
        listed = any(matches(n, pat) for n in ns for pat in cfg.trainable)
        wanted = listed or (cfg.method == "full" and not cfg.trainable)
        p.requires_grad_(wanted and not frozen_here)


def matches(name: str, pattern: str) -> bool:
    """fnmatch over the full dotted name, or its trailing / leading / inner parts."""
    return any(
        fnmatch.fnmatchcase(name, p)
        for p in (pattern, f"*.{pattern}", f"{pattern}.*", f"*.{pattern}.*")
    )


def compact_names(names: list[str]) -> list[str]:
    """Names with block numbers folded ("layers.*.attn.q_proj"), in first-seen order."""
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ------------------------------------------------------------------- merge, disable, fingerprint


def merge(model: nn.Module) -> int:
    """Fold LoRA/DoRA/IA3 updates into the base weights (inference or export: no adapter cost).
    Returns how many layers were merged."""
    layers = _mergeable(model)
    for m in layers:
        m.merge()
    return len(layers)


def unmerge(model: nn.Module) -> int:
    """Undo `merge`: the base weights come back (up to floating-point rounding)."""
    layers = _mergeable(model)
    for m in layers:
        m.unmerge()
    return len(layers)


def _mergeable(model: nn.Module) -> list[nn.Module]:
    model = unwrap(model)
    layers = [m for m in model.modules() if isinstance(m, (LoRALinear, IA3Linear))]
    others = [
        n for n, m in model.named_modules() if isinstance(m, (BottleneckAdapter, PrefixKV))
    ]
    if others:
        raise NotSupportedError(
            f"{compact_names(others)[0]} cannot be merged into the base weights (bottleneck "
            "adapters add a nonlinear layer, prefixes add attention positions). Keep the "
            "adapted model as it is, or fine-tune with lora, dora or ia3 to get a mergeable one."
        )
    return layers


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the `with`: adapters off, merged updates taken out, prefixes
    removed from attention. Everything is restored on exit."""
    model = unwrap(model)
    layers = [m for m in model.modules() if isinstance(m, WrappedLinear)]
    merged = [m for m in layers if getattr(m, "merged", False)]
    prefixed = [
        (m, m.prefix_kv) for m in model.modules()
        if isinstance(m, Attention) and isinstance(m.prefix_kv, PrefixKV)
    ]
    for m in merged:
        m.unmerge()
    try:
        for m in layers:
            m.enabled = False
        for attn, _ in prefixed:
            attn.prefix_kv = None
        yield model
    finally:
        for m in layers:
            m.enabled = True
        for attn, prefix in prefixed:
            attn.prefix_kv = prefix
        for m in merged:
            m.merge()


@torch.no_grad()
def base_fingerprint(model: nn.Module) -> str:
    """The fingerprint of the base model's weights (plinth.hf.fingerprints: the scheme
    import.json records, so a model loaded from `plinth import`'s output gives its import.json
    value): its parameters under plinth names, tied ones once, adapter parameters left out.

    An adapted model reports the fingerprint recorded when its method was applied or its adapter
    loaded (QLoRA no longer holds the dense weights, a merged model holds changed ones)."""
    model = unwrap(model)
    recorded = getattr(model, "peft_base_fingerprint", None)
    if recorded is not None:
        return recorded
    adapters = {id(p) for p in adapter_parameters(model).values()}
    wrapped = [m for m in model.modules() if isinstance(m, WrappedLinear)]
    if any(getattr(m, "merged", False) or getattr(m, "quantized", False) for m in wrapped):
        raise NotSupportedError(
            "the base fingerprint cannot be computed on a merged or 4-bit model; compute it "
            "(plinth.peft.base_fingerprint) before merging or quantising."
        )
    return fingerprint({n: p for n, p in model.named_parameters() if id(p) not in adapters})
