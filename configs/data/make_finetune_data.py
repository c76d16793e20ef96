"""Regenerate the small fine-tuning sets shipped with plinth (deterministic, no downloads).

    python configs/data/make_finetune_data.py

json_answers.{train,val}.jsonl  instruction tuning: short questions answered in a fixed JSON
                                style ({"answer": "..."}) that a chat model does not use on
                                its own, so learning the format is visible.
topics.{train,val}.jsonl        text classification: one sentence, one of four topics.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest", "Mexico": "Mexico City",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "early": "late", "open": "closed", "full": "empty", "happy": "sad", "old": "new",
    "strong": "weak", "high": "low", "wet": "dry", "near": "far", "hard": "soft",
}  # fmt: skip
WORDS = ["apple", "river", "garden", "pencil", "window", "castle", "rocket", "forest", "button",
         "candle", "planet", "bridge", "silver", "market", "dragon", "pocket"]  # fmt: skip


def questions(rng: random.Random) -> list[tuple[str, str]]:
    qa = []
    for _ in range(60):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        qa.append((f"What is {a} plus {b}?", str(a + b)))
    for _ in range(40):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        qa.append((f"What is {a} times {b}?", str(a * b)))
    qa += [(f"What is the capital of {c}?", cap) for c, cap in CAPITALS.items()]
    qa += [(f"What is the opposite of '{w}'?", o) for w, o in OPPOSITES.items()]
    qa += [(f"Spell the word '{w}' backwards.", w[::-1]) for w in WORDS]
    qa += [(f"How many letters are in the word '{w}'?", str(len(w))) for w in WORDS]
    rng.shuffle(qa)
    return qa


TOPICS = {
    "sports": (["The striker", "Our team", "The goalkeeper", "The coach", "The runner"],
               ["scored in the final minute", "won the championship", "trained all week",
                "broke the league record", "lost the match on penalties"]),
    "cooking": (["The chef", "My grandmother", "The baker", "This recipe", "The soup"],
                ["needs more garlic and salt", "simmered for two hours", "baked fresh bread",
                 "uses butter and flour", "was seasoned with pepper"]),
    "weather": (["The forecast", "This afternoon", "The storm", "Tomorrow morning", "The wind"],
                ["brings heavy rain", "will be sunny and warm", "dropped below freezing",
                 "knocked down the old trees", "turns cloudy with fog"]),
    "computers": (["The compiler", "My laptop", "The server", "This program", "The database"],
                  ["crashed after the update", "runs out of memory", "needs a faster processor",
                   "stores every record on disk", "compiles the code in seconds"]),
}  # fmt: skip


def sentences(rng: random.Random) -> list[dict]:
    rows = [
        {"text": f"{s} {p}.", "label": topic}
        for topic, (subjects, predicates) in TOPICS.items()
        for s in subjects
        for p in predicates
    ]
    rng.shuffle(rows)
    return rows


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(1337)
    qa = [{"prompt": q, "completion": json.dumps({"answer": a})} for q, a in questions(rng)]
    write("json_answers.train.jsonl", qa[:-30])
    write("json_answers.val.jsonl", qa[-30:])
    rows = sentences(rng)
    write("topics.train.jsonl", rows[:-20])
    write("topics.val.jsonl", rows[-20:])


if __name__ == "__main__":
    main()
