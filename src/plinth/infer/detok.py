"""A row's text while it is generated: tokens are detokenised incrementally, the text is cut at
the first stop string (which may span tokens), and text that could still become a stop string
is held back from streaming until it cannot, so the streamed deltas add up to the final text.

    python -c "from plinth.infer.detok import partial_stop; print(partial_stop('say ST', ['STOP']))"
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    """Incremental text of one row's tokens (`decode`: token ids -> text), with its stop
    strings: `advance` after each token, `cut_at_stop` to end the text at a stop string,
    `delta` for the text that may be streamed now."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str]):
        self.decode, self.stops = decode, stops
        self.text = ""  # decoded text of the tokens so far (excluding a final stop token)
        self.sent = 0  # characters of self.text already streamed
        # decode from _prefix: the tokens before _read were decoded into text already; a token
        # that ends in an incomplete character ("\ufffd") waits for the next one
        self._prefix, self._read = 0, 0
        self._hold = max((len(s) for s in stops), default=0)

    def advance(self, ids: list[int]) -> None:
        """Take the text of the newest token of `ids` (all the row's tokens so far)."""
        dec = self.decode
        before = dec(ids[self._prefix:self._read])
        now = dec(ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def cut_at_stop(self) -> bool:
        """End the text before the first stop string in it; True when there was one. Only text
        not streamed yet (and a stop string's length before it) is searched."""
        start = max(0, self.sent - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def delta(self, finished: bool) -> str:
        """Text not yet streamed that can no longer turn into a stop string (all of it once the
        row has finished)."""
        end = len(self.text)
        if not finished and self.stops:
            end = len(self.text) - partial_stop(self.text, self.stops)
        if end <= self.sent:
            return ""
        d = self.text[self.sent:end]
        self.sent = end
        return d


def partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
