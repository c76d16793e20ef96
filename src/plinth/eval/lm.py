"""Language-model metrics: loss, perplexity and bits per byte of a text file or a prepared
dataset split, with sliding windows for documents longer than the model's context.

    plinth eval runs/quickstart --text README.md --dataset data/default --split val

Each document is scored token by token after an end-of-text token (so its first token counts
too). A document longer than the window is covered by windows of `window` tokens that start
`stride` tokens apart; each window scores only the tokens the previous one did not, so every
token is scored exactly once, with up to `window` tokens of left context (the Hugging Face
perplexity recipe). stride = window is fastest (chunks, no overlap); smaller strides give each
token more context and a lower, fairer loss.

Bits per byte = total loss in bits / UTF-8 bytes of the text: unlike per-token loss it does not
depend on the tokenizer, so it compares models with different vocabularies.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from plinth.errors import UsageError
from plinth.eval import metrics as M
from plinth.eval.scoring import EvalModel


def window_spans(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a sequence S of n_targets + 1 tokens (S[0] only gives context): each
    (begin, end, n_scored) feeds S[begin:end] and scores the last n_scored of its predictions,
    i.e. targets S[end - n_scored + 1 : end + 1]. Every target is scored once."""
    if window < 1 or not 1 <= stride <= window:
        raise UsageError(f"need 1 <= stride ({stride}) <= window ({window})")
    spans, begin, done = [], 0, 0
    while done < n_targets:
        end = min(begin + window, n_targets)
        spans.append((begin, end, end - done))
        done = end
        begin += stride
    return spans


def sequences_nll(
    lm: EvalModel,
    sequences: list[list[int]],
    window: int,
    stride: int,
    batch_size: int = 8,
    batch_tokens: int = 4096,
) -> tuple[float, int]:
    """(summed negative log-likelihood in nats, tokens scored) over sequences whose first
    token is context only, with sliding windows (see the module docstring). A forward pass
    takes batch_size windows, or more when they are short (up to batch_tokens tokens)."""
    per_seq = sequence_nlls(lm, sequences, window, stride, batch_size, batch_tokens)
    return sum(nll for nll, _ in per_seq), sum(n for _, n in per_seq)


@torch.no_grad()
def sequence_nlls(
    lm: EvalModel,
    sequences: list[list[int]],
    window: int,
    stride: int,
    batch_size: int = 8,
    batch_tokens: int = 4096,
) -> list[tuple[float, int]]:
    """(negative log-likelihood in nats, tokens scored) of each sequence, scored like
    `sequences_nll` (windows of all sequences batched together)."""
    jobs = []  # (sequence index, begin, end, n_scored)
    for k, seq in enumerate(sequences):
        if len(seq) >= 2:
            jobs += [(k, b, e, n) for b, e, n in window_spans(len(seq) - 1, window, stride)]
    jobs.sort(key=lambda j: -(j[2] - j[1]))
    device = next(lm.model.parameters()).device
    out = [(0.0, 0)] * len(sequences)
    start = 0
    while start < len(jobs):
        width = jobs[start][2] - jobs[start][1]
        rows = max(batch_size, batch_tokens // max(width, 1))
        chunk = jobs[start : start + rows]
        start += rows
        x = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T) right-padded
        for r, (k, b, e, _) in enumerate(chunk):
            x[r, : e - b] = torch.tensor(sequences[k][b:e])
        logits = lm.model(x.to(device))  # (B, T, V)
        for r, (k, b, e, n) in enumerate(chunk):
            lp = logits[r, e - b - n : e - b].float().log_softmax(-1)  # (n, V)
            tgt = torch.tensor(sequences[k][e - n + 1 : e + 1], device=lp.device)
            nll, count = out[k]
            out[k] = (nll - lp.gather(-1, tgt[:, None]).sum().item(), count + n)
    return out


@dataclass
class LMResult:
    source: str
    docs: int
    tokens: int
    bytes: int
    loss: float
    perplexity: float
    bits_per_byte: float
    window: int
    stride: int
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _start(lm: EvalModel) -> list[int]:
    if lm.eos_id is None:
        raise UsageError(
            f"{lm.name} has no end-of-text token to start documents from; perplexity needs one"
        )
    return [lm.eos_id]


def _result(source, docs, nll, count, n_bytes, window, stride, t0) -> LMResult:
    return LMResult(
        source=source,
        docs=docs,
        tokens=count,
        bytes=n_bytes,
        loss=nll / count if count else math.nan,
        perplexity=M.perplexity(nll, count),
        bits_per_byte=M.bits_per_byte(nll, n_bytes),
        window=window,
        stride=stride,
        seconds=time.perf_counter() - t0,
    )


def _window_stride(lm: EvalModel, window: int | None, stride: int | None) -> tuple[int, int]:
    w = min(window or lm.max_len, lm.max_len)
    if stride is not None and stride > w:
        raise UsageError(
            f"--stride {stride} is larger than the window of {w} tokens (--window, at most the "
            f"model's context of {lm.max_len}); use a stride of at most {w}"
        )
    return w, stride or w


def evaluate_text(
    lm: EvalModel,
    path: str | Path,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> LMResult:
    """Loss / perplexity / bits per byte of a UTF-8 text file, scored as one document."""
    t0 = time.perf_counter()
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text {p}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {p} is not UTF-8 text (byte {e.start + 1}); save it as UTF-8")\
            from None
    if not text.strip():
        raise UsageError(f"--text {p} is empty: there is no text to score; give a text file")
    w, s = _window_stride(lm, window, stride)
    nll, count = sequences_nll(lm, [_start(lm) + lm.encode(text)], w, s, batch_size)
    return _result(str(p), 1, nll, count, len(text.encode("utf-8")), w, s, t0)


def evaluate_dataset(
    lm: EvalModel,
    path: str | Path,
    split: str = "val",
    limit: int | None = None,
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
) -> LMResult:
    """The same metrics over the documents of a prepared dataset split (`plinth data prepare`).
    With the model's own tokenizer the stored tokens are scored as they are; another tokenizer's
    dataset is decoded to text and re-encoded, so bits per byte still compare."""
    from plinth.data import open_dataset

    t0 = time.perf_counter()
    ds = open_dataset(path)
    n_docs = ds.num_docs(split)
    n = n_docs if limit is None else min(limit, n_docs)
    same = ds.tokenizer.to_str() == lm.tokenizer.to_str()
    seqs, n_bytes = [], 0
    for i in range(n):
        ids = [int(t) for t in ds.doc_tokens(split, i)]
        if not same:
            text = ds.decode(ids)
            n_bytes += len(text.encode("utf-8"))
            ids = lm.encode(text)
        seqs.append(_start(lm) + ids)
    if same:
        tokens = sum(len(s) - 1 for s in seqs)
        if n == n_docs:  # the bytes measured when the dataset was prepared
            n_bytes = round(ds.bytes_per_token(split) * tokens)
        else:
            n_bytes = sum(len(ds.decode(s[1:]).encode("utf-8")) for s in seqs)
    w, s = _window_stride(lm, window, stride)
    nll, count = sequences_nll(lm, seqs, w, s, batch_size)
    return _result(f"{path}:{split}", n, nll, count, n_bytes, w, s, t0)
