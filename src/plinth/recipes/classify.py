"""`plinth classify`: the classification/regression heads a fine-tune trained, on new texts.

    plinth classify runs/cls-minilm --text "The striker scored twice." --text "Bake for 20 min."
    plinth classify runs/cls-minilm --file texts.txt --output predictions.jsonl

The model is a fine-tuning run (its newest good checkpoint) or one of its checkpoints, loaded
through plinth.load with its heads. Texts are tokenized and truncated as in training
(finetune.max_length), pooled as the head was trained (finetune.pooling) and scored in batches;
each input gets its label and probability (regression: its value), and --output writes every
label's probability as JSONL, one row per input, in input order.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from plinth.errors import UsageError

QUOTE = 200  # at most this many characters of user input in a message
PREVIEW = 100  # characters of each text shown next to its prediction


def _q(value) -> str:
    """A user-given value (path, name) as quoted in a message: at most QUOTE characters."""
    text = str(value)
    return text if len(text) <= QUOTE else text[: QUOTE - 3] + "..."


def classify_cmd(
    model: str,
    *,
    text: list[str] = (),
    file: str | None = None,
    field: str | None = None,
    output: str | None = None,
    task: str | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    no_progress: bool = False,
) -> int:
    """Classify texts with a fine-tuned classification (or regression) head.

    MODEL is a `plinth finetune` run with task=classification/regression (or one of its
    checkpoints). Each input gets its predicted label and probability (regression: its value),
    one line per input; --output writes JSONL rows with every label's probability instead.
    Texts are truncated to the run's finetune.max_length tokens, as in training.

    Args:
        model: fine-tuning run or checkpoint directory with a classification/regression head
        text: a text to classify; repeat --text for several
        file: a .txt file (one text per line; blank lines skipped) or a .jsonl file (one object
            per line, the text in --field)
        field: JSONL field holding the text (default: the run's finetune.text_field)
        output: write JSONL results here ({"text", "label", "probability", "probabilities"};
            regression: {"text", "value"}) instead of printing
        task: the head to use when the run trained several (default: all of them)
        batch_size: texts scored together
        device: cpu, cuda, cuda:1, ...
        no_progress: no progress bar for --file
    """
    from plinth.config.load import load_config
    from plinth.config.tasks import head_labels
    from plinth.load import find_run, load_model, resolve

    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: give 1 or more texts per batch")
    if bool(text) == (file is not None):
        raise UsageError("give the texts to classify with --text TEXT (repeatable) or "
                         "--file FILE (.txt, one per line, or .jsonl), one of the two")
    if output is not None and file is not None and _same_file(output, file):
        raise UsageError(f"--output {_q(output)} is the input --file; write the results elsewhere")
    _check_device(device)
    if output is not None and not Path(output).parent.is_dir():
        raise UsageError(f"--output {_q(output)}: its directory does not "
                         "exist; create it or write elsewhere")
    path = resolve(model)
    run, _ = find_run(path)
    cfg = load_config([run / "config.yaml"]).config
    heads = head_labels(cfg) if cfg.finetune.base is not None else {}
    if not heads:
        what = (f"it was fine-tuned with finetune.task={cfg.finetune.task}"
                if cfg.finetune.base is not None else "it is not a fine-tune")
        raise UsageError(
            f"{_q(model)} has no classification or regression head ({what}); classify needs a run "
            "fine-tuned with one, e.g. `plinth finetune configs/cls-minilm.yaml`, then "
            "`plinth classify runs/cls-minilm --text ...`."
        )
    if task is not None:
        if task not in heads:
            raise UsageError(f"--task {task[:QUOTE]!r}: {_q(model)} has no such head; its heads: "
                             f"{', '.join(heads)}")
        heads = {task: heads[task]}
    if field is not None and (file is None or not _is_jsonl(Path(file))):
        raise UsageError(f"--field {field[:QUOTE]!r} names the text's field in a .jsonl --file; "
                         "drop it for --text and .txt files")
    if file is not None:
        where, texts = read_texts(Path(file), field or cfg.finetune.text_field)
    else:
        where, texts = [f"--text {i}" for i in range(1, len(text) + 1)], list(text)
    loaded = load_model(path, device=device, resolve_spec=False, chat=False)
    clf = Classifier(loaded.model, loaded.tokenizer, cfg, heads, pad_id=_pad_id(loaded))
    ids = clf.encode(texts, where)
    preds = clf.predict(ids, batch_size, progress=file is not None and not no_progress)
    if clf.truncated:
        print(f"note: {clf.truncated} of {len(texts)} texts were longer than "
              f"finetune.max_length={clf.max_length} tokens and were truncated, as in training",
              file=sys.stderr)
    if output is not None:
        write_jsonl(Path(output), texts, preds, heads)
        print(f"wrote {len(texts)} rows to {output}", file=sys.stderr)
    else:
        print_predictions(texts, preds, heads)
    return 0


# ------------------------------------------------------------------------------------ inputs


def read_texts(path: Path, field: str) -> tuple[list[str], list[str]]:
    """(where each text came from, the texts) of a .txt (one per line) or .jsonl file."""
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "no such file"
        raise UsageError(f"--file {_q(path)}: {what}; give a .txt file (one text per line) or a "
                         ".jsonl file")
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise UsageError(f"--file {_q(path)} contains NUL bytes: it looks binary, not text. Give a "
                         ".txt file (one text per line) or a .jsonl file")
    try:
        content = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsageError(f"--file {_q(path)} is not UTF-8 text (byte {e.start}); convert it to "
                         "UTF-8 or give another file") from None
    lines = content.splitlines()
    jsonl = _is_jsonl(path)
    where, texts = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if jsonl:
            line = _jsonl_text(path, n, line, field)
        where.append(f"{_q(path)} line {n}")
        texts.append(line)
    if not texts:
        raise UsageError(f"--file {_q(path)} has no texts (it is empty or blank); give one "
                         "text per line"
                         + (f", each a JSON object with {_q(field)!r}" if jsonl else ""))
    return where, texts


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in (".jsonl", ".json", ".ndjson")


def _jsonl_text(path: Path, n: int, line: str, field: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{_q(path)} line {n}: not valid JSON ({e.msg}); each line must be one "
                         f'object like {{"{_q(field)}": "..."}} (a .txt file takes plain lines)'
                         ) from None
    if not isinstance(row, dict) or field not in row:
        keys = ", ".join(sorted(row))[:QUOTE] if isinstance(row, dict) else type(row).__name__
        raise UsageError(f"{_q(path)} line {n} has no field {_q(field)!r} (found: {keys}); "
                         "name the field that holds the text with --field")
    if not isinstance(row[field], str):
        raise UsageError(f"{_q(path)} line {n}: {_q(field)!r} must be a string, got "
                         f"{type(row[field]).__name__}")
    return row[field]


def _same_file(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    try:
        return pa.resolve() == pb.resolve() or (pa.exists() and pa.samefile(pb))
    except OSError:
        return False


def _check_device(device: str) -> None:
    """A clear refusal for a device torch cannot use here, before any loading."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device[:QUOTE]!r} is not a device; use cpu, cuda or "
                         "cuda:N") from None
    if d.type == "cuda" and (not torch.cuda.is_available()
                             or (d.index or 0) >= torch.cuda.device_count()):
        seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise UsageError(f"--device {device}: no such CUDA device ({seen} visible); use "
                         "--device cpu" + (" or cuda:0" if seen else ""))
    if d.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device[:QUOTE]!r}: classify runs on cpu or cuda")


def _pad_id(loaded) -> int:
    from plinth.load import token_roles

    roles = token_roles(loaded.run_dir, loaded.tokenizer)
    return roles.get("pad", roles.get("eos", 0))


# ----------------------------------------------------------------------------------- scoring


@dataclass
class Prediction:
    kind: str  # classification | regression
    scores: list[float]  # probabilities (classification) or values (regression)


class Classifier:
    """A run's heads on texts, tokenized, truncated and pooled as in training."""

    def __init__(self, model, tokenizer, cfg, heads: dict[str, tuple[str, list[str]]],
                 pad_id: int = 0):
        from plinth.models.heads import resolve_pooling

        self.model, self.tokenizer, self.heads, self.pad_id = model, tokenizer, heads, pad_id
        tokenizer.no_padding()  # as training reads it (plinth.finetune.task.build_task)
        tokenizer.no_truncation()
        self.max_length = min(cfg.finetune.max_length, cfg.model.max_seq_len)
        self.pooling = resolve_pooling(cfg.finetune.pooling, cfg.model.arch)
        self.truncated = 0

    def encode(self, texts: list[str], where: list[str]) -> list[list[int]]:
        """Token ids of each text (special tokens as in training), cut to max_length."""
        out = []
        for enc, text, w in zip(self.tokenizer.encode_batch(texts), texts, where, strict=True):
            ids = enc.ids
            if not ids:
                raise UsageError(f"{w}: the text {text[:QUOTE]!r} has no tokens; give a "
                                 "non-empty text")
            if len(ids) > self.max_length:
                self.truncated += 1
                ids = ids[: self.max_length]
            out.append(ids)
        return out

    def predict(self, ids: list[list[int]], batch_size: int,
                progress: bool = False) -> list[dict[str, Prediction]]:
        """Each text's prediction per head, in input order; batches of similar lengths."""
        from plinth.track.progress import TaskProgress

        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        results: list = [None] * len(ids)
        enabled = progress and len(ids) > batch_size
        with TaskProgress(enabled) as bar:
            job = bar.task("classify", len(ids))
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                for i, pred in zip(chunk, self.scores([ids[i] for i in chunk]), strict=True):
                    results[i] = pred
                bar.update(job, advance=len(chunk))
        return results

    def logits(self, batch: list[list[int]]) -> dict:
        """Raw head outputs (B, outputs) per head for a batch of token id lists (padded on the
        right with an attention mask, as training batches are)."""
        import torch

        from plinth.models import unwrap
        from plinth.models.heads import hidden_states, pool

        device = next(self.model.parameters()).device
        width = max(map(len, batch))
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, row in enumerate(batch):
            input_ids[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = 1
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            pooled = pool(hidden_states(self.model, input_ids, mask), mask, self.pooling)
            heads = unwrap(self.model).heads
            return {name: heads[name](pooled).float().cpu() for name in self.heads}

    def scores(self, batch: list[list[int]]) -> list[dict[str, Prediction]]:
        out: list[dict[str, Prediction]] = [{} for _ in batch]
        for name, logits in self.logits(batch).items():
            kind = self.heads[name][0]
            values = logits.softmax(-1) if kind == "classification" else logits
            for r, row in enumerate(values.tolist()):
                out[r][name] = Prediction(kind, row)
        return out


# ------------------------------------------------------------------------------------ output


def fields(pred: Prediction, names: list[str]) -> dict:
    """One head's prediction as JSON fields."""
    if pred.kind == "regression":
        if len(pred.scores) == 1:
            return {"value": pred.scores[0]}
        return {"values": dict(zip(names, pred.scores, strict=True))}
    best = max(range(len(pred.scores)), key=pred.scores.__getitem__)
    return {"label": names[best], "probability": pred.scores[best],
            "probabilities": dict(zip(names, pred.scores, strict=True))}


def write_jsonl(path: Path, texts: list[str], preds: list[dict[str, Prediction]],
                heads: dict) -> None:
    """One row per input; written beside `path` and renamed, so a failure leaves no half file
    (and an existing file intact)."""
    import os

    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for t, p in zip(texts, preds, strict=True):
                if len(heads) == 1:
                    (name,) = heads
                    row = {"text": t, **fields(p[name], heads[name][1])}
                else:
                    row = {"text": t, "tasks": {n: fields(p[n], heads[n][1]) for n in heads}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"--output {_q(path)}: cannot write it ({e.strerror}); choose a writable "
                         "path") from None


def print_predictions(texts: list[str], preds: list[dict[str, Prediction]],
                      heads: dict) -> None:
    """`label  probability  text` per input (several heads: `task=label (p)` each)."""
    single = len(heads) == 1
    width = max(len(n) for _, names in heads.values() for n in names) if single else 0
    for t, p in zip(texts, preds, strict=True):
        parts = []
        for name, (_, names) in heads.items():
            f = fields(p[name], names)
            if "label" in f:
                shown = (f"{f['label']:<{width}}  {f['probability']:.3f}" if single
                         else f"{name}={f['label']} ({f['probability']:.3f})")
            else:
                vals = [f["value"]] if "value" in f else list(f["values"].values())
                shown = ", ".join(f"{v:.4f}" for v in vals)
                shown = shown if single else f"{name}={shown}"
            parts.append(shown)
        preview = " ".join(t.split())
        preview = preview if len(preview) <= PREVIEW else preview[: PREVIEW - 3] + "..."
        print("  ".join(parts) + "  " + preview)
