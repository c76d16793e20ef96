"""The inference engine: batched generation with a preallocated KV cache and per-row decoding
controls, beam search, weight-only int8, and LoRA adapters.

    python -c "from plinth.infer.engine import Engine, SamplingParams as S; \
e = Engine.load('ref-smollm2'); print(e.generate(['The capital of France is'], S(16))[0].text)"

One decode loop serves a whole batch. Prompts of different lengths are left-padded into one KV
cache (each row's padding is masked and its positions start after it, so a row computes what it
would alone). Every row carries its own `SamplingParams`: the sampler works on (rows, vocab)
tensors of per-row temperatures, top-k/top-p/min-p limits and penalties, and draws each row's
token from the row's own `torch.Generator`, so a seeded row's output does not depend on its
batch-mates. A row that finishes leaves the sampler and the batch at once (its cache rows are
dropped: one cache copy per finished row, cheaper than decoding dead rows to the end). Text
is detokenised incrementally, and text that could still become a stop string is held back from
streaming until it cannot.

The loop is a `DecodeSession` (`Engine.session`): rows can also join it between steps
(continuous batching, what `plinth serve` runs); each joining prompt is prefilled on its own and
merged into the batch cache, so it decodes exactly as it would alone. `generate` is a session
with every row added before the first step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from plinth.errors import NotSupportedError, UsageError
from plinth.load import first_special_id
from plinth.models import unwrap
from plinth.models.layers import KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0  # CTRL-style, multiplicative
    frequency_penalty: float = 0.0  # OpenAI-style, additive: - f * count(token)
    presence_penalty: float = 0.0  # OpenAI-style, additive: - p * (count > 0)
    stop: list[str] = field(default_factory=list)  # stop strings (not included in text)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None  # per-request generator: same seed -> same output
    logprobs: int | None = None  # None: none; 0: chosen token's logprob; n: plus top-n

    def check(self) -> None:
        """UsageError naming the field for values no sampler can honour."""
        bad = []
        if self.max_new_tokens < 1:
            bad.append(f"max_new_tokens={self.max_new_tokens} (needs >= 1)")
        if self.temperature < 0:
            bad.append(f"temperature={self.temperature} (needs >= 0; 0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            bad.append(f"top_k={self.top_k} (needs >= 1, or None)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad.append(f"top_p={self.top_p} (needs 0 < top_p <= 1, or None)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            bad.append(f"min_p={self.min_p} (needs 0 <= min_p <= 1, or None)")
        if self.repetition_penalty <= 0:
            bad.append(f"repetition_penalty={self.repetition_penalty} (needs > 0; 1 is off)")
        if self.logprobs is not None and self.logprobs < 0:
            bad.append(f"logprobs={self.logprobs} (needs >= 0, or None)")
        if any(not s for s in self.stop):
            bad.append("stop contains an empty string")
        if bad:
            raise UsageError("sampling parameters: " + "; ".join(bad) + ".")


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos / stop token / stop string), "length" or "cancelled"
    prompt_tokens: int
    logprobs: list[float] | None = None  # per generated token
    top_logprobs: list[dict[str, float]] | None = None  # per generated token, when logprobs>0
    score: float | None = None  # beam search: the hypothesis' length-penalised score


_DERIVE = object()  # eos_ids default: from the config / tokenizer


class Engine:
    """A model, its tokenizer and config, ready to generate (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        cfg,
        *,
        device: str = "cpu",
        chat_template=None,
        eos_ids=_DERIVE,
        name: str | None = None,
    ):
        self.model = unwrap(model).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = torch.device(device)
        self.chat_template = chat_template
        self.arch = cfg.model.arch
        if self.arch == "encoder":
            raise NotSupportedError(
                "an encoder-only model cannot generate; use a decoder or encoder_decoder model"
            )
        if eos_ids is _DERIVE:
            eos_ids = [i for i in [first_special_id(tokenizer, cfg)] if i is not None]
        self.eos_ids = sorted({int(i) for i in (eos_ids or [])})
        self.name = name or "model"
        self.max_context = int(cfg.model.max_seq_len)
        self.vocab_size = int(cfg.model.vocab_size)
        bos = None
        if chat_template is not None:
            bos = getattr(chat_template, "bos_token", None) or None
        self._bos_text = bos
        self._decoder_start = _decoder_start(tokenizer, cfg)
        self.use_fast = True  # False: always run the model's own forward (tests compare both)
        self._fast = None

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str,
        *,
        device: str = "cpu",
        dtype=None,
        quantize: str | None = None,
        adapter: str | None = None,
        merge_adapter: bool = True,
    ) -> Engine:
        """An engine for a plinth run / checkpoint / `plinth import` directory, a Hugging Face
        model directory, a .gguf file, or a reference model name ("ref-smollm2"). `adapter`: a
        LoRA/IA3 adapter directory put on the model; adapters (given or from a fine-tune run)
        are folded into the weights unless merge_adapter=False (then applied on the fly)."""
        from plinth.load import load_model

        m = load_model(path, device=device)
        net = m.model
        if adapter is not None:
            from plinth.peft.save import load_adapter

            load_adapter(net, adapter)
        if merge_adapter:
            _merge_adapters(net)
        net.requires_grad_(False)
        if dtype is not None:
            net.to(_dtype(dtype))
        if quantize is not None:
            from plinth.infer.quant import quantize_model

            quantize_model(net, quantize)
        return cls(net, m.tokenizer, m.cfg, device=device, chat_template=m.chat_template,
                   eos_ids=m.eos_ids, name=m.name)

    # ------------------------------------------------------------------------------ text

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; the tokenizer's own special tokens (e.g. bos) are added unless
        the text already starts with the bos text (a rendered chat template)."""
        special = not (self._bos_text and text.startswith(self._bos_text))
        return self.tokenizer.encode(text, add_special_tokens=special).ids

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids)

    def token_text(self, token_id: int) -> str:
        """One token's text (as top_logprobs keys show it)."""
        return self.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation rendered by the model's chat template, ending with the assistant's
        turn opened (add_generation_prompt)."""
        if self.chat_template is None:
            from plinth.load import no_chat_template

            raise no_chat_template(self.name, None, "send plain prompts (completions) instead "
                                   "of chat messages")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def _ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
        out = []
        for i, p in enumerate(prompts):
            ids = self.encode(p) if isinstance(p, str) else [int(t) for t in p]
            if not ids:
                raise UsageError(f"prompt {i} is empty: every prompt needs at least one token")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise UsageError(
                    f"prompt {i} has token id {bad[0]} outside the vocabulary "
                    f"(0..{self.vocab_size - 1})"
                )
            out.append(ids)
        return out

    def _check_length(self, ids: list[list[int]], new: list[int]) -> None:
        for i, (p, n) in enumerate(zip(ids, new, strict=True)):
            if self.arch == "decoder" and len(p) + n > self.max_context:
                raise UsageError(
                    f"prompt {i} has {len(p)} tokens; with max_new_tokens={n} that is "
                    f"{len(p) + n}, more than this model's context of {self.max_context}. "
                    "Shorten the prompt or lower max_new_tokens."
                )
            if self.arch == "encoder_decoder" and max(len(p), n + 1) > self.max_context:
                raise UsageError(
                    f"prompt {i} ({len(p)} tokens) or max_new_tokens={n} exceeds this model's "
                    f"context of {self.max_context}"
                )

    # ------------------------------------------------------------------------------ generate

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams],
        on_token: Callable[[int, int, str], bool | None] | None = None,
    ) -> list[Completion]:
        """One completion per prompt, from one batched decode loop (see the module docstring).
        on_token(row, token_id, text_delta) is called as each row's tokens arrive; returning
        False cancels that row (finish_reason "cancelled")."""
        if not prompts:
            return []
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise UsageError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        for sp in params:
            sp.check()
        ids = self._ids(prompts)
        self._check_length(ids, [sp.max_new_tokens for sp in params])
        session = DecodeSession(self)
        for p, sp in zip(ids, params, strict=True):
            session._append(p, sp, on_token)
        done: dict[int, Completion] = {}
        while session.live:
            done.update(session.step())
        return [done[i] for i in range(len(ids))]

    def session(self, max_rows: int | None = None) -> DecodeSession:
        """A decode loop that rows join and leave between steps (continuous batching): see
        `DecodeSession`."""
        return DecodeSession(self, max_rows)

    @torch.inference_mode()
    def beam_search(
        self,
        prompts: list[str | list[int]],
        *,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        max_new_tokens: int = 64,
        num_return_sequences: int = 1,
    ) -> list[list[Completion]]:
        """The `num_return_sequences` best sequences per prompt by beam search, best first.

        Follows transformers' beam search: each step extends every live beam by every token and
        keeps the `num_beams` best continuations by summed log-probability (2 * num_beams
        candidates are ranked so that enough remain after some end); a candidate among the
        first `num_beams` that ends with eos, or any at max_new_tokens, becomes a finished
        hypothesis scored sum_logprob / generated_len ** length_penalty (eos counted), and the
        best `num_beams` hypotheses are kept. A prompt is done when num_beams hypotheses exist
        and either early_stopping is set or its best live beam, scored at the current length,
        cannot beat the worst of them. Completion.score holds each hypothesis' score."""
        if num_beams < 1 or not 1 <= num_return_sequences <= num_beams:
            raise UsageError(
                f"beam search: num_beams={num_beams}, num_return_sequences="
                f"{num_return_sequences}; need num_beams >= 1 and 1 <= num_return_sequences "
                "<= num_beams"
            )
        if max_new_tokens < 1:
            raise UsageError(f"beam search: max_new_tokens={max_new_tokens} (needs >= 1)")
        if not prompts:
            return []
        ids = self._ids(prompts)
        self._check_length(ids, [max_new_tokens] * len(ids))
        B, nb, dev = len(ids), num_beams, self.model_device
        runner = self._runner(ids, max_new_tokens)
        logits = runner.prefill()  # (B, V)
        expand = torch.arange(B, device=dev).repeat_interleave(nb)
        runner.keep(expand)  # every beam of a prompt starts from its prompt's cache
        logits = logits.index_select(0, expand)  # (B * nb, V)
        # only beam 0 is live at first (the others are copies): the rest start at -1e9
        scores = torch.full((B, nb), -1e9, device=dev)
        scores[:, 0] = 0.0
        scores = scores.view(-1)
        hist: list[list[int]] = [[] for _ in range(B * nb)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        eos = set(self.eos_ids)
        V = logits.shape[1]
        for t in range(1, max_new_tokens + 1):
            logp = logits.float().log_softmax(dim=-1)  # (B * nb, V)
            cand = (scores[:, None] + logp).view(B, nb * V)
            # as transformers: enough candidates that nb stay live after eos ones are set aside
            keep = min(max(2, 1 + len(eos)) * nb, nb * V)
            top_s, top_i = cand.topk(keep, dim=1)  # (B, keep), best first
            top_s, top_i = top_s.tolist(), top_i.tolist()
            last = t == max_new_tokens
            next_rows, next_toks, next_scores = [], [], []
            for b in range(B):
                live = []
                for rank, (sc, flat) in enumerate(zip(top_s[b], top_i[b], strict=True)):
                    beam, tok = divmod(flat, V)
                    row = b * nb + beam
                    ends = tok in eos
                    if (ends or last) and rank < nb and not done[b]:
                        _add_hypothesis(finished[b], nb, sc / t**length_penalty,
                                        hist[row] + [tok], early_stopping)
                    if not ends and len(live) < nb:
                        live.append((sc, row, tok))
                while len(live) < nb:  # fewer live candidates than beams (tiny vocabularies)
                    live.append((-1e9, b * nb, 0))
                if not done[b] and len(finished[b]) == nb:
                    best_live = live[0][0] / t**length_penalty
                    worst = min(h[0] for h in finished[b])
                    done[b] = early_stopping or best_live <= worst
                for sc, row, tok in live:
                    next_rows.append(row)
                    next_toks.append(tok)
                    next_scores.append(sc)
            if last or all(done):
                break
            hist = [hist[r] + [tok] for r, tok in zip(next_rows, next_toks, strict=True)]
            sel = torch.tensor(next_rows, device=dev)
            runner.keep(sel)  # reorder the cache: each new beam continues its parent's rows
            scores = torch.tensor(next_scores, device=dev)
            logits = runner.step(torch.tensor(next_toks, device=dev))
        out = []
        for b in range(B):
            hyps = sorted((h for h in finished[b] if h[0] > -1e8), key=lambda h: -h[0])
            out.append([self._beam_completion(ids[b], toks, sc)
                        for sc, toks in hyps[:num_return_sequences]])
        return out

    def _beam_completion(self, prompt: list[int], toks: list[int], score: float) -> Completion:
        ends = bool(toks) and toks[-1] in self.eos_ids
        return Completion(
            token_ids=toks,
            text=self.decode(toks[:-1] if ends else toks),
            finish_reason="stop" if ends else "length",
            prompt_tokens=len(prompt),
            score=score,
        )

    @property
    def model_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def _runner(self, ids: list[list[int]], max_new: int) -> _Runner:
        if self.arch == "encoder_decoder":
            return _Seq2SeqRunner(self.model, ids, max_new, self._decoder_start)
        return _DecoderRunner(self.model, ids, max_new, self._fast_path())

    def _fast_path(self):
        """The FastDecoder for this model (built once), or None where it does not apply."""
        from plinth.infer.fast import FastDecoder

        if not self.use_fast or not FastDecoder.supports(self.model):
            return None
        if self._fast is None:
            # normal tensors (not inference-mode ones): the model's own layers keep views of
            # them and must stay usable outside the engine (e.g. for training or evaluation)
            with torch.inference_mode(False), torch.no_grad():
                self._fast = FastDecoder(self.model)
        return self._fast


# ------------------------------------------------------------------------------------ sessions


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
        self.pending: list[_Row] = []
        self.active: list[int] = []  # live rows in batch order
        self.rows: dict[int, _Row] = {}
        self.sampler = _Sampler([], engine.vocab_size, engine.model_device)
        self.runner: _Runner | None = None
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
        ids = self.engine._ids([prompt])[0]
        self.engine._check_length([ids], [params.max_new_tokens])
        return self._append(ids, params, on_token)

    def _append(self, ids: list[int], params: SamplingParams, on_token) -> int:
        row = _Row(self.engine, self._next, ids, params, on_token)
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
            self.runner = eng._runner(ids, max(max_new))
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
        toks = sampler.sample(self.logits, active)  # (A,) for the active rows
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


# ------------------------------------------------------------------------------------ runners


class _Runner:
    """Forward passes for the decode loop: prefill() -> logits (B, V) of the last position;
    step(tokens (A,)) -> logits (A, V); keep(idx) drops the other rows from the batch."""


class _DecoderRunner(_Runner):
    """Rows left-padded to one cache position; `admit` merges new rows between steps (see
    DecodeSession)."""

    def __init__(self, model, ids, max_new, fast=None):
        self.model, self.fast = model, fast
        self.device = model.embed_tokens.weight.device
        self._first = (ids, max_new)
        self.cache: KVCache | None = None
        self.until: list[int] = []  # per batch row: the cache position it may write up to

    def _forward(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        if self.fast is not None:
            return self.fast.forward(idx, cache)
        h = self.model.encode(idx, cache)
        return self.model.lm_head(h[:, -1]).float()  # only the last position gets logits

    def prefill(self) -> torch.Tensor:
        ids, max_new = self._first
        return self.admit(ids, [max_new] * len(ids))

    def admit(self, ids: list[list[int]], max_new: list[int]) -> torch.Tensor:
        """Add rows (prompts, each with its max_new_tokens) after the current ones; logits
        (len(ids), V) at their last prompt positions.

        The cache is laid out afresh: every row's real tokens end at P = the longest row (old
        rows' tokens so far, new prompts), old rows shifted by P - pos, and its length is what
        the rows may still write. Each new prompt is prefilled at its own length into a cache
        of its own (no compute on padding; positions count from the row's first token) and
        copied in after its padding, so the row decodes exactly as it would alone."""
        old, dev = self.cache, self.device
        lens = [len(p) for p in ids]
        if old is None and len(set(lens)) == 1:  # a fresh batch of equal lengths: one pass
            self.cache = self.model.new_cache(len(ids), lens[0] + max(max_new))
            self.until = [lens[0] + m for m in max_new]
            return self._forward(torch.tensor(ids, device=dev), self.cache)
        A = 0 if old is None else old.k.shape[1]
        pos = 0 if old is None else old.pos
        pads = [] if old is None else (
            old.pad.tolist() if old.pad is not None else [0] * A)
        P = max([pos - p for p in pads] + lens)
        delta = P - pos
        until = [u + delta for u in self.until] + [P + m for m in max_new]
        pad = torch.tensor([p + delta for p in pads] + [P - n for n in lens], device=dev)
        cache = self.model.new_cache(A + len(ids), max(until), pad=pad)
        if old is not None:
            if cache.k.dtype != old.k.dtype:
                cache.k, cache.v = cache.k.to(old.k.dtype), cache.v.to(old.v.dtype)
            src, dst = max(0, -delta), max(0, delta)
            cache.k[:, :A, :, dst:P] = old.k[:, :, :, src:pos]
            cache.v[:, :A, :, dst:P] = old.v[:, :, :, src:pos]
        logits = []
        for i, p in enumerate(ids):
            one = self.model.new_cache(1, len(p))
            logits.append(self._forward(torch.tensor([p], device=dev), one))
            cache.k[:, A + i, :, P - len(p):P] = one.k[:, 0]
            cache.v[:, A + i, :, P - len(p):P] = one.v[:, 0]
        cache.pos = P
        self.cache, self.until = cache, until
        return torch.cat(logits)

    def step(self, toks: torch.Tensor) -> torch.Tensor:
        return self._forward(toks[:, None], self.cache)

    def keep(self, idx: torch.Tensor) -> None:
        _compact_cache(self.cache, idx)
        self.until = [self.until[i] for i in idx.tolist()]


class _Seq2SeqRunner(_Runner):
    def __init__(self, model, ids, max_new, start_id):
        self.model = model
        device = model.embed_tokens.weight.device
        S = max(len(p) for p in ids)
        self.src = torch.tensor([p + [0] * (S - len(p)) for p in ids], device=device)
        mask = torch.tensor([[1] * len(p) + [0] * (S - len(p)) for p in ids], device=device)
        self.src_mask = None if bool(mask.all()) else mask
        self.cache = model.new_cache(len(ids), max_new + 1)
        self.start = torch.full((len(ids), 1), start_id, dtype=torch.long, device=device)

    def prefill(self) -> torch.Tensor:
        self.memory = self.model.encode(self.src, self.src_mask)  # (B, S, D), once
        return self.step(self.start[:, 0])

    def step(self, toks: torch.Tensor) -> torch.Tensor:
        out = self.model.decode(toks[:, None], self.memory, self.src_mask, self.cache)
        return out[:, -1].float()

    def admit(self, ids, max_new) -> torch.Tensor:
        raise NotSupportedError("an encoder-decoder batch cannot be joined while it runs")

    def keep(self, idx: torch.Tensor) -> None:
        _compact_cache(self.cache, idx)
        self.memory = self.memory.index_select(0, idx)
        if self.src_mask is not None:
            self.src_mask = self.src_mask.index_select(0, idx)


def _compact_cache(cache: KVCache, idx: torch.Tensor) -> None:
    """Keep rows `idx` of the cache (finished rows stop costing attention and matmul work)."""
    cache.k = cache.k.index_select(1, idx)
    cache.v = cache.v.index_select(1, idx)
    if cache.pad is not None:
        cache.pad = cache.pad.index_select(0, idx)
    for layer, (k, v) in list(cache.cross.items()):
        cache.cross[layer] = (k.index_select(0, idx), v.index_select(0, idx))


# ------------------------------------------------------------------------------------ sampler


class _Sampler:
    """Next tokens for the active rows from their logits, with every row's own parameters as
    (A,) tensors, so one set of tensor operations serves all rows."""

    def __init__(self, rows: list[_Row], vocab: int, device: torch.device):
        self.V, self.device = vocab, device
        self.rows: dict[int, _Row] = {}
        # penalty state for every row (kept by row index; only rows that use it cost anything)
        self.counts: dict[int, torch.Tensor] = {}  # generated-token counts (V,)
        self.seen: dict[int, torch.Tensor] = {}  # prompt + generated tokens (bool V,)
        self.add(rows)
        self._set([r.index for r in rows])
        self._info = None

    def add(self, rows: list[_Row]) -> None:
        """Take on new rows (their penalty state); `keep` makes them active."""
        vocab, device = self.V, self.device
        for r in rows:
            self.rows[r.index] = r
            sp = r.params
            if sp.repetition_penalty != 1.0:
                seen = torch.zeros(vocab, dtype=torch.bool, device=device)
                seen[torch.tensor(r.prompt, device=device)] = True
                self.seen[r.index] = seen
            if sp.frequency_penalty or sp.presence_penalty:
                self.counts[r.index] = torch.zeros(vocab, device=device)

    def _set(self, active: list[int]) -> None:
        self.active = active
        ps = [self.rows[r].params for r in active]
        dev = self.device
        self.sampling = [j for j, p in enumerate(ps) if p.temperature > 0]
        self.any_penalty = any(
            p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in ps
        )
        self.want_logprobs = [j for j, p in enumerate(ps) if p.logprobs is not None]
        if self.sampling:
            sp = [ps[j] for j in self.sampling]
            self.s_idx = torch.tensor(self.sampling, device=dev)
            self.temp = torch.tensor([p.temperature for p in sp], device=dev)[:, None]
            self.top_k = [p.top_k for p in sp]
            self.top_p = [p.top_p for p in sp]
            self.min_p = [p.min_p for p in sp]

    def keep(self, active: list[int]) -> None:
        """Make `active` the rows sampled, in batch order; the others are forgotten."""
        live = set(active)
        for d in (self.rows, self.seen, self.counts):
            for r in [r for r in d if r not in live]:
                del d[r]
        self._set(active)

    def done_step(self) -> None:
        self._info = None

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        rows = [j for j, r in enumerate(self.active) if r in self.seen or r in self.counts]
        if not rows:
            return logits
        V, dev = logits.shape[1], self.device
        rs = [self.active[j] for j in rows]
        ps = [self.rows[r].params for r in rs]
        none_seen = torch.zeros(V, dtype=torch.bool, device=dev)
        none_count = torch.zeros(V, device=dev)
        idx = torch.tensor(rows, device=dev)
        sub = apply_penalties(
            logits.index_select(0, idx),
            torch.stack([self.seen.get(r, none_seen) for r in rs]),
            torch.stack([self.counts.get(r, none_count) for r in rs]),
            torch.tensor([p.repetition_penalty for p in ps], device=dev),
            torch.tensor([p.frequency_penalty for p in ps], device=dev),
            torch.tensor([p.presence_penalty for p in ps], device=dev),
        )
        return logits.index_copy(0, idx, sub)

    def sample(self, logits: torch.Tensor, active: list[int]) -> torch.Tensor:
        """Tokens (A,) for logits (A, V) of the active rows."""
        raw = logits
        if self.any_penalty:
            logits = self._penalise(logits)
        toks = logits.argmax(dim=-1)
        if self.sampling:
            sub = logits.index_select(0, self.s_idx) / self.temp
            sub = filter_logits(sub, self.top_k, self.top_p, self.min_p)
            probs = sub.softmax(dim=-1)
            u = torch.cat([
                torch.rand(1, generator=self.rows[self.active[j]].generator,
                           device=self.rows[self.active[j]].generator.device).to(self.device)
                for j in self.sampling
            ])
            toks = toks.index_copy(0, self.s_idx, draw(probs, u))
        self._raw, self._toks = raw, toks
        if self.want_logprobs:
            self._compute_logprobs()
        for j, r in enumerate(self.active):  # penalty state sees the new token
            if r in self.seen:
                self.seen[r][toks[j]] = True
            if r in self.counts:
                self.counts[r][toks[j]] += 1
        return toks

    def _compute_logprobs(self) -> None:
        idx = torch.tensor(self.want_logprobs, device=self.device)
        lp = self._raw.index_select(0, idx).log_softmax(dim=-1)  # (W, V) of the model's logits
        chosen = lp.gather(1, self._toks.index_select(0, idx)[:, None]).squeeze(1).tolist()
        n = max(self.rows[self.active[j]].params.logprobs for j in self.want_logprobs)
        top = lp.topk(n, dim=-1) if n > 0 else None
        info = {}
        for w, j in enumerate(self.want_logprobs):
            k = self.rows[self.active[j]].params.logprobs
            tops = None
            if k > 0:
                tops = list(zip(top.indices[w, :k].tolist(), top.values[w, :k].tolist(),
                                strict=True))
            info[j] = (chosen[w], tops)
        self._info = info

    def logprob_info(self, j: int):
        return None if self._info is None else self._info.get(j)


def apply_penalties(
    logits: torch.Tensor,
    seen: torch.Tensor,
    counts: torch.Tensor,
    repetition: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> torch.Tensor:
    """Logits (R, V) with each row's penalties: a token in `seen` (R, V) (prompt or generated)
    has its logit divided by `repetition` (R,) when positive and multiplied by it when negative
    (CTRL, as transformers); then `frequency * count + presence * (count > 0)` is subtracted,
    with `counts` (R, V) the times each token was generated (OpenAI's rule, as vLLM)."""
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)


def filter_logits(logits: torch.Tensor, top_k: list, top_p: list, min_p: list) -> torch.Tensor:
    """Tempered logits (R, V) with the tokens each row's top-k, top-p and min-p (each a list of
    per-row values or None) rule out set to -inf, in that order (as transformers applies them).
    top-k keeps the k highest; top-p the smallest set of highest tokens whose probability
    reaches p; min-p the tokens with probability >= min_p * (the highest probability)."""
    V = logits.shape[1]
    ninf = float("-inf")
    if any(k is not None and k < V for k in top_k) or any(p is not None and p < 1 for p in top_p):
        srt, order = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([V if k is None else min(k, V) for k in top_k], device=logits.device)
        rank = torch.arange(V, device=logits.device)[None, :]
        srt = srt.masked_fill(rank >= ks[:, None], ninf)
        if any(p is not None and p < 1 for p in top_p):
            ps = torch.tensor([2.0 if p is None else p for p in top_p], device=logits.device)
            probs = srt.softmax(dim=-1)
            # drop a token when the tokens ranked above it already reach top_p (keeps the first)
            srt = srt.masked_fill(probs.cumsum(dim=-1) - probs >= ps[:, None], ninf)
        logits = torch.full_like(logits, ninf).scatter(1, order, srt)
    if any(m for m in min_p):
        ms = torch.tensor([m or 0.0 for m in min_p], device=logits.device)[:, None]
        probs = logits.softmax(dim=-1)
        keep = probs >= ms * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(~keep, ninf)
    return logits


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (R, V) by inverse transform sampling with uniforms u (R,):
    the first token whose cumulative probability exceeds u * total. Each row uses only its own
    uniform, so its draw does not depend on the other rows."""
    cdf = probs.double().cumsum(dim=-1)  # float64: no drift over a 100k vocabulary
    total = cdf[:, -1:]
    t = torch.searchsorted(cdf, u.double()[:, None] * total, right=True).squeeze(1)
    last = (cdf < total).sum(dim=-1)  # the last token with probability > 0
    return torch.minimum(t, last)


# ------------------------------------------------------------------------------------ rows


class _Row:
    """One prompt's generation state: tokens, incremental text, stop checks, streaming."""

    def __init__(self, engine: Engine, index: int, prompt: list[int], params: SamplingParams,
                 on_token):
        self.engine, self.index, self.prompt, self.params = engine, index, prompt, params
        self.on_token = on_token
        self.tokens: list[int] = []
        self.logprobs: list[float] | None = [] if params.logprobs is not None else None
        self.top: list[dict[str, float]] | None = [] if params.logprobs else None
        self.finish: str | None = None
        self.stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            self.stop_ids |= set(engine.eos_ids)
        # incremental detokenisation (only when text is needed while generating)
        self.track_text = bool(params.stop) or on_token is not None
        self.text = ""  # decoded text of the tokens so far (excluding a final stop token)
        self.sent = 0  # characters of self.text already streamed
        self._prefix, self._read = 0, 0
        self._hold = max((len(s) for s in params.stop), default=0)
        dev = engine.model_device
        self.generator = torch.Generator(device=dev)
        if params.seed is not None:
            self.generator.manual_seed(int(params.seed))
        else:
            self.generator.seed()

    def push(self, tok: int, info) -> bool:
        """Take the row's next token; False when the row has finished."""
        self.tokens.append(tok)
        if self.logprobs is not None and info is not None:
            self.logprobs.append(info[0])
            if self.top is not None:
                self.top.append({self.engine.token_text(i): v for i, v in info[1]})
        stop_tok = tok in self.stop_ids
        if stop_tok:
            self.finish = "stop"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"
        if self.track_text and not stop_tok:
            self._advance_text()
        if self.params.stop and self.finish != "stop":
            self._check_stop()
        if self.on_token is not None:
            delta = self._delta()
            if self.on_token(self.index, tok, delta) is False and self.finish is None:
                self.finish = "cancelled"
        return self.finish is None

    def _advance_text(self) -> None:
        dec = self.engine.decode
        ids = self.tokens
        before = dec(ids[self._prefix:self._read])
        now = dec(ids[self._prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(ids)

    def _check_stop(self) -> None:
        start = max(0, self.sent - self._hold)
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish = "stop"

    def _delta(self) -> str:
        """Text not yet streamed that can no longer turn into a stop string."""
        end = len(self.text)
        if self.finish is None and self.params.stop:
            end = len(self.text) - _partial_stop(self.text, self.params.stop)
        if end <= self.sent:
            return ""
        d = self.text[self.sent:end]
        self.sent = end
        return d

    def completion(self) -> Completion:
        text = self.text
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
            top_logprobs=self.top,
        )


def _add_hypothesis(hyps: list, n: int, score: float, toks: list[int], early: bool) -> None:
    """Keep the n best (score, tokens) hypotheses; with early stopping a full set takes no
    more (as transformers)."""
    if len(hyps) < n:
        hyps.append((score, toks))
        return
    if early:
        return
    worst = min(range(n), key=lambda i: hyps[i][0])
    if score > hyps[worst][0]:
        hyps[worst] = (score, toks)


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ------------------------------------------------------------------------------------ helpers


def _decoder_start(tok, cfg) -> int:
    """The token an encoder-decoder's output starts from: bos (or the first special)."""
    for t in ("<bos>", "<s>", "<|bos|>"):
        i = tok.token_to_id(t) if tok is not None else None
        if i is not None:
            return i
    i = first_special_id(tok, cfg)
    return 0 if i is None else i


def _dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        return d
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if d not in names:
        raise UsageError(f"dtype={d!r}: use one of {', '.join(names)}")
    return names[d]


def _merge_adapters(model: nn.Module) -> None:
    """Fold LoRA/IA3 updates into the weights and put plain nn.Linear layers back, so the
    fused projections (one GEMM for q/k/v and for gate/up) run as in a base model."""
    from plinth.peft.apply import merge
    from plinth.peft.wrap import WrappedLinear

    if not any(isinstance(m, WrappedLinear) for m in model.modules()):
        return
    merge(model)
    for m in list(model.modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, WrappedLinear) and getattr(child, "merged", False):
                plain = nn.Linear(child.in_features, child.out_features, bias=False,
                                  device="meta")
                plain.weight, plain.bias = child.weight, child.bias  # the merged tensors
                setattr(m, child_name, plain)

