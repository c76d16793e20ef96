"""Prompt-only rows for RL from rewards: {prompt, ...fields the reward functions read}.

    python -c "from plinth.align.prompts import read_prompts; help(read_prompts)"

`prompt` is a string, or a list of chat messages ({role, content}); a `messages` list may stand
in for it. With a chat template (finetune.chat_template) the prompt becomes a user message
(after finetune.system_prompt, when set) and is rendered with the generation prompt, so the
policy answers as the assistant, as in SFT; without one a string prompt is used as it is and
chat messages are refused. Prompts longer than finetune.max_length - align.max_new_tokens
tokens keep their LAST tokens (finetune.overlong=truncate: the question and the generation
prompt are at the end) or are dropped (overlong=drop), and counted.

The reward functions get the prompt as written in the row (a chat prompt: its last user
message) and every other field of the row as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plinth.errors import UsageError

EXAMPLE = '{"prompt": "What is 2 + 3?", "answer": "5"}'
ARGUMENTS = ("prompt", "completion")  # what reward functions get positionally, not as fields


@dataclass
class PromptRow:
    ids: list[int]  # the rendered prompt's token ids (what the policy continues)
    text: str  # the prompt as the reward functions get it
    fields: dict  # the row's other fields (keyword arguments of the reward functions)
    where: str  # file and line, for messages


@dataclass
class PromptSet:
    rows: list[PromptRow]
    counts: dict[str, int] = field(default_factory=dict)  # examples, truncated, dropped, kept

    def __len__(self) -> int:
        return len(self.rows)


def read_prompts(
    records: list,
    source: str,
    tokenizer,
    template,
    *,
    max_prompt: int,
    overlong: str,
    system_prompt: str | None = None,
    key: str = "align.dataset",
) -> PromptSet:
    """Render and tokenize prompt rows (see the module doc); `records` are plinth.data.sft
    Records (each knowing its file and line)."""
    out = PromptSet([], {"examples": len(records), "truncated": 0, "dropped": 0})
    for n, rec in enumerate(records, start=1):
        where = getattr(rec, "where", "") or f"{source} example {n}"
        messages, text = _messages(rec, where, key)
        if template is not None:
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}, *messages]
            rendered = template.render(messages, add_generation_prompt=True)
        elif isinstance(rec.get("prompt"), str):
            rendered = rec["prompt"]
        else:
            raise UsageError(
                f"{where} is a chat (messages) prompt but the model has no chat template. Give "
                "one with finetune.chat_template=PATH (a Jinja2 file), or write the prompt as a "
                "string."
            )
        ids = tokenizer.encode(rendered, add_special_tokens=False).ids
        if len(ids) > max_prompt:
            if overlong == "drop":
                out.counts["dropped"] += 1
                continue
            out.counts["truncated"] += 1
            ids = ids[-max_prompt:]
        fields = {k: v for k, v in rec.items() if k not in ARGUMENTS}
        out.rows.append(PromptRow(ids, text, fields, where))
    out.counts["kept"] = len(out.rows)
    if not out.rows:
        raise UsageError(
            f"no prompt of {source} survived: {out.counts}. Every prompt is longer than "
            f"finetune.max_length - align.max_new_tokens = {max_prompt} tokens; raise "
            "finetune.max_length, lower align.max_new_tokens, or use finetune.overlong=truncate."
        )
    return out


def _messages(rec: dict, where: str, key: str) -> tuple[list[dict], str]:
    """(chat messages, the prompt text the reward functions get) of one row."""
    if "prompt" not in rec and "messages" not in rec:
        raise UsageError(
            f"{where}: missing field 'prompt' (the row has "
            f"{', '.join(sorted(map(str, rec)))[:200] or 'no fields'}); every row of {key} "
            f"needs a prompt, e.g. {EXAMPLE} (other fields reach the reward functions)"
        )
    name = "prompt" if "prompt" in rec else "messages"
    value = rec[name]
    if isinstance(value, str):
        if not value.strip():
            raise UsageError(
                f"{where}: field {name!r} is empty; write the question the policy should "
                f"answer, e.g. {EXAMPLE}"
            )
        return [{"role": "user", "content": value}], value
    if not isinstance(value, list) or not value:
        kind = "an empty list" if isinstance(value, list) else \
            ("null" if value is None else type(value).__name__)
        raise UsageError(
            f"{where}: field {name!r} is {kind}; give a string or a non-empty list of "
            '{"role": "system"|"user", "content": "..."} messages'
        )
    msgs = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UsageError(
                f"{where}: {name}[{i}] is {str(m)[:200]}, not a message; each message is "
                '{"role": "system"|"user"|"assistant", "content": "..."}'
            )
        msgs.append({"role": m["role"], "content": m["content"]})
    if msgs[-1]["role"] == "assistant":
        raise UsageError(
            f"{where}: {name} ends with an assistant message; a prompt ends with the user's "
            "turn (the policy writes the assistant's answer). Remove the last message."
        )
    users = [m["content"] for m in msgs if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise UsageError(
            f"{where}: {name} has no (non-empty) user message; add the question as "
            '{"role": "user", "content": "..."}'
        )
    return msgs, users[-1]
