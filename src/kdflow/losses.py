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
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) teachers


SPARSE_MODES = ("renorm", "tail")


@dataclass
class TopKTargets:
    """A teacher known only through its top-k tokens at each row.

    ids:   [N, k] int64 token ids in the student's vocabulary; -1 marks an empty slot
    logp:  [N, k] teacher log-probs at the KD temperature (any value in empty slots)
    valid: [N] bool, rows that take part in the KD term (e.g. positions a cross-tokenizer
           alignment could pair); None means all rows
    tail_logp: [N] log of the teacher mass outside the k ids, when stored exactly; otherwise it is
           derived from `logp`
    row_weight: [N] optional weight of each row's divergence (soft selection); counts are unchanged
    """

    ids: torch.Tensor
    logp: torch.Tensor
    valid: torch.Tensor | None = None
    tail_logp: torch.Tensor | None = None
    row_weight: torch.Tensor | None = None

    def rows(self, index: torch.Tensor) -> "TopKTargets":
        pick = lambda t: None if t is None else t[index]
        return TopKTargets(self.ids[index], self.logp[index], pick(self.valid), pick(self.tail_logp), pick(self.row_weight))

    def count(self) -> int:
        return int(self.ids.shape[0] if self.valid is None else self.valid.sum())


def _log1mexp(logx: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logx)) for logx <= 0, stable on both ends; -inf when exp(logx) reaches 1."""
    logx = logx.clamp(max=0.0)
    return torch.where(logx > -0.6931, torch.log(-torch.expm1(logx)), torch.log1p(-torch.exp(logx)))


def sparse_pair(student_logp: torch.Tensor, targets: TopKTargets, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student as distributions over k + 1 outcomes: the k ids and "everything else".

    mode "tail":   the teacher keeps its leftover mass 1 - sum_k p in the last bucket; the student's
                   bucket holds its mass outside the k ids.
    mode "renorm": the teacher is renormalised over its k ids (its bucket is empty); the student is
                   compared as is, so mass it puts outside the k ids still costs it (for forward KL
                   this is sum_k p_hat (log p_hat - log q), the usual top-k KD loss).
    """
    empty = targets.ids < 0
    safe_ids = targets.ids.clamp(min=0)
    s_k = student_logp.gather(-1, safe_ids).masked_fill(empty, -math.inf)
    # The student's mass outside the k ids, summed directly rather than as 1 - sum_k q: the
    # subtraction loses everything below float32 resolution, and a zero that should be 1e-9
    # makes reverse KL infinite.
    outside = student_logp.scatter(-1, safe_ids, -math.inf)
    if bool(empty.any()):  # empty slots point at id 0 above; put id 0 back unless it is a real slot
        real0 = ((targets.ids == 0) & ~empty).any(-1, keepdim=True)
        outside[..., :1] = torch.where(real0, outside[..., :1], student_logp[..., :1])
    s_rest = torch.logsumexp(outside, -1)
    t_k = targets.logp.float().masked_fill(empty, -math.inf)
    if mode == "renorm":
        t_k = t_k - torch.logsumexp(t_k, -1, keepdim=True)
        t_rest = torch.full_like(s_rest, -math.inf)
    elif mode == "tail":
        t_rest = targets.tail_logp.float() if targets.tail_logp is not None else _log1mexp(torch.logsumexp(t_k, -1))
        # When the k ids cover the whole vocabulary there is no "outside": a rounding residue of
        # 1 - sum_k p (~1e-8) against the student's empty bucket would make forward KL infinite.
        t_rest = torch.where(torch.isneginf(s_rest), torch.full_like(t_rest, -math.inf), t_rest)
    else:
        raise ValueError(f"sparse mode must be one of {SPARSE_MODES}, got {mode!r}")
    return torch.cat([t_k, t_rest.unsqueeze(-1)], -1), torch.cat([s_k, s_rest.unsqueeze(-1)], -1)


def check_sparse_divergence(name: str, mode: str, unpaired: str | None = None, skew_alpha: float = 0.1,
                            keys: tuple[str, str, str, str] = ("kd.divergence", "kd.sparse_mode", "align.unpaired",
                                                               "kd.skew_alpha")) -> None:
    """Refuse a divergence that is infinite against the targets these settings produce (ValueError, one line).

    Reverse KL(q || p), and skew reverse KL at alpha = 0 (the same thing), is infinite wherever the
    target p has no mass and the student q has some, and a softmax q has mass everywhere. Two settings
    give targets with no mass outside a few ids: `renorm` (a top-k teacher renormalised over its k ids:
    teacher cache, teacher with another tokenizer, FedMKT payloads) and `onehot_next` (a one-hot on the
    next token at an unpaired cross-tokenizer position, whatever the sparse mode). `keys` name the
    settings in the message: divergence, sparse mode, unpaired rule, skew alpha.
    """
    if not (name == "rkl" or (name == "srkl" and skew_alpha <= 0.0)):
        return
    what = f"{keys[0]}={name}" + (f" with {keys[3]}={skew_alpha:g} (that is reverse KL)" if name == "srkl" else "")
    if mode == "renorm":
        raise ValueError(f"{what} and {keys[1]}=renorm: reverse KL is infinite against a top-k teacher renormalised "
                         f"over its k ids (teacher cache, teacher with another tokenizer), as soon as the student puts "
                         f"mass outside them; set {keys[1]}=tail or choose another divergence")
    if unpaired == "onehot_next":
        raise ValueError(f"{what} and {keys[2]}=onehot_next: reverse KL is infinite against the one-hot target of an "
                         f"unpaired position (teacher with another tokenizer); set {keys[2]}=mask or choose another "
                         "divergence")


def topk_kd_sum(student_logits: torch.Tensor, targets: TopKTargets, divergence: Divergence, temperature: float = 1.0,
                mode: str = "tail", vocab_size: int | None = None) -> tuple[torch.Tensor, int]:
    """tau^2 * sum over valid rows of D(p_topk || q) — the sparse counterpart of `kd_sum`."""
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t, s2 = sparse_pair(s, targets, mode)
    per_row = divergence(t, s2)
    if targets.row_weight is not None:
        per_row = per_row * targets.row_weight
    if targets.valid is not None:
        per_row = torch.where(targets.valid, per_row, torch.zeros_like(per_row))
    return per_row.sum() * temperature ** 2, targets.count()


# ----------------------------------------------------------------------------------------------
# Losses straight from final hidden states, chunk by chunk


@dataclass
class DenseTeacher:
    """An online teacher given by its final hidden states at the KD rows and its output head."""

    hidden: torch.Tensor  # [N_kd, H_teacher]
    head: Callable[[torch.Tensor], torch.Tensor]  # models.output_head, or an identity over logits
    row_weight: torch.Tensor | None = None  # [N_kd] weight of each row's divergence (several teachers)

    def logits(self, index: torch.Tensor) -> torch.Tensor:
        # the teacher may sit on another device than the student: its rows go there and come back
        with torch.no_grad():
            return self.head(self.hidden[index.to(self.hidden.device)]).float().to(index.device)

    def count(self) -> int:
        return int(self.hidden.shape[0])


@dataclass
class HeadLossSpec:
    """What `head_losses` computes besides cross-entropy."""

    kind: str = "none"  # "none" | "soft" | "hard"
    divergence: Divergence | None = None
    temperature: float = 1.0
    sparse_mode: str = "tail"
    vocab_size: int | None = None  # len(tokenizer): logits past it (a padded head) are cut for every term
    chunk_tokens: int = 0


def head_losses(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], ce_targets: torch.Tensor,
                kd_rows: torch.Tensor, teacher: "DenseTeacher | TopKTargets | None",
                spec: HeadLossSpec) -> dict[str, tuple[torch.Tensor, int]]:
    """CE and KD sums computed from the student's final hidden states, `chunk_tokens` rows at a time.

    hidden:     [N, H] student hidden states at the selected positions
    ce_targets: [N] next-token ids, -100 on rows outside the CE term
    kd_rows:    [N] bool, rows in the KD term (in order, they match the teacher's rows)
    With chunking, each chunk's logits are recomputed in backward (activation checkpointing), so
    at most chunk x vocabulary float32 values are alive at once for the student, and the same
    for a dense teacher; without it the whole [N, V] is computed once.
    """
    from torch.utils.checkpoint import checkpoint

    n = hidden.shape[0]
    kd_index = torch.cumsum(kd_rows.long(), 0) - 1  # row -> teacher row
    V = spec.vocab_size
    T = spec.temperature

    def pick(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # Boolean indexing copies the rows (and scatters them back in backward); in the usual case
        # every row is in both terms, so skip it.
        return x if bool(rows.all()) else x[rows]

    def chunk_fn(h: torch.Tensor, tgt: torch.Tensor, rows: torch.Tensor, t_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        if V is not None and logits.shape[-1] > V:
            # Heads padded past the tokenizer: the padded rows are no tokens, and their logits would
            # take probability mass in the CE as in the KD term. Cut them whatever terms run, so that
            # a CE-only run (sft) scores exactly what the CE term of a KD run scores.
            logits = logits[..., :V]
        in_ce = tgt != -100
        soft = spec.kind == "soft" and bool(rows.any())
        # One log-softmax serves CE and KD when the KD temperature is 1.
        shared = F.log_softmax(logits, -1) if (soft and T == 1.0) else None
        if not bool(in_ce.any()):
            ce = logits.sum() * 0.0
        elif shared is not None:
            ce = F.nll_loss(pick(shared, in_ce), pick(tgt, in_ce), reduction="sum")
        else:
            ce = F.cross_entropy(pick(logits, in_ce), pick(tgt, in_ce), reduction="sum")
        kd = logits.sum() * 0.0
        if spec.kind == "none" or not bool(rows.any()):
            return ce, kd
        idx = t_index[rows]
        if spec.kind == "hard":
            s_logits = pick(logits, rows)
            if isinstance(teacher, TopKTargets):
                sub = teacher.rows(idx)
                best = sub.logp.float().masked_fill(sub.ids < 0, -math.inf).argmax(-1)
                hard = sub.ids.gather(-1, best.unsqueeze(-1)).squeeze(-1)
                keep = sub.valid if sub.valid is not None else torch.ones_like(hard, dtype=torch.bool)
                if bool(keep.any()):
                    kd = F.cross_entropy(pick(s_logits, keep), pick(hard, keep), reduction="sum")
            else:
                t_logits = teacher.logits(idx)
                t_logits = t_logits[..., :V] if V is not None else t_logits
                kd = F.cross_entropy(s_logits, t_logits.argmax(-1), reduction="sum")
            return ce, kd
        s_logp = pick(shared, rows) if shared is not None else F.log_softmax(pick(logits, rows) / T, -1)
        if isinstance(teacher, TopKTargets):
            sub = teacher.rows(idx)
            t, s = sparse_pair(s_logp, sub, spec.sparse_mode)
            per_row = spec.divergence(t, s)
            if sub.row_weight is not None:
                per_row = per_row * sub.row_weight
            if sub.valid is not None:
                per_row = torch.where(sub.valid, per_row, torch.zeros_like(per_row))
        else:
            t_logits = teacher.logits(idx)
            t_logits = t_logits[..., :V] if V is not None else t_logits
            if t_logits.shape[-1] != s_logp.shape[-1]:
                raise ValueError(f"teacher and student heads differ in width ({t_logits.shape[-1]} vs "
                                 f"{s_logp.shape[-1]}); pass vocab_size=len(tokenizer)")
            per_row = spec.divergence(F.log_softmax(t_logits / T, -1), s_logp)
            if teacher.row_weight is not None:
                per_row = per_row * teacher.row_weight[idx]
        return ce, per_row.sum() * T ** 2

    step = spec.chunk_tokens if spec.chunk_tokens > 0 else max(n, 1)
    ce_total = hidden.new_zeros((), dtype=torch.float32)
    kd_total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        args = (hidden[sl], ce_targets[sl], kd_rows[sl], kd_index[sl])
        if spec.chunk_tokens > 0 and torch.is_grad_enabled() and hidden.requires_grad:
            ce, kd = checkpoint(chunk_fn, *args, use_reentrant=False)
        else:
            ce, kd = chunk_fn(*args)
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    out = {"ce": (ce_total, int((ce_targets != -100).sum()))}
    if spec.kind != "none":
        if teacher is None:
            raise ValueError("a KD term needs a teacher")
        out["kd"] = (kd_total, teacher.count() if isinstance(teacher, TopKTargets) else int(kd_rows.sum()))
    return out
