"""Regenerate the arithmetic prompts shipped for RL from rewards (deterministic, no downloads).

    python configs/data/make_arithmetic.py

arithmetic.{train,val}.jsonl  {"prompt": "What is 23 + 45? Answer with just the number.",
                              "answer": "68"}: additions and subtractions of numbers from 0 to
                              49, for align.method=grpo with the exact_match reward
                              (configs/grpo-arithmetic.yaml). No problem (a, op, b) is in both
                              files, so validation measures answers to unseen problems.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAIN, VAL = 512, 64
HIGH = 49


def problems(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    seen: set[tuple[int, str, int]] = set()
    rows = []
    while len(rows) < TRAIN + VAL:
        a, b, op = rng.randint(0, HIGH), rng.randint(0, HIGH), rng.choice("+-")
        if op == "-" and b > a:  # answers stay non-negative
            a, b = b, a
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        answer = a + b if op == "+" else a - b
        rows.append({"prompt": f"What is {a} {op} {b}? Answer with just the number.",
                     "answer": str(answer)})
    return rows


def main() -> None:
    rows = problems()
    for name, part in (("train", rows[:TRAIN]), ("val", rows[TRAIN:])):
        path = HERE / f"arithmetic.{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"{path.name}: {len(part)} prompts")


if __name__ == "__main__":
    main()
