"""Tokenizers: train byte-level BPE, WordPiece or Unigram with Hugging Face `tokenizers`, or
load an existing `tokenizer.json`; fix the ids of the special and sentinel tokens.

    plinth data tokenizer train quickstart --output tok.json

Id layout of a trained tokenizer: the configured special tokens first (`<|endoftext|>` = 0,
`<|pad|>`, `<|mask|>`, `<|bos|>`), then `<|unk|>` for WordPiece/Unigram (BPE is byte-level and
never meets an unknown character), then the sentinels `<|extra_0|>`... used by span corruption,
then the learned vocabulary. Special tokens are never matched inside document text, so a
corpus that contains the string "<|endoftext|>" cannot inject a separator
(`encode_special_tokens` is switched on while documents are encoded; the saved tokenizer
leaves it off so prompts and chat templates can still name special tokens).

`dataset_tokenizer` is the tokenizer stage of `plinth data prepare`: it trains on a seeded
sample of the training documents (or loads `data.tokenizer.path`) and saves the result into
the dataset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plinth.config.preflight import BYTE_ALPHABET, base_ids, check_vocab  # noqa: F401
from plinth.data.layout import TOKENIZER
from plinth.errors import PlinthError, UsageError

if TYPE_CHECKING:
    import numpy as np

    from plinth.data.store import Corpus

# GPT-4's split pattern (as in nanochat): letters, 1-3 digit numbers, punctuation runs and
# whitespace runs are pre-tokens, so merges never glue words to punctuation or long numbers
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
UNK = "<|unk|>"


def sentinel_token(i: int) -> str:
    return f"<|extra_{i}|>"


def sentinel_count(kind: str, vocab_size: int, n_special: int, requested: int) -> int:
    """Sentinels actually reserved: the requested number, but never more than a quarter of the
    ids left after the base ids, so a tiny vocab still has room to learn real tokens."""
    return max(0, min(requested, (vocab_size - base_ids(kind, n_special)) // 4))


def reserved_tokens(kind: str, vocab_size: int, special_tokens: list[str], sentinels: int):
    """(all reserved tokens in id order, number of sentinels) for training a tokenizer."""
    named = list(special_tokens) + ([] if kind == "bpe" else [UNK])
    n = sentinel_count(kind, vocab_size, len(named) - (kind != "bpe"), sentinels)
    return named + [sentinel_token(i) for i in range(n)], n


# Unigram training (a suffix-array seed vocabulary, then EM rounds over every piece) is by far
# the slowest kind in `tokenizers`: minutes per few MB on a CPU core. Like SentencePiece's
# input_sentence_size, it trains on a bounded sample unless the limit is chosen explicitly:
# while data.tokenizer.train_max_bytes keeps its default, unigram uses at most this many bytes.
UNIGRAM_SAMPLE_BYTES = 4_000_000


def train_budget(tc) -> tuple[int | None, str | None]:
    """(bytes to train on, or None for all; a note when unigram's default bound applies)."""
    default = type(tc).model_fields["train_max_bytes"].default
    if tc.kind == "unigram" and tc.train_max_bytes == default:
        return UNIGRAM_SAMPLE_BYTES, (
            f"unigram trains on a sample of at most {UNIGRAM_SAMPLE_BYTES / 1e6:g} MB (its "
            "training time grows fast with the text; set data.tokenizer.train_max_bytes to "
            "choose another limit)"
        )
    return tc.train_max_bytes, None


def fed_with_progress(texts: Iterable[str], prog, task) -> Iterator[str]:
    """`texts`, advancing `task` by the bytes handed to the trainer; once all are in, the
    task says the vocabulary is being fitted (that part runs inside `tokenizers`, in Rust,
    with no progress to report, so the bar shows the time elapsed)."""
    done = 0
    for text in texts:
        done += len(text.encode("utf-8", "surrogatepass"))
        prog.update(task, completed=done, info=f"{done / 1e6:.1f} MB read")
        yield text
    # no total while fitting: the bar pulses and the elapsed time keeps counting (a finished
    # task's clock stops); the caller completes it when training returns
    prog.update(task, total=None, completed=done, info=f"{done / 1e6:.1f} MB; fitting the vocab")


def train_for_config(texts: Iterable[str], cfg):
    """`train_tokenizer` with the settings of `cfg.data.tokenizer` (a plinth Config)."""
    tc = cfg.data.tokenizer
    return train_tokenizer(
        texts,
        kind=tc.kind,
        vocab_size=cfg.tokenizer_vocab_size,
        special_tokens=tc.special_tokens,
        sentinels=tc.sentinels,
        min_frequency=tc.min_frequency,
        key="data.tokenizer.vocab_size" if tc.vocab_size else "model.vocab_size",
    )


def train_tokenizer(
    texts: Iterable[str],
    kind: str = "bpe",
    vocab_size: int = 8192,
    special_tokens: list[str] | None = None,
    sentinels: int = 100,
    min_frequency: int = 2,
    key: str = "model.vocab_size",
):
    """Train a tokenizer on an iterator of texts (streamed; never held in memory at once)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    special_tokens = list(special_tokens or ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|bos|>"])
    check_vocab(kind, vocab_size, special_tokens, key)
    reserved, _ = reserved_tokens(kind, vocab_size, special_tokens, sentinels)
    common = {"vocab_size": vocab_size, "special_tokens": reserved, "show_progress": False}
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            **common,
        )
    elif kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            min_frequency=min_frequency,
            limit_alphabet=max(32, min(1000, vocab_size // 4)),
            continuing_subword_prefix="##",
            **common,
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        trainer = trainers.UnigramTrainer(unk_token=UNK, max_piece_length=16, **common)
    else:
        raise UsageError(f"data.tokenizer.kind={kind!r}: use bpe, wordpiece or unigram")
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise PlinthError(
            f"the trained {kind} tokenizer has {tok.get_vocab_size()} tokens, more than the "
            f"requested {vocab_size} ({key}): the corpus has too many distinct characters for "
            "this vocab. Raise the vocab size or use data.tokenizer.kind=bpe."
        )
    return tok


def load_tokenizer(path: str | Path, special_tokens: list[str] | None = None):
    """Load a `tokenizer.json`; configured special tokens it lacks are added (appended ids).

    Returns (tokenizer, added tokens). To add nothing, set data.tokenizer.special_tokens to
    tokens the file already has (its end-of-text token first)."""
    from tokenizers import Tokenizer

    p = tokenizer_file(path)
    try:
        tok = Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises bare Exceptions for missing/bad files
        raise _load_error(p, e) from None
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in special_tokens or [] if t not in vocab]
    if missing:
        tok.add_special_tokens(missing)
    return tok, missing


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.json that `path` (a file, or a directory holding one) names; UsageError
    when it is not a regular file (a FIFO or device would block the Rust reader forever)."""
    from plinth.data.paths import path_problem

    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER
    problem = path_problem(p)
    if problem is not None:
        raise _load_error(p, problem[1])
    return p


def _load_error(p: Path, why) -> UsageError:
    return UsageError(
        f"cannot load the tokenizer {p} (data.tokenizer.path): {why}. Give a tokenizer.json "
        "written by Hugging Face tokenizers, or unset data.tokenizer.path to train one."
    )


def role_ids(tok, special_tokens: list[str]) -> dict:
    """Ids of the special roles: specials by position (eos, pad, mask, bos; pad and bos fall
    back to eos, mask to None when the list is shorter) plus the sentinel ids found."""
    vocab = tok.get_vocab(with_added_tokens=True)
    ids = [vocab[t] for t in special_tokens]
    eos = ids[0]
    sentinels = []
    i = 0
    while sentinel_token(i) in vocab:
        sentinels.append(vocab[sentinel_token(i)])
        i += 1
    if not sentinels:  # T5 tokenizers call them <extra_id_N>
        while f"<extra_id_{i}>" in vocab:
            sentinels.append(vocab[f"<extra_id_{i}>"])
            i += 1
    return {
        "eos_id": eos,
        "pad_id": ids[1] if len(ids) > 1 else eos,
        "mask_id": ids[2] if len(ids) > 2 else None,
        "bos_id": ids[3] if len(ids) > 3 else eos,
        "unk_id": vocab.get(UNK),
        "sentinel_ids": sentinels,
    }


def tokenizer_hash(tok) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


# -------------------------------------------------------------------------- dataset stage


@dataclass(frozen=True)
class TokenizerResult:
    """The tokenizer stage's output: the tokenizer, where it was saved, its manifest section."""

    tokenizer: Any  # tokenizers.Tokenizer
    path: Path
    info: dict  # the manifest's `tokenizer` section
    warnings: list[str] = field(default_factory=list)


def dataset_tokenizer(cfg, corpus: Corpus, is_val: np.ndarray, out: Path, prog) -> TokenizerResult:
    """Load `data.tokenizer.path`, or train on a seeded sample of the training documents of
    `corpus` (at most `data.tokenizer.train_max_bytes`); saved as `out`/tokenizer.json."""
    tc = cfg.data.tokenizer
    warnings: list[str] = []
    info: dict[str, Any] = {"kind": tc.kind}
    if tc.path:
        tok, added = load_tokenizer(tc.path, tc.special_tokens)
        info.update(loaded_from=str(tc.path), added_special_tokens=added)
        if added:
            warnings.append(
                f"tokenizer {tc.path} lacked {added}; they were added with new ids (set "
                "data.tokenizer.special_tokens to tokens it has to avoid this)"
            )
        if tok.get_vocab_size() > cfg.model.vocab_size:
            warnings.append(
                f"tokenizer has {tok.get_vocab_size()} tokens but model.vocab_size is "
                f"{cfg.model.vocab_size}; raise model.vocab_size to at least the tokenizer's"
            )
    else:
        budget, note = train_budget(tc)
        sample = _training_sample(corpus, is_val, cfg.seed, budget)
        nbytes = int(corpus.sizes[sample].sum())
        task = prog.task(f"train {tc.kind} tokenizer", total=nbytes)
        if note and budget < corpus.sizes[~is_val].sum():
            prog.log(note)
        tok = train_for_config(fed_with_progress(corpus.texts(sample), prog, task), cfg)
        info["trained_on"] = {"docs": len(sample), "bytes": nbytes}
        if note:
            info["trained_on"]["limit_bytes"] = budget
        prog.update(
            task, total=nbytes, completed=nbytes,
            info=f"{nbytes / 1e6:.1f} MB; vocab {tok.get_vocab_size()}",
        )
        n_sent = sentinel_count(
            tc.kind, cfg.tokenizer_vocab_size, len(tc.special_tokens), tc.sentinels
        )
        if n_sent < tc.sentinels:
            warnings.append(
                f"only {n_sent} of data.tokenizer.sentinels={tc.sentinels} sentinel tokens fit "
                f"a vocab of {cfg.tokenizer_vocab_size}"
            )
    path = out / TOKENIZER
    tok.save(str(path))
    roles = role_ids(tok, tc.special_tokens)
    info.update(
        file=TOKENIZER,
        vocab_size=tok.get_vocab_size(),
        sha256=tokenizer_hash(tok),
        special_tokens=list(tc.special_tokens),
        sentinels=len(roles["sentinel_ids"]),
        roles=roles,
    )
    return TokenizerResult(tok, path, info, warnings)


def _training_sample(corpus: Corpus, is_val, seed: int, max_bytes: int | None) -> np.ndarray:
    """Training documents in a seeded random order, cut at `max_bytes`, then sorted so the
    store is read front to back."""
    import numpy as np

    rng = np.random.default_rng([seed, 0x70C])
    sample = rng.permutation(np.flatnonzero(~is_val))
    if max_bytes:
        sizes = corpus.sizes[sample]
        sample = sample[: int(np.searchsorted(np.cumsum(sizes), max_bytes)) + 1]
    return np.sort(sample)
