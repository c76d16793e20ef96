"""Training throughput: plinth vs Hugging Face `LlamaForCausalLM` on the ref-cpu-decoder workload.

    python bench/bench_train.py                 # eager plinth vs eager HF
    python bench/bench_train.py --compile       # adds torch.compile'd plinth (compile time apart)

Workload (DESIGN.md, preset `ref-cpu-decoder`): decoder, 6 layers, d_model 384, 6 heads, SwiGLU
d_ff 1536, RMSNorm, RoPE, untied head, vocab 8192, seq 256, micro-batch 8, fp32. Both models have
identical sizes (checked: same parameter count) and train on the same random token batches with
full steps: forward, loss, backward, gradient clipping at 1.0, fused AdamW (the Hugging Face
Trainer's default optimizer, `adamw_torch_fused`, so the peer is what its users run).

The machine is shared and noisy, so contenders alternate: each round runs `--steps` steps of
every contender (order rotated) and one fp32 matmul peak sample (large square matmuls); warm-up
steps are excluded and all numbers are medians. MFU = flops_per_token(seq) * tokens/s / peak,
with flops_per_token = 6 * matmul weights + 12 * n_layers * d_model * seq (see
`Decoder.flops_per_token`). Prints `name: value` lines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` fp32 GFLOP/s of an n x n @ n x n matmul (the machine's practical peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def plinth_step(cfg, batches, compile_model: bool) -> tuple[Callable[[int], None], int, object]:
    from plinth.models import build_model
    from plinth.train.objectives import SpecialTokens, compute_loss
    from plinth.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    net = torch.compile(model) if compile_model else model  # as distributed.parallelize does
    special = SpecialTokens(eos_id=0)

    def step(i: int) -> None:
        out = compute_loss("clm", net, batches[i % len(batches)], special)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model.num_params(), model


def hf_step(cfg, batches, compile_model: bool = False) -> tuple[Callable[[int], None], int]:
    import transformers

    m = cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads, max_position_embeddings=m.max_seq_len,
        rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).train()
    net = torch.compile(model) if compile_model else model
    # the Trainer's groups: no decay on biases and norm weights
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)

    def step(i: int) -> None:
        x = batches[i % len(batches)][:, :-1]
        loss = net(input_ids=x, labels=x).loss  # HF shifts the labels inside
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd plinth")
    ap.add_argument("--rounds", type=int, default=5, help="alternating measurement rounds")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-eager", action="store_true", help="skip eager plinth (with --compile)")
    ap.add_argument("--compile-peer", action="store_true",
                    help="also time torch.compile'd HF (a like-for-like view of compile's share)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="let inductor reuse compiled kernels from earlier runs (default: cold)")
    args = ap.parse_args()

    from plinth.config.load import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    if (args.compile or args.compile_peer) and not args.warm_cache:
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True  # report a first-time compile
    cfg = load_config(overrides=["preset=ref-cpu-decoder"]).config
    B, T, V = cfg.optim.micro_batch, cfg.model.max_seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(4)]

    contenders: dict[str, Callable[[int], None]] = {}
    hf, hf_params = hf_step(cfg, batches)
    contenders["hf"] = hf
    if not args.no_eager:
        contenders["plinth"], n_params, model = plinth_step(cfg, batches, compile_model=False)
    compile_s: dict[str, float] = {}
    if args.compile:
        step, n_params, model = plinth_step(cfg, batches, compile_model=True)
        t0 = time.perf_counter()
        step(0)  # compiles forward and backward (includes one step)
        compile_s["plinth"] = time.perf_counter() - t0
        contenders["plinth_compiled"] = step
    if args.compile_peer:
        step, _ = hf_step(cfg, batches, compile_model=True)
        t0 = time.perf_counter()
        step(0)
        compile_s["hf"] = time.perf_counter() - t0
        contenders["hf_compiled"] = step
    assert n_params == hf_params, (n_params, hf_params)

    for step in contenders.values():
        for i in range(args.warmup):
            step(i)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    peaks = []
    names = list(contenders)
    for r in range(args.rounds):
        peaks.append(matmul_peak_gflops())
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for i in range(args.steps):
                t0 = time.perf_counter()
                contenders[name](i)
                times[name].append(time.perf_counter() - t0)

    tokens = B * T
    peak = statistics.median(peaks)
    flops_per_token = model.flops_per_token(T)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    print(f"workload: ref-cpu-decoder (params {n_params:,}, batch {B}x{T}, fp32, fused AdamW)")
    print(f"threads: {torch.get_num_threads()}")
    print(f"timed_steps_per_contender: {args.rounds * args.steps}")
    print(f"matmul_peak_gflops: {peak:.1f}  (median of {len(peaks)}; max {max(peaks):.1f})")
    print(f"flops_per_token: {flops_per_token:.4g}")
    for name, v in tps.items():
        print(f"{name}_tokens_per_s: {v:.1f}")
        print(f"{name}_step_s: {statistics.median(times[name]):.3f}  "
              f"(min {min(times[name]):.3f}, max {max(times[name]):.3f})")
    mfu = {k: flops_per_token * v / (peak * 1e9) for k, v in tps.items()}
    for name in tps:
        print(f"{name}_mfu: {mfu[name]:.3f}")
    for name in [n for n in tps if n != "hf"]:
        print(f"{name}_over_hf: {tps[name] / tps['hf']:.3f}")
    cache = "warm" if args.warm_cache else "cold"
    for name, s in compile_s.items():
        print(f"{name}_compile_s: {s:.1f}  (first compiled step, {cache} cache)")
    best = max((n for n in tps if n.startswith("plinth")), key=tps.get)
    print(f"goal_ratio_1.3x: {'met' if tps[best] / tps['hf'] >= 1.3 else 'not met'} ({best})")
    print(f"goal_mfu_75pct: {'met' if mfu[best] >= 0.75 else 'not met'} ({best})")


if __name__ == "__main__":
    main()
