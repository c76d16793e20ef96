"""The `data` section: sources, filters, dedup and tokenizer of the training mixture.

    plinth config explain data
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from plinth.config.sections.base import Section


class SourceConfig(Section):
    """One input of the data mixture."""

    kind: Literal["stdlib_code", "stdlib_docs", "text", "jsonl", "parquet", "hf_disk"] = (
        "stdlib_code"
    )
    """Where documents come from. `stdlib_code`/`stdlib_docs`: the running Python's standard
    library source / its docstrings as prose (offline, on every machine). `text`: plain text
    files (path may be a file, directory or glob), `jsonl`, `parquet`, or `hf_disk` (a dataset
    saved with Hugging Face `datasets.save_to_disk`)."""

    path: str | None = None
    """File, directory or glob for text/jsonl/parquet/hf_disk sources; unused for stdlib ones.
    Relative paths resolve against the working directory."""

    text_field: str = "text"
    """Field holding the document text in jsonl/parquet/hf_disk records. Change it to match
    your data (e.g. `content`)."""

    weight: float = Field(1.0, gt=0)
    """Mixture weight: relative share of training rows drawn from this source. Up-weight
    high-quality sources; the loader keeps the ratio within sampling noise."""

    name: str | None = None
    """Short name used in manifests and metrics; defaults to the kind (plus file name)."""

    pattern: str | None = None
    """File-name glob used when `path` is a directory (searched recursively), e.g. `*.py`.
    None picks by kind: `*.txt`, `*.md`, `*.rst` for text, `*.jsonl`, `*.json` for jsonl,
    `*.parquet` for parquet; `.gz` versions of text and jsonl files are read too. Narrow it
    when a directory mixes data with other files."""


class FilterConfig(Section):
    """Cleaning and quality filters applied to each document before dedup and tokenization."""

    enabled: bool = True
    """Master switch for all filters below. Turn off only for data you already cleaned."""

    unicode_normalize: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation form. NFC keeps text as written; NFKC also folds look-alike
    characters (full-width digits, ligatures), better for web text, lossy for code."""

    min_chars: int = Field(32, ge=0)
    """Drop documents shorter than this many characters (boilerplate, empty pages)."""

    max_chars: int = Field(1_000_000, ge=1)
    """Drop documents longer than this (minified blobs, dumps). Raise it for books."""

    max_duplicate_line_frac: float = Field(0.3, ge=0, le=1)
    """Drop documents where this fraction of lines are repeats of other lines in the same
    document (navigation menus, logs). Lower is stricter."""

    max_top_ngram_frac: float = Field(0.2, ge=0, le=1)
    """Drop documents whose most frequent word 3-gram covers more than this fraction of the
    words (spam, repeated templates). Gopher uses 0.2."""

    max_symbol_frac: float = Field(0.5, ge=0, le=1)
    """Drop documents where symbol characters (#, {, ...) exceed this fraction of characters.
    Code is symbol-heavy: keep it high for code corpora, ~0.1 for prose."""

    min_alpha_frac: float = Field(0.2, ge=0, le=1)
    """Drop documents with fewer alphabetic characters than this fraction (tables of numbers,
    binary junk). ~0.6 for prose, lower for code."""

    scripts: list[str] = Field(default_factory=list)
    """Keep only documents whose dominant script is one of these (e.g. ["latin"]); empty keeps
    all. A cheap language filter for single-language models."""

    blocklist: str | None = None
    """Path of a file with one blocked term per line; documents containing any are dropped
    (spam, toxic terms). None disables."""

    scrub_pii: bool = True
    """Replace e-mail addresses, phone numbers and IP addresses with placeholders so the model
    cannot memorise them. Turn off only for data without personal information."""

    ngram: int = Field(3, ge=1, le=10)
    """Word n-gram length used by max_top_ngram_frac. 2-4 are the usual choices (Gopher checks
    several); longer n-grams only catch verbatim repeated phrases."""


class DedupConfig(Section):
    """Exact and near-duplicate removal across the whole corpus."""

    exact: bool = True
    """Drop documents whose normalised text hashes equal an earlier one. Cheap; keep on."""

    near: bool = True
    """Drop near-duplicates found with MinHash + LSH, keeping one document per cluster.
    Duplicates waste compute and encourage memorisation."""

    threshold: float = Field(0.8, gt=0, le=1)
    """Estimated Jaccard similarity above which two documents count as near-duplicates.
    Lower removes more (and risks merging distinct documents)."""

    num_perm: int = Field(128, ge=16, le=1024)
    """MinHash permutations. More: more precise similarity estimates, slower hashing."""

    shingle: int = Field(5, ge=1, le=32)
    """Word n-gram length of the shingles compared. Short shingles match loosely, long ones
    only near-verbatim copies."""


class TokenizerConfig(Section):
    """The tokenizer: trained on the prepared corpus, or loaded from a file."""

    kind: Literal["bpe", "wordpiece", "unigram"] = "bpe"
    """Algorithm. bpe (byte-level, GPT/Llama) never meets an unknown character; wordpiece is
    BERT's; unigram is T5/SentencePiece's."""

    path: str | None = None
    """An existing `tokenizer.json` to use instead of training one. Required when fine-tuning a
    pretrained model (use its own tokenizer)."""

    vocab_size: int | None = Field(None, ge=32, le=2**22)
    """Vocabulary size to train; None uses model.vocab_size, which it must equal. Larger:
    shorter sequences, more embedding parameters."""

    min_frequency: int = Field(2, ge=1)
    """Minimum count of a pair/piece to be merged into the vocab; raise it to skip rare noise."""

    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>", "<|pad|>", "<|mask|>", "<|bos|>"]
    )
    """Special tokens given the first ids. The first is the end-of-document separator; the
    others are used for padding, masked LM and beginning of sequence."""

    sentinels: int = Field(100, ge=0, le=1000)
    """Extra reserved tokens `<|extra_0|>`, `<|extra_1|>`, ... placed right after the special
    tokens; span corruption (T5) replaces each masked span with one. 100 is T5's number; it is
    lowered automatically when the vocab is tiny (at most a quarter of the ids left after the
    byte alphabet and the special tokens). Set 0 for decoder-only models to save the ids."""

    train_max_bytes: int | None = Field(256_000_000, ge=1)
    """Train the tokenizer on at most this many bytes of training documents (a seeded random
    subset). Tokenizer quality saturates long before corpus size and training memory grows
    with the text seen; None trains on everything."""


class DataConfig(Section):
    """Corpus preparation: sources, cleaning, dedup, tokenizer, shards and packing."""

    sources: list[SourceConfig] = Field(default_factory=lambda: [SourceConfig()])
    """Inputs and their mixture weights. The default is the standard library's source code,
    which needs no download."""

    dir: str = "data/default"
    """Where the prepared dataset (shards, tokenizer, manifest) is written and read from."""

    filters: FilterConfig = Field(default_factory=FilterConfig)
    """Cleaning and quality filters (see `plinth config explain data.filters`)."""

    dedup: DedupConfig = Field(default_factory=DedupConfig)
    """Deduplication settings (see `plinth config explain data.dedup`)."""

    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """Tokenizer settings (see `plinth config explain data.tokenizer`)."""

    val_fraction: float = Field(0.02, ge=0, lt=1)
    """Fraction of documents held out for validation, split by document and seeded. More gives
    steadier validation losses and fewer training tokens."""

    max_docs: int | None = Field(None, ge=1)
    """Cap on documents read per source (quick experiments); None reads everything."""

    max_bytes: int | None = Field(None, ge=1)
    """Cap on UTF-8 bytes of documents read per source; reading stops after the document that
    crosses it. Bounds preparation time (quickstart uses a few MB); None reads everything."""

    max_doc_bytes: int = Field(16_000_000, ge=1)
    """Documents (files or JSONL lines/records) larger than this are skipped unread and counted
    as `too_large`, so one huge line cannot exhaust memory. Raise it for books or long logs."""

    decontaminate: list[str] = Field(default_factory=list)
    """Evaluation sets that must not leak into training: JSONL files (all string fields of a
    row), plinth task YAML files, text files (one example per line) or directories of them.
    A document sharing any word n-gram (`decontaminate_ngram` words, lower-cased, punctuation
    ignored) with an example is dropped and counted as `contaminated`. Costs one dict lookup
    per word while preparing; empty checks nothing. Report overlap without dropping anything
    with `plinth.eval.decontam`."""

    decontaminate_ngram: int = Field(13, ge=1, le=64)
    """Words per n-gram for `decontaminate` (13, as GPT-3 did). Shorter catches more lightly
    edited leaks but also common phrases; examples with fewer words are not checked."""

    packing: Literal["concat", "bos_aligned"] = "concat"
    """How documents become fixed-length rows. `concat` joins them with separators (no padding,
    rows may start mid-document); `bos_aligned` best-fit packs so every row starts at a document
    start (better for short-context quality, wastes a little)."""

    curriculum: Literal["none", "short_first"] = "none"
    """Order of training rows. `short_first` presents short documents early (a cheap curriculum);
    `none` shuffles uniformly."""

    workers: int = Field(1, ge=1, le=256)
    """Processes used to tokenize while preparing. More is faster up to the number of cores."""
