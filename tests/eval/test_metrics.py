"""Metric math on examples computed by hand, and the sliding-window arithmetic."""

from __future__ import annotations

import math

import pytest

from plinth.errors import UsageError
from plinth.eval import metrics as M
from plinth.eval.lm import window_spans
from plinth.eval.scoring import cut_at_stop


def test_accuracy_and_length_normalised_accuracy():
    # raw log-likelihoods prefer choice 0; per byte, choice 1 (-6/12 = -0.5 > -2/2 = -1)
    lls, nbytes = [-2.0, -6.0, -9.0], [2, 12, 3]
    assert M.accuracy(lls, 0) == 1.0 and M.accuracy(lls, 1) == 0.0
    assert M.accuracy_norm(lls, nbytes, 1) == 1.0 and M.accuracy_norm(lls, nbytes, 0) == 0.0
    assert M.accuracy([-1.0, -1.0], 0) == 1.0  # ties go to the first choice, like argmax


def test_exact_match_f1_and_squad_normalisation():
    assert M.normalize_answer("The  Cat, sat!") == "cat sat"
    assert M.exact_match(" 42 ", "42") == 1.0
    assert M.exact_match("-5", "5") == 0.0  # strip keeps the sign
    assert M.exact_match("The Paris.", "paris", normalize="squad") == 1.0
    assert M.exact_match("Rome", ["Paris", "Rome"]) == 1.0
    # prediction "cat sat down", gold "the cat sat": common 2, P = 2/3, R = 2/2 -> F1 = 0.8
    assert M.f1("cat sat down", "the cat sat") == pytest.approx(0.8)
    assert M.f1("dog", "cat") == 0.0
    assert M.f1("a", "the") == 1.0  # both empty after normalisation
    assert M.f1("blue", ["red", "blue sky"]) == pytest.approx(2 * 1 * 0.5 / 1.5)


def test_regex_extraction():
    pat = r'\{\s*"answer"\s*:\s*"?([^"}]*?)"?\s*\}'
    assert M.regex_extract('sure: {"answer": "Paris"} ok', pat) == "Paris"
    assert M.regex_extract("Paris", pat) is None
    assert M.regex_extract("x = 12", r"\d+") == "12"  # no group: the whole match
    assert M.regex_match('{"answer": 7}', "7", pat) == 1.0
    assert M.regex_match('{"answer": "8"}', "7", pat) == 0.0
    assert M.regex_match("7", "7", pat) == 0.0  # right answer, wrong format


def test_expected_calibration_error_by_hand():
    # bins of width 0.1: {0.95, 0.92} -> acc 1/2, conf 0.935; {0.65} -> acc 1, conf 0.65;
    # {0.3} -> acc 0, conf 0.3. ECE = 2/4*0.435 + 1/4*0.35 + 1/4*0.3 = 0.38
    conf, ok = [0.95, 0.92, 0.65, 0.3], [True, False, True, False]
    assert M.ece(conf, ok) == pytest.approx(0.38)
    assert M.ece([1.0, 1.0], [True, True]) == pytest.approx(0.0)  # 1.0 lands in the last bin
    assert math.isnan(M.ece([], []))
    probs = M.choice_probs([math.log(1), math.log(3)])
    assert probs == pytest.approx([0.25, 0.75])


def test_perplexity_and_bits_per_byte():
    nll = 4 * math.log(2)  # 4 tokens at probability 1/2 each
    assert M.perplexity(nll, 4) == pytest.approx(2.0)
    assert M.bits_per_byte(nll, 8) == pytest.approx(0.5)  # 4 bits over 8 bytes
    assert math.isnan(M.perplexity(0.0, 0))


def test_sliding_windows_score_every_token_once():
    spans = window_spans(100, 32, 16)
    assert spans[0] == (0, 32, 32)  # the first window scores all its predictions
    assert spans[1] == (16, 48, 16)  # later ones only the tokens after the previous window
    assert spans[-1] == (80, 100, 4)
    assert sum(n for *_, n in spans) == 100
    for n_targets, window, stride in [(1, 4, 4), (7, 4, 1), (64, 64, 64), (65, 64, 64), (9, 3, 2)]:
        spans = window_spans(n_targets, window, stride)
        scored = [t for b, e, n in spans for t in range(e - n + 1, e + 1)]
        assert scored == list(range(1, n_targets + 1))  # each target once, in order
        assert all(e - b <= window for b, e, _ in spans)
    with pytest.raises(UsageError, match="stride"):
        window_spans(10, 4, 5)


def test_stop_strings_cut_at_the_earliest():
    assert cut_at_stop(" 12\nQuestion: 3.", ["\n", "."]) == " 12"
    assert cut_at_stop("no stop", ["\n"]) == "no stop"
