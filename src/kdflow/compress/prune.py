"""Depth pruning chosen by importance (methods.md §12, after Minitron and ShortGPT).

The importance of transformer block l is the change it makes to the hidden state it reads:
1 − cos(h_l, h_{l+1}), averaged over the real (non-padding) tokens of calibration rows. A block
that barely turns its input is the cheapest to drop. The first and the last blocks are always
kept: the first turns embeddings into the residual stream every later block expects, the last
shapes the state the output head reads.
"""

from __future__ import annotations

from typing import Any


def block_importance(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16) -> list[float]:
    """1 − cosine between each block's input and output hidden states, mean over real tokens."""
    import torch
    import torch.nn.functional as F

    from kdflow.data import collate
    from kdflow.models import input_device

    if not examples:
        raise ValueError("no calibration rows")
    was_training = model.training
    model.eval()
    device = input_device(model)
    sums: list[float] | None = None
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad_id)
            mask = batch["attention_mask"].bool()
            out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                        output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            part = []
            for a, b in zip(hs[:-1], hs[1:]):
                a, b = a[mask.to(a.device)].float(), b[mask.to(b.device)].float()
                part.append(float((1.0 - F.cosine_similarity(a, b, dim=-1)).sum()))
            sums = part if sums is None else [x + y for x, y in zip(sums, part)]
            tokens += int(mask.sum())
    model.train(was_training)
    return [s / max(tokens, 1) for s in sums or []]


def most_important(scores: list[float], keep: int) -> list[int]:
    """The `keep` blocks to keep, in order: the first and last always, then the highest scores
    (ties: the earlier block)."""
    n = len(scores)
    if not 2 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} layers (at least 2: the first and the last)")
    middle = sorted(range(1, n - 1), key=lambda i: (-scores[i], i))[: keep - 2]
    return sorted([0, n - 1, *middle])


def evenly_spaced(n_layers: int, keep: int) -> list[int]:
    """`keep` block indices spread evenly from the first to the last."""
    if not 2 <= keep <= n_layers:
        raise ValueError(f"cannot keep {keep} of {n_layers} layers (at least 2: the first and the last)")
    return sorted({round(i * (n_layers - 1) / (keep - 1)) for i in range(keep)})
