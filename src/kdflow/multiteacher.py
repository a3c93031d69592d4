"""Several teachers at once (methods.md §11): per-row teacher weights and per-sample selection.

Every rule is a *weighted sum of divergences*, sum_j w_j[r] D(p_j || q) at KD row r, never one
divergence against the mixture sum_j w_j p_j. For forward KL the two have the same gradient (they
differ by a constant, the mixture's Jensen gap), so nothing is lost there; for the other divergences
the sum keeps each teacher's own distribution (a top-k teacher, a teacher carried from another
tokenizer with its own aligned rows) as the single-teacher term treats it, with no merged support
to invent. The weights of a row are normalised over the teachers that have a target there (a
cross-tokenizer teacher may leave a row unaligned); a row no chosen teacher covers leaves the term
and its denominator (§0).

Rules:
    fixed       w_j[r] proportional to the entry's weight
    min_ce      per sample the teacher with the lowest answer NLL per character of the reference
                answer (kdflow.selection.no_selection; teachers are frozen, so it is decided once)
    confidence  w_j[r] = softmax_j(-H_j[r] / temperature), H_j the entropy of teacher j's target at r
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

RULES = ("fixed", "min_ce", "confidence")


def support(rule: str, coverage: torch.Tensor, choice: torch.Tensor | None) -> torch.Tensor:
    """[m, N] bool: the teachers that may teach each row (covered, and chosen under min_ce)."""
    if rule == "min_ce":
        if choice is None:
            raise ValueError("rule min_ce needs each row's chosen teacher")
        chosen = choice.unsqueeze(0) == torch.arange(coverage.shape[0], device=coverage.device).unsqueeze(1)
        return coverage & chosen
    return coverage


def row_weights(rule: str, coverage: torch.Tensor, weights: Sequence[float] | None = None,
                entropy: torch.Tensor | None = None, choice: torch.Tensor | None = None,
                temperature: float = 1.0) -> torch.Tensor:
    """Per teacher and KD row, the weight of its divergence: [m, N], each column summing to 1 (or 0
    when no teacher may teach the row).

    coverage [m, N] bool; weights [m] (fixed); entropy [m, N] nats (confidence); choice [N] the chosen
    teacher of each row's sample (min_ce).
    """
    allowed = support(rule, coverage, choice)
    m = coverage.shape[0]
    if rule == "fixed":
        w = torch.tensor(list(weights if weights is not None else [1.0] * m), dtype=torch.float32,
                         device=coverage.device)
        raw = w.unsqueeze(1).expand(m, coverage.shape[1])
    elif rule == "min_ce":
        raw = torch.ones(coverage.shape, dtype=torch.float32, device=coverage.device)
    elif rule == "confidence":
        if entropy is None:
            raise ValueError("rule confidence needs each teacher's entropy per row")
        z = (-entropy.float() / temperature).masked_fill(~allowed, -math.inf)
        z = z - z.max(0, keepdim=True).values.clamp(min=-1e30)  # all -inf columns stay -inf, not NaN
        raw = z.exp()
    else:
        raise ValueError(f"multi-teacher rule must be one of {RULES}, got {rule!r}")
    raw = torch.where(allowed, raw, torch.zeros_like(raw))
    total = raw.sum(0, keepdim=True)
    return torch.where(total > 0, raw / total.clamp(min=1e-30), torch.zeros_like(raw))


def entropy_dense(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Entropy [N] of softmax(logits / temperature), in float32."""
    lp = F.log_softmax(logits.float() / temperature, -1)
    return -(lp.exp() * lp).sum(-1)


def entropy_topk(logp: torch.Tensor, ids: torch.Tensor, tail_logp: torch.Tensor | None) -> torch.Tensor:
    """Entropy [N] of a top-k teacher over its k ids plus one bucket for the mass outside them (a lower
    bound of the full distribution's entropy: the bucket is not spread over the ids it stands for)."""
    from kdflow.losses import _log1mexp

    lp = logp.float().masked_fill(ids < 0, -math.inf)
    tail = tail_logp.float() if tail_logp is not None else _log1mexp(torch.logsumexp(lp, -1))
    full = torch.cat([lp, tail.unsqueeze(-1)], -1)
    p = full.exp()
    return -torch.where(p > 0, p * full, torch.zeros_like(p)).sum(-1)


def choose_per_sample(scores: np.ndarray) -> np.ndarray:
    """scores [m, N] (answer NLL per character, one row per teacher) -> the chosen teacher per sample.

    DualMinCE's selection (kdflow.selection) without its receiver test: a student is not yet a
    competitor of its teachers, so the best teacher always teaches."""
    from kdflow.selection import no_selection

    scores = np.asarray(scores, dtype=np.float32)
    return no_selection(np.zeros(scores.shape[1], dtype=np.float32), scores)


def answer_scores(model: Any, tok: Any, rows: Any, data_cfg: Any, batch_size: int = 16) -> np.ndarray:
    """Per row, the model's NLL of the reference answer per character (sum over its answer tokens / the
    characters those tokens cover), comparable across tokenizers (methods.md §8)."""
    from kdflow.data import Encoder, encode_rows, row_turns
    from kdflow.evaluate import answer_nll

    examples = encode_rows(rows, tok, data_cfg)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_token = answer_nll(model, examples, pad, batch_size)["per_example_nll"]
    enc = Encoder(tok, data_cfg)
    out = []
    for mean, e, row, where in zip(per_token, examples, rows.items, rows.locations):
        turns = row_turns(row, where, data_cfg)
        kept = len(e["input_ids"]) - e["prompt_len"]
        full = max(len(enc.response_ids(turns)), 1)
        chars = max(len(turns.response) * min(kept, full) // full, 1)  # an answer cut at data.max_length
        tokens = sum(1 for x in e["labels"][1:] if x != -100)  # the positions answer_nll averaged over
        out.append(mean * tokens / chars)
    return np.asarray(out, dtype=np.float64)
