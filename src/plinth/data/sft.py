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


MAX_LINE = 64 * 1024 * 1024  # bytes in one JSONL line (one example)
EXAMPLE = '{"prompt": "...", "completion": "..."}'


class Record(dict):
    """One example of a JSONL file; `where` names its file and line for messages."""

    where: str = ""


def read_jsonl(path: str | Path) -> list[Record]:
    """The objects of a JSONL file, each knowing its file and line (`Record.where`); blank
    lines are skipped. Binary, non-UTF-8, malformed, oversized or empty files are refused
    (UsageError naming the file and line)."""
    from plinth.data.paths import open_regular, path_problem

    p = Path(path)
    problem = path_problem(p)
    if problem is not None:
        what = "does not exist" if problem[0] == "missing_path" else f"cannot be read: {problem[1]}"
        raise UsageError(f"fine-tuning data {p} {what}; point finetune.dataset at a JSONL file")
    records = []
    with open_regular(p) as f:
        n = 0
        while line := f.readline(MAX_LINE + 1):
            n += 1
            where = f"{p} line {n}"
            if len(line) > MAX_LINE:
                raise UsageError(
                    f"{where} is longer than {MAX_LINE // 2**20} MiB; each line must be one "
                    f"example such as {EXAMPLE}. Split the file into one example per line."
                )
            if b"\0" in line:
                raise UsageError(
                    f"{where} holds NUL bytes: {p} looks like a binary file, not JSONL text. "
                    f"Give a UTF-8 text file with one example per line such as {EXAMPLE}."
                )
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(
                    f"{where} is not UTF-8 text (byte {e.start + 1}; is {p.name} a binary "
                    f"file?); save the file as UTF-8 with one example per line such as "
                    f"{EXAMPLE}"
                ) from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(
                    f"{where} is not valid JSON ({e.msg} at column {e.colno}); each line must "
                    f"be one object like {EXAMPLE}"
                ) from None
            except RecursionError:
                raise UsageError(
                    f"{where} is nested too deeply to read; each line must be one flat object "
                    f"like {EXAMPLE}"
                ) from None
            except ValueError as e:  # e.g. an integer longer than Python reads (4300 digits)
                raise UsageError(
                    f"{where} is not valid JSON ({str(e)[:120]}); each line must be one object "
                    f"like {EXAMPLE}"
                ) from None
            if not isinstance(rec, dict):
                raise UsageError(
                    f"{where} is a JSON {type(rec).__name__}, not an object; each line must be "
                    f"one object like {EXAMPLE}"
                )
            rec = Record(rec)
            rec.where = where
            records.append(rec)
    if not records:
        raise UsageError(
            f"{p} holds no examples (it is empty or blank); write one JSON object per line, "
            f"such as {EXAMPLE}"
        )
    return records


def detect_format(rec: dict, source: str = "the data") -> str:
    if "messages" in rec:
        return "messages"
    if "instruction" in rec and "output" in rec:
        return "alpaca"
    if "prompt" in rec and "completion" in rec:
        return "prompt_completion"
    keys = str(sorted(map(str, rec)))[:200]
    raise UsageError(
        f"cannot tell the format of {source}: its first record has keys {keys}. Use "
        "prompt/completion, instruction/input/output (Alpaca) or messages (chat), or set "
        "finetune.format."
    )


FIELDS = {  # format -> (required text fields, optional text fields)
    "prompt_completion": (("prompt", "completion"), ()),
    "alpaca": (("instruction", "output"), ("input",)),
}


def _where(rec: dict, fallback: str) -> str:
    return getattr(rec, "where", "") or fallback


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def check_record(rec: dict, fmt: str, where: str) -> None:
    """Every field the format reads is present and text (messages: a list of role/content
    objects with known roles); UsageError naming the file, line and field otherwise."""
    where = _where(rec, where)
    if fmt == "messages":
        _check_messages(rec, where)
        return
    required, optional = FIELDS[fmt]
    for key in (*required, *optional):
        if key not in rec:
            if key in optional:
                continue
            raise UsageError(
                f"{where}: missing field {key!r} for the {fmt} format (the record has "
                f"{', '.join(sorted(map(str, rec)))[:200] or 'no fields'}); every example needs "
                f"{' and '.join(required)}, or set finetune.format to the format the file uses"
            )
        value = rec[key]
        if key in optional and value is None:
            continue
        if not isinstance(value, str):
            raise UsageError(
                f"{where}: field {key!r} is {_kind(value)} ({str(value)[:200]}), not text; "
                f"write it as a JSON string, e.g. \"{key}\": \"...\""
            )


def _check_messages(rec: dict, where: str) -> None:
    msgs = rec.get("messages")
    shape = '{"role": "system"|"user"|"assistant", "content": "..."}'
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(
            f"{where}: field 'messages' is {_kind(msgs) if 'messages' in rec else 'missing'}; "
            f"it must be a non-empty list of {shape} objects"
        )
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise UsageError(
                f"{where}: messages[{i}] is {_kind(m)}, not an object; each message is {shape}"
            )
        if m.get("role") not in ROLES:
            got = repr(m["role"])[:200] if "role" in m else "missing"
            raise UsageError(
                f"{where}: messages[{i}].role is {got}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(m.get("content"), str):
            got = f"{_kind(m['content'])} ({str(m['content'])[:200]})" if "content" in m \
                else "missing"
            raise UsageError(
                f"{where}: messages[{i}].content is {got}, not text; write the message as a "
                'JSON string, e.g. "content": "..."'
            )


def to_messages(rec: dict, fmt: str, where: str, system: str | None) -> list[dict]:
    """Any format as a conversation (for chat templates)."""
    check_record(rec, fmt, where)
    where = _where(rec, where)
    if fmt == "messages":
        msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
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
    if not any(m["role"] == "assistant" for m in msgs):
        raise UsageError(
            f"{where}: no assistant message, so nothing to learn from it; add the answer as "
            '{"role": "assistant", "content": "..."}'
        )
    if system and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


class ChatTemplate:
    """A Hugging Face-style Jinja2 chat template (messages, add_generation_prompt, bos/eos),
    run in plinth.data.templates' bounded sandbox: a template that reaches for Python
    internals or runs away is refused with a TemplateError (exit 2) naming `origin`."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 origin: str = "the chat template"):
        from plinth.data.templates import compile_jinja

        self.origin = origin
        self.template = compile_jinja(source, origin, trim_blocks=True, lstrip_blocks=True)
        self.bos_token, self.eos_token = bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        from plinth.data.templates import render_jinja

        return render_jinja(
            self.template,
            self.origin,
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
    check_record(rec, fmt, where)
    if fmt == "messages":
        raise UsageError(
            f"{_where(rec, where)} is a chat (messages) example but the model has no chat "
            "template. Give one with finetune.chat_template=PATH (a Jinja2 file), or convert "
            "the data to prompt/completion."
        )
    if fmt == "alpaca":
        tpl = ALPACA_PROMPT_INPUT if rec.get("input") else ALPACA_PROMPT
        prompt = tpl.format(instruction=rec["instruction"], input=rec.get("input") or "")
        return [(prompt, False), (rec["output"] + eos, True)]
    return [(rec["prompt"], False), (rec["completion"] + eos, True)]


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
        where = _where(rec, f"{path} example {n}")
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
