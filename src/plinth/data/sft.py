"""Instruction-tuning data: JSONL examples -> token ids with loss only on the answers, packed.

    from plinth.data.sft import SFTOptions, load_sft
    data = load_sft("configs/data/json_answers.jsonl", tokenizer, SFTOptions(max_length=512),
                    chat_template=template)   # template: the model's own (None: plain format)
    rows = data.pack(512)                    # rows of examples, attention kept within each

Formats (auto-detected per file from the first record, or forced with `format`):
- `prompt_completion`: {"prompt": ..., "completion": ...}
- `alpaca`: {"instruction": ..., "input": ... (optional), "output": ...}
- `messages`: {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}

With a chat template (a Jinja2 string, the model's own from its tokenizer config or GGUF) every
format becomes a conversation; the loss covers each assistant turn (what the template adds for
it, end-of-turn tokens included) and nothing else. Without one, `messages` cannot be rendered
(clear error) and the other formats use a plain "### Instruction / ### Response" layout with
EOS after the answer. Each rendered piece is tokenized on its own so the split between prompt
and answer is exact in tokens.

Examples longer than `max_length` are truncated (answer tokens kept from the start) or dropped,
as configured, and counted. Packing puts whole examples side by side in rows; each token
carries its example's segment id (0 = padding) and its position within the example, so
attention and positions never cross examples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from plinth.errors import UsageError
from plinth.models.layers import IGNORE_INDEX

FORMATS = ("prompt_completion", "alpaca", "messages")
ROLES = ("system", "user", "assistant")

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"


@dataclass
class SFTOptions:
    format: str = "auto"
    max_length: int = 512
    overlong: str = "truncate"  # truncate | drop
    system_prompt: str | None = None


@dataclass
class SFTData:
    """Tokenized examples: ids and labels (IGNORE_INDEX where the loss does not count)."""

    ids: list[np.ndarray]
    labels: list[np.ndarray]
    counts: dict[str, int] = field(default_factory=dict)
    format: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def pack(self, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
        """Rows (N, length) of whole examples, first-fit in order: input_ids, labels,
        segment_ids (1, 2, ... per example in the row; 0 = padding) and position_ids
        (restarting at 0 for each example)."""
        rows: list[list[int]] = []
        used: list[int] = []
        for i, ids in enumerate(self.ids):
            n = len(ids)
            for r, u in enumerate(used):
                if u + n <= length:
                    rows[r].append(i)
                    used[r] += n
                    break
            else:
                rows.append([i])
                used.append(n)
        out = {
            k: np.full((len(rows), length), v, dtype=np.int64)
            for k, v in (("input_ids", pad_id), ("labels", IGNORE_INDEX), ("segment_ids", 0))
        }
        out["position_ids"] = np.zeros((len(rows), length), dtype=np.int64)
        for r, members in enumerate(rows):
            at = 0
            for s, i in enumerate(members, start=1):
                n = len(self.ids[i])
                out["input_ids"][r, at : at + n] = self.ids[i]
                out["labels"][r, at : at + n] = self.labels[i]
                out["segment_ids"][r, at : at + n] = s
                out["position_ids"][r, at : at + n] = np.arange(n)
                at += n
        return out


def read_jsonl(path: str | Path) -> list[dict]:
    from plinth.data.paths import open_regular, path_problem

    p = Path(path)
    problem = path_problem(p)
    if problem is not None:
        what = "does not exist" if problem[0] == "missing_path" else f"cannot be read: {problem[1]}"
        raise UsageError(f"fine-tuning data {p} {what}; point finetune.dataset at a JSONL file")
    records = []
    with open_regular(p) as f:
        head = f.peek(8192)[:8192]
        if b"\x00" in head:
            raise UsageError(
                f"fine-tuning data {p} contains NUL bytes: it looks binary, not JSONL text; "
                "point finetune.dataset at a UTF-8 JSONL file"
            )
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(
                    f"{p} line {n} is not UTF-8 (invalid byte at offset {e.start}); re-encode "
                    "the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError) as e:
                why = getattr(e, "msg", None) or "nested too deeply or a number too long"
                raise UsageError(
                    f"{p} line {n} is not valid JSON ({why}); each line must be one object "
                    'like {"prompt": ..., "completion": ...}'
                ) from None
            if not isinstance(rec, dict):
                raise UsageError(f"{p} line {n} is a {type(rec).__name__}, not a JSON object")
            records.append(rec)
    if not records:
        raise UsageError(f"{p} holds no examples")
    return records


def detect_format(rec: dict, source: str = "the data") -> str:
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    raise UsageError(
        f"cannot tell the format of {source}: its first record has keys {sorted(rec)}. Use "
        "prompt/completion, instruction/input/output (Alpaca) or messages (chat), or set "
        "finetune.format."
    )


def to_messages(rec: dict, fmt: str, where: str, system: str | None) -> list[dict]:
    """Any format as a conversation (for chat templates)."""
    try:
        if fmt == "messages":
            msgs = rec["messages"]
        elif fmt == "alpaca":
            user = rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else "")
            msgs = [
                {"role": "user", "content": user},
                {"role": "assistant", "content": rec["output"]},
            ]
        else:
            msgs = [
                {"role": "user", "content": rec["prompt"]},
                {"role": "assistant", "content": rec["completion"]},
            ]
    except KeyError as e:
        raise UsageError(f"{where}: missing field {e} for format {fmt}") from None
    if not isinstance(msgs, list) or not all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
        for m in msgs
    ):
        raise UsageError(
            f'{where}: messages must be a list of {{"role": system|user|assistant, '
            '"content": text}} objects'
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise UsageError(f"{where}: no assistant message, so nothing to learn from it")
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


class ChatTemplate:
    """A Hugging Face-style Jinja2 chat template (messages, add_generation_prompt, bos/eos)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def pieces(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """(text, is_answer) pieces whose concatenation is the rendered conversation: each
        assistant turn is the text its message adds after the generation prompt."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[: i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise UsageError(
                    "the chat template does not render conversations incrementally (a prefix "
                    "of the conversation renders differently), so answer tokens cannot be "
                    "told apart; use finetune.chat_template=none for the plain format"
                )
            out += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
            done = full
        tail = self.render(messages)[len(done) :]
        return out + ([(tail, False)] if tail else [])


def plain_pieces(rec: dict, fmt: str, where: str, eos: str) -> list[tuple[str, bool]]:
    if fmt == "messages":
        raise UsageError(
            f"{where} is a chat (messages) example but the model has no chat template. Give "
            "one with finetune.chat_template=PATH (a Jinja2 file), or convert the data to "
            "prompt/completion."
        )
    try:
        if fmt == "alpaca":
            tpl = ALPACA_PROMPT_INPUT if rec.get("input") else ALPACA_PROMPT
            return [(tpl.format(**rec), False), (rec["output"] + eos, True)]
        return [(rec["prompt"], False), (rec["completion"] + eos, True)]
    except KeyError as e:
        raise UsageError(f"{where}: missing field {e} for format {fmt}") from None


def load_sft(
    path: str | Path,
    tokenizer,
    options: SFTOptions | None = None,
    chat_template: ChatTemplate | None = None,
    eos_token: str = "",
    records: Sequence[dict] | None = None,
) -> SFTData:
    """Read, render and tokenize a JSONL file of examples (see the module doc)."""
    opt = options or SFTOptions()
    if opt.overlong not in ("truncate", "drop"):
        raise UsageError(f"overlong={opt.overlong!r}: use truncate or drop")
    recs = list(records) if records is not None else read_jsonl(path)
    fmt = detect_format(recs[0], str(path)) if opt.format == "auto" else opt.format
    if fmt not in FORMATS:
        raise UsageError(f"format={fmt!r}: use auto or one of {', '.join(FORMATS)}")
    data = SFTData([], [], {"examples": len(recs), "truncated": 0, "dropped": 0}, fmt)
    for n, rec in enumerate(recs, start=1):
        where = f"{path} example {n}"
        if chat_template is not None:
            pieces = chat_template.pieces(to_messages(rec, fmt, where, opt.system_prompt))
        else:
            pieces = plain_pieces(rec, fmt, where, eos_token)
        ids: list[int] = []
        labels: list[int] = []
        for text, answer in pieces:
            piece = tokenizer.encode(text, add_special_tokens=False).ids if text else []
            ids += piece
            labels += piece if answer else [IGNORE_INDEX] * len(piece)
        if len(ids) > opt.max_length:
            if opt.overlong == "drop":
                data.counts["dropped"] += 1
                continue
            data.counts["truncated"] += 1
            ids, labels = ids[: opt.max_length], labels[: opt.max_length]
        if all(lab == IGNORE_INDEX for lab in labels[1:]):  # nothing to learn (prompt too long)
            data.counts["dropped"] += 1
            continue
        # labels are the next token: predict ids[t+1] at t
        data.ids.append(np.asarray(ids, dtype=np.int64))
        data.labels.append(np.asarray([*labels[1:], IGNORE_INDEX], dtype=np.int64))
    data.counts["kept"] = len(data.ids)
    if not data.ids:
        raise UsageError(
            f"no example of {path} survived: {data.counts}. Raise finetune.max_length or use "
            "finetune.overlong=truncate."
        )
    return data
