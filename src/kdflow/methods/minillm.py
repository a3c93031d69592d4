"""`kdflow minillm`: MiniLLM — minimise the sequence-level reverse KL KL(q_theta || p) by policy gradient.

methods.md §5; paper: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models".
Per-token reward r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x). With the paper's three tricks
(single-step decomposition, teacher-mixed sampling, length normalisation) the gradient is Eq. 6:

    grad L = - E_{y ~ p~} sum_t w_t [ grad sum_v q_theta(v|.) log(p(v|.) / q_theta(v|.))
                                      + R^norm_{t+1} grad log q_theta(y_t|.) ]

    p~ = mix_alpha p + (1 - mix_alpha) q,   w_t = q(y_t|.) / p~(y_t|.),
    R^norm_{t+1} = (1 / (T - t - 1)) sum_{t' > t} r_t'.

The loop: draw `rollout_batch_size` responses from p~ (kdflow.rollout: both models with KV
caches), compute the returns once, then make `inner_epochs` passes over the rollout in minibatches
of `batch_size`, one optimizer step each, with PPO-style clipping of q_theta / q_rollout. Each
term is a (sum, count) pair divided by the response tokens of the optimizer step (all its
micro-batches); the optional LM loss on `lm_data` is divided by its own token count.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdflow import processes
from kdflow.config import MiniLLMConfig, MiniLLMSettings
from kdflow.data import Encoder, Rows, collate, left_pad, prompts_of, read_rows
from kdflow.errors import ConfigError, DataError, KDFlowError
from kdflow.evaluate import EvalResult, differences_markdown, evaluate_cached, format_table
from kdflow.loop import Loop, adamw, prune, resume_step
from kdflow.losses import ce_sum, reverse_kl
from kdflow.models import (apply_lora, build_student, check_student, count_parameters, load_tokenizer, place,
                           require_same_tokenizer, save_model, selected_logits)
from kdflow.report import examples_markdown, plot_curves, write_atomic, write_json
from kdflow.teachers import check_teacher, check_teacher_settings, get_teacher
from kdflow.rollout import Rollout, length_normalized_returns, mixed_sample, pack_right
from kdflow.runfolder import run_settings
from kdflow.training import setup_run

TERMS = ("single_step", "pg", "lm")


# ----------------------------------------------------------------------------------------------
# The loss


def policy_loss_sums(student_logits: torch.Tensor, tokens: torch.Tensor, rollout_logp: torch.Tensor,
                     weights: torch.Tensor, returns: torch.Tensor, teacher_logprobs: torch.Tensor,
                     clip_ratio: float, single_step_importance: bool = True
                     ) -> tuple[dict[str, tuple[torch.Tensor, int]], dict[str, float]]:
    """MiniLLM's two terms summed over N response tokens (rows of every argument).

    student_logits [N, V] (with grad), tokens [N], rollout_logp [N] = log q at sampling time,
    weights [N] = q/p~ at sampling time, returns [N] = R^norm_{t+1}, teacher_logprobs [N, V].
    Returns ({"single_step": (sum, N), "pg": (sum, N)}, statistics summed over the tokens).
    """
    n = int(tokens.numel())
    logq = F.log_softmax(student_logits.float(), dim=-1)
    weights, returns, rollout_logp = weights.float(), returns.float(), rollout_logp.float()
    # Single-step part (Eq. 4/6): the exact reverse KL over the whole vocabulary at each sampled
    # prefix, differentiated directly; the paper weights it by w_t like the long-term part.
    kl = reverse_kl(teacher_logprobs.float(), logq)
    single = weights * kl if single_step_importance else kl
    # Long-term part: PPO surrogate. The full per-token importance ratio towards q_theta from the
    # sampler p~ is (q_theta / q_rollout) * (q_rollout / p~) = ratio * w_t; only the first factor
    # is clipped (the trust region around the policy that sampled), w_t corrects for the teacher
    # mixture. At ratio = 1 its gradient is -w_t R grad log q_theta(y_t), Eq. 6's second term.
    logq_tok = logq.gather(-1, tokens[:, None]).squeeze(-1)
    ratio = torch.exp(logq_tok - rollout_logp)
    clipped = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    pg = weights * torch.maximum(-returns * ratio, -returns * clipped)
    with torch.no_grad():
        stats = {"rkl": float(kl.sum()), "clipped": float(((ratio - clipped).abs() > 0).sum()),
                 "ratio": float(ratio.sum())}
    return {"single_step": (single.sum(), n), "pg": (pg.sum(), n)}, stats


def step_gradients(student: Any, rollout: Rollout, returns: torch.Tensor, lm_examples: list[dict[str, Any]] | None,
                   s: MiniLLMSettings, pad_id: int, vocab_size: int, loop: Loop | None = None) -> dict[str, float]:
    """Forward and backward of one optimizer step over `rollout` (and an LM batch); grads accumulate.

    Every micro-batch divides by the token count of the whole step, so the accumulated gradient
    does not depend on `micro_batch_size`. With `loop`, `rollout` and `lm_examples` are this
    process's share of the step and the counts cover every process; the logged terms returned are
    this process's share (their sums over the processes are the step's values).
    """
    import contextlib

    device = next(student.parameters()).device
    rows = rollout.response_ids.shape[0]
    micro = s.micro_batch_size or rows
    use_lm = bool(lm_examples) and s.lm_coef > 0
    counts = {"response": int(rollout.response_mask.sum())}
    if use_lm:
        counts["lm"] = int((collate(lm_examples, pad_id)["labels"][:, 1:] != -100).sum())
    if loop is not None:
        counts = loop.step_counts(counts)
    n_tokens, n_lm = max(counts["response"], 1), max(counts.get("lm", 0), 1)
    parts = [("policy", list(range(start, min(start + micro, rows)))) for start in range(0, rows, micro)]
    if use_lm:
        lm_micro = s.micro_batch_size or len(lm_examples)
        parts += [("lm", lm_examples[start:start + lm_micro]) for start in range(0, len(lm_examples), lm_micro)]
    logs = {"single_step": 0.0, "pg": 0.0, "rkl": 0.0, "clipped": 0.0, "ratio": 0.0, **({"lm": 0.0} if use_lm else {})}
    for i, (kind, part) in enumerate(parts):
        last = i == len(parts) - 1
        with loop.micro_batch(last) if loop is not None else _autocast(device, s.bf16):
            if kind == "policy":
                mb = rollout.select(part)
                ids, mask, positions = pack_right(mb, pad_id)
                logits = selected_logits(student, ids, mask, positions)
                m = mb.response_mask
                sums, stats = policy_loss_sums(logits[:, :vocab_size], mb.response_ids[m], mb.student_logp[m],
                                               mb.importance_weight[m], returns[part][m], mb.teacher_logprobs[m],
                                               s.clip_ratio, s.single_step_importance)
                loss = (s.single_step_weight * sums["single_step"][0] + s.pg_weight * sums["pg"][0]) / n_tokens
                _check_finite(loss, "MiniLLM")
                for term in ("single_step", "pg"):
                    logs[term] += float(sums[term][0].detach()) / n_tokens
                for k, v in stats.items():
                    logs[k] += v / n_tokens
            else:
                batch = collate(part, pad_id)
                targets = batch["labels"][:, 1:].to(device)
                positions = targets != -100
                logits = selected_logits(student, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                         positions)
                ce, _ = ce_sum(logits[:, :vocab_size], targets[positions])
                loss = s.lm_coef * ce / n_lm
                _check_finite(loss, "language-modelling")
                logs["lm"] += float(ce.detach()) / n_lm
            if loop is not None:
                loop.backward(loss)
            else:
                loss.backward()
    logs["loss"] = s.single_step_weight * logs["single_step"] + s.pg_weight * logs["pg"] + s.lm_coef * logs.get("lm", 0.0)
    logs["clip_fraction"] = logs.pop("clipped")
    return logs


def _check_finite(loss: torch.Tensor, what: str) -> None:
    if not torch.isfinite(loss.detach()):
        raise KDFlowError(f"the {what} loss became {float(loss.detach())}; lower minillm.learning_rate, "
                          "or disable minillm.bf16")


def _autocast(device: torch.device, bf16: bool) -> Any:
    import contextlib

    from kdflow.models import use_bf16

    return (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if use_bf16(bf16, "minillm.bf16", device)
            else contextlib.nullcontext())


def rollout_statistics(rollout: Rollout, eos_id: int, loop: Loop | None = None) -> dict[str, float]:
    """What the sampler saw: mean per-token reward, length, weights, rows that ended (over every
    process's share of the rollout, with `loop`).

    The reward is the exact expected reward under the student at each sampled prefix,
    E_q[log p - log q] = -KL(q || p) over the whole vocabulary. Averaging log p(y_t) - log q(y_t) over
    the sampled tokens instead would estimate it from tokens drawn from the teacher-mixed p~, which
    favours tokens the teacher likes and so overstates the reward.
    """
    m = rollout.response_mask
    last = rollout.response_ids.gather(-1, (rollout.lengths - 1).clamp(min=0)[:, None]).squeeze(-1)
    sums = {"tokens": float(m.sum()), "rows": float(m.shape[0]), "rkl": float(rollout.reverse_kl[m].sum()),
            "weight": float(rollout.importance_weight[m].sum()), "ended": float((last == eos_id).sum())}
    if loop is not None:
        sums = loop.sum_logs(sums)
    n, rows = max(sums["tokens"], 1.0), max(sums["rows"], 1.0)
    return {"reward": -sums["rkl"] / n, "response_length": sums["tokens"] / rows,
            "importance_weight": sums["weight"] / n, "ended_with_eos": sums["ended"] / rows}


# ----------------------------------------------------------------------------------------------
# Data: prompts for rollouts, rows for the LM loss


def lm_examples_of(rows: Rows, tok: Any, cfg: MiniLLMConfig) -> list[dict[str, Any]]:
    """Rows with a plain-text field: LM loss on every token (EOS appended). Prompt/response rows: the answer's tokens."""
    field = cfg.minillm.lm_text_field
    enc = Encoder(tok, cfg.data)
    out = []
    for i, (row, where) in enumerate(zip(rows.items, rows.locations)):
        if field in row:
            text = row[field]
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: field '{field}' (minillm.lm_text_field) must be non-empty text")
            ids = tok(text, add_special_tokens=False).input_ids
            ids = ([tok.bos_token_id] if enc.add_bos else []) + ids + [tok.eos_token_id]
            ids = ids[: cfg.data.max_length]
            out.append({"input_ids": ids, "labels": list(ids), "prompt_len": 0, "row_index": i})
        elif any(k in row for k in (cfg.data.prompt_field, cfg.data.messages_field)):
            out.append(enc.encode(row, where, i))
        else:
            raise DataError(f"{where}: an lm_data row needs a '{field}' field (plain text, minillm.lm_text_field) or "
                            f"prompt/response fields; the row has: {', '.join(map(str, row)) or 'nothing'}")
    return out


def _cycled(n_items: int, start: int, count: int, seed: int) -> list[int]:
    """Items start .. start+count-1 of an endless stream of seeded permutations (one per epoch).

    A function of (seed, position) only, so a resumed run draws exactly the batches the
    uninterrupted run would have drawn.
    """
    out, cache = [], {}
    for g in range(start, start + count):
        epoch, offset = divmod(g, n_items)
        if epoch not in cache:
            cache[epoch] = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
        out.append(cache[epoch][offset])
    return out


# ----------------------------------------------------------------------------------------------
# Training


def train(cfg: MiniLLMConfig, student: Any, teacher: Any, tok: Any, prompts: list[list[int]],
          lm_examples: list[dict[str, Any]] | None, out: Path) -> tuple[dict[str, Any], Any]:
    """Rollouts and updates until `minillm.max_steps`; checkpoints at rollout boundaries. Returns the
    training state and the trained student (plain, on this process's device).

    Under P processes each samples `rollout_batch_size` prompts of every rollout (the global
    rollout has P times as many) and makes its inner-epoch passes over its own rows, `batch_size`
    of them per optimizer step, as data-parallel PPO does. Each sampled row is seeded by its place
    in the global prompt stream, so P processes sample what one process with P times the rollout
    samples; with one minibatch per rollout they compute its step too.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    s = cfg.minillm
    loop = Loop(s.bf16, "minillm.bf16")
    P, rank, R = loop.world, loop.rank, s.rollout_batch_size
    pad_id, eos_id, vocab = tok.pad_token_id, tok.eos_token_id, len(tok)
    updates_per_rollout = s.inner_epochs * (R // s.batch_size)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.weight_decay)
    scheduler = get_scheduler(s.lr_scheduler, optimizer, num_warmup_steps=math.ceil(s.warmup_ratio * s.max_steps),
                              num_training_steps=s.max_steps)
    (wrapped,), (optimizer,), (scheduler,) = loop.prepare([student], [optimizer], [scheduler])
    student = loop.unwrap(wrapped)  # samples outside DDP: processes draw different numbers of tokens
    device = loop.device  # the teacher stays where it was placed (teacher.device / device_map)
    loop.seed(cfg.seed)
    state: dict[str, Any] = {"global_step": 0, "max_steps": s.max_steps, "log_history": [], "rollout_seconds": 0.0,
                             "update_seconds": 0.0, "sampled_tokens": 0}
    resume = resume_step(out, s.resume, "minillm.resume")
    if resume is not None:
        print(f"[kdflow] resuming from {out / f'checkpoint-{resume}'}")
        state = loop.load(out / f"checkpoint-{resume}", "minillm.resume", reseed=cfg.seed + resume)
    step = state["global_step"]
    last_saved = step
    bar = tqdm(total=s.max_steps, initial=step, desc="minillm", disable=not loop.is_main)
    wrapped.train()
    while step < s.max_steps:
        k = step // updates_per_rollout  # rollout index; checkpoints sit on rollout boundaries
        t0 = time.time()
        first = k * R * P  # this rollout's place in the global stream of prompts
        rows = _cycled(len(prompts), first, R * P, cfg.seed)
        ids, mask = left_pad([prompts[i] for i in rows[rank * R:(rank + 1) * R]], pad_id,
                             width=max(len(prompts[i]) for i in rows))
        gens = [torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + first + rank * R + i)
                for i in range(R)]
        rollout = mixed_sample(student, teacher, ids.to(device), mask.to(device), max_new_tokens=s.max_new_tokens,
                               mix_alpha=s.mix_alpha, eos_id=eos_id, pad_id=pad_id, vocab_size=vocab,
                               temperature=s.sample_temperature, generator=gens, keep_teacher_logprobs=True, bf16=s.bf16)
        wrapped.train()
        # Rewards and returns are fixed per rollout (computed from the sampling-time log-probs).
        returns = length_normalized_returns(rollout.teacher_logp - rollout.student_logp, rollout.response_mask)
        rstats = rollout_statistics(rollout, eos_id, loop)
        state["rollout_seconds"] += time.time() - t0
        state["sampled_tokens"] += int(loop.step_counts({"n": int(rollout.response_mask.sum())})["n"])
        t1 = time.time()
        for epoch in range(s.inner_epochs):
            order = torch.randperm(R, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + k * 101 + epoch)).tolist()
            for b in range(0, R, s.batch_size):
                if step >= s.max_steps:
                    break
                mb_rows = order[b:b + s.batch_size]
                lm = None
                if lm_examples:
                    lm = [lm_examples[i] for i in _cycled(len(lm_examples), (step * P + rank) * s.lm_batch_size,
                                                          s.lm_batch_size, cfg.seed + 1)]
                optimizer.zero_grad(set_to_none=True)
                logs = loop.sum_logs(step_gradients(wrapped, rollout.select(mb_rows), returns[mb_rows], lm, s, pad_id,
                                                    vocab, loop))
                norm = loop.clip_grad_norm(wrapped, s.max_grad_norm)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                if step % s.logging_steps == 0 or step == 1 or step == s.max_steps:
                    entry = {"step": step, "rollout": k, "inner_epoch": epoch, **{key: round(v, 6) for key, v in logs.items()},
                             "grad_norm": norm, "learning_rate": scheduler.get_last_lr()[0],
                             **{f"rollout_{key}": round(v, 6) for key, v in rstats.items()}}
                    state["log_history"].append(entry)
                    bar.set_postfix(loss=f"{logs['loss']:.3f}", reward=f"{rstats['reward']:.3f}",
                                    len=f"{rstats['response_length']:.1f}")
        state["update_seconds"] += time.time() - t1
        state["global_step"] = step
        if step >= s.max_steps or (s.save_steps > 0 and step // s.save_steps > last_saved // s.save_steps):
            loop.save(out / f"checkpoint-{step}", state)
            prune(out, max(s.save_total_limit, 1))
            last_saved = step
    bar.close()
    return state, loop.release(wrapped)


# ----------------------------------------------------------------------------------------------
# The run


def _eval_cached(out: Path, name: str, model: Any, tok: Any, rows: Rows, cfg: MiniLLMConfig) -> EvalResult:
    """Evaluate, reusing a result saved by an earlier (interrupted) run with the same settings."""
    # the settings that identify the run's checkpoints (not where the folder is: a moved run reuses its results)
    return evaluate_cached(out / "eval" / f"{name}.json", {"run": run_settings(cfg)}, model, tok, rows, cfg.data,
                           cfg.eval, name)


def _check_settings(cfg: MiniLLMConfig) -> None:
    s = cfg.minillm
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: rollouts need prompts (a .jsonl/.csv/.parquet file or hf:<id>@<split>)")
    if s.rollout_batch_size % s.batch_size:
        raise ConfigError(f"minillm.batch_size={s.batch_size} must divide minillm.rollout_batch_size={s.rollout_batch_size}")
    if s.lm_coef > 0 and not s.lm_data:
        raise ConfigError("minillm.lm_coef > 0 needs minillm.lm_data (rows of plain text or prompt/response pairs)")


def run_minillm(cfg: MiniLLMConfig) -> dict[str, Any]:
    _check_settings(cfg)
    t_start = time.time()
    # Read every data file first: a bad row should stop the run before minutes of model loading.
    train_rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows) if cfg.data.test else None
    val_rows = read_rows(cfg.data.validation, "data.validation").head(cfg.data.max_eval_rows) if cfg.data.validation else None
    lm_rows = read_rows(cfg.minillm.lm_data, "minillm.lm_data") if cfg.minillm.lm_data and cfg.minillm.lm_coef > 0 else None
    if not cfg.teacher.name:
        raise ConfigError("teacher.name is not set: MiniLLM needs the teacher at every sampled token")
    check_student(cfg.student, cfg.teacher)
    check_teacher_settings(cfg.teacher)
    out = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.minillm.num_threads, resume=cfg.minillm.resume,
                    resume_key="minillm.resume")

    ready = get_teacher(cfg.teacher, cfg.data, train_rows)
    cfg = dataclasses.replace(cfg, teacher=ready.spec)
    teacher_tok = ready.tokenizer
    uses_own_tok = cfg.student.init == "pretrained" or (cfg.student.init == "config" and cfg.student.name)
    tok = load_tokenizer(cfg.student) if uses_own_tok else teacher_tok
    require_same_tokenizer(teacher_tok, tok, cfg.teacher.name, cfg.student.name or cfg.student.init)
    prompts = prompts_of(train_rows, tok, cfg.data)
    limit = cfg.data.max_length - cfg.data.min_response_tokens
    too_long = [i for i, p in enumerate(prompts) if len(p) > limit]
    if too_long:
        raise DataError(f"{train_rows.locations[too_long[0]]}: the prompt is {len(prompts[too_long[0]])} tokens, more than "
                        f"data.max_length - data.min_response_tokens = {limit}; raise data.max_length or shorten it")
    lm_examples = lm_examples_of(lm_rows, tok, cfg) if lm_rows is not None else None

    teacher = ready.model()
    teacher_check = check_teacher(cfg.teacher, lambda: (teacher, teacher_tok), val_rows, cfg.data, cfg.eval)
    student = place(build_student(cfg.student, teacher, cfg.teacher), cfg.student, "student")
    total, _ = count_parameters(student)
    print(f"[kdflow] minillm: student {total / 1e6:.1f}M params, teacher {count_parameters(teacher)[0] / 1e6:.1f}M, "
          f"{len(prompts)} prompts, mix_alpha={cfg.minillm.mix_alpha}")
    results: dict[str, EvalResult] = {}
    if test_rows is not None and cfg.evaluate_before:
        results["student (before)"] = _eval_cached(out, "student_before", student, tok, test_rows, cfg)
    student = apply_lora(student, cfg.student.lora)

    t_train = time.time()
    state, student = train(cfg, student, teacher, tok, prompts, lm_examples, out)
    train_seconds = time.time() - t_train

    def save_student() -> None:
        save_model(student, tok, out / "student")
        if cfg.student.lora.enabled:
            student.save_pretrained(out / "student_adapter")

    processes.on_main(save_student)
    if test_rows is not None:
        results["student (after)"] = _eval_cached(out, "student_after", student, tok, test_rows, cfg)
        if cfg.evaluate_teacher:
            results = {"teacher": _eval_cached(out, "teacher", teacher, teacher_tok, test_rows, cfg), **results}

    history = state["log_history"]
    metrics = {
        "method": "minillm",
        "train": {"steps": state["global_step"], "seconds_this_session": train_seconds, "processes": processes.world(),
                  "rollout_seconds": state["rollout_seconds"], "update_seconds": state["update_seconds"],
                  "sampled_tokens": state["sampled_tokens"],
                  "sampled_tokens_per_second": state["sampled_tokens"] / max(state["rollout_seconds"], 1e-9)},
        "last_rollout": {k[len("rollout_"):]: v for k, v in (history[-1] if history else {}).items() if k.startswith("rollout_")},
        "eval": {k: v.metrics for k, v in results.items()},
        "teacher": cfg.teacher.name,
        "teacher_check": teacher_check,
        "student_parameters": total,
        "seconds_total": time.time() - t_start,
    }

    def write_outputs() -> None:
        write_json(out / "metrics.json", metrics)
        write_json(out / "log_history.json", history)
        curves = {k: [(h["step"], h[k]) for h in history if k in h] for k in ("loss", "single_step", "pg", "lm")}
        curves = {k: v for k, v in curves.items() if v}
        rewards = {"rollout reward (mean -KL(q||p) per token)": [(h["step"], h["rollout_reward"]) for h in history],
                   "rollout rows ending with EOS (fraction)": [(h["step"], h["rollout_ended_with_eos"]) for h in history]}
        if history:
            plot_curves(out / "loss_curve.png", curves, "kdflow minillm: loss terms")
            plot_curves(out / "reward_curve.png", rewards, "kdflow minillm: rollouts", ylabel="reward / fraction")
        write_atomic(out / "report.md", _report(cfg, metrics, results, bool(history)))

    processes.on_main(write_outputs)
    print()
    print(format_table({k: v.metrics for k, v in results.items()}))
    print(f"\n[kdflow] run folder: {out}  (report.md, metrics.json, loss_curve.png, reward_curve.png, student/)")
    return metrics


def _report(cfg: MiniLLMConfig, metrics: dict[str, Any], results: dict[str, EvalResult], curves: bool) -> str:
    s, t = cfg.minillm, metrics["train"]
    student = (f"`{cfg.student.name}`" if cfg.student.init == "pretrained" else f"init `{cfg.student.init}`")
    lines = ["# kdflow minillm", "",
             f"- teacher: `{cfg.teacher.name}`; student: {student} — {metrics['student_parameters'] / 1e6:.1f}M parameters"
             f"{' + LoRA' if cfg.student.lora.enabled else ''}",
             f"- sampling: p~ = {s.mix_alpha}·p + {1 - s.mix_alpha:g}·q, temperature {s.sample_temperature}, "
             f"at most {s.max_new_tokens} tokens, {s.rollout_batch_size} prompts per rollout from `{cfg.data.train}`",
             f"- loss per response token: {s.single_step_weight}·w·RKL(q‖p) (single step{', importance-weighted' if s.single_step_importance else ''})"
             f" + {s.pg_weight}·PPO-clipped({s.clip_ratio}) policy gradient with length-normalised returns"
             + (f" + {s.lm_coef}·LM loss on `{s.lm_data}`" if s.lm_coef > 0 else ""),
             f"- optimisation: {t['steps']} steps (batch {s.batch_size}, {s.inner_epochs} inner epochs per rollout), "
             f"lr {s.learning_rate} ({s.lr_scheduler}); rollouts {t['rollout_seconds']:.0f} s "
             f"({t['sampled_tokens_per_second']:.1f} sampled tokens/s), updates {t['update_seconds']:.0f} s",
             "", f"## Test split (`{cfg.data.test}`, first {cfg.eval.max_rows} rows)", "",
             format_table({k: v.metrics for k, v in results.items()}) or "(no test split)", ""]
    sampled = {k: v.metrics for k, v in results.items() if "sampled_rougeL" in v.metrics}
    if sampled:
        lines += [f"Sampled generations (seeds {cfg.eval.sample_seeds}, temperature {cfg.eval.sample_temperature}), "
                  "mean ± std over seeds:", "", "| model | Rouge-L | length | distinct-1 | distinct-2 |", "|---|---:|---:|---:|---:|"]
        for name, m in sampled.items():
            cell = lambda k: f"{m[k]:.4f} ± {m.get(k + '_std', 0.0):.4f}"  # noqa: E731
            lines.append(f"| {name} | {cell('sampled_rougeL')} | {m['sampled_length']:.1f} | "
                         f"{m['sampled_distinct_1']:.3f} | {m['sampled_distinct_2']:.3f} |")
        lines.append("")
    if curves:
        lines += ["## Curves", "", "![loss terms](loss_curve.png)", "", "![rollout reward](reward_curve.png)", ""]
    lines += differences_markdown(results, [("student (after)", "student (before)"), ("student (after)", "teacher")],
                                  cfg.eval)
    for name, res in results.items():
        if res.examples:
            lines += examples_markdown(f"{name} (greedy)", res.examples)
    return "\n".join(lines)
