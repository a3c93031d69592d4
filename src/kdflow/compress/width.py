"""Width pruning: cut a Llama-style model to fewer embedding channels, MLP channels and attention heads.

Every layer keeps the same sizes (which channels and heads it keeps may differ from layer to layer),
so the result is a plain model of the same architecture whose config states the new sizes
(`hidden_size`, `intermediate_size`, `num_attention_heads`, `num_key_value_heads`, `head_dim` kept
as it was): it loads with AutoModelForCausalLM and trains with every method.

Only the architectures whose every weight the rules below place are accepted: a parameter no rule
covers would silently keep its old width, so it is an error instead.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from kdflow.errors import ConfigError, ModelError

# Llama-style decoders (embed_tokens, q/k/v/o_proj, gate/up/down_proj, RMSNorm before each sub-block and at the
# end, head_dim in the config). Gemma scales embeddings by sqrt(hidden_size) and Phi fuses projections: not these.
WIDTH_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class WidthPlan:
    """What a width-pruned model keeps: embedding channels, and per layer its MLP channels, KV groups and
    query heads (indices into the original model, in order). None: that dimension is not pruned."""

    hidden: list[int] | None
    mlp: list[list[int]] | None
    kv_groups: list[list[int]] | None
    heads: list[list[int]] | None


def check_width_prunable(model_or_config: Any, setting: str = "student.width") -> None:
    cfg = getattr(model_or_config, "config", model_or_config)
    kind = getattr(cfg, "model_type", None)
    if kind not in WIDTH_MODEL_TYPES:
        raise ConfigError(f"{setting}: width pruning is implemented for Llama-style models ({', '.join(WIDTH_MODEL_TYPES)}); "
                          f"this model is {kind or type(cfg).__name__}: prune its layers only (num_layers, keep_layers)")


def original_sizes(cfg: Any) -> dict[str, int]:
    heads = cfg.num_attention_heads
    return {"hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size, "num_attention_heads": heads,
            "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // heads}


def target_sizes(spec: Any, cfg: Any, setting: str = "student.width") -> dict[str, int]:
    """The sizes a WidthSpec asks for, with unset ones as they are; every bad combination is one ConfigError."""
    check_width_prunable(cfg, setting)
    old = original_sizes(cfg)
    new = dict(old)
    for key in ("hidden_size", "intermediate_size", "num_key_value_heads"):
        value = getattr(spec, key)
        if value is not None:
            if value > old[key]:
                raise ConfigError(f"{setting}.{key}={value}: the model has only {old[key]}; keep at most that many")
            new[key] = value
    per_group = old["num_attention_heads"] // old["num_key_value_heads"]
    if spec.num_attention_heads is None:
        new["num_attention_heads"] = new["num_key_value_heads"] * per_group
    else:
        most = new["num_key_value_heads"] * per_group
        if spec.num_attention_heads > most or spec.num_attention_heads % new["num_key_value_heads"]:
            raise ConfigError(
                f"{setting}.num_attention_heads={spec.num_attention_heads}: query heads are kept in whole GQA groups, "
                f"{new['num_key_value_heads']} KV group(s) of {per_group} head(s) here, so give a multiple of "
                f"{new['num_key_value_heads']} up to {most}")
        new["num_attention_heads"] = spec.num_attention_heads
    _check_config(cfg, new, setting)
    return new


def _check_config(cfg: Any, sizes: dict[str, int], setting: str) -> None:
    """The architecture's own rules for its config (Llama's: hidden_size a multiple of num_attention_heads,
    even with head_dim given), checked now: transformers applies them only when the config is saved."""
    trial = copy.deepcopy(cfg)
    for key, value in sizes.items():
        setattr(trial, key, value)
    validate = getattr(trial, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as err:  # huggingface_hub's strict dataclasses raise their own error types
        cause = getattr(err, "__cause__", None) or err
        detail = (str(cause).strip().splitlines() or [""])[-1].strip()
        raise ConfigError(f"{setting}: the pruned sizes {', '.join(f'{k}={sizes[k]}' for k in sizes if k != 'head_dim')} "
                          f"break a rule of {type(cfg).__name__} ({detail}); choose sizes that keep it") from None


def norm_modules(model: Any) -> list[Any]:
    """The RMSNorms acting on the residual stream (before attention, before the MLP, at the end)."""
    hidden = model.config.hidden_size
    return [m for name, m in model.named_modules()
            if re.search(r"(input_layernorm|post_attention_layernorm|^model\.norm)$", name)
            and getattr(m, "weight", None) is not None and tuple(m.weight.shape) == (hidden,)]


def _head_rows(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _cut(name: str, value: Any, plan: WidthPlan, head_dim: int) -> Any:
    """`value` (a weight of the original model) cut to what `plan` keeps, by the rule its name matches."""
    import torch

    def take(t: Any, dim: int, index: list[int] | None) -> Any:
        return t if index is None else t.index_select(dim, torch.tensor(index, device=t.device))

    hid = plan.hidden
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return take(value, 1, hid)
    if name == "model.norm.weight":
        return take(value, 0, hid)
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    mlp = plan.mlp[i] if plan.mlp is not None else None
    q_rows = _head_rows(plan.heads[i], head_dim) if plan.heads is not None else None
    kv_rows = _head_rows(plan.kv_groups[i], head_dim) if plan.kv_groups is not None else None
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return take(value, 0, hid)
    if rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):  # Qwen3: per head_dim, unchanged
        return value
    rows_cols = {"self_attn.q_proj": (q_rows, hid), "self_attn.k_proj": (kv_rows, hid),
                 "self_attn.v_proj": (kv_rows, hid), "self_attn.o_proj": (hid, q_rows),
                 "mlp.gate_proj": (mlp, hid), "mlp.up_proj": (mlp, hid), "mlp.down_proj": (hid, mlp)}
    module, _, kind = rest.rpartition(".")
    if module not in rows_cols:
        return None
    rows, cols = rows_cols[module]
    if kind == "weight":
        return take(take(value, 0, rows), 1, cols)
    if kind == "bias":
        return take(value, 0, rows)
    return None


def prune_width(model: Any, plan: WidthPlan) -> Any:
    """A new model holding only what `plan` keeps of `model` (weights copied, not shared)."""
    from transformers import AutoModelForCausalLM

    check_width_prunable(model)
    old = original_sizes(model.config)
    cfg = copy.deepcopy(model.config)
    cfg.head_dim = old["head_dim"]  # explicit: hidden_size / num_attention_heads no longer gives it
    if plan.hidden is not None:
        cfg.hidden_size = len(plan.hidden)
    if plan.mlp is not None:
        cfg.intermediate_size = len(plan.mlp[0])
    if plan.kv_groups is not None:
        cfg.num_key_value_heads = len(plan.kv_groups[0])
    if plan.heads is not None:
        cfg.num_attention_heads = len(plan.heads[0])
    for name, per_layer in (("mlp", plan.mlp), ("kv_groups", plan.kv_groups), ("heads", plan.heads)):
        if per_layer is not None and (len(per_layer) != cfg.num_hidden_layers or len({len(x) for x in per_layer}) != 1):
            raise ValueError(f"width plan: {name} must list the same number of kept indices for each of the "
                             f"{cfg.num_hidden_layers} layers")
    state = {}
    for name, value in model.state_dict().items():
        cut = _cut(name, value, plan, old["head_dim"])
        if cut is None:
            raise ModelError(f"width pruning does not know how to cut {name} of {type(model).__name__}; prune its "
                             "layers only (num_layers, keep_layers)")
        state[name] = cut.detach().clone()
    new = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    try:
        missing, unexpected = new.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a size mismatch: a weight whose width no rule changed
        raise ModelError(f"width pruning {type(model).__name__} gave weights of the wrong size "
                         f"({str(err).strip().splitlines()[-1][:200]})") from None
    from kdflow.models import _is_tied

    missing = [k for k in missing if not _is_tied(new, k)]
    if missing or unexpected:
        raise ModelError(f"width pruning {type(model).__name__} left weights unmatched: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return new


def plan_from_scores(spec: Any, model: Any, scores: Any, setting: str = "student.width") -> WidthPlan:
    """The channels and heads to keep: the highest-scoring ones (kdflow.compress.prune.WidthScores)."""
    from kdflow.compress.prune import choose_heads, top_indices

    old = original_sizes(model.config)
    new = target_sizes(spec, model.config, setting)
    hidden = top_indices(scores.hidden, new["hidden_size"]) if new["hidden_size"] < old["hidden_size"] else None
    mlp = ([top_indices(s, new["intermediate_size"]) for s in scores.mlp]
           if new["intermediate_size"] < old["intermediate_size"] else None)
    kv_groups = heads = None
    if new["num_attention_heads"] < old["num_attention_heads"]:
        chosen = [choose_heads(s, old["num_key_value_heads"], new["num_key_value_heads"], new["num_attention_heads"])
                  for s in scores.heads]
        kv_groups = [g for g, _ in chosen] if new["num_key_value_heads"] < old["num_key_value_heads"] else None
        heads = [h for _, h in chosen]
    return WidthPlan(hidden=hidden, mlp=mlp, kv_groups=kv_groups, heads=heads)
