"""Divergences between next-token distributions, and the loss contract every method shares.

Contract: a loss function returns `(sum over tokens, number of tokens)`. The training loop
divides by the number of tokens in the whole optimizer step (all micro-batches, all ranks);
dividing per micro-batch changes the objective whenever micro-batches hold different numbers of
tokens.

Every divergence takes teacher and student log-probabilities of shape [N, V] (rows = token
positions already selected by the mask) and returns a per-position value of shape [N]. Inputs
are upcast to float32; log-probs come from `log_softmax`, never `log(softmax)`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _plogp_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_v p (log p - log q), with 0 where p = 0 (so -inf log-probs never give NaN)."""
    p = logp.exp()
    term = p * (logp - logq)
    return torch.where(p > 0, term, torch.zeros_like(term)).sum(-1)


def forward_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mode-covering, the classic KD loss."""
    return _plogp_diff(teacher_logp.float(), student_logp.float())


def reverse_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking."""
    return _plogp_diff(student_logp.float(), teacher_logp.float())


def _log_mixture(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q) in log space. w in [0, 1]; log(0) = -inf is handled by logsumexp."""
    lw = math.log(w) if w > 0 else -math.inf
    l1w = math.log1p(-w) if w < 1 else -math.inf
    return torch.logsumexp(torch.stack([logp + lw, logq + l1w]), dim=0)


def generalized_jsd(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    Tends to 0 at beta = 0 and beta = 1 (m equals one of the two). We keep that: some libraries
    switch to a plain KL at the endpoints, which makes the loss jump as beta reaches them.
    """
    p, q = teacher_logp.float(), student_logp.float()
    m = _log_mixture(p, q, beta)
    out = torch.zeros(p.shape[:-1], dtype=torch.float32, device=p.device)
    if beta > 0:
        out = out + beta * _plogp_diff(p, m)
    if beta < 1:
        out = out + (1 - beta) * _plogp_diff(q, m)
    return out


def skew_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(p || alpha p + (1 - alpha) q) (DistiLLM)."""
    p, q = teacher_logp.float(), student_logp.float()
    return _plogp_diff(p, _log_mixture(p, q, alpha))


def skew_reverse_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """KL(q || alpha q + (1 - alpha) p) (DistiLLM)."""
    p, q = teacher_logp.float(), student_logp.float()
    return _plogp_diff(q, _log_mixture(q, p, alpha))


def total_variation(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """0.5 sum_v |p - q|."""
    return 0.5 * (teacher_logp.float().exp() - student_logp.float().exp()).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": generalized_jsd,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
    "tv": total_variation,
}


def get_divergence(name: str, jsd_beta: float = 0.5, skew_alpha: float = 0.1) -> Divergence:
    """The divergence `name` with its parameter bound, as f(teacher_logp, student_logp) -> [N]."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence '{name}'; choose from {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    if name == "jsd":
        return lambda t, s: generalized_jsd(t, s, jsd_beta)
    if name in ("skl", "srkl"):
        return lambda t, s: fn(t, s, skew_alpha)
    return fn


# ----------------------------------------------------------------------------------------------
# Position selection


def shifted_masks(labels: torch.Tensor, attention_mask: torch.Tensor, token_scope: str = "response") -> tuple[torch.Tensor, torch.Tensor]:
    """Masks over positions 0..L-2 (each predicts the next token).

    Returns (ce_mask, kd_mask) of shape [B, L-1]. The CE mask marks positions whose next token is
    a response token. The KD mask is the same for token_scope="response", and marks every
    position whose own and next token are real (non-padding) for token_scope="all". Both come
    from labels and the attention mask, never from comparing ids with the pad id.
    """
    ce_mask = labels[:, 1:] != -100
    if token_scope == "response":
        kd_mask = ce_mask
    elif token_scope == "all":
        kd_mask = (attention_mask[:, 1:] > 0) & (attention_mask[:, :-1] > 0)
    else:
        raise ValueError(f"token_scope must be 'response' or 'all', got {token_scope!r}")
    return ce_mask, kd_mask


# ----------------------------------------------------------------------------------------------
# Loss sums


def ce_sum(student_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over rows: logits [N, V], targets [N] -> (sum, N)."""
    if targets.numel() == 0:
        return student_logits.sum() * 0.0, 0
    loss = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    return loss, int(targets.numel())


def kd_sum(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, int]:
    """sum over rows of tau^2 * D(p_tau || q_tau), rows = selected positions ([N, V] each).

    `vocab_size` keeps only the first `len(tokenizer)` logits of both heads: heads padded to
    different sizes share a tokenizer but their extra rows are not tokens (and padding logits
    with zeros would give them probability mass). `chunk_tokens` bounds the float32
    intermediate tensors to chunk x V.
    """
    n = student_logits.shape[0]
    if n == 0:
        return student_logits.sum() * 0.0, 0
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
        teacher_logits = teacher_logits[..., :vocab_size]
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"teacher and student distributions have different widths ({teacher_logits.shape[-1]} vs "
            f"{student_logits.shape[-1]}); pass vocab_size=len(tokenizer)")
    step = chunk_tokens if chunk_tokens > 0 else n
    total = student_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        s = F.log_softmax(student_logits[start:start + step].float() / temperature, dim=-1)
        with torch.no_grad():
            t = F.log_softmax(teacher_logits[start:start + step].float() / temperature, dim=-1)
        total = total + divergence(t, s).sum()
    return total * (temperature ** 2), n


def hard_token_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the student against the teacher's argmax token at each row."""
    if vocab_size is not None:
        teacher_logits = teacher_logits[..., :vocab_size]
    targets = teacher_logits.argmax(-1)
    return ce_sum(student_logits, targets)
