"""What a training recipe refuses before doing any work, as pure checks on the resolved config,
so `plinth config validate` refuses exactly what `plinth pretrain` / `plinth finetune` would.

    from plinth.config.preflight import preflight
    preflight(resolved, world_size=1)          # ConfigError with key, source and fix

- batch: global_batch in tokens must be a multiple of the sequence length, and the global batch
  a multiple of micro_batch x world size (`OptimConfig.accum_steps`);
- vocab: the tokenizer to train fits model.vocab_size (special tokens plus a minimal alphabet);
  a given tokenizer file (data.tokenizer.path) is readable and its ids fit model.vocab_size;
- run directory: tracking.output_dir is a directory (or can become one).

Recipes call these at start (`plinth.train.setup.start`, `check_batch` with their own sequence
length and world size); validate calls `preflight` with world size 1.
"""

from __future__ import annotations

from pathlib import Path

from plinth.config.load import Resolved
from plinth.config.yamlio import quote
from plinth.errors import ConfigError

BYTE_ALPHABET = 256

# options each training recipe does not honour yet; refusing beats silently ignoring them
UNSUPPORTED_BY = {
    "pretrain": {
        "compress.quantization": "quantisation is applied to a trained model, not during "
        "pretraining",
        "compress.pruning": "pruning is applied to a trained model, not during pretraining",
        "compress.distill_teacher": "distillation is its own recipe",
        "finetune.base": "starting from a pretrained model is `plinth finetune`",
    },
    "finetune": {
        "compress.quantization": "quantisation is applied to a trained model, not during "
        "training",
        "compress.pruning": "pruning is applied to a trained model, not during training",
        "compress.distill_teacher": "distillation is its own recipe",
    },
}
UNSUPPORTED_BY["align"] = {
    **UNSUPPORTED_BY["finetune"],
    "finetune.dataset": "alignment data is align.dataset (finetune.dataset is SFT's)",
    "finetune.val_dataset": "alignment validation data is align.val_dataset",
    "finetune.tasks": "alignment trains one objective (align.method); multitask is SFT's",
}


def base_ids(kind: str, n_special: int) -> int:
    """Ids a tokenizer of this kind needs before any learned token: specials (+ unk) + bytes."""
    return n_special + (BYTE_ALPHABET if kind == "bpe" else 1)


def check_vocab(kind: str, vocab_size: int, special_tokens: list[str], key: str) -> None:
    """ConfigError when the vocab cannot hold the special tokens plus a minimal alphabet."""
    if not special_tokens:
        raise ConfigError(
            "data.tokenizer.special_tokens is empty; it needs at least the end-of-document "
            "token (default ['<|endoftext|>', '<|pad|>', '<|mask|>', '<|bos|>'])."
        )
    if len(set(special_tokens)) != len(special_tokens):
        raise ConfigError(
            f"data.tokenizer.special_tokens has duplicates: {quote(special_tokens)}; list each "
            "token once."
        )
    need = base_ids(kind, len(special_tokens)) + (0 if kind == "bpe" else 63)
    if vocab_size < need:
        alphabet = (
            f"the {BYTE_ALPHABET} byte tokens of byte-level BPE"
            if kind == "bpe"
            else "an unknown token and a minimal alphabet of 63 characters"
        )
        raise ConfigError(
            f"vocab size {vocab_size} ({key}) is too small for a {kind} tokenizer: it needs "
            f"{len(special_tokens)} special tokens plus {alphabet}, i.e. at least {need} ids. "
            f"Set {key} to {need} or more (a few thousand is typical)"
            + (", or use data.tokenizer.kind=unigram for a tiny vocab." if kind == "bpe" else ".")
        )


def check_batch(resolved: Resolved, seq_len: int, world_size: int = 1, rows: str = "") -> int:
    """Micro-batches each rank accumulates per step, after lowering a micro_batch that does
    not divide the global batch (`OptimConfig.fit_world`; the note goes to resolved.notes);
    ConfigError (naming the batch keys, where they came from and a value that works) when the
    global batch cannot be split over the processes."""
    optim = resolved.config.optim
    try:
        # a micro_batch that does not divide the global batch over the processes is lowered
        # (same global batch, same math) and said; a batch that cannot split is refused
        note = optim.fit_world(seq_len, world_size)
        accum = optim.accum_steps(seq_len, world_size)
    except ValueError as e:
        keys = ["optim.global_batch", "optim.micro_batch"]
        if optim.batch_unit == "tokens":
            keys.append("optim.batch_unit")
        origin = ", ".join(f"{k} from {resolved.source(k)}" for k in keys)
        procs = f"; torchrun started {world_size} processes" if world_size > 1 else ""
        raise ConfigError(f"{e} ({origin}{rows}{procs}).") from None
    if note:
        resolved.sources["optim.micro_batch"] = f"lowered to fit {world_size} process(es)"
        resolved.notes.append(note)
    return accum


def check_output_dir(resolved: Resolved) -> None:
    """tracking.output_dir must be a directory, or a path whose nearest existing ancestor is."""
    out = Path(resolved.config.tracking.output_dir).expanduser()
    src = resolved.source("tracking.output_dir")
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        what = "is a file" if p == out else f"is under {p}, which is a file"
        raise ConfigError(
            f"tracking.output_dir={quote(str(out))} (from {src}) {what}, so no run directory "
            "can be created in it. Set tracking.output_dir to a directory (e.g. runs)."
        )


def tokenizer_file_vocab(path: str, special_tokens: list[str]) -> int:
    """Ids a tokenizer.json (or a directory holding one) will use, counting the configured
    special tokens it lacks (they are appended); ConfigError when it cannot be read."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises bare Exceptions for missing/bad files
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(
            f"cannot load the tokenizer {quote(str(p))} (data.tokenizer.path): {reason}. Give a "
            "tokenizer.json written by Hugging Face tokenizers, or unset data.tokenizer.path to "
            "train one."
        ) from None
    vocab = tok.get_vocab(with_added_tokens=True)
    size = max(tok.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
    return size + sum(1 for t in set(special_tokens) if t not in vocab)


def check_pretrain_vocab(resolved: Resolved) -> None:
    """The tokenizer pretraining will train or load fits model.vocab_size."""
    cfg = resolved.config
    tc = cfg.data.tokenizer
    if tc.path is None:
        key = "data.tokenizer.vocab_size" if tc.vocab_size else "model.vocab_size"
        check_vocab(tc.kind, cfg.tokenizer_vocab_size, tc.special_tokens, key)
        return
    size = tokenizer_file_vocab(tc.path, tc.special_tokens)
    if size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer {quote(tc.path)} (data.tokenizer.path, from "
            f"{resolved.source('data.tokenizer.path')}) has {size} tokens but model.vocab_size "
            f"is {cfg.model.vocab_size} (from {resolved.source('model.vocab_size')}): token ids "
            f"would fall outside the embedding. Set model.vocab_size={size} (or larger)."
        )


def preflight(resolved: Resolved, world_size: int = 1, recipe: str = "pretrain") -> int:
    """Every pure check a training recipe makes before any work; returns the accumulation
    steps. `recipe` is pretrain (sequence length model.max_seq_len, the tokenizer of data.*)
    or finetune (rows of finetune.max_length tokens, the base model's tokenizer)."""
    cfg = resolved.config
    check_output_dir(resolved)
    if recipe == "align":
        check_align(resolved)
    if recipe in ("finetune", "align"):
        rows = f"; rows are finetune.max_length={cfg.finetune.max_length} tokens"
        return check_batch(resolved, cfg.finetune.max_length, world_size, rows)
    check_pretrain_vocab(resolved)
    return check_batch(resolved, cfg.model.max_seq_len, world_size)


def check_align(resolved: Resolved) -> None:
    """What `plinth align` needs from its config before reading anything."""
    cfg = resolved.config
    a = cfg.align
    if a.dataset is None:
        what = {"preference": "{prompt, chosen, rejected}", "unpaired":
                "{prompt, completion, label}", "prompt": "{prompt, ...}"}[a.data_kind]
        raise ConfigError(
            f"align.dataset is not set: align.method={a.method} (from "
            f"{resolved.source('align.method')}) trains on JSONL rows {what}; set "
            "align.dataset=FILE (e.g. configs/data/concise_prefs.train.jsonl)."
        )
    if a.data_kind == "prompt" and not a.reward_funcs and a.reward_model is None:
        raise ConfigError(
            f"align.method={a.method} needs a reward: set align.reward_funcs (built-ins "
            "exact_match, json_valid, length_penalty, or module:function) and/or "
            "align.reward_model (a run trained with align.method=reward)."
        )
    if cfg.distributed.strategy in ("fsdp", "hsdp"):
        raise ConfigError(
            f"distributed.strategy={cfg.distributed.strategy} (from "
            f"{resolved.source('distributed.strategy')}): `plinth align` runs data parallel "
            "(ddp) for now; sharded weights would need every rank in each rollout and "
            "reference forward. Use distributed.strategy=ddp (or auto) with a LoRA-family "
            "finetune.method to fit larger models."
        )
    if a.precompute_ref and a.method not in ("dpo", "kto"):
        raise ConfigError(
            f"align.precompute_ref=true (from {resolved.source('align.precompute_ref')}) has "
            f"no effect for align.method={a.method}, which uses no reference log-probs; "
            "remove it (it is for dpo and kto)."
        )

