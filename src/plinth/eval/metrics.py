"""Metric math for evaluation: plain functions on plain numbers and strings, no model.

    python -c "from plinth.eval.metrics import f1, ece; print(f1('the cat sat', 'a cat'), \
ece([0.9, 0.6], [True, False]))"

Text metrics follow SQuAD's answer normalisation (lowercase, drop punctuation and the articles
a/an/the, squeeze whitespace); expected calibration error uses equal-width confidence bins.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _targets(target: str | Sequence[str]) -> list[str]:
    return [target] if isinstance(target, str) else [str(t) for t in target]


def exact_match(prediction: str, target: str | Sequence[str], normalize: str = "strip") -> float:
    """1.0 when the prediction equals a target (any of several), else 0.0.

    normalize: "strip" compares with surrounding whitespace removed (numbers keep their sign);
    "squad" compares `normalize_answer` of both."""
    norm = normalize_answer if normalize == "squad" else str.strip
    return float(any(norm(prediction) == norm(t) for t in _targets(target)))


def f1(prediction: str, target: str | Sequence[str]) -> float:
    """SQuAD token F1 between normalised prediction and target (best over several targets)."""
    best = 0.0
    pred = normalize_answer(prediction).split()
    for t in _targets(target):
        gold = normalize_answer(t).split()
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common == 0:
            continue
        p, r = common / len(pred), common / len(gold)
        best = max(best, 2 * p * r / (p + r))
    return best


def regex_extract(prediction: str, pattern: str) -> str | None:
    """The answer a pattern extracts: its first capture group (or the whole match when it has
    none); None when it does not match anywhere."""
    m = re.search(pattern, prediction, flags=re.DOTALL)
    if m is None:
        return None
    return m.group(1) if m.groups() else m.group(0)


def regex_match(
    prediction: str, target: str | Sequence[str], pattern: str, normalize: str = "strip"
) -> float:
    """1.0 when the pattern extracts an answer from the prediction that exactly matches a
    target; 0.0 when it extracts a different answer or nothing."""
    got = regex_extract(prediction, pattern)
    return 0.0 if got is None else exact_match(got, target, normalize)


def accuracy(scores: Sequence[float], gold: int) -> float:
    """1.0 when the highest score is the gold choice (ties go to the first, as argmax does)."""
    return float(max(range(len(scores)), key=lambda i: (scores[i], -i)) == gold)


def accuracy_norm(loglikelihoods: Sequence[float], n_bytes: Sequence[int], gold: int) -> float:
    """Accuracy after dividing each choice's log-likelihood by its continuation's UTF-8 bytes
    (lm-eval's acc_norm), so long answers are not penalised for having more tokens."""
    return accuracy([ll / max(b, 1) for ll, b in zip(loglikelihoods, n_bytes, strict=True)], gold)


def choice_probs(loglikelihoods: Sequence[float]) -> list[float]:
    """Softmax over the choices' log-likelihoods: the model's belief in each choice."""
    top = max(loglikelihoods)
    ex = [math.exp(x - top) for x in loglikelihoods]
    total = sum(ex)
    return [e / total for e in ex]


def ece(confidences: Sequence[float], correct: Sequence[bool], n_bins: int = 10) -> float:
    """Expected calibration error: sum over equal-width confidence bins of
    (examples in bin / all) * |accuracy in bin - mean confidence in bin|. A confidence of
    exactly 1.0 falls in the last bin; 0 belongs to the first. NaN with no examples."""
    if not confidences:
        return math.nan
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for c, ok in zip(confidences, correct, strict=True):
        bins[min(int(c * n_bins), n_bins - 1)].append((c, bool(ok)))
    total = 0.0
    for b in bins:
        if b:
            conf = sum(c for c, _ in b) / len(b)
            acc = sum(ok for _, ok in b) / len(b)
            total += len(b) / len(confidences) * abs(acc - conf)
    return total


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token, in nats)."""
    return math.exp(nll_sum / n_tokens) if n_tokens else math.nan


def bits_per_byte(nll_sum: float, n_bytes: int) -> float:
    """Total negative log-likelihood in bits over the UTF-8 bytes of the text: comparable
    across tokenizers, since every tokenizer must explain the same bytes."""
    return nll_sum / math.log(2) / n_bytes if n_bytes else math.nan
