"""Each cleaning/quality filter on crafted examples: what it drops, and what it must keep."""

from __future__ import annotations

import pytest

from plinth.config.schema import FilterConfig
from plinth.data import filters as F
from plinth.errors import UsageError

PROSE = (
    "The river runs past the old mill and into the valley, where the farmers grow wheat.\n"
    "In autumn the fields turn gold and the market fills with bread, apples and cider.\n"
)
CODE = (
    "def add(a, b):\n    \"\"\"Return the sum of a and b.\"\"\"\n    return a + b\n\n\n"
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n"
)


def settings(**kw) -> F.FilterSettings:
    return F.FilterSettings.from_config(FilterConfig(**kw))


def test_normalize_unicode_newlines_and_controls():
    assert F.normalize("e\u0301te\r\nb\x00c\ufeff", "NFC") == "\u00e9te\nbc\n"
    assert F.normalize("\uff21\ufb01", "NFKC") == "Afi\n"  # full-width A, fi ligature
    assert F.normalize("\uff21", "none") == "\uff21\n"
    assert F.normalize(" \n\t \n", "NFC") == ""


def test_length_bounds():
    s = settings(min_chars=50, max_chars=200)
    assert F.clean_document("short text", s)[1] == "too_short"
    assert F.clean_document(PROSE * 3, s)[1] == "too_long"
    assert F.clean_document(PROSE, s)[1] is None


def test_duplicate_lines():
    menu = "Home\nAbout us\nContact\n" * 10 + PROSE
    assert F.duplicate_line_frac(menu) > 0.7
    assert F.clean_document(menu, settings())[1] == "duplicate_lines"
    assert F.duplicate_line_frac(PROSE) == 0.0
    assert F.duplicate_line_frac("a\n\n\n\nb\n") == 0.0  # blank lines do not count


def test_repeated_ngrams():
    spam = "buy cheap pills now " * 40
    assert F.top_ngram_frac(spam, 3) > 0.7
    assert F.clean_document(spam, settings())[1] == "repeated_ngrams"
    assert F.top_ngram_frac(PROSE, 3) == 0.0
    assert F.clean_document(spam, settings(max_top_ngram_frac=1.0))[1] is None


def test_symbol_and_letter_ratios():
    assert F.char_fracs("ab!?")[0] == pytest.approx(0.5)
    assert F.char_fracs("ab!?")[1] == pytest.approx(0.5)
    assert F.char_fracs("éa—b")[0] == pytest.approx(0.75)  # non-ASCII path
    table = "12 34 56 78 90\n" * 20
    assert F.clean_document(table, settings())[1] == "too_few_letters"
    noise = "#{}[]<>|~^" * 10 + " some words here"
    assert F.clean_document(noise, settings(min_alpha_frac=0.0))[1] == "too_many_symbols"
    assert F.clean_document(CODE, settings())[1] is None  # code passes the defaults


def test_script_filter():
    russian = (
        "Река течёт мимо старой мельницы в долину, где крестьяне выращивают пшеницу.\n"
        "Осенью поля становятся золотыми, а рынок полон хлеба, яблок и сидра.\n"
    )
    greek = "Το ποτάμι κυλά δίπλα από τον παλιό μύλο και μέσα στην κοιλάδα.\n"
    assert F.dominant_script(PROSE) == "latin"
    assert F.dominant_script(russian) == "cyrillic"
    assert F.dominant_script(greek) == "greek"
    assert F.dominant_script("漢字のテキストです。" * 5) in ("cjk", "japanese")
    s = settings(scripts=["latin"])
    assert F.clean_document(russian, s)[1] == "wrong_script"
    assert F.clean_document(PROSE, s)[1] is None
    assert F.clean_document(russian, settings())[1] is None  # empty list keeps every script


def test_blocklist(tmp_path):
    bl = tmp_path / "block.txt"
    bl.write_text("# spam terms\ncasino\nfree money\n\n", encoding="utf-8")
    s = settings(blocklist=str(bl))
    assert F.clean_document(PROSE + "Visit our CASINO today.\n", s)[1] == "blocklisted"
    assert F.clean_document(PROSE + "Get free   money.\n", s)[1] is None  # phrase must match
    assert F.clean_document(PROSE + "Get FREE money now.\n", s)[1] == "blocklisted"
    assert F.clean_document(PROSE + "The casinos closed.\n", s)[1] is None  # whole words only
    assert s.describe()["blocklist_terms"] == 2
    with pytest.raises(UsageError, match=r"data\.filters\.blocklist"):
        settings(blocklist=str(tmp_path / "missing.txt"))


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        ("mail john.doe+x@example.co.uk now", "mail [EMAIL] now", {"email": 1}),
        ("call +1 555-123-4567 or (555) 123-4567.", "call [PHONE] or [PHONE].", {"phone": 2}),
        ("host 10.0.0.12 and 127.0.0.1", "host [IP] and 127.0.0.1", {"ip": 1}),
        ("from 192.168.1.20.", "from [IP].", {"ip": 1}),
        ("x = 1234567890; pi = 3.14159; v = 3.11.7; d = 2024-01-15", None, {}),
        ("mask = 255.255.255.0 # netmask", "mask = [IP] # netmask", {"ip": 1}),
        ("@decorator\ndef f(): pass", None, {}),
    ],
)
def test_pii_scrub(text, expected, counts):
    out, got = F.scrub_pii(text)
    assert out == (expected if expected is not None else text)
    assert got == counts


def test_pii_scrub_in_chain_and_switch():
    doc = PROSE + "Write to alice@example.org from 192.168.1.20.\n"
    text, reason, pii = F.clean_document(doc, settings())
    assert reason is None and "[EMAIL]" in text and "[IP]" in text
    assert pii == {"email": 1, "ip": 1}
    text, _, pii = F.clean_document(doc, settings(scrub_pii=False))
    assert "alice@example.org" in text and pii == {}


def test_disabled_filters_keep_everything_but_empty():
    s = settings(enabled=False)
    assert F.clean_document("x", s)[1] is None
    assert F.clean_document("   \n", s)[1] == "empty"
