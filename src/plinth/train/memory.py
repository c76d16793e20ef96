"""Training memory per device: an estimate to refuse a run that cannot fit, and a measurement.

`memory_per_device` predicts the peak bytes of one training step (`plinth plan` prints it per
device and strategy; `check_fits` refuses a run before it starts). Weights, gradients and
optimizer state are fp32 master copies: 4 + 4 + 8 bytes per parameter with AdamW or Muon (SGD
momentum: 4); FSDP/HSDP shard all three across devices. Activations and logits are not a
textbook formula but what plinth's own models keep: the tensors autograd saves in one block,
read off its saved-tensor hooks, and the peak of real training steps measured with `PeakMemory`
on CPU (tests/recipes/test_plan.py: decoder, encoder and encoder-decoder, fp32 and bf16 autocast,
with and without activation checkpointing, all within a few percent).

One block keeps, per token (D d_model, q and kv the query and key/value widths, F the MLP
width, a = 4 bytes in fp32 and 2 under bf16/fp16 autocast, r = 1 for rmsnorm, 0 for layernorm):

    4 * (2 + 2r) * D                  the fp32 residual stream (block input, after attention)
                                      and rmsnorm's normalised inputs
  + a * (2D + 3q + 3kv + M)           the norm outputs; q/k/v (v keeps the fused projection
                                      alive), rotated q and k, attention output; the MLP's
                                      M = 4F (swiglu: gate/up, silu, product) or 2F
  + per block, under autocast only: the 16-bit copies of o_proj and down_proj (autocast caches
    them). The fused q/k/v and gate/up projections keep references to their separate fp32
    weights, so they add no copy (the concatenated matrix is a temporary).

Attention runs through SDPA's flash kernels, which keep a logsumexp per head and token but no
T x T probabilities, so there is no 5 * heads * seq term (Korthikanti et al. 2022 assume
materialised probabilities). Activation checkpointing keeps each block's fp32 input and, in
backward, one block recomputed. A block's backward needs ~0.4 M per token on top. The decoder
fuses its head and the loss (`linear_cross_entropy`): `logits` is one ~4M-value chunk of fp32
logits (each chunk is freed before the next) plus the gradients of the final hidden states
(tokens x D) and of the head (V x D), which the loss computes in forward and hands over in
backward, keeping no reference (the loop's loss output lives on into the next forward, but
holds nothing large). Under autocast add the head cast to 16 bits, a chunk's 16-bit copy of its
logits' gradient and its 16-bit head-weight gradient, added to the fp32 sum in blocks of at
most 4M values. The encoder (MLM on mask_ratio of the tokens) and the encoder-decoder (T5 span
targets) build plain logits: fp32 logits, log-softmax and gradient. The peak is at the loss or
in a block's backward, whichever needs more.

The total is the peak with gradient accumulation (the loop runs several micro-batches per step
when global_batch > micro_batch * devices: earlier gradients exist during forward); with one
micro-batch per step gradients appear only during backward and the peak is lower by up to
their size. Not modelled: dropout masks, padding masks that move SDPA off its flash kernel,
scratch space inside kernels, and the CUDA allocator's rounding, caching and fragmentation.
Checked once on an H100 (torch 2.11, 40M-900M parameters, the same three families, fp32 and
bf16, with and without checkpointing): within 11% of `torch.cuda.max_memory_allocated`. There
the fused rms_norm keeps no normalised copy (the estimate runs ~5% high in fp32), and cuBLAS
workspaces add a fixed ~60 MiB that only matters for toy models. (That check predates the
layers keeping no concatenated weights and the loss keeping no gradients; not re-run since.)

`measure_peak_bytes(fn, model, optimizer)` measures: the CUDA allocator's peak on a GPU; on CPU,
which has no allocator counter, the peak of live tensor storage seen by `PeakMemory`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from plinth.config.presets import PRESETS
from plinth.config.schema import Config, ModelConfig
from plinth.errors import UsageError


def memory_per_device(
    cfg: Config, micro_batch: int | None = None, devices: int = 1, strategy: str = "none"
) -> dict[str, float]:
    """Bytes per device at the peak of a training step: weights, gradients, optimizer state,
    activations and logits (the loss head's working memory); the module doc has the formula.

    FSDP/HSDP shard weights, gradients and optimizer state across `devices`; activation
    checkpointing keeps only each block's input plus one block's activations."""
    m = cfg.model
    n = m.param_count()
    shard = devices if strategy in ("fsdp", "hsdp") else 1
    activations, logits = _activations(cfg, micro_batch or cfg.optim.micro_batch)
    optim_bytes = {"adamw": 8, "adam": 8, "sgd": 4, "muon": 8}[cfg.optim.name]
    return {
        "weights": 4.0 * n / shard,
        "gradients": 4.0 * n / shard,
        "optimizer": optim_bytes * n / shard,
        "activations": float(activations),
        "logits": float(logits),
    }


def _activations(cfg: Config, batch: int) -> tuple[float, float]:
    """(activations, logits) bytes at the step's peak for `batch` sequences of max_seq_len."""
    m = cfg.model
    a = 2 if cfg.hardware.precision in ("bf16", "fp16") else 4  # bytes per activation
    d, f, V = m.d_model, m.ffn_dim, m.vocab_size
    q, kv = m.n_heads * m.head_dim, m.kv_heads * m.head_dim
    r = 1 if m.norm == "rmsnorm" else 0  # rmsnorm also keeps its normalised input
    mlp = (4 if m.activation == "swiglu" else 2) * f
    # one block, bytes per token (module doc)
    per_token = 4 * (2 + 2 * r) * d + a * (2 * d + 3 * q + 3 * kv + mlp)
    if m.qk_norm:
        per_token += a * r * (q + kv)
    # weight copies one block keeps for backward: under autocast the 16-bit casts of o_proj and
    # down_proj (autocast caches them; the fused q/k/v and gate/up keep only the fp32 weights)
    copies = 2 * (q * d + d * f) if a == 2 else 0
    N = batch * m.max_seq_len  # tokens through the stack (the decoder stack for enc-dec)
    stacks = [(m.n_layers, N, per_token, copies)]  # (blocks, tokens, per token, per block)
    extra = 0  # saved outside the blocks, besides the last stack's final norm
    if m.arch == "encoder_decoder":  # T5 span corruption: shorter source and target
        p = cfg.pretrain
        noise = max(round(m.max_seq_len * p.mask_ratio), 1)
        spans = max(1, round(noise / p.mean_span_length))
        src, N = batch * (m.max_seq_len - noise + spans), batch * (noise + spans + 1)
        # cross-attention per target token: norm, residual, query, output; per source token
        # the keys and values (and under autocast the memory cast to 16 bits for each)
        cross = 4 * (1 + r) * d + a * (d + 2 * q)
        cross_src = src * (a * 2 * kv + (4 * d if a == 2 else 0))
        n_dec = m.n_decoder_layers or m.n_layers
        stacks = [
            (m.n_layers, src, per_token, copies),
            (n_dec, N, per_token + cross, copies + cross_src),
        ]
        extra = src * 4 * (2 + r) * d  # the encoder's final norm and its output (the memory)
    ckpt = cfg.hardware.activation_checkpointing
    saved = extra + N * 4 * (1 + r) * d  # the final norm's input (and normalised input)
    for blocks, tokens, tok, blk in stacks:
        saved += blocks * (tokens * 4 * d if ckpt else tokens * tok + blk)
    # one block's backward: its recomputed activations (checkpointing) and its gradients
    work = max((t * tok + blk if ckpt else 0) + t * a * 0.4 * mlp for _, t, tok, blk in stacks)
    if m.arch == "decoder":  # fused head + loss (linear_cross_entropy): one chunk of logits
        rows = min(N, max(64, 2**22 // V))  # its default chunk
        logits = rows * V * (6 if a == 2 else 4) + rows * d * 4
        if a == 2:  # the head weight cast to 16 bits; a chunk's weight gradient in 16 bits,
            # added to the fp32 one in blocks of 2**22 // d rows
            logits += 4 * V * d + 4 * min(V, max(1, 2**22 // d)) * d
        # gradients of h and of the head weight, computed in forward, kept until backward
        logits += 4 * (N * d + V * d)
    else:  # plain fp32 logits of the predicted positions, their log-softmax and gradient
        rows = N if m.arch == "encoder_decoder" else N * cfg.pretrain.mask_ratio
        logits = rows * V * 4 * 3 + rows * d * a
    # the peak is at the loss (end of forward) or in a block's backward, whichever is larger
    return saved + max(0, work - logits), logits


def available_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    import psutil

    return float(psutil.virtual_memory().available)


def check_fits(
    cfg: Config,
    device: torch.device,
    available: float | None = None,
    *,
    devices: int = 1,
    strategy: str = "none",
    ranks_here: int = 1,
) -> None:
    """Raise a clear error when the estimate exceeds what the device has free. Under torchrun
    the estimate is per rank (`strategy` over `devices` ranks); CPU ranks on one machine
    (`ranks_here`) share its memory."""
    est = memory_per_device(cfg, devices=devices, strategy=strategy)
    need = sum(est.values())
    have = available_bytes(device) if available is None else available
    if device.type == "cpu":
        have /= ranks_here
    if need <= 0.9 * have:
        return
    gib = 2**30
    fits = [
        name
        for name, p in PRESETS.items()
        if p.nominal_params
        and 16
        * ModelConfig(
            **{k.split(".", 1)[1]: v for k, v in p.values.items() if k.startswith("model.")}
        ).param_count()
        < 0.5 * have
    ]
    breakdown = ", ".join(f"{k} {v / gib:.1f} GiB" for k, v in est.items())
    raise UsageError(
        f"this model will not fit: {cfg.model.param_count() / 1e6:,.1f}M parameters need about "
        f"{need / gib:.1f} GiB to train ({breakdown}) but {device.type} has {have / gib:.1f} GiB "
        f"free{' per rank' if devices > 1 else ''}. Use a smaller model (presets that fit: "
        f"{', '.join(fits) or 'none'}), lower optim.micro_batch or model.max_seq_len, turn on "
        "hardware.activation_checkpointing, shard it (torchrun with distributed.strategy=fsdp; "
        "`plinth plan --devices N --strategy fsdp` tells how many GPUs), or use a device with "
        "more memory."
    )


# ------------------------------------------------------------------------------- measurement


class PeakMemory(TorchDispatchMode):
    """Live tensor storage bytes while active, and their peak: CPU has no allocator counter.

        with PeakMemory(model, optimizer) as mem:  # their tensors count from the start
            train_step()
        mem.peak  # bytes

    Every storage an operator returns is counted once (views share it) until it is freed (a
    weakref finalizer subtracts it). Tensors that exist before entering count only when passed
    in: modules (parameters, gradients, buffers), optimizers (state) or tensors. Scratch memory
    inside a single kernel, and allocator rounding or caching, are not seen."""

    def __init__(self, *existing: nn.Module | torch.optim.Optimizer | torch.Tensor):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, tuple[int, weakref.finalize]] = {}  # id(storage) -> bytes
        for t in _tensors(existing):
            self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or t.is_sparse or t.is_nested:
            return  # no plain storage to count
        st = t.untyped_storage()
        key, size = id(st), st.nbytes()
        old = self._live.get(key)
        if old is None:
            self._live[key] = (size, weakref.finalize(st, self._free, key))
        elif old[0] != size:  # resized in place
            self._live[key] = (size, old[1])
        else:
            return
        self.current += size - (old[0] if old else 0)
        self.peak = max(self.peak, self.current)

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key)
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    def __exit__(self, *exc):
        for _, fin in self._live.values():
            fin.detach()  # stop counting; the tensors live on
        self._live.clear()
        return super().__exit__(*exc)


def _tensors(objs: Iterable) -> Iterator[torch.Tensor]:
    for obj in objs:
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, nn.Module):
            for p in obj.parameters():
                yield p
                if p.grad is not None:
                    yield p.grad
            yield from obj.buffers()
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                yield from (v for v in state.values() if isinstance(v, torch.Tensor))
        else:
            raise TypeError(f"cannot find tensors in {type(obj).__name__}")


def measure_peak_bytes(
    fn: Callable[[], object], *existing: nn.Module | torch.optim.Optimizer | torch.Tensor
) -> int:
    """Peak memory while `fn()` runs, including the tensors of `existing` (model, optimizer).

    On CUDA (the device of the first existing tensor) the allocator's own peak of everything
    allocated on that device; elsewhere the peak of live storage bytes (`PeakMemory`)."""
    first = next(_tensors(existing), None)
    device = first.device if first is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    with PeakMemory(*existing) as mem:
        fn()
    return mem.peak
