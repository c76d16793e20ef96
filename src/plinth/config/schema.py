"""The typed configuration: one section per stage of a model's life, every field documented.

    plinth config explain            # list the sections
    plinth config explain optim.lr   # doc, type, default, current value and its source

Every field carries a docstring (what it does, its trade-off, when to change it); pydantic
turns those into field descriptions and a test fails for any field without one. Sections
forbid unknown keys, so a typo is an error with a suggestion, never a silently ignored value.
Cross-field rules live in `model_validator`s next to the fields they relate.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Section(BaseModel):
    """Base of every section: strict keys, docstrings as descriptions, validated assignment."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


# --------------------------------------------------------------------------------------- model


class ModelConfig(Section):
    """Transformer architecture: the shape of the network, shared by every recipe."""

    arch: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    """Model family. `decoder`: GPT/Llama-style causal LM (generation, chat, most fine-tuning).
    `encoder`: BERT-style bidirectional model (embeddings, classification; trained with MLM).
    `encoder_decoder`: T5-style (sequence-to-sequence, trained with span corruption)."""

    n_layers: int = Field(4, ge=1, le=512)
    """Number of transformer blocks (in each stack for encoder_decoder). More layers: more
    capacity and compute per token, linearly more activation memory. Scale with d_model."""

    n_decoder_layers: int | None = Field(None, ge=1, le=512)
    """encoder_decoder only: blocks in the decoder stack; None uses n_layers. Shallower decoders
    make generation cheaper at a small quality cost."""

    d_model: int = Field(256, ge=8, le=65536)
    """Width of the residual stream (hidden size). Parameters grow with its square; must be a
    multiple of n_heads. The main knob of model size together with n_layers."""

    n_heads: int = Field(4, ge=1, le=1024)
    """Attention (query) heads. head_dim = d_model / n_heads; 64-128 per head is the usual
    sweet spot for speed on GPUs. Must divide d_model."""

    n_kv_heads: int | None = Field(None, ge=1, le=1024)
    """Key/value heads for grouped-query attention; None means n_heads (classic multi-head).
    Fewer KV heads shrink the KV cache and speed up generation with little quality loss; must
    divide n_heads (1 = multi-query attention)."""

    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the MLP. None derives it: 4*d_model for gelu(_tanh)/relu2, 8/3*d_model
    rounded up to a multiple of 64 for swiglu (same parameter count as a 4x gelu MLP)."""

    activation: Literal["swiglu", "gelu", "gelu_tanh", "relu2"] = "swiglu"
    """MLP non-linearity. swiglu (Llama) trains best per parameter; gelu (exact erf form) matches
    BERT checkpoints and gelu_tanh (its tanh approximation, `gelu_new`) GPT-2 ones; relu2 (squared
    ReLU) is cheap and strong for small pretraining runs."""

    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation layer. rmsnorm is cheaper and standard in modern LLMs; layernorm is what
    GPT-2/BERT checkpoints were trained with."""

    norm_position: Literal["pre", "post"] = "pre"
    """Where each block normalises. pre (`x + f(norm(x))`, then a final norm) trains stably at
    any depth without warmup tricks and is what modern models use; post (`norm(x + f(x))`, the
    original Transformer and BERT; the model's own norm then normalises the embeddings) is
    needed to import BERT checkpoints. decoder and encoder only."""

    norm_eps: float = Field(1e-5, gt=0, le=1e-2)
    """Epsilon inside the norm for numerical safety. Match the checkpoint when importing
    (Llama uses 1e-5 or 1e-6, BERT 1e-12); otherwise leave it."""

    positional: Literal["rope", "learned"] = "rope"
    """Position encoding. rope (rotary) extrapolates better and has no parameters; learned
    absolute embeddings match GPT-2/BERT checkpoints and cap the context at max_seq_len."""

    rope_theta: float = Field(10000.0, gt=0)
    """RoPE base frequency. Larger values (e.g. 500000) suit long contexts; keep 10000 for
    contexts up to a few thousand tokens or to match a checkpoint."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual branches. 0 for pretraining (data is the regulariser);
    0.05-0.1 helps when fine-tuning small datasets that overfit."""

    bias: bool = False
    """Add biases to linear layers and norms. Modern LLMs drop them (fewer parameters, more
    stable); GPT-2 and BERT checkpoints need them on."""

    qkv_bias: bool = False
    """Bias on the query/key/value projections only (Qwen2 has it). Needed to import such
    checkpoints; otherwise leave off."""

    qk_norm: bool = False
    """Normalise queries and keys per head before attention. Stabilises training at high
    learning rates and large scale at a small cost; needed for checkpoints that use it."""

    type_vocab_size: int = Field(0, ge=0, le=1024)
    """Token-type (segment) embeddings added to the token embeddings: BERT's sentence A/B ids
    (it has 2). 0 means none, the right choice unless importing such a checkpoint; encoder
    only."""

    tie_embeddings: bool = False
    """Share the input embedding and output head weights. Saves vocab_size*d_model parameters,
    which matters for small models; untied heads train slightly better at scale."""

    vocab_size: int = Field(8192, ge=2, le=2**22)
    """Number of token ids; must match the tokenizer (checked when data and model meet). A
    bigger vocab shortens sequences but costs embedding memory; for small models keep it small."""

    max_seq_len: int = Field(256, ge=1, le=2**20)
    """Longest sequence the model trains on (context length). Attention cost grows with its
    square and activation memory linearly; raise it only when the data has long documents."""

    init_std: float = Field(0.02, gt=0, le=1.0)
    """Standard deviation of the normal weight init; output projections are further scaled by
    1/sqrt(2*n_layers) so the residual stream does not grow with depth. 0.02 is the GPT-2/Llama
    default."""

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must divide d_model ({self.d_model}): each head gets "
                f"d_model/n_heads dimensions. Pick n_heads from {_divisors(self.d_model)} or "
                "change d_model."
            )
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}) so that "
                f"query heads share key/value heads evenly. Pick one of "
                f"{_divisors(self.n_heads)}, or leave it unset for multi-head attention."
            )
        if self.norm_position == "post" and self.arch == "encoder_decoder":
            raise ValueError(
                "norm_position=post is implemented for decoder and encoder models only; use "
                "norm_position=pre with arch=encoder_decoder"
            )
        if self.type_vocab_size and self.arch != "encoder":
            raise ValueError(
                f"type_vocab_size={self.type_vocab_size} needs arch=encoder (token-type "
                f"embeddings are a BERT feature); set type_vocab_size=0 for arch={self.arch}"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(
                f"rope needs an even head_dim, but d_model/n_heads = {self.head_dim}. Change "
                "d_model or n_heads, or set positional=learned."
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)
        return 4 * self.d_model

    def param_count(self) -> int:
        """Parameters of the model this config builds (the model classes must agree exactly)."""
        d, ff, hd = self.d_model, self.ffn_dim, self.head_dim
        q, kv = self.n_heads * hd, self.kv_heads * hd
        norm = 2 * d if (self.norm == "layernorm" and self.bias) else d
        attn = d * q + 2 * d * kv + q * d
        if self.bias or self.qkv_bias:
            attn += q + 2 * kv
        if self.bias:
            attn += d
        if self.qk_norm:
            attn += 2 * hd
        mlp = (3 if self.activation == "swiglu" else 2) * d * ff
        if self.bias:
            mlp += (2 if self.activation == "swiglu" else 1) * ff + d
        block = attn + mlp + 2 * norm
        embed = self.vocab_size * d + (self.max_seq_len * d if self.positional == "learned" else 0)
        embed += self.type_vocab_size * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        if self.arch == "encoder_decoder":
            n_dec = self.n_decoder_layers or self.n_layers
            # decoder blocks add cross-attention (same shape as self-attention) and its norm
            return embed + head + self.n_layers * block + n_dec * (block + attn + norm) + 2 * norm
        return embed + head + self.n_layers * block + norm


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0][:12]


# ---------------------------------------------------------------------------------------- data


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


# ------------------------------------------------------------------------------------ pretrain


class PretrainConfig(Section):
    """Pretraining from scratch: objective and how long to train."""

    objective: Literal["auto", "clm", "mlm", "span"] = "auto"
    """Training objective. clm (next-token) for decoders, mlm (masked LM) for encoders, span
    (T5 span corruption) for encoder-decoders; auto picks the one that fits model.arch."""

    mask_ratio: float = Field(0.15, gt=0, lt=1)
    """Fraction of tokens masked (mlm) or corrupted (span). 0.15 is BERT/T5's; higher (0.3-0.4)
    can train faster for larger encoders."""

    mean_span_length: float = Field(3.0, ge=1)
    """span objective: average length of corrupted spans (T5 uses 3)."""

    max_steps: int | None = Field(1000, ge=1)
    """Optimizer steps to train for. The run ends at whichever of max_steps, max_tokens or
    max_epochs comes first; None disables this bound."""

    max_tokens: int | None = Field(None, ge=1)
    """Training tokens to consume; None disables. ~20 tokens per parameter is compute-optimal
    (Chinchilla); small models benefit from far more."""

    max_epochs: float | None = Field(None, gt=0)
    """Passes over the training split; None disables. More than a few epochs overfits."""

    @model_validator(mode="after")
    def _some_bound(self) -> PretrainConfig:
        if self.max_steps is None and self.max_tokens is None and self.max_epochs is None:
            raise ValueError(
                "set at least one of max_steps, max_tokens or max_epochs, or the run never ends"
            )
        return self


# ------------------------------------------------------------------------------------ finetune


class TaskSpec(Section):
    """One task of a multitask fine-tune (`finetune.tasks`): its data, head and loss weight."""

    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Task name: its head is `heads.<name>` and its metrics `val/<name>/...`."""

    task: Literal["lm", "classification", "regression"] = "classification"
    """lm: instruction data through the language-model head (a per-task prompt lives in the
    data); classification/regression: a head of its own on the pooled hidden state."""

    dataset: str
    """Training JSONL of this task."""

    val_dataset: str | None = None
    """Validation JSONL; None holds out finetune.val_fraction of `dataset`."""

    labels: list[str] = Field(default_factory=list)
    """Class names (classification); empty: integer labels 0..num_labels-1."""

    num_labels: int | None = Field(None, ge=1)
    """Head outputs; None: len(labels) (classification) or 1 (regression)."""

    weight: float = Field(1.0, gt=0)
    """Multiplier of this task's loss in the sum the optimizer minimises."""

    text_field: str = "text"
    """JSON field holding the input text (classification/regression)."""

    label_field: str = "label"
    """JSON field holding the label (a class name, an integer, or a number for regression)."""


class FinetuneConfig(Section):
    """Adapting a pretrained model: base, data, method, adapter sizes, frozen parts and heads."""

    base: str | None = None
    """The pretrained model to start from: a plinth run or checkpoint directory, a directory
    written by `plinth import`, or a reference model by name (ref-smollm2, ref-minilm: imported
    on first use into ~/.cache/plinth/models)."""

    dataset: str | None = None
    """Training data, JSONL. lm: prompt/completion, Alpaca instruction/input/output or chat
    messages; classification/regression: objects with `text_field` and `label_field`."""

    val_dataset: str | None = None
    """Validation JSONL in the same format; None holds out `val_fraction` of `dataset`."""

    val_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of `dataset` held out for validation when no val_dataset is given."""

    format: Literal["auto", "prompt_completion", "alpaca", "messages"] = "auto"
    """Instruction data layout; auto detects it from the first record."""

    chat_template: str = "auto"
    """auto: the base model's own chat template when its tokenizer has one, else the plain
    "### Instruction / ### Response" layout; none: always the plain layout; or a path to a
    Jinja2 template file."""

    system_prompt: str | None = None
    """System message prepended to every conversation (chat templates only)."""

    max_length: int = Field(512, ge=8)
    """Tokens per example (and per packed row). Longer examples are handled by `overlong`."""

    overlong: Literal["truncate", "drop"] = "truncate"
    """Examples longer than max_length: truncate keeps the start (counted in the run's events),
    drop skips them (counted)."""

    packing: bool = True
    """lm: put several short examples in one row (attention and positions stay inside each
    example), far fewer padding tokens; off: one example per row."""

    method: Literal["full", "lora", "dora", "qlora", "adapter", "prefix", "ia3"] = "lora"
    """full updates every weight (best quality, most memory); lora/dora train small low-rank
    updates (a few % of memory); qlora also stores the base in 4-bit; adapter, prefix and ia3
    are other parameter-efficient methods."""

    rank: int = Field(8, ge=1, le=4096)
    """LoRA/DoRA rank (adapter bottleneck for `adapter`, prefix length for `prefix`). Higher:
    more capacity and memory; 8-64 covers most tasks."""

    alpha: float = Field(16.0, gt=0)
    """LoRA scaling: updates are multiplied by alpha/rank. Keep alpha ~ 2*rank; change rank and
    alpha together."""

    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter input. Helps small datasets; 0 for large ones."""

    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    """Name patterns (fnmatch) of linear layers that get adapters. Adding the MLP projections
    (gate_proj, up_proj, down_proj) costs memory and usually improves quality."""

    freeze_layers: int = Field(0, ge=0)
    """Freeze the embeddings and the first K transformer blocks (full fine-tuning). Saves memory
    and protects general knowledge in the lower layers."""

    trainable: list[str] = Field(default_factory=list)
    """If non-empty, train only parameters whose names match these patterns (plus adapters and
    heads), freezing everything else."""

    task: Literal["lm", "classification", "regression"] = "lm"
    """Head on top of the model: lm keeps the language-model head (SFT, continued pretraining);
    classification/regression add a pooled head trained with cross-entropy/MSE."""

    labels: list[str] = Field(default_factory=list)
    """Class names of a classification task, in head order; labels in the data must be one of
    them. Empty: integer labels 0..num_labels-1."""

    num_labels: int | None = Field(None, ge=1)
    """Outputs of the classification head; None: len(labels) (1 for regression)."""

    text_field: str = "text"
    """JSON field holding the input text (classification/regression)."""

    label_field: str = "label"
    """JSON field holding the label: a class name, an integer class, or a number (regression)."""

    pooling: Literal["auto", "mean", "cls", "last"] = "auto"
    """How a head sees a sequence: mean of the token states, the first (CLS) token, or the last
    real token. auto: mean for encoders (sentence-embedding models are trained so), last for
    decoders (the only token that has seen the whole input)."""

    tasks: list[TaskSpec] = Field(default_factory=list)
    """Multitask fine-tuning: several datasets, each with its own head (or the LM head) and loss
    weight. When set, the single-task fields above (dataset, task, labels, ...) are unused."""

    epochs: float = Field(3.0, gt=0)
    """Passes over the fine-tuning data. 1-3 for SFT; more risks overfitting small datasets."""

    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps even if `epochs` is not done."""

    @model_validator(mode="after")
    def _tasks_unique(self) -> FinetuneConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"finetune.tasks names must be unique; repeated: {', '.join(dup)}")
        return self


# --------------------------------------------------------------------------------------- optim


class EarlyStopConfig(Section):
    """Stop training when validation stops improving."""

    metric: str = "val_loss"
    """Validation metric to watch (lower is better for losses)."""

    patience: int | None = Field(None, ge=1)
    """Evaluations without improvement before stopping; None disables early stopping."""

    min_delta: float = Field(0.0, ge=0)
    """Improvement smaller than this does not reset the patience counter."""


class OptimConfig(Section):
    """Optimizer, learning-rate schedule, batch size and regularisation."""

    name: Literal["adamw", "adam", "sgd", "muon"] = "adamw"
    """Optimizer. adamw is the safe default; muon (orthogonalised momentum for 2-D hidden
    weights, AdamW for the rest) often reaches a loss faster in pretraining; sgd with momentum
    mainly for baselines; adam applies decay as L2 (rarely what you want)."""

    lr: float = Field(1e-3, gt=0, le=10)
    """Peak learning rate. Too high diverges, too low wastes compute. Smaller models tolerate
    higher rates (~1e-3 at 10M params, ~3e-4 at 1B); fine-tuning uses ~1e-5 full, ~1e-4 LoRA."""

    betas: tuple[float, float] = (0.9, 0.95)
    """Adam momentum coefficients. beta2=0.95 reacts faster to gradient changes and is more
    stable for LLM pretraining than 0.999."""

    eps: float = Field(1e-8, gt=0, le=1)
    """Adam epsilon; raise (1e-6) if low-precision training shows instability."""

    weight_decay: float = Field(0.1, ge=0, le=10)
    """Decoupled weight decay on matrices (never on norms, biases and embeddings). 0.1 is
    standard for pretraining; 0-0.01 for fine-tuning."""

    momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum for sgd and for muon's hidden-weight update."""

    schedule: Literal["constant", "linear", "cosine", "wsd"] = "cosine"
    """Learning-rate shape after warmup. cosine decays smoothly to min_lr; wsd (warmup-stable-
    decay) holds the peak and decays in the final decay_frac, so a run can be extended; linear
    decays linearly; constant never decays."""

    warmup_steps: int = Field(100, ge=0)
    """Steps of linear warmup from 0 to lr. Prevents early divergence with Adam; ~1-5% of the
    run."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of lr for decaying schedules."""

    decay_frac: float = Field(0.2, gt=0, le=1)
    """wsd only: fraction of the run spent in the final decay."""

    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value (the pre-clip norm is logged). 1.0 is
    standard; None disables clipping."""

    global_batch: int = Field(32, ge=1)
    """Batch per optimizer step across all devices, in `batch_unit`s. Larger: smoother
    gradients and better hardware use, fewer steps per token; memory is bounded by micro_batch
    since the rest is gradient accumulation."""

    batch_unit: Literal["sequences", "tokens"] = "sequences"
    """Unit of global_batch. `tokens` keeps the batch fixed when max_seq_len changes (LLM
    papers quote batch sizes in tokens)."""

    micro_batch: int = Field(8, ge=1)
    """Sequences per forward/backward pass on each device. Raise until memory is full; the
    global batch is reached by accumulating micro-batches."""

    z_loss: float = Field(0.0, ge=0)
    """Weight of the z-loss (log-sum-exp of logits squared, PaLM). ~1e-4 keeps logits from
    drifting and stabilises large runs; 0 disables."""

    early_stop: EarlyStopConfig = Field(default_factory=EarlyStopConfig)
    """Early stopping on a validation metric (off unless patience is set)."""

    def sequences_per_step(self, seq_len: int) -> int:
        """Global batch in sequences, whichever unit it was given in."""
        if self.batch_unit == "sequences":
            return self.global_batch
        if self.global_batch % seq_len:
            raise ValueError(
                f"optim.global_batch={self.global_batch} tokens is not a multiple of the "
                f"sequence length {seq_len}; use {max(1, self.global_batch // seq_len) * seq_len}"
            )
        return self.global_batch // seq_len

    def accum_steps(self, seq_len: int, world_size: int = 1) -> int:
        """Micro-batches each device accumulates per optimizer step."""
        seqs = self.sequences_per_step(seq_len)
        per_step = self.micro_batch * world_size
        if seqs % per_step:
            raise ValueError(
                f"global batch of {seqs} sequences is not a multiple of micro_batch "
                f"({self.micro_batch}) x world size ({world_size}) = {per_step}; set "
                f"optim.global_batch to a multiple of {per_step}"
            )
        return seqs // per_step


# ------------------------------------------------------------------------------------ hardware


class HardwareConfig(Section):
    """Where and how fast the model runs: device, precision, memory savers."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Compute device. auto picks cuda when a GPU is visible, else cpu."""

    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Numeric precision of compute. bf16 autocast halves activation memory and is much faster
    on GPUs from A100 on, at a small accuracy cost; fp16 needs loss scaling (older GPUs); fp32
    is exact and the only fast choice on most CPUs."""

    activation_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: ~30% more compute
    for far less activation memory. Turn on when a larger micro-batch or model must fit."""

    compile: bool = False
    """Compile the model with torch.compile: faster steps after a one-off compile delay
    (tens of seconds). Worth it for runs longer than a few minutes."""

    num_workers: int = Field(0, ge=0, le=64)
    """Data-loader worker processes. Reading memory-mapped shards is cheap, so 0 (in-process)
    is usually fastest; raise it if data loading shows up in the step time."""


# --------------------------------------------------------------------------------- distributed


class DistributedConfig(Section):
    """Multi-process training under torchrun: how the model is replicated or sharded.

    Launch with `torchrun --nproc_per_node=N -m plinth pretrain CONFIG`; rank and world size
    come from torchrun's environment. A single process ignores this section."""

    strategy: Literal["auto", "none", "ddp", "fsdp", "hsdp"] = "auto"
    """ddp replicates the model on every rank and all-reduces gradients (fits when one device
    holds weights + gradients + optimizer state); fsdp (FSDP2) shards parameters, gradients and
    optimizer state across all ranks (ZeRO-3: for models that do not fit one device); hsdp
    shards within groups of `shard_size` ranks (usually one node) and replicates across groups,
    keeping the heavy traffic on the fast intra-node links. auto: ddp when world size > 1."""

    shard_size: int | None = Field(None, ge=1)
    """hsdp only: ranks that share one copy of the model; must divide the world size. None
    means the ranks of one node (torchrun's LOCAL_WORLD_SIZE)."""

    param_dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fsdp/hsdp mixed precision: dtype the gathered parameters compute in. auto follows
    hardware.precision. The sharded master weights and the optimizer stay fp32."""

    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    """fsdp/hsdp mixed precision: dtype of the gradient reduce-scatter. fp32 is exact; bf16
    halves the traffic at a small accuracy cost."""

    reshard_after_forward: bool = True
    """fsdp/hsdp: free gathered parameters after each block's forward and gather them again in
    backward (ZeRO-3, least memory). false keeps them until backward (ZeRO-2-like, less
    communication, more memory)."""

    bucket_mb: int = Field(25, ge=1)
    """ddp: gradient bucket size in MB; each full bucket is all-reduced while backward goes on."""

    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process-group backend. auto: nccl on GPUs, gloo on CPU."""

    timeout_s: int = Field(600, ge=10)
    """Seconds a collective waits for the other ranks before failing. When a rank dies the
    others stop with a clear error after at most this long instead of hanging (torchrun usually
    stops them sooner)."""


# ----------------------------------------------------------------------------------- inference


class InferenceConfig(Section):
    """Text generation defaults, used by generate, chat, serve and training samples."""

    temperature: float = Field(0.8, ge=0)
    """Sampling temperature; 0 means greedy. Higher is more diverse and more error-prone."""

    top_k: int | None = Field(50, ge=1)
    """Sample only from the k most likely tokens; None disables. Cuts off the long tail."""

    top_p: float | None = Field(0.95, gt=0, le=1)
    """Nucleus sampling: smallest token set with this total probability; None disables."""

    repetition_penalty: float = Field(1.0, gt=0)
    """Divide logits of tokens already present (>1 discourages repeats; 1.0 disables)."""

    beam_width: int = Field(1, ge=1, le=64)
    """Beams for beam search; 1 means sampling/greedy. Beams help translation/summarisation,
    rarely open-ended chat."""

    max_new_tokens: int = Field(128, ge=1)
    """Upper bound on generated tokens per prompt."""

    batch_size: int = Field(8, ge=1)
    """Prompts decoded together. Larger uses the device better and needs more KV-cache memory."""

    stop: list[str] = Field(default_factory=list)
    """Strings that end generation when produced (not included in the output)."""

    seed: int | None = None
    """Seed for reproducible sampling; None draws fresh randomness."""


# ------------------------------------------------------------------------------------ compress


class CompressConfig(Section):
    """Making a trained model smaller and cheaper to serve."""

    quantization: Literal["none", "int8", "int4"] = "none"
    """Weight-only quantisation. int8 halves memory vs bf16 with negligible loss; int4 quarters
    it with a measurable loss (check perplexity)."""

    group_size: int = Field(128, ge=8)
    """Weights sharing one quantisation scale (int4). Smaller groups are more accurate and use
    a little more memory."""

    pruning: Literal["none", "magnitude", "structured"] = "none"
    """Weight pruning method. magnitude zeroes the smallest weights (unstructured); structured
    removes whole MLP channels (real speed-ups on any hardware)."""

    sparsity: float = Field(0.0, ge=0, lt=1)
    """Fraction of weights (or channels) pruned. Quality drops quickly beyond ~0.5."""

    distill_teacher: str | None = None
    """Run or checkpoint directory of a teacher model to distil into this (smaller) model."""

    distill_temperature: float = Field(2.0, gt=0)
    """Softmax temperature for distillation; higher transfers more of the teacher's ranking of
    unlikely tokens."""

    distill_alpha: float = Field(0.5, ge=0, le=1)
    """Weight of the distillation loss vs the ordinary loss on labels."""


# ------------------------------------------------------------------------------------ tracking


class TrackingConfig(Section):
    """Run directory, logging cadence and metric sinks."""

    run_name: str | None = None
    """Name of the run directory under output_dir; None uses the recipe name and a timestamp."""

    output_dir: str = "runs"
    """Parent directory of run directories; `plinth runs` lists what is under it. Point it at
    fast local disk with room for checkpoints."""

    log_every: int = Field(10, ge=1)
    """Optimizer steps between metric records. Smaller is finer curves at slightly more
    overhead."""

    eval_every: int = Field(200, ge=1)
    """Steps between validation evaluations (also at the end)."""

    eval_batches: int = Field(20, ge=1)
    """Micro-batches per validation evaluation. More is a less noisy estimate, more time."""

    eval_tasks: list[str] = Field(default_factory=list)
    """Evaluation tasks scored during training (decoders), like `plinth eval --tasks`: built-in
    names (arithmetic, capitals, ...), `suite`, or task YAML paths. Logged as `eval/<task>/
    <metric>` next to validation loss. Empty: none."""

    eval_tasks_every: int | None = Field(None, ge=1)
    """Steps between task evaluations (also at the end); None: every eval_every."""

    eval_tasks_limit: int | None = Field(50, ge=1)
    """Examples scored per task each time (the first N: the same ones every time). None: all."""

    checkpoint_every: int = Field(500, ge=1)
    """Steps between checkpoints (also at the end). More frequent: less lost work on a crash,
    more disk and time."""

    keep_last: int = Field(2, ge=1)
    """Checkpoints kept besides the best one; older ones are deleted."""

    sample_every: int = Field(500, ge=1)
    """Steps between text samples from the fixed prompts (decoder models)."""

    sample_prompts: list[str] = Field(default_factory=lambda: ["def ", "The "])
    """Fixed prompts sampled during training, so samples compare across steps and runs."""

    sinks: list[Literal["jsonl", "tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"]
    )
    """Where metrics go. jsonl (metrics.jsonl in the run directory) is always written; the
    others need the `track` extra."""


# ----------------------------------------------------------------------------------- stability


class StabilityConfig(Section):
    """Stability guard run every optimizer step: non-finite values, spikes, rollback, stalls."""

    enabled: bool = True
    """Check every step's loss and gradient norm. Costs microseconds per step (it only looks at
    floats the loop already has); turn off only to reproduce how unguarded training behaves."""

    on_nonfinite: Literal["skip", "halt"] = "skip"
    """What a NaN/Inf loss or gradient norm does. `skip` drops that update (weights stay finite)
    and goes on, so one bad batch costs one step; `halt` stops at once so you can inspect the
    state. Repeated non-finite steps count toward the rollback rule either way."""

    spike_metrics: list[Literal["loss", "grad_norm"]] = Field(
        default_factory=lambda: ["loss", "grad_norm"]
    )
    """Metrics watched for upward spikes (grad_norm is the pre-clip norm). Gradient-norm spikes
    often come a few steps before loss spikes; drop grad_norm if its natural swings (e.g. right
    after warmup) cause false alarms."""

    on_spike: Literal["log", "skip"] = "skip"
    """What a spike does. `skip` drops the update, so one poisoned batch cannot move the weights;
    `log` only records the event (use it to measure how often spikes happen before acting)."""

    window: int = Field(128, ge=8, le=100_000)
    """Recent steps whose mean and standard deviation define "normal" for spike detection.
    Longer windows are steadier but adapt more slowly to a loss that is still falling fast."""

    min_history: int = Field(64, ge=2)
    """Finite values a window must hold before spikes are checked (the first steps of a run and
    of a warmup are naturally wild). Must not exceed window; lower it for very short runs."""

    z_threshold: float = Field(6.0, gt=0)
    """A value more than this many standard deviations above the window mean is a spike
    (one-sided). Lower catches more real spikes and more noise; 6 almost never fires on a
    healthy run."""

    blowup_count: int = Field(4, ge=1)
    """Anomalies (spikes or non-finite steps) within blowup_steps that count as a persistent
    blow-up and trigger a rollback to the last good checkpoint. Lower reacts sooner and rolls
    back more often."""

    blowup_steps: int = Field(32, ge=1)
    """Length in steps of the sliding span in which blowup_count anomalies mean a blow-up.
    Widen it to catch slower divergence; it should stay well below tracking.checkpoint_every
    times the number of checkpoints kept."""

    max_rollbacks: int = Field(3, ge=0)
    """Rollbacks allowed in one run; the next blow-up halts it. Bounds the compute spent
    retrying a run that keeps diverging (then lower the learning rate instead). 0 means halt
    on the first blow-up."""

    stall_fraction: float = Field(0.25, gt=0, lt=1)
    """Throughput (tokens/s) below this fraction of its recent median is reported as a stall
    (an event; training goes on). Raise it to catch milder slowdowns (slow disk, throttling)."""

    stall_window: int = Field(32, ge=4)
    """Logged throughput values whose median is the stall reference. Longer is steadier but
    takes longer to accept a new normal after a lasting change (e.g. a resume on other
    hardware)."""

    @model_validator(mode="after")
    def _check_history(self) -> StabilityConfig:
        if self.min_history > self.window:
            raise ValueError(
                f"stability.min_history ({self.min_history}) exceeds stability.window "
                f"({self.window}): the window can never hold that many values. Lower "
                "min_history or raise window."
            )
        return self


# -------------------------------------------------------------------------------------- config


class Config(Section):
    """Everything a plinth run needs; every value can be set in YAML or as key=value."""

    preset: str | None = None
    """Named starting point applied before your YAML (see `plinth config presets`), e.g.
    `small` for a ~125M decoder or `ref-cpu-decoder` for the CPU benchmark workload."""

    seed: int = 1337
    """Seed for weights, data order, masking and dropout. Same seed + config = same run."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    """Architecture (see `plinth config explain model`)."""

    data: DataConfig = Field(default_factory=DataConfig)
    """Data preparation and loading (see `plinth config explain data`)."""

    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    """Pretraining objective and length (see `plinth config explain pretrain`)."""

    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    """Fine-tuning method and task head (see `plinth config explain finetune`)."""

    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer, schedule and batch (see `plinth config explain optim`)."""

    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    """Device, precision and memory savers (see `plinth config explain hardware`)."""

    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """Multi-process strategy under torchrun (see `plinth config explain distributed`)."""

    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    """Generation defaults (see `plinth config explain inference`)."""

    compress: CompressConfig = Field(default_factory=CompressConfig)
    """Quantisation, pruning, distillation (see `plinth config explain compress`)."""

    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """Run directory and logging (see `plinth config explain tracking`)."""

    stability: StabilityConfig = Field(default_factory=StabilityConfig)
    """Non-finite and spike guard, rollback, stall detection (`plinth config explain
    stability`)."""

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        objective, arch = self.pretrain.objective, self.model.arch
        if objective != "auto" and objective != OBJECTIVE_FOR_ARCH[arch]:
            raise ValueError(
                f"pretrain.objective={objective} does not fit model.arch={arch}; use "
                f"pretrain.objective={OBJECTIVE_FOR_ARCH[arch]} (or auto)"
            )
        tok = self.data.tokenizer
        if tok.path is None and tok.vocab_size not in (None, self.model.vocab_size):
            raise ValueError(
                f"data.tokenizer.vocab_size ({tok.vocab_size}) differs from model.vocab_size "
                f"({self.model.vocab_size}): the model's embedding must match the tokenizer it "
                "trains; set only model.vocab_size (the tokenizer follows it)"
            )
        return self

    @property
    def objective(self) -> str:
        """The pretraining objective after resolving `auto` from the architecture."""
        o = self.pretrain.objective
        return OBJECTIVE_FOR_ARCH[self.model.arch] if o == "auto" else o

    @property
    def tokenizer_vocab_size(self) -> int:
        return self.data.tokenizer.vocab_size or self.model.vocab_size


OBJECTIVE_FOR_ARCH = {"decoder": "clm", "encoder": "mlm", "encoder_decoder": "span"}
