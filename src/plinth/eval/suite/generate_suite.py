"""Writes the built-in evaluation suite's JSONL files from the facts and rules below.

    python src/plinth/eval/suite/generate_suite.py   # rewrites *.jsonl next to this file

Everything here was written for plinth (no third-party data set): arithmetic problems drawn
with a fixed seed, capitals and simple facts typed by hand, and instruction-following
questions built from those, and small Python functions to complete (checked by running their
tests in plinth's sandbox). Re-running it reproduces the committed files byte for byte.
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


# (function header with docstring, a reference body, test lines): completions are checked by
# running them; the reference bodies pass (a test checks) and serve as the few-shot examples
CODE = [
    ("def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n",
     "    return a + b\n",
     ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]),
    ("def square(x):\n    \"\"\"Return x squared.\"\"\"\n",
     "    return x * x\n",
     ["assert square(4) == 16", "assert square(-3) == 9"]),
    ("def is_even(n):\n    \"\"\"Return True when n is even.\"\"\"\n",
     "    return n % 2 == 0\n",
     ["assert is_even(4)", "assert not is_even(7)", "assert is_even(0)"]),
    ("def maximum(xs):\n    \"\"\"Return the largest number in the list xs.\"\"\"\n",
     "    return max(xs)\n",
     ["assert maximum([1, 5, 3]) == 5", "assert maximum([-4, -2]) == -2"]),
    ("def reverse_string(s):\n    \"\"\"Return the string s reversed.\"\"\"\n",
     "    return s[::-1]\n",
     ["assert reverse_string('abc') == 'cba'", "assert reverse_string('') == ''"]),
    ("def count_vowels(s):\n    \"\"\"Return how many vowels (a, e, i, o, u) are in s.\"\"\"\n",
     "    return sum(1 for c in s if c in 'aeiou')\n",
     ["assert count_vowels('hello') == 2", "assert count_vowels('xyz') == 0"]),
    ("def factorial(n):\n    \"\"\"Return n factorial.\"\"\"\n",
     "    return 1 if n == 0 else n * factorial(n - 1)\n",
     ["assert factorial(0) == 1", "assert factorial(5) == 120"]),
    ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, with fibonacci(0) == 0 and "
     "fibonacci(1) == 1.\"\"\"\n",
     "    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
     ["assert fibonacci(0) == 0", "assert fibonacci(1) == 1", "assert fibonacci(10) == 55"]),
    ("def is_palindrome(s):\n    \"\"\"Return True when s reads the same backwards.\"\"\"\n",
     "    return s == s[::-1]\n",
     ["assert is_palindrome('level')", "assert not is_palindrome('hello')"]),
    ("def average(xs):\n    \"\"\"Return the mean of the numbers in xs.\"\"\"\n",
     "    return sum(xs) / len(xs)\n",
     ["assert average([1, 2, 3]) == 2", "assert average([4]) == 4"]),
    ("def celsius_to_fahrenheit(c):\n    \"\"\"Convert a temperature from Celsius to "
     "Fahrenheit.\"\"\"\n",
     "    return c * 9 / 5 + 32\n",
     ["assert celsius_to_fahrenheit(0) == 32", "assert celsius_to_fahrenheit(100) == 212"]),
    ("def count_words(s):\n    \"\"\"Return the number of words in s, split on whitespace.\"\"\"\n",
     "    return len(s.split())\n",
     ["assert count_words('a b c') == 3", "assert count_words('') == 0"]),
    ("def first_char(s):\n    \"\"\"Return the first character of the string s.\"\"\"\n",
     "    return s[0]\n",
     ["assert first_char('plinth') == 'p'"]),
    ("def absolute(x):\n    \"\"\"Return the absolute value of x.\"\"\"\n",
     "    return x if x >= 0 else -x\n",
     ["assert absolute(-5) == 5", "assert absolute(3) == 3"]),
    ("def sum_list(xs):\n    \"\"\"Return the sum of the numbers in xs.\"\"\"\n",
     "    return sum(xs)\n",
     ["assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0"]),
    ("def to_upper(s):\n    \"\"\"Return s in upper case.\"\"\"\n",
     "    return s.upper()\n",
     ["assert to_upper('abc') == 'ABC'"]),
    ("def minimum(a, b):\n    \"\"\"Return the smaller of a and b.\"\"\"\n",
     "    return min(a, b)\n",
     ["assert minimum(2, 7) == 2", "assert minimum(5, -1) == -1"]),
    ("def last_element(xs):\n    \"\"\"Return the last element of the list xs.\"\"\"\n",
     "    return xs[-1]\n",
     ["assert last_element([1, 2, 3]) == 3"]),
    ("def double_all(xs):\n    \"\"\"Return a new list with every number in xs doubled.\"\"\"\n",
     "    return [2 * x for x in xs]\n",
     ["assert double_all([1, 2]) == [2, 4]", "assert double_all([]) == []"]),
    ("def is_positive(x):\n    \"\"\"Return True when x is greater than zero.\"\"\"\n",
     "    return x > 0\n",
     ["assert is_positive(3)", "assert not is_positive(0)", "assert not is_positive(-2)"]),
    ("def string_length(s):\n    \"\"\"Return the number of characters in s.\"\"\"\n",
     "    return len(s)\n",
     ["assert string_length('abc') == 3", "assert string_length('') == 0"]),
    ("def contains(xs, x):\n    \"\"\"Return True when x is in the list xs.\"\"\"\n",
     "    return x in xs\n",
     ["assert contains([1, 2], 2)", "assert not contains([1, 2], 5)"]),
    ("def repeat(s, n):\n    \"\"\"Return the string s repeated n times.\"\"\"\n",
     "    return s * n\n",
     ["assert repeat('ab', 3) == 'ababab'", "assert repeat('x', 0) == ''"]),
    ("def sort_list(xs):\n    \"\"\"Return the numbers in xs sorted from smallest to "
     "largest.\"\"\"\n",
     "    return sorted(xs)\n",
     ["assert sort_list([3, 1, 2]) == [1, 2, 3]"]),
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


def code() -> list[dict]:
    # the prompt stops at the docstring's quotes: BPE vocabularies fuse "\n" with the indent
    # that follows, so a prompt ending in a bare "\n" is a token split the model never saw
    return [
        {"prompt": header.rstrip("\n"), "solution": "\n" + body.rstrip("\n"),
         "tests": "\n".join(tests) + "\n"}
        for header, body, tests in CODE
    ]


def write(name: str, rows: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (HERE / f"{name}.jsonl").write_text(text, encoding="utf-8")


def main() -> None:
    write("arithmetic", arithmetic(random.Random(1)))
    write("capitals", capitals(random.Random(2)))
    write("facts", facts(random.Random(3)))
    write("json_answer", json_answer(random.Random(4)))
    write("code", code())


if __name__ == "__main__":
    main()
