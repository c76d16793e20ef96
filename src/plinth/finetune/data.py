"""Fine-tuning data as fixed arrays of rows, and the loaders that feed them to the loop.

- instruction data (task lm): plinth.data.sft renders and tokenizes it; rows are packed
  examples (input_ids, labels, segment_ids, position_ids) or one example per row.
- labelled data (classification/regression): JSONL objects with a text field and a label
  field; rows are input_ids + attention_mask (+ label).

`RowLoader` shuffles rows per epoch from the seed; each global micro-batch is `micro x world`
rows and rank r takes its slice. The state is (epoch, row offset): exact resume on any world
size. Batches are cut to their longest row, so short examples cost short compute.
`MixLoader` interleaves several tasks' loaders (multitask), choosing the task of the k-th
micro-batch from (seed, k) with probability proportional to the task's rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from plinth.data.sft import read_jsonl
from plinth.errors import UsageError
from plinth.models.layers import IGNORE_INDEX


class Batch(dict):
    """Named tensors of one micro-batch (plus `task`, the name of the task it belongs to)."""

    task: str = ""

    def to(self, device, non_blocking: bool = False) -> Batch:
        out = Batch({k: v.to(device, non_blocking=non_blocking) for k, v in self.items()})
        out.task = self.task
        return out


@dataclass
class Rows:
    """Equal-length rows of one task: arrays (N, L) (labels of classification may be (N,))."""

    arrays: dict[str, np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)
    prompts: list[tuple[str, str]] = field(default_factory=list)  # (prompt text, reference)

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def split(self, fraction: float, seed: int) -> tuple[Rows, Rows]:
        """(train, val) rows: a seeded `fraction` of the rows held out."""
        train, val = held_out(len(self), fraction, seed)
        pick = lambda idx: Rows({a: v[idx] for a, v in self.arrays.items()}, dict(self.counts))  # noqa: E731
        return pick(train), pick(val)


def held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices in order: a seeded `fraction` of range(n) held out."""
    order = np.random.default_rng(seed).permutation(n)
    k = round(n * fraction)
    return np.sort(order[k:]), np.sort(order[:k])


def real_length(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Per row, one past the last non-padding token."""
    mask = arrays["segment_ids"] > 0 if "segment_ids" in arrays else arrays["attention_mask"] > 0
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0)


class RowLoader:
    """Shuffled micro-batches of rows for this rank; see the module doc."""

    def __init__(
        self,
        rows: Rows,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        loop: bool = True,
        task: str = "",
    ):
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.loop, self.task = shuffle, loop, task
        self.epoch, self.row = 0, 0
        self.lengths = real_length(rows.arrays)

    def __len__(self) -> int:
        """Micro-batches per epoch on each rank (the last incomplete global batch is dropped when
        looping)."""
        per = self.batch_size * self.world_size
        n = len(self.rows)
        return n // per if self.loop else math.ceil(n / per)

    def _order(self) -> np.ndarray:
        n = len(self.rows)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "row": self.row}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.row = int(state["epoch"]), int(state["row"])

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        per = self.batch_size * self.world_size
        n = len(self.rows)
        if self.row >= n or (self.loop and self.row + per > n):
            if not self.loop:
                raise StopIteration
            self.epoch, self.row = self.epoch + 1, 0
        order = self._order()
        start = self.row + self.rank * self.batch_size
        idx = order[start : start + self.batch_size]
        self.row += per
        if len(idx) == 0:
            if not self.loop:
                raise StopIteration
            return next(self)
        return self.batch(idx)

    def batch(self, idx: np.ndarray) -> Batch:
        width = max(1, int(self.lengths[idx].max()))
        out = Batch(
            {
                k: torch.from_numpy(np.ascontiguousarray(v[idx, :width] if v.ndim == 2 else v[idx]))
                for k, v in self.rows.arrays.items()
            }
        )
        out.task = self.task
        return out


class MixLoader:
    """Micro-batches from several tasks' RowLoaders, the k-th from task choice(seed, k)."""

    def __init__(self, loaders: dict[str, RowLoader], seed: int):
        self.loaders, self.seed, self.k = loaders, seed, 0
        sizes = np.array([len(ld.rows) for ld in loaders.values()], dtype=np.float64)
        self.p = sizes / sizes.sum()
        self.names = list(loaders)

    def __len__(self) -> int:
        return sum(len(ld) for ld in self.loaders.values())

    def state_dict(self) -> dict:
        return {"k": self.k, "tasks": {n: ld.state_dict() for n, ld in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])
        for n, s in state["tasks"].items():
            self.loaders[n].load_state_dict(s)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        pick = np.random.default_rng([self.seed, 7, self.k]).choice(len(self.names), p=self.p)
        self.k += 1
        return next(self.loaders[self.names[pick]])


# ----------------------------------------------------------------------- labelled examples


def labelled_rows(
    path: str | Path,
    tokenizer,
    *,
    task: str,
    labels: list[str],
    num_labels: int,
    text_field: str,
    label_field: str,
    max_length: int,
    overlong: str,
    pad_id: int,
    key: str = "finetune",
) -> Rows:
    """Tokenized texts and labels of a classification/regression JSONL file."""
    records = read_jsonl(path)
    ids: list[list[int]] = []
    targets: list[float | int] = []
    counts = {"examples": len(records), "truncated": 0, "dropped": 0}
    for n, rec in enumerate(records, start=1):
        where = getattr(rec, "where", "") or f"{path} example {n}"
        if text_field not in rec or label_field not in rec:
            missing = text_field if text_field not in rec else label_field
            raise UsageError(
                f"{where} has no field {missing!r} (its keys: {', '.join(sorted(rec))[:200]}). Set "
                f"{key}.text_field / {key}.label_field to the fields that hold the text and label."
            )
        text = rec[text_field]
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            raise UsageError(
                f"{where}: field {text_field!r} is {kind} ({str(text)[:200]}), not text; write "
                f"it as a JSON string, or set {key}.text_field to the field that holds the text"
            )
        target = _label(rec[label_field], where, task, labels, num_labels, label_field, key)
        tok = tokenizer.encode(text).ids
        if len(tok) > max_length:
            if overlong == "drop":
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            tok = tok[:max_length]
        ids.append(tok)
        targets.append(target)
    if not ids:
        raise UsageError(f"no example of {path} survived: {counts}. Raise {key}.max_length.")
    counts["kept"] = len(ids)
    width = max(len(t) for t in ids)
    input_ids = np.full((len(ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(ids), width), dtype=np.int64)
    for i, t in enumerate(ids):
        input_ids[i, : len(t)] = t
        mask[i, : len(t)] = 1
    dtype = np.float32 if task == "regression" else np.int64
    return Rows(
        {"input_ids": input_ids, "attention_mask": mask, "label": np.asarray(targets, dtype)},
        counts,
    )


def _label(value, where, task, labels, num_labels, field_name, key) -> float | int:
    if task == "regression":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(
                f"{where}: {field_name}={value!r} is not a number; a regression task needs "
                "numeric labels"
            )
        return float(value)
    if labels:
        if value in labels:
            return labels.index(value)
        raise UsageError(
            f"{where}: {field_name}={value!r} is not one of the configured classes "
            f"({key}.labels: {', '.join(map(str, labels))}). Add it to {key}.labels or fix the "
            "example."
        )
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_labels:
        raise UsageError(
            f"{where}: {field_name}={value!r} is outside the configured classes 0..{num_labels - 1}"
            f" ({key}.num_labels={num_labels}). Use integer labels in that range, or name the "
            f"classes with {key}.labels."
        )
    return value


def sft_rows(sft, max_length: int, packing: bool, pad_id: int) -> Rows:
    """Rows of tokenized instruction examples: packed, or one example per row."""
    if packing:
        arrays = sft.pack(max_length, pad_id)
    else:
        n = len(sft.ids)
        arrays = {
            k: np.full((n, max_length), v, dtype=np.int64)
            for k, v in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("segment_ids", 0))
        }
        arrays["position_ids"] = np.zeros((n, max_length), dtype=np.int64)
        for i, (ids, lab) in enumerate(zip(sft.ids, sft.labels, strict=True)):
            arrays["input_ids"][i, : len(ids)] = ids
            arrays["labels"][i, : len(ids)] = lab
            arrays["segment_ids"][i, : len(ids)] = 1
            arrays["position_ids"][i, : len(ids)] = np.arange(len(ids))
    arrays.pop("position_ids")  # the model derives positions from segment_ids
    return Rows(arrays, dict(sft.counts))
