"""Scoring on hand-written cases, ECE against a direct computation, bootstrap coverage."""

from __future__ import annotations

import random

import pytest

from kdflow.errors import ConfigError
from kdflow.scoring import (bootstrap_mean, compile_pattern, expected_calibration_error, extract_answer, match_answer,
                            mean_sd, normalize_answer, paired_bootstrap, seed_average, split_references)


def test_normalisation():
    assert normalize_answer("  The Opposite,  is: ‘Unfree’! ") == "opposite is unfree"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("") == ""


def test_accepted_answers_and_rules():
    refs = split_references("concept|conception| construct ", "|")
    assert refs == ["concept", "conception", "construct"]
    assert split_references(["a", " ", "b"]) == ["a", "b"]
    assert split_references(None) == []
    assert match_answer("Conception.", refs)
    assert not match_answer("misconception", refs)
    # contains: whole words only
    assert match_answer("I would say construct here", refs, "contains")
    assert not match_answer("constructive", refs, "contains")
    assert not match_answer("I would say construct here", refs, "exact")
    assert not match_answer("anything", [""], "contains")  # an empty reference never matches


def test_extraction():
    pat = compile_pattern(r'is "?([\w-]+)"?[.!]?$')
    text = 'The opposite of "effective" is "ineffective".'
    assert extract_answer(text, pat) == "ineffective"
    assert match_answer(extract_answer(text, pat), ["ineffective"])
    assert extract_answer("no answer here", pat) == "no answer here"  # no match: the whole text
    assert extract_answer("x", None) == "x"
    # the last match wins; a pattern without a group takes the whole match
    assert extract_answer("cold, then hot", compile_pattern(r"\b(hot|cold)\b")) == "hot"
    assert extract_answer("answer: 42", compile_pattern(r"\d+")) == "42"
    with pytest.raises(ConfigError, match="eval.answer_pattern"):
        compile_pattern("(unclosed")
    with pytest.raises(ConfigError, match="one capturing group"):
        compile_pattern(r"(a)(b)")


def _ece_direct(conf, correct, bins):
    # straightforward reference: loop over bins, select members
    n = len(conf)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [i for i, c in enumerate(conf) if (lo <= c < hi) or (b == bins - 1 and c == 1.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / n * abs(acc - avg)
    return total


def test_ece_against_direct_computation():
    rng = random.Random(0)
    conf = [rng.random() for _ in range(500)] + [1.0, 0.0]
    correct = [float(rng.random() < c ** 2) for c in conf]
    for bins in (1, 10, 15):
        assert expected_calibration_error(conf, correct, bins) == pytest.approx(_ece_direct(conf, correct, bins), abs=1e-12)
    # perfectly calibrated in expectation within a bin -> 0
    assert expected_calibration_error([0.5, 0.5], [1.0, 0.0], 15) == pytest.approx(0.0)
    assert expected_calibration_error([0.9, 0.9], [0.0, 0.0], 15) == pytest.approx(0.9)


def test_bootstrap_interval_coverage():
    """On a synthetic paired case with a known mean difference, the 95% interval covers it about
    95% of the time (binomial noise over 200 trials: between 88% and 99.5%)."""
    true_diff = 0.1
    rng = random.Random(1)
    covered = 0
    trials = 200
    for t in range(trials):
        a = [rng.gauss(0.5, 1.0) for _ in range(60)]
        b = [x - true_diff + rng.gauss(0, 0.5) for x in a]  # paired: shares the row effect
        iv = paired_bootstrap(a, b, resamples=500, seed=t)
        covered += iv.low <= true_diff <= iv.high
    assert 0.88 <= covered / trials <= 0.995


def test_paired_beats_unpaired_and_helpers():
    rng = random.Random(2)
    rows = [rng.gauss(0, 3) for _ in range(100)]
    a = [r + 0.3 + rng.gauss(0, 0.1) for r in rows]
    b = rows
    paired = paired_bootstrap(a, b, resamples=1000, seed=0)
    assert paired.excludes_zero() and paired.low > 0
    assert paired.estimate == pytest.approx(sum(a) / 100 - sum(b) / 100)
    one = bootstrap_mean(a, resamples=1000, seed=0)
    assert one.high - one.low > 5 * (paired.high - paired.low)  # the row effect cancels only when paired
    assert bootstrap_mean(a, resamples=300, seed=5).as_dict() == bootstrap_mean(a, resamples=300, seed=5).as_dict()
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])
    assert seed_average([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]) == pytest.approx([2 / 3, 1 / 3])
    assert mean_sd([1.0, 3.0]) == pytest.approx((2.0, 2 ** 0.5))
    assert mean_sd([4.0]) == (4.0, 0.0)


def test_distinct_n_counts_word_ngrams_and_is_undefined_without_any():
    import math

    from kdflow.scoring import distinct_n

    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)  # (a,b) (b,a) (a,b) + (a,b): 2 distinct of 4
    assert distinct_n(["a b c"], 1) == 1.0
    assert math.isnan(distinct_n(["hot", "cold"], 2))  # one-word answers: no bigram, no diversity to measure
