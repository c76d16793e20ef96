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

This module holds the `Engine` (loading, text, validation, the entry points); the loop is in
`plinth.infer.session`, the sampler in `.sampler`, the forward passes in `.runners`, streaming
text in `.detok`, beam search in `.beam`, and the request/result types in `.params`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from plinth.config.dtypes import canonical_dtype, dtype_choices
from plinth.errors import NotSupportedError, UsageError
from plinth.infer.beam import beam_search
from plinth.infer.params import Completion, SamplingParams
from plinth.infer.pieces import Pieces
from plinth.infer.runners import DecoderRunner, Runner, Seq2SeqRunner
from plinth.infer.session import DecodeSession
from plinth.load import first_special_id
from plinth.models import unwrap

# the engine's public names; the sampling functions live in plinth.infer.sampler
__all__ = ["Completion", "DecodeSession", "Engine", "SamplingParams"]

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
            net.to(weight_dtype(dtype))
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

    def token_text(self, token_id: int, before: list[int] | tuple = ()) -> str:
        """One token's text as logprobs show it: what it adds after the tokens `before`."""
        if self.tokenizer is None:
            return str(token_id)
        return self.pieces.text(token_id, before)

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """A token's raw bytes (OpenAI's logprob `bytes`), given its text (`token_text`)."""
        if self.tokenizer is None:
            return list(text.encode("utf-8"))
        return self.pieces.bytes(token_id, text)

    def token_legacy(self, token_id: int, text: str) -> str:
        """A token as the legacy completions logprobs name it ("bytes:\\xNN" when it holds
        part of a character)."""
        return text if self.tokenizer is None else self.pieces.legacy(token_id, text)

    @property
    def pieces(self):
        if getattr(self, "_pieces", None) is None:
            self._pieces = Pieces(self.tokenizer)
        return self._pieces

    def apply_chat_template(self, messages: list[dict]) -> str:
        """The conversation rendered by the model's chat template, ending with the assistant's
        turn opened (add_generation_prompt)."""
        if self.chat_template is None:
            from plinth.load import no_chat_template

            raise no_chat_template(self.name, None, "send plain prompts (completions) instead "
                                   "of chat messages")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def prompt_ids(self, prompts: list[str | list[int]]) -> list[list[int]]:
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

    def check_length(self, ids: list[list[int]], new: list[int]) -> None:
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
        ids = self.prompt_ids(prompts)
        self.check_length(ids, [sp.max_new_tokens for sp in params])
        session = DecodeSession(self)
        for p, sp in zip(ids, params, strict=True):
            session.queue(p, sp, on_token)
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
        ids = self.prompt_ids(prompts)
        self.check_length(ids, [max_new_tokens] * len(ids))
        return beam_search(self, ids, num_beams=num_beams, length_penalty=length_penalty,
                           early_stopping=early_stopping, max_new_tokens=max_new_tokens,
                           num_return_sequences=num_return_sequences)

    @property
    def model_device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_runner(self, ids: list[list[int]], max_new: int) -> Runner:
        """Forward passes over a fresh KV cache for prompts `ids` (see plinth.infer.runners)."""
        if self.arch == "encoder_decoder":
            return Seq2SeqRunner(self.model, ids, max_new, self._decoder_start)
        return DecoderRunner(self.model, ids, max_new, self._fast_path())

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


# ------------------------------------------------------------------------------------ helpers


def _decoder_start(tok, cfg) -> int:
    """The token an encoder-decoder's output starts from: bos (or the first special)."""
    for t in ("<bos>", "<s>", "<|bos|>"):
        i = tok.token_to_id(t) if tok is not None else None
        if i is not None:
            return i
    i = first_special_id(tok, cfg)
    return 0 if i is None else i


def weight_dtype(d) -> torch.dtype:
    """The torch dtype of a weight dtype name: fp32, bf16, fp16 (or float32, bfloat16, ...)."""
    if isinstance(d, torch.dtype):
        return d
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    name = canonical_dtype(d)
    if name not in names:
        raise UsageError(f"--dtype {str(d)[:40]!r} is not a weight dtype: use "
                         f"{dtype_choices()}.")
    return names[name]


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

