"""Carry a sender's top-k next-token distribution into the receiver's vocabulary (methods.md §6.3).

Each of the k sender ids goes through the MinED map. Where several land on one receiver id their
probabilities are **added** (the reference keeps the first and drops the rest, losing mass).
Sender ids mapped to -1 (special tokens without a counterpart) leave the k slots; their mass joins
the mass outside the top k. The result is `TopKTargets`-ready: receiver ids with -1 in empty
slots, log-probs (-inf in empty slots) ordered from most to least likely, and the log of the mass
outside them.

"Renormalised" (§6.3) is honoured by the KD loss's sparse mode rather than here, so that the
leftover mass is not thrown away before the loss can use it: with `kd.sparse_mode=renorm`,
`losses.sparse_pair` renormalises the projected teacher over its ids; with `tail` (the default)
the leftover 1 - sum p stays one bucket, compared with the student's mass outside those ids.
"""

from __future__ import annotations

import math

import torch


def project_topk(ids: torch.Tensor, logp: torch.Tensor, vocab_map: torch.Tensor, tail_logp: torch.Tensor | None = None,
                 chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(receiver ids [N, k], log-probs [N, k], tail log-mass [N]) from sender top-k ids and log-probs.

    ids: [N, k] sender ids (-1 = empty slot); logp: [N, k] their log-probs; vocab_map: [V_sender]
    int64 receiver id per sender id (-1 = none); tail_logp: [N] log of the sender's mass outside
    its k ids, when known exactly (else it is taken as 1 - sum of the k probabilities).
    Probability is conserved: sum(exp(out logp)) + exp(out tail) = sum(exp(logp)) + exp(tail).
    """
    vocab_map = vocab_map.to(ids.device)
    out_ids, out_lp, out_tail = [], [], []
    for start in range(0, ids.shape[0], chunk):
        i, lp = ids[start:start + chunk], logp[start:start + chunk].float()
        present = i >= 0
        lp = lp.masked_fill(~present, -math.inf)
        mapped = torch.where(present, vocab_map[i.clamp(min=0)], torch.full_like(i, -1))
        keep = mapped >= 0
        # mass that leaves the k slots: sender ids without a receiver counterpart
        dropped = torch.logsumexp(lp.masked_fill(keep, -math.inf), -1)
        same = (mapped.unsqueeze(-1) == mapped.unsqueeze(-2)) & keep.unsqueeze(-1) & keep.unsqueeze(-2)
        summed = torch.logsumexp(lp.unsqueeze(-2).expand_as(same).masked_fill(~same, -math.inf), -1)
        k = i.shape[-1]
        earlier = torch.ones(k, k, dtype=torch.bool, device=i.device).tril(-1)  # [slot, other]: other < slot
        first = keep & ~(same & earlier).any(-1)
        new_lp = summed.masked_fill(~first, -math.inf)
        new_lp, order = new_lp.sort(dim=-1, descending=True, stable=True)
        new_ids = torch.where(first, mapped, torch.full_like(mapped, -1)).gather(-1, order)
        if tail_logp is not None:
            tail = torch.logaddexp(tail_logp[start:start + chunk].float(), dropped)
        else:
            covered = torch.logsumexp(new_lp, -1).clamp(max=0.0)
            tail = torch.log(-torch.expm1(covered))
        out_ids.append(new_ids)
        out_lp.append(new_lp)
        out_tail.append(tail)
    if not out_ids:
        return ids.new_empty(ids.shape), logp.new_empty(logp.shape).float(), logp.new_empty(ids.shape[:1]).float()
    return torch.cat(out_ids), torch.cat(out_lp), torch.cat(out_tail)
