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
/metrics (plinth_batch_size: live rows per decode step; before continuous batching, rows per
Engine.generate call), and whether the greedy texts are identical in both modes (they should
be: a row computes what it would alone; float rounding across batch shapes can, rarely, flip
a near-tie).
Absolute numbers on a shared machine move with the other jobs' load; compare the ratio.

    python bench/bench_serve.py --staggered --interval-ms 100 --requests 24 --threads 1

--staggered: the same requests arrive one every --interval-ms (not waiting for each other), with
mixed lengths (max_tokens cycling through --mix, default 8,64,16,32), the traffic continuous
batching is for: a request arriving while others decode joins the running loop at the next
step instead of waiting for the batch to end. Prints the mean, p50 and p90 latency (arrival to
last byte), the mean latency of the short requests (the smallest max_tokens), generated tokens/s
over the whole run (first arrival to last answer), and the mean rows per decode step.
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
    ap.add_argument("--staggered", action="store_true",
                    help="requests arrive at --interval-ms intervals with mixed max_tokens")
    ap.add_argument("--interval-ms", type=float, default=100.0)
    ap.add_argument("--mix", default="8,64,16,32", help="max_tokens of the staggered requests")
    args = ap.parse_args()
    if args.staggered:
        return staggered(args)

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


def staggered(args) -> None:
    import httpx
    import torch

    from plinth.infer.engine import Engine
    from plinth.infer.server import BackgroundServer, create_app

    torch.set_num_threads(args.threads)
    engine = Engine.load(args.model, device=args.device)
    app = create_app(engine, max_batch=args.max_batch, max_queue=max(64, args.requests))
    mix = [int(x) for x in args.mix.split(",")]
    reqs = [(PROMPTS[i % len(PROMPTS)] + " " * (i // len(PROMPTS)), mix[i % len(mix)])
            for i in range(args.requests)]

    def metrics(url: str) -> tuple[float, float]:
        text = httpx.get(url + "/metrics").text
        count = float(re.search(r"^plinth_batch_size_count (\S+)$", text, re.M).group(1))
        rows = float(re.search(r"^plinth_batch_size_sum (\S+)$", text, re.M).group(1))
        return count, rows

    async def run(url: str):
        async with httpx.AsyncClient(timeout=600) as c:
            async def one(i, p, n):
                await asyncio.sleep(i * args.interval_ms / 1000)
                t = time.perf_counter()
                r = await c.post(url + "/v1/completions", json={
                    "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
                r.raise_for_status()
                return n, time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

            return await asyncio.gather(*(one(i, p, n) for i, (p, n) in enumerate(reqs)))

    with BackgroundServer(app) as srv:
        httpx.post(srv.url + "/v1/completions", timeout=600, json={
            "prompt": reqs[0][0], "max_tokens": 4}).raise_for_status()  # warm
        m0 = metrics(srv.url)
        t0 = time.perf_counter()
        out = asyncio.run(run(srv.url))
        wall = time.perf_counter() - t0
        m1 = metrics(srv.url)
    lat = sorted(x[1] for x in out)
    short = [x[1] for x in out if x[0] == min(mix)]
    toks = sum(x[2] for x in out)
    print(f"model: {args.model} ({engine.name}), device {args.device}, torch threads "
          f"{args.threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.2f}")
    print(f"staggered: {args.requests} requests, one every {args.interval_ms:g} ms, max_tokens "
          f"{args.mix}, max_batch {args.max_batch}")
    print(f"mean_latency_s: {sum(lat) / len(lat):.3f}")
    print(f"p50_latency_s: {lat[len(lat) // 2]:.3f}")
    print(f"p90_latency_s: {lat[min(len(lat) - 1, int(0.9 * len(lat)))]:.3f}")
    print(f"mean_latency_short_s (max_tokens {min(mix)}): {sum(short) / len(short):.3f}")
    print(f"throughput_tokens_per_s: {toks / wall:.1f} ({toks} tokens in {wall:.2f} s)")
    print(f"mean_rows_per_step: {(m1[1] - m0[1]) / max(m1[0] - m0[0], 1):.2f}")


if __name__ == "__main__":
    main()
