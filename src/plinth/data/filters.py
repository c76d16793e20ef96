"""Cleaning and quality filters: small pure functions over one document's text.

    from plinth.data.filters import clean_document
    text, reason, pii = clean_document("Mail me at a@b.org ...", FilterSettings.from_config(cfg))

Each check returns a drop reason (a short snake_case string counted in the manifest) or None.
`clean_document` runs them in a fixed order and stops at the first reason, so every dropped
document is counted exactly once. Character-class ratios take an ASCII fast path
(`bytes.translate`), which keeps the whole chain at tens of MB/s per core on code and prose.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field

# --------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class FilterSettings:
    """The filter part of the data config, flattened into a picklable value for workers."""

    enabled: bool = True
    unicode_normalize: str = "NFC"
    min_chars: int = 32
    max_chars: int = 1_000_000
    max_duplicate_line_frac: float = 0.3
    max_top_ngram_frac: float = 0.2
    ngram: int = 3
    max_symbol_frac: float = 0.5
    min_alpha_frac: float = 0.2
    scripts: tuple[str, ...] = ()
    blocklist_words: frozenset[str] = field(default_factory=frozenset)
    blocklist_phrases: tuple[str, ...] = ()
    scrub_pii: bool = True

    @classmethod
    def from_config(cls, fc) -> FilterSettings:
        """From a `FilterConfig`; reads the blocklist file (UsageError if unreadable)."""
        words, phrases = load_blocklist(fc.blocklist) if fc.blocklist else (frozenset(), ())
        return cls(
            enabled=fc.enabled,
            unicode_normalize=fc.unicode_normalize,
            min_chars=fc.min_chars,
            max_chars=fc.max_chars,
            max_duplicate_line_frac=fc.max_duplicate_line_frac,
            max_top_ngram_frac=fc.max_top_ngram_frac,
            ngram=fc.ngram,
            max_symbol_frac=fc.max_symbol_frac,
            min_alpha_frac=fc.min_alpha_frac,
            scripts=tuple(s.lower() for s in fc.scripts),
            blocklist_words=words,
            blocklist_phrases=phrases,
            scrub_pii=fc.scrub_pii,
        )

    def describe(self) -> dict:
        """JSON-able summary for the manifest (the blocklist as a size, not its terms)."""
        d = asdict(self)
        d["scripts"] = list(self.scripts)
        d["blocklist_terms"] = len(self.blocklist_words) + len(self.blocklist_phrases)
        del d["blocklist_words"], d["blocklist_phrases"]
        return d


def load_blocklist(path: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """One term per line (blank lines and `#` comments ignored), matched case-insensitively as
    whole words; multi-word terms match as phrases."""
    from plinth.data.paths import read_regular
    from plinth.errors import UsageError

    try:
        lines = read_regular(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(
            f"cannot read the blocklist file {path} (data.filters.blocklist): {e}. Give a UTF-8 "
            "text file with one term per line, or set data.filters.blocklist=null."
        ) from None
    terms = [t.strip().lower() for t in lines if t.strip() and not t.lstrip().startswith("#")]
    words = frozenset(t for t in terms if re.fullmatch(r"\w+", t))
    phrases = tuple(sorted(t for t in terms if t not in words))
    return words, phrases


# ------------------------------------------------------------------------------ normalisation


def normalize(text: str, form: str = "NFC") -> str:
    """Unicode normalisation plus newline and stray-control clean-up (keeps tabs/newlines)."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if form != "none" and not text.isascii():
        text = unicodedata.normalize(form, text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    return text.strip("\n") + "\n" if text.strip() else ""


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufeff]")

# ------------------------------------------------------------------------------------- checks


def check_length(text: str, min_chars: int, max_chars: int) -> str | None:
    n = len(text)
    if n < min_chars:
        return "too_short"
    if n > max_chars:
        return "too_long"
    return None


def duplicate_line_frac(text: str) -> float:
    """Fraction of non-blank lines that repeat an earlier line of the same document."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if not lines:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def top_ngram_frac(text: str, n: int = 3) -> float:
    """Share of words covered by the most frequent word n-gram (Gopher's repetition check):
    count(top n-gram) * n / words. A document that says one phrase over and over scores ~1."""
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    ((_, count),) = grams.most_common(1)
    if count < 2:
        return 0.0
    return min(1.0, count * n / len(words))


_ASCII_LETTERS = string.ascii_letters.encode()
_ASCII_SPACE = string.whitespace.encode()
_ASCII_PUNCT = string.punctuation.encode()


def char_fracs(text: str) -> tuple[float, float]:
    """(alphabetic, symbol) characters as fractions of the non-whitespace characters. Symbols
    are punctuation and symbol characters (Unicode categories P* and S*). ASCII is counted with
    `bytes.translate`; only the non-ASCII characters are looked at one by one."""
    b = text.encode("ascii", "ignore")
    nonspace = len(b.translate(None, _ASCII_SPACE))
    alpha = len(b) - len(b.translate(None, _ASCII_LETTERS))
    sym = len(b) - len(b.translate(None, _ASCII_PUNCT))
    if len(b) != len(text):
        for ch in _NON_ASCII.findall(text):
            if ch.isspace():
                continue
            nonspace += 1
            if ch.isalpha():
                alpha += 1
            elif unicodedata.category(ch)[0] in "PS":
                sym += 1
    return (alpha / nonspace, sym / nonspace) if nonspace else (0.0, 0.0)


_NON_ASCII = re.compile(r"[^\x00-\x7f]")


def dominant_script(text: str, sample: int = 4000) -> str:
    """Most common writing system among the letters ('latin', 'cyrillic', 'cjk', 'greek', ...).

    Unicode character names start with the script (LATIN SMALL LETTER A, CYRILLIC ..., CJK
    UNIFIED IDEOGRAPH ...); ASCII letters are counted as latin without a lookup. Only the first
    `sample` non-ASCII letters are looked up, which is plenty to find the dominant one."""
    counts: Counter[str] = Counter()
    if text.isascii():
        return "latin" if any(c.isalpha() for c in text) else "none"
    ascii_letters = len(text.encode("ascii", "ignore").translate(None, _NOT_ASCII_LETTERS))
    counts["latin"] += ascii_letters
    seen = 0
    for ch in text:
        if ch.isascii() or not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        script = _SCRIPT_ALIASES.get(name.split(" ", 1)[0], name.split(" ", 1)[0].lower())
        counts[script or "other"] += 1
        seen += 1
        if seen >= sample:
            break
    if not counts or counts.most_common(1)[0][1] == 0:
        return "none"
    return counts.most_common(1)[0][0]


_NOT_ASCII_LETTERS = bytes(c for c in range(128) if chr(c) not in string.ascii_letters)
_SCRIPT_ALIASES = {"CJK": "cjk", "HIRAGANA": "japanese", "KATAKANA": "japanese", "HANGUL": "korean"}


def check_blocklist(text: str, words: frozenset[str], phrases: tuple[str, ...]) -> bool:
    """True when the text contains a blocked word (whole word, any case) or phrase."""
    if not words and not phrases:
        return False
    low = text.lower()
    if words and not words.isdisjoint(_WORD.findall(low)):
        return True
    return any(re.search(r"(?<!\w)" + re.escape(p) + r"(?!\w)", low) for p in phrases)


_WORD = re.compile(r"\w+")

# ------------------------------------------------------------------------------------- PII

EMAIL_PLACEHOLDER, PHONE_PLACEHOLDER, IP_PLACEHOLDER = "[EMAIL]", "[PHONE]", "[IP]"

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# a phone number needs separators or a +country prefix, so plain integers in code never match
_PHONE = re.compile(
    r"(?<![\w+.])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])\d{3,4}[ .-]\d{3,4}"
    r"(?![\w-]|\.\d)"
)
_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?!\w|\.\d)"
)
# Cheap candidate patterns (a literal first character lets `re` skip ahead fast); the precise
# pattern then only runs in a window around each candidate. ~10x faster on code and prose.
_EMAIL_CAND = re.compile(r"@[A-Za-z0-9-]")
_IPV4_CAND = re.compile(r"\.\d{1,3}\.\d")
_PHONE_CAND = re.compile(r"\d[ .-]\d{3}")
# loopback/unspecified/broadcast are not personal and are common in code
_KEEP_IPS = frozenset({"127.0.0.1", "0.0.0.0", "255.255.255.255"})


def _spans(text: str, cand: re.Pattern, full: re.Pattern, before: int, after: int):
    """Matches of `full` near matches of `cand` (lookarounds still see the whole text)."""
    found = {}
    for c in cand.finditer(text):
        lo, hi = max(0, c.start() - before), min(len(text), c.end() + after)
        for m in full.finditer(text, lo, hi):
            if m.end() < hi or hi == len(text):  # not cut off by the window's end
                found[m.start()] = m.end()
    return sorted(found.items())


def _replace(text: str, spans, placeholder: str, keep=frozenset()) -> tuple[str, int]:
    out, pos, n = [], 0, 0
    for a, b in spans:
        if a < pos or text[a:b] in keep:
            continue
        out += [text[pos:a], placeholder]
        pos, n = b, n + 1
    return ("".join(out) + text[pos:], n) if n else (text, 0)


def scrub_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mails, phone numbers and IPv4 addresses with [EMAIL]/[PHONE]/[IP]."""
    counts = {}
    text, counts["email"] = _replace(
        text, _spans(text, _EMAIL_CAND, _EMAIL, 64, 256), EMAIL_PLACEHOLDER
    )
    text, counts["ip"] = _replace(
        text, _spans(text, _IPV4_CAND, _IPV4, 8, 12), IP_PLACEHOLDER, _KEEP_IPS
    )
    text, counts["phone"] = _replace(
        text, _spans(text, _PHONE_CAND, _PHONE, 12, 16), PHONE_PLACEHOLDER
    )
    return text, {k: v for k, v in counts.items() if v}


# ------------------------------------------------------------------------------------- chain


def clean_document(text: str, s: FilterSettings) -> tuple[str, str | None, dict[str, int]]:
    """Normalise, check and scrub one document: (clean text, drop reason or None, PII counts).

    Order: normalise -> empty -> length -> letters/symbols -> repetition -> script ->
    blocklist -> PII scrub. Cheap checks come first so most drops cost little."""
    text = normalize(text, s.unicode_normalize if s.enabled else "none")
    if not text:
        return text, "empty", {}
    if not s.enabled:
        return text, None, {}
    reason = check_length(text, s.min_chars, s.max_chars)
    if reason:
        return text, reason, {}
    alpha, sym = char_fracs(text)
    if alpha < s.min_alpha_frac:
        return text, "too_few_letters", {}
    if sym > s.max_symbol_frac:
        return text, "too_many_symbols", {}
    if duplicate_line_frac(text) > s.max_duplicate_line_frac:
        return text, "duplicate_lines", {}
    if top_ngram_frac(text, s.ngram) > s.max_top_ngram_frac:
        return text, "repeated_ngrams", {}
    if s.scripts and dominant_script(text) not in s.scripts:
        return text, "wrong_script", {}
    if check_blocklist(text, s.blocklist_words, s.blocklist_phrases):
        return text, "blocklisted", {}
    pii: dict[str, int] = {}
    if s.scrub_pii:
        text, pii = scrub_pii(text)
    return text, None, pii
