"""Server throughput: `plinth serve` with concurrent clients vs the same requests one by one.

    python bench/bench_serve.py                       # ref-smollm2, 16 requests, concurrency 8
    python bench/bench_serve.py --requests 32 --max-tokens 64 --threads 2
    python bench/bench_serve.py --model runs/quickstart --device cuda

Workload: `Engine.load(--model)` served in-process by `create_app` + uvicorn (a background
thread, loopback port); --requests distinct short prompts sent to /v1/completions, greedy,
`ignore_eos` so every answer has exactly --max-tokens tokens:
- sequential: one request at a time (each runs as a batch of one);
- concurrent: --concurrency requests in flight (httpx.AsyncClient), which the scheduler batches
  into one decode loop of up to --max-batch rows.
Prints requests/s and generated tokens/s of both modes and their ratio (goal: > 1; the
server batches concurrent requests, so the ratio grows with --concurrency until the model's
per-step cost stops being flat in the batch size), the mean batch size the server reported in
/metrics, and whether the greedy texts are identical in both modes (they should be: a row
computes what it would alone; float rounding across batch shapes can, rarely, flip a near-tie).
Absolute numbers on a shared machine move with the other jobs' load; compare the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import time

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time",
    "The three primary colours are", "import numpy as np\n", "The largest planet is",
    "To make a cup of tea,", "Photosynthesis is", "The Pythagorean theorem states",
    "In 1969, astronauts", "A haiku about autumn:", "SELECT name FROM", "The speed of light",
    "Dear hiring manager,", "The mitochondria is",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ref-smollm2")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import httpx
    import torch

    from plinth.infer.engine import Engine
    from plinth.infer.server import BackgroundServer, create_app

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device)
    app = create_app(engine, max_batch=args.max_batch, max_queue=max(64, args.requests))
    prompts = [PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)) for i in
               range(args.requests)]

    def body(p: str) -> dict:
        return {"prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                "ignore_eos": True}

    def batches(url: str) -> tuple[float, float]:
        text = httpx.get(url + "/metrics").text
        count = float(re.search(r"^plinth_batch_size_count (\S+)$", text, re.M).group(1))
        rows = float(re.search(r"^plinth_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, rows

    async def concurrent(url: str) -> list[dict]:
        sem = asyncio.Semaphore(args.concurrency)
        async with httpx.AsyncClient(timeout=600) as c:
            async def one(p):
                async with sem:
                    r = await c.post(url + "/v1/completions", json=body(p))
                    r.raise_for_status()
                    return r.json()

            return await asyncio.gather(*(one(p) for p in prompts))

    with BackgroundServer(app) as srv:
        url = srv.url
        with httpx.Client(timeout=600) as c:
            c.post(url + "/v1/completions", json=body(prompts[0])).raise_for_status()  # warm
            b0 = batches(url)
            t0 = time.perf_counter()
            seq = []
            for p in prompts:
                r = c.post(url + "/v1/completions", json=body(p))
                r.raise_for_status()
                seq.append(r.json())
            t_seq = time.perf_counter() - t0
        b1 = batches(url)
        t0 = time.perf_counter()
        con = asyncio.run(concurrent(url))
        t_con = time.perf_counter() - t0
        b2 = batches(url)

    n = args.requests
    tok_seq = sum(r["usage"]["completion_tokens"] for r in seq)
    tok_con = sum(r["usage"]["completion_tokens"] for r in con)
    same = sum(a["choices"][0]["text"] == b["choices"][0]["text"]
               for a, b in zip(seq, con, strict=True))
    print(f"model: {args.model} ({engine.name}), device {args.device}, torch threads "
          f"{args.threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    print(f"requests: {n}, max_tokens: {args.max_tokens}, concurrency: {args.concurrency}, "
          f"max_batch: {args.max_batch}")
    print(f"sequential_requests_per_s: {n / t_seq:.3f}")
    print(f"sequential_tokens_per_s: {tok_seq / t_seq:.1f}")
    print(f"sequential_mean_batch: {(b1[1] - b0[1]) / max(b1[0] - b0[0], 1):.2f}")
    print(f"concurrent_requests_per_s: {n / t_con:.3f}")
    print(f"concurrent_tokens_per_s: {tok_con / t_con:.1f}")
    print(f"concurrent_mean_batch: {(b2[1] - b1[1]) / max(b2[0] - b1[0], 1):.2f}")
    print(f"ratio_concurrent_over_sequential: {t_seq / t_con:.2f}x (goal > 1)")
    print(f"identical_greedy_texts: {same}/{n}")
    if same != n:
        for a, b in zip(seq, con, strict=True):
            if a["choices"][0]["text"] != b["choices"][0]["text"]:
                print(f"  differs: {a['choices'][0]['text']!r} vs {b['choices'][0]['text']!r}")
                break


if __name__ == "__main__":
    main()
