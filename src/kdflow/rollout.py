"""Sampling from a mixture of two models, each with its own KV cache (stock transformers, no fork).

MiniLLM's teacher-mixed sampling (methods.md §5, trick 2) draws every response token from

    p~(. | y_<t, x) = mix_alpha * p(. | y_<t, x) + (1 - mix_alpha) * q(. | y_<t, x)

so both the teacher p and the student q must be queried at every step. `generate()` runs one
model, so this module has its own small loop: prefill both models on the left-padded prompts,
then feed only the newly sampled token to each model together with its cache. It records, per
response token, log q(y_t), log p(y_t) and log p~(y_t) (the importance weight is q/p~), the exact
token-level reverse KL(q || p) at each sampled prefix, and a mask that is False after a row's EOS,
so padding never reaches a loss.

Positions: with left padding, a row's first prompt token must get position 0, as it does in
training (right padding) and in `generate()`. Transformers 5 takes explicit `position_ids`
(cumulative sum of the attention mask minus one) and builds the causal mask from the 2-D
attention mask plus the cache length; without explicit positions it would number the padding.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdflow.losses import reverse_kl


@dataclass
class Rollout:
    """A batch of sampled responses and what the sampler knew about each token ([B, T] unless noted)."""

    prompt_ids: torch.Tensor  # [B, P] left-padded prompts
    prompt_mask: torch.Tensor  # [B, P] 1 on prompt tokens
    response_ids: torch.Tensor  # sampled tokens; after a row has ended: pad_id
    response_mask: torch.Tensor  # bool, True on a row's tokens up to and including its EOS
    student_logp: torch.Tensor  # log q(y_t | y_<t, x), untempered; 0 where masked
    teacher_logp: torch.Tensor  # log p(y_t | y_<t, x), untempered; 0 where masked
    mixed_logp: torch.Tensor  # log of the probability the token was actually drawn with; 0 where masked
    teacher_logprobs: torch.Tensor | None = None  # [B, T, V] float32 log p(. | y_<t, x) when kept
    # KL(q || p) over the vocabulary at each sampled prefix, untempered; 0 where masked. Minus it is
    # the expected reward E_q[log p - log q] there, known exactly rather than estimated from tokens
    # that were drawn from the mixture p~, not from q.
    reverse_kl: torch.Tensor | None = None

    @property
    def importance_weight(self) -> torch.Tensor:
        """w_t = q(y_t) / p~(y_t) (the single-step weight of the paper), 0 on padding."""
        return torch.exp(self.student_logp - self.mixed_logp) * self.response_mask

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor | list[int]) -> "Rollout":
        """The rollout restricted to some rows (a minibatch)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx.to(t.device)]  # noqa: E731
        return Rollout(pick(self.prompt_ids), pick(self.prompt_mask), pick(self.response_ids), pick(self.response_mask),
                       pick(self.student_logp), pick(self.teacher_logp), pick(self.mixed_logp), pick(self.teacher_logprobs),
                       pick(self.reverse_kl))


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token (padding gets 0, it is masked)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def log_mixture(teacher_logp: torch.Tensor, student_logp: torch.Tensor, mix_alpha: float) -> torch.Tensor:
    """log(mix_alpha p + (1 - mix_alpha) q) from log-probs, in log space (exact at mix_alpha = 0 or 1)."""
    if mix_alpha <= 0.0:
        return student_logp
    if mix_alpha >= 1.0:
        return teacher_logp
    return torch.logaddexp(teacher_logp + math.log(mix_alpha), student_logp + math.log1p(-mix_alpha))


def _autocast(device: torch.device, bf16: bool) -> Any:
    from kdflow.models import use_bf16

    if not use_bf16(bf16, "bf16 (rollouts)", device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _cache_argument(model: Any) -> str:
    """The name a model's forward takes its KV cache under: transformers 5 renamed `past_key_values`
    to `cache` (the old name warns and goes in 5.40); remote code may still take the old one."""
    import inspect

    from kdflow.models import unwrap

    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def _last_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
                 use_cache: bool, vocab_size: int) -> tuple[torch.Tensor, Any]:
    # logits_to_keep=1: only the last position goes through the vocabulary-sized head.
    from kdflow.models import input_device

    name = _cache_argument(model)
    device = input_device(model)  # the teacher may sit on another device than the student: feed it there
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                use_cache=use_cache, logits_to_keep=1, **{name: cache})
    return out.logits[:, -1, :vocab_size].float().to(ids.device), (out[name] if use_cache else None)


@torch.no_grad()
def mixed_sample(student: Any, teacher: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                 max_new_tokens: int, mix_alpha: float, eos_id: int, pad_id: int, vocab_size: int,
                 temperature: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None,
                 use_cache: bool = True,
                 stop_at_eos: bool = True, keep_teacher_logprobs: bool = False, bf16: bool = False) -> Rollout:
    """Sample responses token by token from mix_alpha p + (1 - mix_alpha) q.

    `temperature` tempers both distributions before mixing (sampling only); the recorded log q
    and log p are untempered, so q/p~ is the weight that turns draws from the sampler into
    draws from the student being optimised. Only the first `vocab_size` logits are used (heads
    may be padded beyond the tokenizer). `use_cache=False` re-runs each full sequence at every
    step instead (the reference for tests and the speed benchmark); `stop_at_eos=False` forces
    every row to `max_new_tokens` tokens. `generator` may be one generator per row: a row's tokens
    then depend on its own seed only, not on the rows it is batched with, so processes that sample
    their shares of a rollout draw what one process sampling all of it draws.
    """
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    mask = prompt_mask.long()
    positions = prompt_positions(mask)
    next_pos = positions[:, -1:] + 1  # left padding: every row's last column is its last prompt token
    ids_so_far = prompt_ids
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, keep, logq_t, logp_t, logmix_t, rkl_t, full_p = [], [], [], [], [], [], []
    s_cache = t_cache = None
    with _autocast(device, bf16):
        s_logits, s_cache = _last_logits(student, prompt_ids, mask, positions, None, use_cache, vocab_size)
        t_logits, t_cache = _last_logits(teacher, prompt_ids, mask, positions, None, use_cache, vocab_size)
        for step in range(max_new_tokens):
            logq = F.log_softmax(s_logits, dim=-1)
            logp = F.log_softmax(t_logits, dim=-1)
            if temperature == 1.0:
                log_mix = log_mixture(logp, logq, mix_alpha)
            else:
                log_mix = log_mixture(F.log_softmax(t_logits / temperature, dim=-1),
                                      F.log_softmax(s_logits / temperature, dim=-1), mix_alpha)
            probs = log_mix.exp()
            y = _draw(probs, generator)
            live = ~done
            y = torch.where(live, y, torch.full_like(y, pad_id))
            gather = lambda lp: torch.where(live, lp.gather(-1, y[:, None]).squeeze(-1), torch.zeros(()))  # noqa: E731
            tokens.append(y)
            keep.append(live)
            logq_t.append(gather(logq))
            logp_t.append(gather(logp))
            logmix_t.append(gather(log_mix))
            rkl_t.append(torch.where(live, reverse_kl(logp, logq), torch.zeros(())))
            if keep_teacher_logprobs:
                full_p.append(logp)
            if stop_at_eos:
                done = done | (live & (y == eos_id))
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            # Rows that have ended keep receiving padding, as in generate(); their outputs are ignored.
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            if use_cache:
                s_logits, s_cache = _last_logits(student, y[:, None], mask, next_pos, s_cache, True, vocab_size)
                t_logits, t_cache = _last_logits(teacher, y[:, None], mask, next_pos, t_cache, True, vocab_size)
                next_pos = next_pos + 1
            else:
                ids_so_far = torch.cat([prompt_ids, torch.stack(tokens, dim=1)], dim=-1)
                pos = prompt_positions(mask)
                s_logits, _ = _last_logits(student, ids_so_far, mask, pos, None, False, vocab_size)
                t_logits, _ = _last_logits(teacher, ids_so_far, mask, pos, None, False, vocab_size)
    student.train(was_training[0])
    teacher.train(was_training[1])
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(),
        response_ids=torch.stack(tokens, dim=1), response_mask=torch.stack(keep, dim=1),
        student_logp=torch.stack(logq_t, dim=1), teacher_logp=torch.stack(logp_t, dim=1),
        mixed_logp=torch.stack(logmix_t, dim=1),
        teacher_logprobs=torch.stack(full_p, dim=1) if keep_teacher_logprobs else None,
        reverse_kl=torch.stack(rkl_t, dim=1))



def _draw(probs: Any, generator: Any) -> Any:
    """One token per row from `probs` [B, V]: with one generator per row (a list), each row draws
    from its own stream, so a row's sample does not depend on which rows share its batch."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generator)])
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

def top_p_filter(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of log-probs [B, V]: keep the smallest set of most likely tokens whose mass
    reaches top_p (the most likely token always), renormalised; the others get -inf."""
    if top_p >= 1.0:
        return logp
    sorted_lp, order = logp.sort(dim=-1, descending=True)
    mass_before = sorted_lp.exp().cumsum(-1) - sorted_lp.exp()  # mass of the tokens ranked above each one
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return F.log_softmax(logp.masked_fill(drop, float("-inf")), dim=-1)


@torch.no_grad()
def student_sample(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                   eos_id: int, pad_id: int, vocab_size: int, temperature: float = 1.0, top_p: float = 1.0,
                   generator: torch.Generator | list[torch.Generator] | None = None, bf16: bool = False) -> Rollout:
    """Sample responses from one model alone (on-policy distillation, methods.md §9), with its KV cache.

    Unlike `mixed_sample` no second model runs per token: GKD's teacher scores each finished
    sequence once, in the training forward. `temperature` and `top_p` shape the sampling only; the
    recorded log q is untempered. A row stops at its EOS (kept in `response_mask`, so it becomes a
    target); a row cut at `max_new_tokens` has no EOS and so no end target. `generator` as in
    `mixed_sample` (one per row: a row's tokens depend on its own seed only).
    """
    device = prompt_ids.device
    batch = prompt_ids.shape[0]
    was_training = model.training
    model.eval()
    mask = prompt_mask.long()
    positions = prompt_positions(mask)
    next_pos = positions[:, -1:] + 1
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, keep, logq_t = [], [], []
    try:
        with _autocast(device, bf16):
            logits, cache = _last_logits(model, prompt_ids, mask, positions, None, True, vocab_size)
            for step in range(max_new_tokens):
                logq = F.log_softmax(logits, dim=-1)
                draw = logq if temperature == 1.0 else F.log_softmax(logits / temperature, dim=-1)
                probs = top_p_filter(draw, top_p).exp()
                y = _draw(probs, generator)
                live = ~done
                y = torch.where(live, y, torch.full_like(y, pad_id))
                tokens.append(y)
                keep.append(live)
                logq_t.append(torch.where(live, logq.gather(-1, y[:, None]).squeeze(-1), torch.zeros(())))
                done = done | (live & (y == eos_id))
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                logits, cache = _last_logits(model, y[:, None], mask, next_pos, cache, True, vocab_size)
                next_pos = next_pos + 1
    finally:
        model.train(was_training)
    logq = torch.stack(logq_t, dim=1)
    return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask.long(), response_ids=torch.stack(tokens, dim=1),
                   response_mask=torch.stack(keep, dim=1), student_logp=logq, teacher_logp=torch.zeros_like(logq),
                   mixed_logp=logq)


def pack_right(rollout: Rollout, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt + response of each row as right-padded sequences, for a plain forward pass.

    Returns (input_ids [B, L], attention_mask [B, L], positions [B, L-1]); `positions` marks the
    positions whose next token is a response token, in the same row-major order as
    `rollout.response_mask`, so `logits_at(positions)` lines up with `response_mask`-selected values.
    Right padding numbers positions from 0 like the sampler's explicit position ids.
    """
    p_len = rollout.prompt_mask.sum(-1).tolist()
    r_len = rollout.lengths.tolist()
    width = max(p + r for p, r in zip(p_len, r_len))
    batch = len(p_len)
    device = rollout.prompt_ids.device
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    positions = torch.zeros((batch, width - 1), dtype=torch.bool, device=device)
    P = rollout.prompt_ids.shape[1]
    for i, (p, r) in enumerate(zip(p_len, r_len)):
        ids[i, :p] = rollout.prompt_ids[i, P - p:]
        ids[i, p:p + r] = rollout.response_ids[i, :r]
        mask[i, :p + r] = 1
        positions[i, p - 1:p - 1 + r] = True
    return ids, mask, positions


def length_normalized_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R_{t+1} = mean of r_t' over the later tokens t' > t of the same response; 0 when none remain.

    MiniLLM's length normalisation (methods.md §5, trick 3): the sum of the remaining rewards is
    divided by the number of *remaining* tokens T - t - 1, not discounted by the absolute position,
    so that short responses are not favoured. `mask` ([B, T], a prefix of each row) marks the
    response tokens; rewards at masked positions, whatever they hold, never enter a return, and
    returns there are 0.
    """
    m = mask.to(torch.float32)
    r = torch.where(mask.bool(), rewards.float(), torch.zeros((), dtype=torch.float32, device=rewards.device))
    later_sum = r.flip(-1).cumsum(-1).flip(-1) - r  # sum over t' > t
    remaining = m.flip(-1).cumsum(-1).flip(-1) - m  # number of response tokens after t
    returns = torch.where(remaining > 0, later_sum / remaining.clamp(min=1.0), torch.zeros_like(r))
    return returns * m
