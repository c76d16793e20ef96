"""Writes the built-in evaluation suite's JSONL files from the facts and rules below.

    python src/plinth/eval/suite/generate_suite.py   # rewrites *.jsonl next to this file

Everything here was written for plinth (no third-party data set): arithmetic problems drawn
with a fixed seed, capitals and simple facts typed by hand, and instruction-following
questions built from those. Re-running it reproduces the committed files byte for byte.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Japan", "Tokyo"), ("China", "Beijing"), ("Russia", "Moscow"),
    ("Egypt", "Cairo"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Norway", "Oslo"),
    ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Kenya", "Nairobi"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
    ("India", "New Delhi"), ("Turkey", "Ankara"), ("Iran", "Tehran"), ("Cuba", "Havana"),
    ("Switzerland", "Bern"), ("Brazil", "Brasilia"), ("Vietnam", "Hanoi"),
    ("the United Kingdom", "London"), ("the United States", "Washington"),
    ("Iceland", "Reykjavik"),
]

# (cloze prompt, correct completion, three wrong completions)
FACTS = [
    ("A baby cat is called a", "kitten", ["puppy", "calf", "foal"]),
    ("A baby dog is called a", "puppy", ["kitten", "lamb", "chick"]),
    ("The opposite of hot is", "cold", ["warm", "loud", "tall"]),
    ("The opposite of up is", "down", ["left", "over", "high"]),
    ("Water freezes at zero degrees", "Celsius", ["Kelvin", "Fahrenheit", "Rankine"]),
    ("The largest planet in the solar system is", "Jupiter", ["Mars", "Venus", "Mercury"]),
    ("The planet closest to the Sun is", "Mercury", ["Neptune", "Saturn", "Jupiter"]),
    ("A week has seven", "days", ["hours", "months", "years"]),
    ("A year has twelve", "months", ["days", "weeks", "hours"]),
    ("An hour has sixty", "minutes", ["days", "weeks", "months"]),
    ("The color of grass is", "green", ["purple", "orange", "black"]),
    ("The color of the sky on a clear day is", "blue", ["green", "brown", "red"]),
    ("Bees make", "honey", ["milk", "silk", "wool"]),
    ("Cows give us", "milk", ["honey", "silk", "eggs"]),
    ("A triangle has three", "sides", ["wheels", "legs", "colors"]),
    ("The Sun rises in the", "east", ["west", "north", "south"]),
    ("Ice is frozen", "water", ["sand", "metal", "wood"]),
    ("A spider has eight", "legs", ["wings", "eyes", "heads"]),
    ("The chemical symbol for gold is", "Au", ["Ag", "Fe", "Gd"]),
    ("The chemical symbol for water is", "H2O", ["CO2", "NaCl", "O3"]),
    ("The first letter of the English alphabet is", "A", ["Z", "M", "Q"]),
    ("Humans breathe in", "oxygen", ["helium", "neon", "argon"]),
    ("The Moon orbits the", "Earth", ["Sun", "Mars", "Venus"]),
    ("Fish live in", "water", ["trees", "sand", "clouds"]),
    ("Birds are covered in", "feathers", ["scales", "fur", "shells"]),
    ("A doctor works in a", "hospital", ["bakery", "garage", "library"]),
    ("People read books in a", "library", ["garage", "stable", "kitchen"]),
    ("The number after nine is", "ten", ["eight", "seven", "twelve"]),
    ("Snow is usually", "white", ["red", "green", "blue"]),
    ("Lemons taste", "sour", ["sweet", "salty", "bitter"]),
]

OPPOSITES = [
    ("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("old", "new"),
    ("light", "dark"), ("open", "closed"), ("happy", "sad"), ("early", "late"),
    ("full", "empty"), ("wet", "dry"), ("high", "low"),
]


def arithmetic(rng: random.Random, n: int = 48) -> list[dict]:
    """Two-operand problems with whole, non-negative answers (the sign never matters)."""
    rows = []
    ops = ["plus", "minus", "times"]
    for i in range(n):
        op = ops[i % 3]
        if op == "times":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            ans = a * b
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if op == "minus" and b > a:
                a, b = b, a
            ans = a + b if op == "plus" else a - b
        rows.append({"question": f"What is {a} {op} {b}?", "answer": str(ans)})
    return rows


def capitals(rng: random.Random) -> list[dict]:
    rows = []
    cities = [c for _, c in CAPITALS]
    for country, city in CAPITALS:
        wrong = rng.sample([c for c in cities if c != city], 3)
        choices = [city, *wrong]
        rng.shuffle(choices)
        rows.append({"country": country, "choices": choices, "answer": choices.index(city)})
    return rows


def facts(rng: random.Random) -> list[dict]:
    rows = []
    for prompt, right, wrong in FACTS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append({"text": prompt, "choices": choices, "answer": choices.index(right)})
    return rows


def json_answer(rng: random.Random) -> list[dict]:
    """Questions whose one-word answer must come back as {"answer": "..."}."""
    rows = []
    for country, city in CAPITALS[:16]:
        rows.append({"question": f"What is the capital of {country}?", "answer": city})
    for word, opposite in OPPOSITES:
        rows.append({"question": f"What is the opposite of {word}?", "answer": opposite})
    for _ in range(8):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append({"question": f"What is {a} plus {b}?", "answer": str(a + b)})
    return rows


def write(name: str, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (HERE / f"{name}.jsonl").write_text(text, encoding="utf-8")


def main() -> None:
    write("arithmetic", arithmetic(random.Random(1)))
    write("capitals", capitals(random.Random(2)))
    write("facts", facts(random.Random(3)))
    write("json_answer", json_answer(random.Random(4)))


if __name__ == "__main__":
    main()
