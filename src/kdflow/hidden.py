"""Intermediate-layer (hidden-state) distillation (methods.md §10).

Per mapped layer pair (s, t), at the positions the KD term uses:
    d(W h_s, h_t),   d = MSE of the layer-normalised states, or 1 - cosine
W is a learned linear map when the widths differ (identity otherwise). The term of a position is the
mean of d over the pairs, so `kd.hidden_weight` does not scale with how many layers are mapped; like
the logit terms it is a (sum over positions, number of positions) pair that the training loop
normalises over the whole optimizer step.

Layer indices are those of `output_hidden_states`: 0 is the embedding output, i the output of
block i (1-based), the last one after the model's final norm.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from kdflow.errors import ConfigError

HIDDEN_LOSSES = ("mse", "cosine")


def parse_pairs(text: str, key: str = "kd.hidden_layers") -> list[tuple[int, int]]:
    """'1:3,2:6' -> [(1, 3), (2, 6)] (student index : teacher index, in output_hidden_states numbering)."""
    pairs = []
    for part in text.split(","):
        bits = part.strip().split(":")
        if len(bits) != 2 or not all(b.strip().isdigit() for b in bits):
            raise ConfigError(f"setting '{key}': {part.strip()!r} is no layer pair; give auto, uniform, or pairs "
                              "student:teacher such as 2:6,4:12 (0 is the embedding output, i the output of block i)")
        pairs.append((int(bits[0]), int(bits[1])))
    if len(set(p[0] for p in pairs)) != len(pairs):
        raise ConfigError(f"setting '{key}': a student layer appears twice in {text!r}")
    return pairs


def check_hidden_layers(value: str, key: str) -> None:
    """Config check: auto, uniform or student:teacher pairs."""
    if value not in ("auto", "uniform"):
        parse_pairs(value, key)


def uniform_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i <-> teacher block round(i * L_t / L_s) (1-based: the last blocks pair up)."""
    return [(i, max(1, int(math.floor(i * teacher_layers / student_layers + 0.5)))) for i in range(1, student_layers + 1)]


def layer_map(how: str, student_config: Any, teacher_layers: int, embeddings: bool = False) -> list[tuple[int, int]]:
    """The (student, teacher) hidden-state index pairs of a run.

    auto: a student pruned from the teacher (its config records `kdflow_pruned_from_layers`, 0-based
    teacher blocks, saved with the student) maps each kept block to the block it came from; any other
    student is mapped uniformly. uniform: always uniformly. Otherwise pairs given by hand.
    """
    n_s = int(student_config.num_hidden_layers)
    kept = getattr(student_config, "kdflow_pruned_from_layers", None)
    if how == "auto" and kept:
        if len(kept) != n_s or max(kept) >= teacher_layers:
            raise ConfigError(f"kd.hidden_layers=auto: the student records it was pruned from teacher blocks {list(kept)}, "
                              f"which do not fit a {n_s}-block student of a {teacher_layers}-block teacher; is it pruned "
                              "from another teacher? Set kd.hidden_layers=uniform or give pairs by hand")
        pairs = [(i + 1, int(k) + 1) for i, k in enumerate(kept)]
    elif how in ("auto", "uniform"):
        pairs = uniform_map(n_s, teacher_layers)
    else:
        pairs = parse_pairs(how)
        for s, t in pairs:
            if s > n_s or t > teacher_layers:
                raise ConfigError(f"kd.hidden_layers: pair {s}:{t} is outside the models (student has blocks 1..{n_s}, "
                                  f"teacher 1..{teacher_layers}; 0 is the embedding output)")
        return pairs
    return ([(0, 0)] if embeddings else []) + pairs


class HiddenProjection(torch.nn.Module):
    """One linear map per layer pair, student width -> teacher width; trained with the student and
    kept out of the student's folder (it is a training device, not part of the model)."""

    def __init__(self, pairs: Sequence[tuple[int, int]], student_width: int, teacher_width: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.maps = torch.nn.ModuleList()
        for _ in pairs:
            lin = torch.nn.Linear(student_width, teacher_width, bias=False)
            with torch.no_grad():  # seeded, so two runs of one seed start alike
                lin.weight.copy_(torch.randn(teacher_width, student_width, generator=g) / math.sqrt(student_width))
            self.maps.append(lin)

    def forward(self, j: int, h: torch.Tensor) -> torch.Tensor:
        return self.maps[j](h.to(self.maps[j].weight.dtype))


def distance(s: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-row distance [N] between student and teacher states [N, H], in float32."""
    s, t = s.float(), t.float()
    if kind == "mse":
        # layer-normalised: raw MSE is dominated by a few outlier channels of LLM residual streams
        return (F.layer_norm(s, s.shape[-1:]) - F.layer_norm(t, t.shape[-1:])).pow(2).mean(-1)
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)
    raise ValueError(f"hidden loss must be one of {HIDDEN_LOSSES}, got {kind!r}")


def hidden_sum(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], kind: str,
               projection: HiddenProjection | None = None, chunk_tokens: int = 0) -> tuple[torch.Tensor, int]:
    """(sum over rows of the mean over pairs of d(W h_s, h_t), rows).

    student[j], teacher[j]: [N, H_s] and [N, H_t] states of pair j at the same N positions. Chunks of
    `chunk_tokens` rows bound the float32 copies to chunk x width per pair.
    """
    from torch.utils.checkpoint import checkpoint

    n = student[0].shape[0] if student else 0
    if n == 0:
        return (student[0].sum() * 0.0 if student else torch.zeros(())), 0

    def chunk(j: int, hs: torch.Tensor, ht: torch.Tensor) -> torch.Tensor:
        if projection is not None:
            hs = projection(j, hs)
        return distance(hs, ht, kind).sum()

    step = chunk_tokens if chunk_tokens > 0 else n
    total = student[0].new_zeros((), dtype=torch.float32)
    for start in range(0, n, step):
        sl = slice(start, start + step)
        for j, (s, t) in enumerate(zip(student, teacher)):
            args = (j, s[sl], t[sl].to(s.device).detach())
            if chunk_tokens > 0 and torch.is_grad_enabled() and s.requires_grad:
                # like the logit losses: the float32 copies of a chunk are recomputed in backward
                total = total + checkpoint(chunk, *args, use_reentrant=False)
            else:
                total = total + chunk(*args)
    return total / len(student), n
