"""Pruning chosen by importance (methods.md §12, after Minitron and ShortGPT), measured on calibration rows.

Depth: the importance of transformer block l is the change it makes to the hidden state it reads,
1 − cos(h_l, h_{l+1}), averaged over the real (non-padding) tokens, or the increase of the answer loss
when the block alone is skipped. A block that barely turns its input, or whose absence costs nothing,
is the cheapest to drop. The first and the last blocks are always kept: the first turns embeddings
into the residual stream every later block expects, the last shapes the state the output head reads.

Width: Minitron's activation magnitudes, one forward pass with hooks: an MLP channel by the mean
|act(gate)·up| it feeds the down projection, an attention head by the mean norm of its output, an
embedding channel by the mean |output| of the RMSNorms at that channel. `kdflow.compress.width` cuts
the model to the chosen channels.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# ----------------------------------------------------------------------------------------------
# Depth importance by the loss (ShortGPT's alternative; Minitron's "LM loss" depth metric)


def _answer_loss(model: Any, batches: list[dict[str, Any]]) -> float:
    """Mean cross-entropy of the answer tokens (labels != -100) over `batches`, one number."""
    import torch
    import torch.nn.functional as F

    from kdflow.models import input_device

    device = input_device(model)
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(logits.device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                       reduction="sum"))
        count += int((labels != -100).sum())
    if count == 0:
        raise ValueError("the calibration rows have no answer tokens")
    return total / count


def loss_importance(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16) -> list[float]:
    """For each block: the answer loss of the calibration rows with that block alone skipped (its output replaced by
    its input), minus the loss of the whole model. n_layers + 1 forward passes over the rows."""
    import torch

    from kdflow.data import collate
    from kdflow.models import layer_list_name

    if not examples:
        raise ValueError("no calibration rows")
    layers = model.get_submodule(layer_list_name(model))
    batches = [collate(examples[s:s + batch_size], pad_id) for s in range(0, len(examples), batch_size)]

    def skip(module: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    was_training = model.training
    model.eval()
    scores = []
    try:
        with torch.no_grad():
            base = _answer_loss(model, batches)
            for layer in layers:
                handle = layer.register_forward_hook(skip, with_kwargs=True)
                try:
                    scores.append(_answer_loss(model, batches) - base)
                finally:
                    handle.remove()
    finally:
        model.train(was_training)
    return scores


# ----------------------------------------------------------------------------------------------
# Width importance (Minitron: activation magnitudes on calibration rows)


@dataclass
class WidthScores:
    """Per-layer importance of MLP channels and attention heads, and of the embedding channels.

    mlp[l][c]: mean over real tokens of |act(gate) * up| at channel c of layer l's MLP (the down projection's input);
    heads[l][h]: mean over real tokens of the L2 norm of query head h's attention output (o_proj's input slice);
    hidden[c]: mean over real tokens and over every RMSNorm of |norm output| at channel c.
    """

    mlp: list[list[float]]
    heads: list[list[float]]
    hidden: list[float]


def width_importance(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16) -> WidthScores:
    """Activation-magnitude importance of every MLP channel, attention head and embedding channel (one pass)."""
    import torch

    from kdflow.compress.width import check_width_prunable, norm_modules
    from kdflow.data import collate
    from kdflow.models import input_device

    if not examples:
        raise ValueError("no calibration rows")
    check_width_prunable(model)
    cfg = model.config
    layers = model.model.layers
    head_dim = cfg.head_dim
    n_heads = cfg.num_attention_heads
    mlp_sums = [torch.zeros(cfg.intermediate_size, dtype=torch.float64) for _ in layers]
    head_sums = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    norms = norm_modules(model)
    hidden_sum = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    state: dict[str, Any] = {}

    def real(x: Any) -> Any:  # [B, T, C] -> [real tokens, C], float
        return x[state["mask"].to(x.device)].float()

    def on_mlp(i: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            mlp_sums[i].add_(real(args[0]).abs().sum(0).double().cpu())
        return hook

    def on_heads(i: int) -> Any:
        def hook(module: Any, args: tuple) -> None:
            x = real(args[0])
            head_sums[i].add_(x.view(x.shape[0], n_heads, head_dim).norm(dim=-1).sum(0).double().cpu())
        return hook

    def on_norm(module: Any, args: tuple, out: Any) -> None:
        hidden_sum.add_(real(out).abs().sum(0).double().cpu())

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(on_mlp(i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(on_heads(i)))
    handles += [m.register_forward_hook(on_norm) for m in norms]
    was_training = model.training
    model.eval()
    device = input_device(model)
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                batch = collate(examples[start:start + batch_size], pad_id)
                state["mask"] = batch["attention_mask"].bool()
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                      use_cache=False)
                tokens += int(state["mask"].sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    tokens = max(tokens, 1)
    return WidthScores(mlp=[(s / tokens).tolist() for s in mlp_sums], heads=[(s / tokens).tolist() for s in head_sums],
                       hidden=(hidden_sum / (tokens * len(norms))).tolist())


def top_indices(scores: list[float], keep: int) -> list[int]:
    """The `keep` highest-scoring indices, in their original order (ties: the earlier index)."""
    if not 1 <= keep <= len(scores):
        raise ValueError(f"cannot keep {keep} of {len(scores)}")
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


def choose_heads(head_scores: list[float], n_kv: int, keep_kv: int, keep_heads: int) -> tuple[list[int], list[int]]:
    """(kept KV groups, kept query heads) of one layer. A KV group g serves query heads g*r .. g*r + r - 1
    (r = heads per group, as transformers' repeat_kv lays them out); it is kept whole or dropped whole,
    ranked by the summed scores of its heads; each kept group then keeps its keep_heads / keep_kv
    strongest query heads."""
    r = len(head_scores) // n_kv
    group_scores = [sum(head_scores[g * r:(g + 1) * r]) for g in range(n_kv)]
    groups = top_indices(group_scores, keep_kv)
    per_group = keep_heads // keep_kv
    heads = []
    for g in groups:
        local = top_indices(head_scores[g * r:(g + 1) * r], per_group)
        heads += [g * r + h for h in local]
    return groups, heads
