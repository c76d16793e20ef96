"""Regenerate the small alignment sets shipped with plinth (deterministic, no downloads).

    python configs/data/make_align_data.py

concise_prefs.{train,val}.jsonl  preference pairs teaching CONCISE answers: short factual
                                 questions; chosen is the short direct answer (at most 12
                                 words), rejected a rambling one (40-80 words of filler around
                                 the same answer). Both are correct; only the style differs.
concise_kto.train.jsonl          the same training questions as unpaired examples for KTO: for
                                 each pair either its chosen answer (label true) or its rejected
                                 one (label false), half and half, shuffled.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 2417
N_VAL = 60

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Poland": "Warsaw", "Ireland": "Dublin",
    "Chile": "Santiago", "Cuba": "Havana", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Hungary": "Budapest",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Belgium": "Brussels",
    "Netherlands": "Amsterdam", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
    "Turkey": "Ankara", "Iran": "Tehran", "Colombia": "Bogota", "Nigeria": "Abuja",
    "Ghana": "Accra", "Morocco": "Rabat", "Scotland": "Edinburgh", "Wales": "Cardiff",
}  # fmt: skip
COLOURS = {
    "the sky on a clear day": "blue", "fresh grass": "green", "a ripe banana": "yellow",
    "snow": "white", "coal": "black", "a ripe tomato": "red", "an orange": "orange",
    "a lemon": "yellow", "milk": "white", "a stop sign": "red", "a crow": "black",
    "a carrot": "orange", "a lime": "green", "an eggplant": "purple", "chocolate": "brown",
    "a polar bear's fur": "white", "a school bus in the United States": "yellow",
    "a flamingo": "pink", "a frog, usually": "green", "the sea on a sunny day": "blue",
}  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "light": "dark",
    "early": "late", "open": "closed", "full": "empty", "happy": "sad", "old": "new",
    "strong": "weak", "high": "low", "wet": "dry", "near": "far", "hard": "soft",
    "rich": "poor", "loud": "quiet", "thick": "thin", "heavy": "light", "inside": "outside",
    "win": "lose", "begin": "end", "push": "pull", "true": "false", "left": "right",
}  # fmt: skip
UNITS = [  # (question, answer)
    ("How many centimetres are in a metre?", "100"),
    ("How many metres are in a kilometre?", "1,000"),
    ("How many grams are in a kilogram?", "1,000"),
    ("How many millilitres are in a litre?", "1,000"),
    ("How many seconds are in a minute?", "60"),
    ("How many minutes are in an hour?", "60"),
    ("How many hours are in a day?", "24"),
    ("How many days are in a week?", "7"),
    ("How many months are in a year?", "12"),
    ("How many days are in a leap year?", "366"),
    ("How many inches are in a foot?", "12"),
    ("How many feet are in a yard?", "3"),
    ("How many ounces are in a pound?", "16"),
    ("How many years are in a century?", "100"),
    ("How many years are in a decade?", "10"),
    ("How many millimetres are in a centimetre?", "10"),
    ("How many seconds are in an hour?", "3,600"),
    ("How many minutes are in a day?", "1,440"),
    ("How many weeks are in a year?", "52"),
    ("How many cents are in a dollar?", "100"),
]
WORDS = ["apple", "river", "garden", "pencil", "window", "castle", "rocket", "forest", "button",
         "candle", "planet", "bridge", "silver", "market", "dragon", "pocket", "turtle", "winter",
         "mirror", "basket", "jacket", "ladder", "orange", "ticket", "violin"]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip
PLURALS = {
    "child": "children", "mouse": "mice", "tooth": "teeth", "foot": "feet", "man": "men",
    "woman": "women", "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies", "sheep": "sheep",
    "fish": "fish", "cactus": "cacti", "ox": "oxen", "bus": "buses", "potato": "potatoes",
}  # fmt: skip
YOUNG = {
    "cat": "a kitten", "dog": "a puppy", "cow": "a calf", "horse": "a foal",
    "sheep": "a lamb", "goat": "a kid", "duck": "a duckling", "frog": "a tadpole",
    "bear": "a cub", "kangaroo": "a joey", "swan": "a cygnet", "deer": "a fawn",
    "goose": "a gosling", "pig": "a piglet", "owl": "an owlet",
}  # fmt: skip


def facts(rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, bare answer, short direct answer) triples, each question once."""
    out: dict[str, tuple[str, str]] = {}

    def add(q: str, a: str, short: str) -> None:
        out.setdefault(q, (a, short))

    while len([q for q in out if " plus " in q]) < 85:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        add(f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} is {a + b}.")
    while len([q for q in out if " minus " in q]) < 60:
        a, b = rng.randint(20, 99), rng.randint(2, 19)
        add(f"What is {a} minus {b}?", str(a - b), f"{a - b}.")
    while len([q for q in out if " times " in q]) < 60:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        add(f"What is {a} times {b}?", str(a * b), f"{a} times {b} is {a * b}.")
    while len([q for q in out if q.startswith("What is half")]) < 25:
        a = 2 * rng.randint(6, 150)
        add(f"What is half of {a}?", str(a // 2), f"Half of {a} is {a // 2}.")
    for c, cap in CAPITALS.items():
        add(f"What is the capital of {c}?", cap, f"The capital of {c} is {cap}.")
    for thing, col in COLOURS.items():
        add(f"What colour is {thing}?", col, f"{col.capitalize()}.")
    for w, o in OPPOSITES.items():
        add(f"What is the opposite of '{w}'?", f"'{o}'", f"The opposite of '{w}' is '{o}'.")
    for q, a in UNITS:
        add(q, a, f"{a}.")
    for w in WORDS:
        add(f"How many letters are in the word '{w}'?", str(len(w)),
            f"'{w}' has {len(w)} letters.")
        add(f"Spell the word '{w}' backwards.", f"'{w[::-1]}'", f"'{w[::-1]}'.")
        add(f"What is the first letter of the word '{w}'?", f"'{w[0]}'", f"'{w[0]}'.")
    for i, d in enumerate(DAYS):
        add(f"Which day comes after {d}?", DAYS[(i + 1) % 7], f"{DAYS[(i + 1) % 7]}.")
    for i, m in enumerate(MONTHS):
        add(f"Which month comes after {m}?", MONTHS[(i + 1) % 12], f"{MONTHS[(i + 1) % 12]}.")
    for w, p in PLURALS.items():
        add(f"What is the plural of '{w}'?", f"'{p}'", f"The plural of '{w}' is '{p}'.")
    for animal, young in YOUNG.items():
        add(f"What is a baby {animal} called?", young, f"A baby {animal} is called {young}.")
    rows = [(q, a, s) for q, (a, s) in out.items()]
    rng.shuffle(rows)
    return rows


OPENERS = [
    "Great question!", "What a fascinating thing to ask!", "Thanks so much for asking this!",
    "Ah, this is a really interesting one.", "Oh, I love questions like this!",
    "That is an excellent question, and I am glad you asked.",
    "Wow, what a thoughtful question!", "Good question, truly.",
]
THINKING = [
    "Let me think about this carefully.", "Let's take a moment to consider it step by step.",
    "I want to make sure I get this exactly right, so bear with me.",
    "Before answering, it helps to slow down and reflect a little.",
    "Let me walk through my reasoning so that everything is clear.",
    "I will try to be as thorough as I possibly can here.",
]
CONTEXT = [
    "There are many aspects to a question like this, and each of them deserves attention.",
    "People often wonder about things like this, and it can be surprisingly subtle.",
    "It is the kind of thing that seems simple at first but invites deeper reflection.",
    "Many sources discuss this topic, and it is worth keeping the bigger picture in mind.",
    "Questions of this sort come up in everyday life more often than you might expect.",
    "It is always good to double-check facts like these rather than rushing to an answer.",
    "Of course, context matters, and it is wise to consider it before drawing conclusions.",
    "Learning about this can be a rewarding experience for curious minds of all ages.",
]
ANSWERS = [
    "After careful consideration, the answer is {a}.",
    "So, putting it all together, it turns out to be {a}.",
    "Having weighed everything, I can say that it is {a}.",
    "When all is said and done, the answer you are looking for is {a}.",
    "Taking all of this into account, the result is {a}.",
]
CLOSERS = [
    "In conclusion, {a} is the answer to your question.",
    "I hope this helps, and feel free to ask if you have any other questions!",
    "In summary, the answer is {a}, and I hope that clears things up.",
    "I hope this detailed explanation was useful to you!",
    "To sum up, it is {a}. Let me know if you would like to explore this topic further!",
    "So there you have it: {a}. Happy learning!",
]


def rambling(rng: random.Random, answer: str) -> str:
    """40-80 words of filler around the answer (pieces drawn from several pools)."""
    while True:
        parts = [rng.choice(OPENERS), rng.choice(THINKING)]
        parts += rng.sample(CONTEXT, 1 if rng.random() < 0.6 else 2)
        if rng.random() < 0.25:
            parts.append(rng.choice([t for t in THINKING if t != parts[1]]))
        parts += [rng.choice(ANSWERS), rng.choice(CLOSERS)]
        text = " ".join(parts).format(a=answer)
        if 40 <= len(text.split()) <= 80:
            return text


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    pairs = [
        {"prompt": q, "chosen": short, "rejected": rambling(rng, a)}
        for q, a, short in facts(rng)
    ]
    train, val = pairs[:-N_VAL], pairs[-N_VAL:]
    write("concise_prefs.train.jsonl", train)
    write("concise_prefs.val.jsonl", val)
    desirable = set(rng.sample(range(len(train)), len(train) // 2))
    kto = [
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True} if i in desirable
        else {"prompt": p["prompt"], "completion": p["rejected"], "label": False}
        for i, p in enumerate(train)
    ]
    rng.shuffle(kto)
    write("concise_kto.train.jsonl", kto)


if __name__ == "__main__":
    main()
