"""Alignment data: preference pairs and unpaired (KTO) examples -> equal-length rows of tokens.

    data = load_align_data(cfg, tokenizer, template, eos_text, pad_id)   # AlignData
    data.train.arrays["chosen_ids"]                                      # (N, L) int64

Formats (JSONL, one object a line; TRL's field names):
- preference (dpo, simpo, orpo, reward): {"prompt": ..., "chosen": ..., "rejected": ...}, or
  TRL's implicit-prompt form {"chosen": [messages], "rejected": [messages]} whose shared first
  messages are the prompt;
- unpaired (kto): {"prompt": ..., "completion": ..., "label": true | false}.
A prompt is a string (a user turn) or a list of chat messages {role, content}; an answer
(chosen, rejected, completion) is a string or a list of assistant messages.

Rendering is SFT's (plinth.data.sft): with the model's chat template the prompt is the
conversation up to the assistant's generation prompt (finetune.system_prompt first when given)
and the answer is what the assistant turn adds, end-of-turn text included; without one, the
plain layout (the prompt as is, the answer then EOS). The prompt is tokenized once and each
answer on its own, then concatenated (as TRL does), so chosen and rejected share the exact
prompt tokens.

Rows (int64, right-padded; L is the longest real row of the file, not max_length):
- preference: chosen_ids / chosen_labels / chosen_mask and the same for rejected; labels are the
  token itself on answer tokens and IGNORE_INDEX on prompt and padding (aligned with the ids:
  the consumer shifts); attention_mask is 1 where either side has a real token.
- unpaired: input_ids / labels / seq_mask; kl_ids / kl_labels / kl_mask, prompt i followed by
  the completion of example (i + 1) mod N (the mismatched pairs of KTO's reference point);
  attention_mask (the union) and label (N,), 1 desirable / 0 undesirable.

An example longer than finetune.max_length is truncated (the end of the answers cut) or dropped
(finetune.overlong=drop); one whose prompt alone leaves no room for an answer token is dropped
as prompt_too_long; pairs whose answers are identical are dropped as identical. All counted in
`Rows.counts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plinth.data.sft import ROLES, Record, plain_pieces, read_jsonl
from plinth.errors import UsageError
from plinth.finetune.data import Rows, held_out
from plinth.models.layers import IGNORE_INDEX

N_SAMPLES = 3  # validation prompts shown with their preferred answers
PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")
UNPAIRED_FIELDS = ("prompt", "completion", "label")
PREFERENCE_EXAMPLE = '{"prompt": "...", "chosen": "...", "rejected": "..."}'
UNPAIRED_EXAMPLE = '{"prompt": "...", "completion": "...", "label": true}'
MSG = '{"role": "user"|"assistant"|"system", "content": "..."}'


@dataclass
class AlignData:
    train: Rows
    val: Rows | None
    prompts: list[str]  # the first validation prompts as the model sees them (rendered)
    answers: list[str]  # their preferred answers (chosen / desirable completion), rendered


@dataclass
class _Render:
    """How examples become text and tokens (the SFT settings)."""

    tokenizer: object
    template: object  # plinth.data.sft.ChatTemplate | None
    eos_text: str
    system_prompt: str | None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def texts(self, prompt, answers: dict, where: str) -> tuple[str, list[str]]:
        """(prompt text, [answer text, ...]): each answer (field name -> value) rendered after
        the same prompt (the rendered prompt depends on the prompt messages only)."""
        if self.template is None:
            for name, value in {"prompt": prompt, **answers}.items():
                if isinstance(value, list):
                    raise UsageError(
                        f"{where}: field {name!r} is a list of chat messages but the model has "
                        "no chat template. Give one with finetune.chat_template=PATH (a Jinja2 "
                        "file), or write prompt and answers as plain strings."
                    )
            pieces = [plain_pieces({"prompt": prompt, "completion": a}, "prompt_completion",
                                   where, self.eos_text) for a in answers.values()]
            return pieces[0][0][0], [p[1][0] for p in pieces]
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if self.system_prompt and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        turns = sum(m["role"] == "assistant" for m in msgs)  # earlier assistant turns
        prompt_text, answer_texts = "", []
        for a in answers.values():
            reply = [{"role": "assistant", "content": a}] if isinstance(a, str) else a
            pieces = self.template.pieces([*msgs, *reply])
            # pieces: (text before an assistant turn, False), (the turn, True), ..., (tail)
            prompt_text = "".join(t for t, _ in pieces[: 2 * turns + 1])
            answer_texts.append("".join(t for t, _ in pieces[2 * turns + 1 :]))
        return prompt_text, answer_texts


# --------------------------------------------------------------------------- record checks


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _quote(value) -> str:
    return str(value)[:200]


def _missing(rec: Record, name: str, fields: tuple[str, ...], example: str) -> UsageError:
    have = ", ".join(sorted(map(str, rec)))[:200] or "no fields"
    hint = ""
    if "completion" in rec and "label" in rec and "chosen" not in rec:
        hint = " It looks like unpaired data: that is align.method=kto's format."
    elif "chosen" in rec and "rejected" in rec and "completion" not in rec:
        hint = " It looks like preference pairs: that is dpo/simpo/orpo/reward's format."
    elif set(rec) == {"prompt"} or ("prompt" in rec and not {"chosen", "completion"} & set(rec)):
        hint = " It looks like prompt-only data: that is align.method=grpo/rloo's format."
    return UsageError(
        f"{rec.where}: missing field {name!r} (the record has {have}). Every example of this "
        f"format needs {', '.join(fields)}, e.g. {example}.{hint}"
    )


def _messages(value, name: str, where: str, roles: tuple[str, ...]) -> list[dict]:
    """A checked list of {role, content} messages (field `name` of the record)."""
    if not value:
        raise UsageError(f"{where}: field {name!r} is an empty list; it must hold {MSG} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise UsageError(
                f"{where}: {name}[{i}] is {_kind(m)} ({_quote(m)}), not an object; each message "
                f"is {MSG}"
            )
        role = m.get("role")
        if role not in ROLES:
            got = repr(role)[:200] if "role" in m else "missing"
            raise UsageError(f"{where}: {name}[{i}].role is {got}; use one of {', '.join(ROLES)}")
        if role not in roles:
            raise UsageError(
                f"{where}: {name}[{i}].role is {role!r}, but an answer holds assistant messages "
                "only; put the conversation before the answer in 'prompt' (or drop 'prompt' and "
                "give chosen/rejected as whole conversations sharing their first messages)"
            )
        content = m.get("content")
        if not isinstance(content, str):
            got = f"{_kind(content)} ({_quote(content)})" if "content" in m else "missing"
            raise UsageError(
                f"{where}: {name}[{i}].content is {got}, not text; write the message as a JSON "
                'string, e.g. "content": "..."'
            )
        out.append({"role": role, "content": content})
    return out


def _text_or_messages(rec: Record, name: str, roles: tuple[str, ...]):
    """Field `name`: a non-empty string or a checked, non-empty list of messages."""
    value = rec[name]
    where = rec.where
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(
                f"{where}: field {name!r} is empty; every example needs a non-empty {name} "
                "(remove the line or write the text)"
            )
        return value
    if isinstance(value, list):
        msgs = _messages(value, name, where, roles)
        if not any(m["content"].strip() for m in msgs):
            raise UsageError(
                f"{where}: field {name!r} has only empty messages; every example needs a "
                f"non-empty {name} (remove the line or write the text)"
            )
        return msgs
    raise UsageError(
        f"{where}: field {name!r} is {_kind(value)} ({_quote(value)}), not text or a list of "
        f'messages; write it as a JSON string, e.g. "{name}": "...", or as [{MSG}, ...]'
    )


ANSWER = ("assistant",)


def _preference(rec: Record) -> tuple[object, dict] | None:
    """(prompt, {"chosen": ..., "rejected": ...}) of a preference record, checked; None when the
    implicit form's two conversations are the same."""
    for name in ("chosen", "rejected"):
        if name not in rec:
            raise _missing(rec, name, PREFERENCE_FIELDS, PREFERENCE_EXAMPLE)
    if "prompt" in rec:
        prompt = _text_or_messages(rec, "prompt", ROLES)
        return prompt, {n: _text_or_messages(rec, n, ANSWER) for n in ("chosen", "rejected")}
    if not (isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list)):
        raise UsageError(
            f"{rec.where}: missing field 'prompt'. Give prompt, chosen and rejected, e.g. "
            f"{PREFERENCE_EXAMPLE}, or (TRL's implicit-prompt form) chosen and rejected as "
            "whole conversations (lists of messages) that share their first messages"
        )
    chosen = _messages(rec["chosen"], "chosen", rec.where, ROLES)
    rejected = _messages(rec["rejected"], "rejected", rec.where, ROLES)
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise UsageError(
            f"{rec.where}: chosen and rejected have no 'prompt' and differ from their first "
            "message, so there is no shared prompt; add a 'prompt' field, or start both "
            "conversations with the same messages"
        )
    if chosen == rejected:
        return None  # identical: counted and dropped by the caller
    answers = {}
    for name, msgs in (("chosen", chosen), ("rejected", rejected)):
        rest = msgs[n:]
        if not rest or not any(m["content"].strip() for m in rest):
            raise UsageError(
                f"{rec.where}: the {name} conversation has no answer after the messages it "
                "shares with the other one (its answer is empty); end both conversations with "
                "their own non-empty assistant message"
            )
        bad = [m["role"] for m in rest if m["role"] != "assistant"]
        if bad:
            raise UsageError(
                f"{rec.where}: chosen and rejected differ before their answers (a {bad[0]!r} "
                f"message after the shared ones in {name}); they must share every message up to "
                "the answer, or give the shared part as 'prompt'"
            )
        answers[name] = rest
    return chosen[:n], answers


def _unpaired(rec: Record) -> tuple[object, dict, bool]:
    for name in UNPAIRED_FIELDS:
        if name not in rec:
            raise _missing(rec, name, UNPAIRED_FIELDS, UNPAIRED_EXAMPLE)
    label = rec["label"]
    if not isinstance(label, bool):
        raise UsageError(
            f"{rec.where}: field 'label' is {_kind(label)} ({_quote(label)}), not a boolean; "
            'write "label": true for a desirable completion or "label": false for an '
            "undesirable one (JSON true/false, no quotes)"
        )
    prompt = _text_or_messages(rec, "prompt", ROLES)
    return prompt, {"completion": _text_or_messages(rec, "completion", ANSWER)}, label


# ------------------------------------------------------------------------------- reading


def _read(path, key: str, example: str) -> list[Record]:
    from plinth.data.paths import path_problem

    p = Path(path)
    problem = path_problem(p)
    if problem is not None:
        what = "does not exist" if problem[0] == "missing_path" else f"cannot be read: {problem[1]}"
        raise UsageError(
            f"{key}: {p} {what}; point {key} at a JSONL file with one example a line, such as "
            f"{example}"
        )
    return read_jsonl(p)


def _fit(prompt: list[int], answers: list[list[int]], max_length: int, overlong: str,
         counts: dict) -> list[list[int]] | None:
    """The answers cut to fit max_length after the prompt (counted), or None (dropped)."""
    if len(prompt) + max(map(len, answers)) <= max_length:
        return answers
    if overlong == "drop":
        counts["dropped"] += 1
        return None
    room = max_length - len(prompt)
    if room < 1:
        counts["prompt_too_long"] += 1
        return None
    counts["truncated"] += 1
    return [a[:room] for a in answers]


def _pad(seqs: list[tuple[list[int], list[int]]], width: int, pad_id: int):
    """(ids, labels, mask) arrays (N, width) of (prompt, answer) token lists."""
    n = len(seqs)
    ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = p + a
        labels[i, len(p) : len(p) + len(a)] = a
        mask[i, : len(p) + len(a)] = 1
    return ids, labels, mask


def _nothing_left(path, counts: dict, key: str, max_length: int) -> UsageError:
    why = {
        "identical": "chosen and rejected are the same (nothing to prefer)",
        "identical_after_truncation": f"chosen and rejected are the same in their first "
                                      f"finetune.max_length={max_length} tokens",
        "dropped": f"longer than finetune.max_length={max_length} with finetune.overlong=drop",
        "prompt_too_long": f"the prompt alone fills finetune.max_length={max_length}",
    }
    reasons = "; ".join(f"{counts[k]} {v}" for k, v in why.items() if counts.get(k))
    return UsageError(
        f"{key}: no example of {path} is usable ({counts.get('examples', 0)} read, all dropped: "
        f"{reasons or 'none kept'}). Raise finetune.max_length, use finetune.overlong=truncate, "
        "or fix the examples."
    )


def _check_options(overlong: str) -> None:
    if overlong not in ("truncate", "drop"):
        raise UsageError(f"finetune.overlong={overlong!r}: use truncate or drop")


def read_preferences(path, tokenizer, *, template, eos_text: str, pad_id: int, max_length: int,
                     overlong: str, system_prompt: str | None, key: str = "align.dataset",
                     records: list[Record] | None = None) -> Rows:
    """Rows of preference pairs (see the module doc); `records` instead of reading `path`."""
    _check_options(overlong)
    recs = records if records is not None else _read(path, key, PREFERENCE_EXAMPLE)
    render = _Render(tokenizer, template, eos_text, system_prompt)
    counts = {"examples": len(recs), "kept": 0, "identical": 0, "identical_after_truncation": 0,
              "truncated": 0, "dropped": 0, "prompt_too_long": 0}
    chosen, rejected, samples = [], [], []
    for n, rec in enumerate(recs, start=1):
        if not getattr(rec, "where", ""):
            rec = Record(rec)
            rec.where = f"{path} example {n}"
        parsed = _preference(rec)
        if parsed is None:
            counts["identical"] += 1
            continue
        prompt_text, (c_text, r_text) = render.texts(*parsed, rec.where)
        if c_text == r_text:
            counts["identical"] += 1
            continue
        prompt = render.encode(prompt_text)
        fitted = _fit(prompt, [render.encode(c_text), render.encode(r_text)], max_length,
                      overlong, counts)
        if fitted is None:
            continue
        if fitted[0] == fitted[1]:
            counts["identical_after_truncation"] += 1
            continue
        chosen.append((prompt, fitted[0]))
        rejected.append((prompt, fitted[1]))
        if len(samples) < N_SAMPLES:
            samples.append((prompt_text, c_text))
    counts["kept"] = len(chosen)
    if not chosen:
        raise _nothing_left(path, counts, key, max_length)
    width = max(len(p) + len(a) for p, a in chosen + rejected)
    arrays = {}
    for side, seqs in (("chosen", chosen), ("rejected", rejected)):
        ids, labels, mask = _pad(seqs, width, pad_id)
        arrays |= {f"{side}_ids": ids, f"{side}_labels": labels, f"{side}_mask": mask}
    arrays["attention_mask"] = np.maximum(arrays["chosen_mask"], arrays["rejected_mask"])
    return Rows(arrays, counts, samples)


def read_unpaired(path, tokenizer, *, template, eos_text: str, pad_id: int, max_length: int,
                  overlong: str, system_prompt: str | None, key: str = "align.dataset",
                  records: list[Record] | None = None, need_both: bool = True) -> Rows:
    """Rows of unpaired examples with their KL rows (see the module doc); `need_both`: refuse
    a file whose labels are all one kind (training data)."""
    _check_options(overlong)
    recs = records if records is not None else _read(path, key, UNPAIRED_EXAMPLE)
    render = _Render(tokenizer, template, eos_text, system_prompt)
    counts = {"examples": len(recs), "kept": 0, "truncated": 0, "dropped": 0,
              "prompt_too_long": 0}
    seqs, labels, samples = [], [], []
    for n, rec in enumerate(recs, start=1):
        if not getattr(rec, "where", ""):
            rec = Record(rec)
            rec.where = f"{path} example {n}"
        prompt_obj, answer, label = _unpaired(rec)
        prompt_text, (c_text,) = render.texts(prompt_obj, answer, rec.where)
        prompt = render.encode(prompt_text)
        fitted = _fit(prompt, [render.encode(c_text)], max_length, overlong, counts)
        if fitted is None:
            continue
        seqs.append((prompt, fitted[0]))
        labels.append(label)
        if label and len(samples) < N_SAMPLES:
            samples.append((prompt_text, c_text))
    counts["kept"] = len(seqs)
    if not seqs:
        raise _nothing_left(path, counts, key, max_length)
    counts["desirable"] = sum(labels)
    counts["undesirable"] = len(labels) - counts["desirable"]
    if need_both and not (counts["desirable"] and counts["undesirable"]):
        raise UsageError(
            f"{key}: the usable examples of {path} are all one kind ({counts['desirable']} with "
            f"label true, {counts['undesirable']} with label false); KTO learns from the "
            "contrast, so it needs both desirable (true) and undesirable (false) completions. "
            "Add examples of the missing kind."
        )
    # KL rows: prompt i with the completion of example i + 1 (cut to fit after prompt i)
    kl = [(p, seqs[(i + 1) % len(seqs)][1][: max_length - len(p)])
          for i, (p, _) in enumerate(seqs)]
    width = max(len(p) + len(a) for p, a in seqs + kl)
    ids, labs, mask = _pad(seqs, width, pad_id)
    kl_ids, kl_labs, kl_mask = _pad(kl, width, pad_id)
    arrays = {"input_ids": ids, "labels": labs, "seq_mask": mask, "kl_ids": kl_ids,
              "kl_labels": kl_labs, "kl_mask": kl_mask,
              "attention_mask": np.maximum(mask, kl_mask),
              "label": np.asarray(labels, dtype=np.int64)}
    return Rows(arrays, counts, samples)


def load_align_data(cfg, tokenizer, template, eos_text: str, pad_id: int) -> AlignData:
    """The training and validation rows of align.dataset (see the module doc); validation is
    align.val_dataset, or a seeded finetune.val_fraction of align.dataset's examples."""
    al, ft = cfg.align, cfg.finetune
    kind = al.data_kind
    if kind not in ("preference", "unpaired"):
        raise UsageError(
            f"align.method={al.method} samples its completions from prompt-only data, not "
            "preference or unpaired examples; its data is read by the RL task"
        )
    if not al.dataset:
        example = PREFERENCE_EXAMPLE if kind == "preference" else UNPAIRED_EXAMPLE
        raise UsageError(
            f"align.dataset is not set; align.method={al.method} needs a JSONL file of "
            f"examples such as {example} (set align.dataset=PATH)"
        )
    example = PREFERENCE_EXAMPLE if kind == "preference" else UNPAIRED_EXAMPLE
    records = _read(al.dataset, "align.dataset", example)
    val_path, val_key = al.dataset, "align.dataset"
    if al.val_dataset:
        val_path, val_key = al.val_dataset, "align.val_dataset"
        val_records = _read(al.val_dataset, "align.val_dataset", example)
    else:
        keep, held = held_out(len(records), ft.val_fraction, cfg.seed)
        val_records = [records[i] for i in held]
        records = [records[i] for i in keep]
        if not records:
            raise UsageError(
                f"align.dataset: {al.dataset} holds {len(held)} examples and holding out "
                f"finetune.val_fraction={ft.val_fraction:g} of them for validation leaves none "
                "for training; add examples, lower finetune.val_fraction or give "
                "align.val_dataset"
            )
    opts = dict(template=template, eos_text=eos_text, pad_id=pad_id, max_length=ft.max_length,
                overlong=ft.overlong, system_prompt=ft.system_prompt)
    if kind == "preference":
        train = read_preferences(al.dataset, tokenizer, key="align.dataset", records=records,
                                 **opts)
        val = read_preferences(val_path, tokenizer, key=val_key, records=val_records,
                               **opts) if val_records else None
    else:
        train = read_unpaired(al.dataset, tokenizer, key="align.dataset", records=records, **opts)
        val = read_unpaired(val_path, tokenizer, key=val_key, records=val_records,
                            need_both=False, **opts) if val_records else None
    samples = val.prompts if val is not None else []
    return AlignData(train, val, [p for p, _ in samples], [a for _, a in samples])
