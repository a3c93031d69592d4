"""Scoring that credits right answers, and honest statistics (methods.md §13).

Pure functions, no model: answer normalisation, accepted answers, answer extraction, exact-match
and contains rules, expected calibration error, distinct-n, and bootstrap intervals — paired
(two models scored on the same rows) and for one model's mean. Models are run in evaluate.py.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}“”‘’]")


def normalize_answer(text: str) -> str:
    """The usual QA normalisation: lowercase, punctuation and articles dropped, spaces collapsed."""
    text = _PUNCT.sub(" ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def split_references(value: Any, separator: str = "|") -> list[str]:
    """Accepted answers from a row's field: a list of strings, or one string joined by `separator`."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        items = str(value).split(separator) if separator else [str(value)]
    return [s.strip() for s in items if s.strip()]


def compile_pattern(pattern: str | None, setting: str = "eval.answer_pattern") -> re.Pattern | None:
    """Compile a user's extraction pattern, or say clearly why it cannot be used."""
    if not pattern:
        return None
    from kdflow.errors import ConfigError

    try:
        compiled = re.compile(pattern, re.IGNORECASE | re.DOTALL)
    except re.error as e:
        raise ConfigError(f"{setting}={pattern!r} is not a valid regular expression ({e}); "
                          "for example 'is \"?([\\w-]+)\"?[.!]?$' takes the word after the last 'is'") from None
    if compiled.groups > 1:
        raise ConfigError(f"{setting}={pattern!r} has {compiled.groups} groups; use one capturing group "
                          "(the answer) or none (the whole match)")
    return compiled


def extract_answer(text: str, pattern: re.Pattern | None) -> str:
    """The answer inside a generated text: the pattern's group (or whole match) at its LAST match,
    as evaluation harnesses do for chat models that explain before answering. Without a pattern,
    or when it does not match, the whole text."""
    if pattern is None:
        return text
    last = None
    for m in pattern.finditer(text):
        last = m
    if last is None:
        return text
    return last.group(1) if pattern.groups == 1 and last.group(1) is not None else last.group(0)


def match_answer(prediction: str, accepted: Sequence[str], rule: str = "exact") -> bool:
    """exact: the normalised prediction equals a normalised accepted answer. contains: a normalised
    accepted answer appears in the normalised prediction as whole words."""
    pred = normalize_answer(prediction)
    for ref in accepted:
        ref = normalize_answer(ref)
        if not ref:
            continue
        if rule == "exact" and pred == ref:
            return True
        if rule == "contains" and f" {ref} " in f" {pred} ":
            return True
    return False


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (diversity of the generations); NaN when the
    texts hold no n-gram at all (one-word answers have no bigrams: their diversity is undefined,
    not zero)."""
    grams: Counter = Counter()
    for t in texts:
        words = t.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else float("nan")


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float], bins: int = 15) -> float:
    """Top-1 ECE: positions binned by the model's probability of its most likely token (`bins`
    equal-width bins on [0, 1]); the weighted mean over bins of |accuracy − mean confidence|,
    accuracy being how often that token is the reference token."""
    n = len(confidence)
    if n == 0:
        return float("nan")
    totals = [[0, 0.0, 0.0] for _ in range(bins)]  # count, sum of confidence, sum of correct
    for c, ok in zip(confidence, correct):
        b = min(int(c * bins), bins - 1)
        totals[b][0] += 1
        totals[b][1] += c
        totals[b][2] += ok
    return sum(abs(s_ok - s_c) for cnt, s_c, s_ok in totals if cnt) / n


# ----------------------------------------------------------------------------------------------
# Bootstrap intervals


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    resamples: int
    seed: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, float]:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "resamples": self.resamples,
                "seed": self.seed, "level": self.level}

    def text(self, digits: int = 3) -> str:
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default rule)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bootstrap_stat(n: int, stat: Any, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of a statistic of n rows. `stat(idx)` takes an integer array
    [R, n] (the rows drawn by each of R resamples) and returns R values; the estimate is the
    statistic of the rows as they are."""
    import numpy as np

    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), resamples, seed, level)
    rng = np.random.default_rng(seed)
    draws = sorted(np.asarray(stat(rng.integers(0, n, size=(resamples, n))), dtype=np.float64).tolist())
    alpha = (1 - level) / 2
    estimate = float(np.asarray(stat(np.arange(n)[None, :]))[0])
    return Interval(estimate, _percentile(draws, alpha), _percentile(draws, 1 - alpha), resamples, seed, level)


def row_mean(values: Sequence[float]) -> Any:
    """The statistic 'mean over rows' of `values`, for bootstrap_stat."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    return lambda idx: x[idx].mean(axis=-1)


def token_weighted_mean(per_row_mean: Sequence[Sequence[float]], per_row_count: Sequence[Sequence[int]]) -> Any:
    """The statistic 'sum over rows of value x count / sum of counts', averaged over seeds (one
    inner list per seed) — e.g. answer NLL in nats per token — for bootstrap_stat."""
    import numpy as np

    means = np.asarray(per_row_mean, dtype=np.float64)
    counts = np.asarray(per_row_count, dtype=np.float64)
    sums = means * counts

    def stat(idx: Any) -> Any:
        return (sums[:, idx].sum(-1) / np.maximum(counts[:, idx].sum(-1), 1)).mean(0)

    return stat


def bootstrap_mean(values: Sequence[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Percentile bootstrap interval of the mean of `values` (rows resampled with replacement)."""
    return bootstrap_stat(len(values), row_mean(values), resamples, seed, level)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Interval of mean(a) − mean(b) for two models scored on the same rows: the per-row
    differences are resampled together, so what the rows share cancels out."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same rows ({len(a)} vs {len(b)})")
    return bootstrap_mean([x - y for x, y in zip(a, b)], resamples, seed, level)


def paired_bootstrap_stat(n: int, stat_a: Any, stat_b: Any, resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> Interval:
    """Interval of stat_a − stat_b on the same resampled rows (see bootstrap_stat)."""
    return bootstrap_stat(n, lambda idx: stat_a(idx) - stat_b(idx), resamples, seed, level)


def seed_average(per_seed_rows: Sequence[Sequence[float]]) -> list[float]:
    """Per-row scores averaged over training seeds (each inner list: one seed's scores by row)."""
    if not per_seed_rows:
        return []
    n = len(per_seed_rows[0])
    if any(len(s) != n for s in per_seed_rows):
        raise ValueError("every seed must score the same rows")
    return [sum(s[i] for s in per_seed_rows) / len(per_seed_rows) for i in range(n)]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    sd = (sum((v - m) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return m, sd
