"""The engine's decode loop: a `DecodeSession` that rows join and leave between steps
(continuous batching; `Engine.generate` is a session with every row added before the first step),
and each row's state (`Row`: tokens, logprobs, text, stop checks, streaming, its generator).

    python -c "from plinth.infer.session import DecodeSession; help(DecodeSession)"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from plinth.errors import NotSupportedError, UsageError
from plinth.infer.detok import TextStream
from plinth.infer.params import Completion, SamplingParams
from plinth.infer.runners import Runner
from plinth.infer.sampler import RowSampler, row_generator

if TYPE_CHECKING:
    from plinth.infer.engine import Engine


class DecodeSession:
    """A running decode loop that rows join and leave between steps (continuous batching).

        s = engine.session(max_rows=8)
        h = s.add(ids, SamplingParams(16), on_token)   # a row handle (its on_token row index)
        while s.live:
            for handle, completion in s.step(): ...    # rows that finished this step

    `add` validates the row (UsageError as `generate` gives) and queues it; the next `step`
    prefills the queued rows, each on its own, and merges them into the batch cache, then
    advances every live row by one token with the same per-row sampling, penalties, seeds,
    logprobs, stop strings, streaming and cancelling as `generate` (which is this loop with all
    rows added before the first step). A decoder's rows are left-padded to one cache position:
    when rows join, the cache is laid out afresh with the real tokens of every row ending at
    max(row lengths) (a prompt longer than the running position shifts the others right; a
    shorter one gets more padding), and its length is what the rows can still write. Every
    row's positions count from its own first token, so a row decodes what it would alone. An
    encoder-decoder's rows can join only an empty session (`joinable`)."""

    def __init__(self, engine: Engine, max_rows: int | None = None):
        self.engine, self.max_rows = engine, max_rows
        self.pending: list[Row] = []
        self.active: list[int] = []  # live rows in batch order
        self.rows: dict[int, Row] = {}
        self.sampler = RowSampler([], engine.vocab_size, engine.model_device)
        self.runner: Runner | None = None
        self.logits: torch.Tensor | None = None  # (A, V) next-token logits of the active rows
        self._next = 0

    @property
    def live(self) -> int:
        """Rows generating or queued to join at the next step."""
        return len(self.active) + len(self.pending)

    @property
    def joinable(self) -> bool:
        return self.engine.arch == "decoder" or not self.active

    def add(self, prompt: str | list[int], params: SamplingParams,
            on_token: Callable[[int, int, str], bool | None] | None = None) -> int:
        """Queue a row to join at the next step; its handle (the row index on_token gets)."""
        if self.max_rows is not None and self.live >= self.max_rows:
            raise UsageError(f"the session is full ({self.max_rows} rows)")
        if not self.joinable:
            raise NotSupportedError("an encoder-decoder session cannot be joined while it runs")
        params.check()
        ids = self.engine.prompt_ids([prompt])[0]
        self.engine.check_length([ids], [params.max_new_tokens])
        return self.queue(ids, params, on_token)

    def queue(self, ids: list[int], params: SamplingParams, on_token) -> int:
        """`add` for a row whose token ids, parameters and length were checked already."""
        row = Row(self.engine, self._next, ids, params, on_token)
        self._next += 1
        self.pending.append(row)
        return row.index

    def discard(self, handle: int) -> bool:
        """Drop a row that has not joined yet (True when it was queued)."""
        for i, r in enumerate(self.pending):
            if r.index == handle:
                del self.pending[i]
                return True
        return False

    def _admit(self) -> None:
        new, self.pending = self.pending, []
        eng = self.engine
        ids = [r.prompt for r in new]
        max_new = [r.params.max_new_tokens for r in new]
        if self.runner is None:
            self.runner = eng.new_runner(ids, max(max_new))
            logits = self.runner.prefill()
        else:
            logits = self.runner.admit(ids, max_new)
        for r in new:
            self.rows[r.index] = r
        self.sampler.add(new)
        self.active = self.active + [r.index for r in new]
        self.sampler.keep(self.active)
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Completion]]:
        """Admit the queued rows, advance every live row by one token; (handle, Completion)
        of the rows that finished."""
        if self.pending:
            self._admit()
        if not self.active:
            return []
        sampler, active = self.sampler, self.active
        toks = sampler.sample(self.logits)  # (A,) for the active rows
        still, keep_batch, done = [], [], []
        for j, (r, t) in enumerate(zip(active, toks.tolist(), strict=True)):
            if self.rows[r].push(t, sampler.logprob_info(j)):
                still.append(r)
                keep_batch.append(j)
            else:
                done.append(r)
        sampler.done_step()
        finished = [(r, self.rows.pop(r).completion()) for r in done]
        if not still:
            self.active, self.logits, self.runner = [], None, None  # free the cache
            sampler.keep([])
            return finished
        if len(still) < len(active):
            sel = torch.tensor(keep_batch, device=self.engine.model_device)
            toks = toks.index_select(0, sel)
            self.runner.keep(sel)
            sampler.keep(still)
            self.active = still
        self.logits = self.runner.step(toks)
        return finished



class Row:
    """One prompt's generation state: tokens, logprobs, incremental text with stop checks and
    streaming (`TextStream`), its own generator, and why it finished."""

    def __init__(self, engine: Engine, index: int, prompt: list[int], params: SamplingParams,
                 on_token):
        self.engine, self.index, self.prompt, self.params = engine, index, prompt, params
        self.on_token = on_token
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top: list[list[tuple[int, float]]] | None = [] if params.logprobs else None
        self.finish: str | None = None
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(engine.eos_ids)
        # incremental detokenisation (only when text is needed while generating)
        self.track_text = bool(params.stop) or on_token is not None
        self.stream = TextStream(engine.decode, params.stop)
        self.generator = row_generator(params.seed, engine.model_device)

    def push(self, tok: int, info) -> bool:
        """Take the row's next token; False when the row has finished."""
        self.tokens.append(tok)
        if self.logprobs is not None and info is not None:
            self.logprobs.append(info[0])
            if self.top is not None:
                self.top.append([(int(i), v) for i, v in info[1]])
        stop_tok = tok in self.stop_ids
        if stop_tok:
            self.finish = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"
        if self.track_text and not stop_tok:
            self.stream.advance(self.tokens)
        if self.params.stop and self.finish != "stop" and self.stream.cut_at_stop():
            self.finish = "stop"
        if self.on_token is not None:
            delta = self.stream.delta(self.finish is not None)
            if self.on_token(self.index, tok, delta) is False and self.finish is None:
                self.finish = "cancelled"
        return self.finish is None

    def completion(self) -> Completion:
        text = self.stream.text
        if not self.track_text or self.finish in ("length", "cancelled"):
            # the final text, with anything an incomplete character held back
            cut = self.tokens[:-1] if self.tokens and self.tokens[-1] in self.stop_ids \
                else self.tokens
            if not (self.params.stop and self.finish == "stop"):
                text = self.engine.decode(cut)
        return Completion(
            token_ids=list(self.tokens),
            text=text,
            finish_reason=self.finish or "length",
            prompt_tokens=len(self.prompt),
            logprobs=self.logprobs,
            top_logprobs=None if self.top is None else
            [{self.engine.token_text(i, self.tokens[max(0, k - 6):k]): v for i, v in step}
             for k, step in enumerate(self.top)],
            top_ids=self.top,
        )
