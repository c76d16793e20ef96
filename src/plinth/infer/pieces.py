"""Each token as logprobs show it: the text it adds in the middle of a text, and its raw bytes.

    from plinth.infer.pieces import Pieces
    p = Pieces(tokenizer)                     # a `tokenizers.Tokenizer`
    p.texts(ids)                              # [" the", " cat"]: not the BPE pieces "Ġthe"
    p.bytes(tid, " the")                      # [32, 116, 104, 101]

A token's text is what decoding it after the tokens before it adds (so "▁the" of a
sentencepiece-style tokenizer is " the" mid-text), and a sequence's token texts add up to its
text. A token that holds part of a character shows as "\ufffd"; its bytes are then the raw
bytes (byte-level BPE, "<0xE2>" byte fallback), as OpenAI's `bytes` field has them.
"""

from __future__ import annotations

import re
from functools import cache

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


CONTEXT = 6  # tokens decoded before a token to find the text it adds


class Pieces:
    """Token text and bytes for logprobs (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._raw: dict[int, bytes | None] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def text(self, tid: int, before: list[int] | tuple = ()) -> str:
        """The text `tid` adds after the tokens `before` (the last few of them count)."""
        ctx = list(before[-CONTEXT:])
        if ctx:
            head, both = self._decode(ctx), self._decode([*ctx, tid])
            if both.startswith(head):
                return both[len(head):]
        return self._decode([tid])

    def texts(self, ids: list[int]) -> list[str]:
        """The text each token of a sequence adds: together, the sequence's text."""
        return [self.text(t, ids[max(0, k - CONTEXT):k]) for k, t in enumerate(ids)]

    def bytes(self, tid: int, text: str) -> list[int]:
        """The token's raw bytes: from its byte-level (or "<0xNN>") piece when that spells
        `text` (its text), else `text` in UTF-8."""
        if tid not in self._raw:
            self._raw[tid] = _raw_bytes(self.tok.id_to_token(tid) or "")
        raw = self._raw[tid]
        if raw is not None and _same_text(raw, text):
            return list(raw)
        return list(text.encode("utf-8"))

    def legacy(self, tid: int, text: str) -> str:
        """The token as the legacy completions API names it: its text, or "bytes:\\xNN..."
        when its bytes are not whole characters."""
        raw = bytes(self.bytes(tid, text))
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{x:02x}" for x in raw)
        return text


def _raw_bytes(piece: str) -> bytes | None:
    m = _BYTE_FALLBACK.fullmatch(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    alphabet = byte_alphabet()
    if piece and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return None


def _same_text(raw: bytes, text: str) -> bool:
    """Whether `raw` is the token's text (partial characters standing as U+FFFD)."""
    lossy = raw.decode("utf-8", errors="replace")
    if lossy == text:
        return True
    return "\ufffd" in text and lossy.replace("\ufffd", "") == text.replace("\ufffd", "")
