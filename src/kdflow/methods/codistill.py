"""`kdflow codistill`: N >= 2 models learn from each other on the same batches (methods.md §4).

For peer i, with every other peer j as a teacher whose distribution is a stop-gradient target:

    soft: L_i = kd_weight * tau^2 * mean_j D(sg(p_j)_tau || p_i_tau) + (1 - kd_weight) * CE(y, p_i)
    hard: L_i = kd_weight *         mean_j CE(argmax sg(p_j), p_i)    + (1 - kd_weight) * CE(y, p_i)
    L_total = sum_i L_i

Peers share no parameters and every target is detached, so one backward of L_total gives each
peer exactly the gradient of its own L_i; each term is normalised by its token count over the
whole optimizer step. Peers with different tokenizers exchange top-k distributions carried
across by `kdflow.align` (methods.md §6). Trainer holds one model, so this file has its own loop:
every peer has its own optimizer, scheduler, learning rate, and full or LoRA training, all on one
`kdflow.loop.Loop` (one accelerate.Accelerator; several processes with data parallelism), with one
checkpoint for all peers (`output_dir/peers/checkpoint-N`); the same command resumes them from it.
Every peer is evaluated before and after training, optionally beside the same peer trained alone
(`baseline_alone`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdflow import processes
from kdflow.config import CoDistillConfig, PeerSpec, to_dict
from kdflow.data import Rows, collate, encode_rows, read_rows, row_turns
from kdflow.errors import ConfigError, KDFlowError
from kdflow.evaluate import EvalResult, answer_nll, evaluate_cached, format_table
from kdflow.loop import Loop, adamw, prune, resume_step
from kdflow.losses import (DenseTeacher, HeadLossSpec, TopKTargets, get_divergence, head_losses,
                           shifted_masks)
from kdflow.models import (apply_lora, build_student, check_student, count_parameters, load_model, load_tokenizer,
                           model_identity, place, run_device, save_model, selected_hidden, tokenizer_fingerprint,
                           use_bf16)
from kdflow.report import examples_markdown, plot_curves, write_atomic, write_json
from kdflow.training import setup_run, step_normalized, step_rows

# ----------------------------------------------------------------------------------------------
# Peers


@dataclass
class Peer:
    """One model being trained, with everything it owns."""

    spec: PeerSpec
    seed: int
    tok: Any
    model: Any  # the plain model (generation, evaluation, saving)
    examples: list[dict[str, Any]]  # the training rows in this peer's tokenization
    group: int  # peers of one group tokenize every row into identical ids
    lr: float = 0.0
    optimizer: Any = None
    scheduler: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    val_examples: list[dict[str, Any]] | None = None
    bridges: dict[str, "Bridge"] = field(default_factory=dict)  # by sender name, for senders of another group
    wrapped: Any = None  # while training: the model as `Loop.prepare` returned it (DDP, FSDP), for the forwards

    name = property(lambda self: self.spec.name)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class PeerOutputs:
    """A peer's forward pass on one micro-batch, at the positions its losses use."""

    hidden: torch.Tensor  # [n, H] final hidden states (or logits, for heads that are not plain)
    head: torch.nn.Module
    ce_targets: torch.Tensor  # [n] next token, -100 outside the CE term
    kd_rows: torch.Tensor  # [n] bool, rows in the KD term
    rows: list[int]  # the training rows of the micro-batch, in batch order


@dataclass
class Bridge:
    """How a sender's distribution reaches a receiver whose tokenizer (or template) differs."""

    cross: Any  # kdflow.align.targets.CrossTokenizer(sender tokenizer -> receiver tokenizer)
    turns: list[Any]  # every training row as chat turns (the answer text is what gets aligned)
    valid: list[int]  # per training row: receiver KD rows this sender's distribution covers


def make_bridge(sender: Peer, receiver: Peer, turns: list[Any], cfg: CoDistillConfig) -> Bridge:
    """MinED vocabulary map, position pairing and projection (methods.md §6, `kdflow.align`)."""
    from kdflow.align.targets import CrossTokenizer

    if cfg.kd.token_scope != "response":
        raise ConfigError(f"kd.token_scope={cfg.kd.token_scope}: peers '{sender.name}' and '{receiver.name}' tokenize the "
                          "data differently and only the answer text is shared between them; use kd.token_scope=response")
    cross = CrossTokenizer(sender.tok, receiver.tok, cfg.data, cfg.align)
    valid = []
    for r, t in enumerate(turns):  # which receiver rows the sender covers depends on the tokenizations only
        m = _answer_len(sender.examples[r])
        empty = cross.carry_rows(t, receiver.examples[r], sender.examples[r], torch.zeros((m, 1), dtype=torch.long),
                                 torch.zeros((m, 1)))
        valid.append(int(empty.valid.sum()))
    total = sum(_answer_len(e) for e in receiver.examples)
    print(f"[kdflow] {sender.name} -> {receiver.name}: other tokenizer; {sum(valid)} of {total} answer positions take "
          f"part (positions by {cfg.align.sequence}, unpaired: {cfg.align.unpaired}, top {cfg.align.top_k})")
    return Bridge(cross, turns, valid)


def _answer_len(example: dict[str, Any]) -> int:
    return len(example["input_ids"]) - example["prompt_len"]


def peer_targets(sender: Peer, receiver: Peer, out: PeerOutputs, spec: HeadLossSpec, top_k: int) -> DenseTeacher | TopKTargets:
    """The sender's next-token distribution at the receiver's KD rows, as a stop-gradient target.

    Same tokenization: the sender's own detached hidden states and its head (applied under
    no_grad) at the same rows. Otherwise the sender's top-k at its own answer positions, computed
    from the same forward pass, is carried into the receiver's positions and vocabulary by
    `kdflow.align` (hard variant: at temperature 1, the argmax of the carried distribution).
    """
    if sender.group == receiver.group:
        return DenseTeacher(out.hidden[out.kd_rows].detach(), out.head)
    from kdflow.teacher_cache import topk_from_logits

    bridge = receiver.bridges[sender.name]
    with torch.no_grad():
        logits = out.head(out.hidden[out.kd_rows].detach()).float()[:, :len(sender.tok)].cpu()
        ids, logp, tail = topk_from_logits(logits, top_k, spec.temperature if spec.kind == "soft" else 1.0)
    parts, start = [], 0
    for r in out.rows:
        m = _answer_len(sender.examples[r])
        sl = slice(start, start + m)
        parts.append(bridge.cross.carry_rows(bridge.turns[r], receiver.examples[r], sender.examples[r],
                                             ids[sl], logp[sl], tail[sl]))
        start += m
    if start != ids.shape[0]:
        raise AssertionError(f"{sender.name}: {ids.shape[0]} KD rows for {start} answer tokens")  # a bug, not a user error
    dev = out.hidden.device
    return TopKTargets(*(torch.cat([getattr(t, k) for t in parts]).to(dev) for k in ("ids", "logp", "valid", "tail_logp")))


def pair_count(sender: Peer, receiver: Peer, rows: list[int], kd_mask: torch.Tensor) -> int:
    """Tokens of one micro-batch in the receiver's KD term for this sender: all of its KD rows when
    the tokenization is shared, else the rows the alignment covers."""
    if sender.group == receiver.group:
        return int(kd_mask.sum())
    return sum(receiver.bridges[sender.name].valid[r] for r in rows)


def term_weights(peers: list[Peer], kd_weight: float) -> dict[str, float]:
    if kd_weight == 0.0 or len(peers) < 2:
        return {"ce": 1.0}
    return {"ce": 1.0 - kd_weight, **{f"kd:{p.name}": kd_weight / (len(peers) - 1) for p in peers}}


# ----------------------------------------------------------------------------------------------
# One optimizer step's gradients


def _batches(peers: list[Peer], rows: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """One collated batch per tokenization group."""
    out = {}
    for p in peers:
        if p.group not in out:
            out[p.group] = collate([p.examples[r] for r in rows], p.tok.pad_token_id)
    return out


def step_counts(peers: list[Peer], micro_batches: list[list[int]], token_scope: str) -> list[dict[str, int]]:
    """Each peer's token count per loss term over every micro-batch of the step."""
    counts: list[dict[str, int]] = [{} for _ in peers]
    for rows in micro_batches:
        batches = _batches(peers, rows)
        for i, p in enumerate(peers):
            b = batches[p.group]
            ce_mask, kd_mask = shifted_masks(b["labels"], b["attention_mask"], token_scope)
            c = counts[i]
            c["ce"] = c.get("ce", 0) + int(ce_mask.sum())
            for q in peers:
                if q is not p:
                    c[f"kd:{q.name}"] = c.get(f"kd:{q.name}", 0) + pair_count(q, p, rows, kd_mask)
    return counts


def forward_peer(p: Peer, batch: dict[str, torch.Tensor], rows: list[int], token_scope: str, device: torch.device) -> PeerOutputs:
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    ce_mask, kd_mask = shifted_masks(labels, attn, token_scope)
    positions = ce_mask | kd_mask
    hidden, head = selected_hidden(p.wrapped if p.wrapped is not None else p.model, ids, attn, positions)
    ce_targets = labels[:, 1:][positions].masked_fill(~ce_mask[positions], -100)
    return PeerOutputs(hidden, head, ce_targets, kd_mask[positions], rows)


def peer_loss_sums(i: int, peers: list[Peer], outs: list[PeerOutputs], spec: HeadLossSpec,
                   top_k: int = 64) -> dict[str, tuple[torch.Tensor, int]]:
    """Peer i's (sum, count) per term: "ce", and "kd:<j>" against every other peer j."""
    me = outs[i]
    own = copy.copy(spec)
    own.vocab_size = len(peers[i].tok)  # padded heads: score and compare real tokens only
    if spec.kind == "none":
        return head_losses(me.hidden, me.head, me.ce_targets, me.kd_rows, None, own)
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    for j, q in [(j, q) for j, q in enumerate(peers) if j != i]:
        ce_targets = me.ce_targets if "ce" not in sums else torch.full_like(me.ce_targets, -100)  # CE counted once
        r = head_losses(me.hidden, me.head, ce_targets, me.kd_rows, peer_targets(q, peers[i], outs[j], spec, top_k), own)
        sums.setdefault("ce", r["ce"])
        sums[f"kd:{q.name}"] = r["kd"]
    return sums


def loss_spec(cfg: CoDistillConfig, peers: list[Peer], kd_weight: float) -> HeadLossSpec:
    kd = cfg.kd
    kind = kd.variant if any(k.startswith("kd:") for k in term_weights(peers, kd_weight)) else "none"
    return HeadLossSpec(kind=kind, divergence=get_divergence(kd.divergence, kd.jsd_beta, kd.skew_alpha),
                        temperature=kd.temperature, sparse_mode=kd.sparse_mode, chunk_tokens=kd.chunk_tokens)


def micro_batch_losses(peers: list[Peer], rows: list[int], counts: list[dict[str, int]], cfg: CoDistillConfig,
                       kd_weight: float, device: torch.device) -> list[tuple[torch.Tensor, dict[str, float]]]:
    """Each peer's share L_i of the step loss from one micro-batch, and its normalised terms.

    `counts` are the step-level token counts (`step_counts`); every peer runs forward once and
    its outputs serve as its own predictions and, detached, as the other peers' targets.
    """
    spec = loss_spec(cfg, peers, kd_weight)
    weights = term_weights(peers, kd_weight)
    batches = _batches(peers, rows)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16(cfg.train.bf16, "train.bf16", device)):
        outs = [forward_peer(p, batches[p.group], rows, cfg.kd.token_scope, device) for p in peers]
        return [step_normalized(peer_loss_sums(i, peers, outs, spec, cfg.align.top_k), counts[i], weights)
                for i in range(len(peers))]


def accumulate_step(peers: list[Peer], micro_batches: list[list[int]], cfg: CoDistillConfig, kd_weight: float,
                    device: torch.device, loop: Loop | None = None) -> list[dict[str, float]]:
    """Backward of L_total = sum_i L_i over the micro-batches of one step (gradients add up in
    `.grad`). With `loop`, `micro_batches` are this process's share and the token counts cover every
    process. Returns each peer's normalised terms for logging (this process's share of them): loss,
    ce, kd (mean over peers)."""
    import contextlib

    counts = step_counts(peers, micro_batches, cfg.kd.token_scope)
    if loop is not None:
        counts = [loop.step_counts(c) for c in counts]
    logs = [{"loss": 0.0, "ce": 0.0} for _ in peers]
    for a, rows in enumerate(micro_batches):
        with loop.micro_batch(last=a == len(micro_batches) - 1) if loop is not None else contextlib.nullcontext():
            losses = micro_batch_losses(peers, rows, counts, cfg, kd_weight, device)
            for lg, (loss_i, parts) in zip(logs, losses):
                lg["loss"] += float(loss_i.detach())
                lg["ce"] += parts["ce"]
                kd_parts = [v for k, v in parts.items() if k.startswith("kd:")]
                if kd_parts:
                    lg["kd"] = lg.get("kd", 0.0) + sum(kd_parts) / len(kd_parts)
            total = sum(loss_i for loss_i, _ in losses)
            if not torch.isfinite(total.detach()):
                bad = [p.name for p, (loss_i, _) in zip(peers, losses) if not torch.isfinite(loss_i.detach())]
                raise KDFlowError(f"the training loss of peer(s) {', '.join(bad)} became non-finite; lower their "
                                  "learning_rate, check the data, or disable train.bf16")
            # peers share no parameters and targets are detached: each gets dL_i/dθ_i
            if loop is not None:
                loop.backward(total)
            else:
                total.backward()
    return logs


# ----------------------------------------------------------------------------------------------
# The loop


def total_steps(cfg: CoDistillConfig, n_rows: int, world: int = 1) -> int:
    """Optimizer steps of the run; a step takes batch_size * grad_accum rows on each of `world` processes."""
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_rows / (cfg.train.batch_size * cfg.train.grad_accum * world))
    return max(1, math.ceil(cfg.train.num_epochs * per_epoch))


def _make_optimizer(p: Peer, cfg: CoDistillConfig, steps: int) -> None:
    from transformers import get_scheduler

    t = cfg.train
    wd = p.spec.weight_decay if p.spec.weight_decay is not None else t.weight_decay
    params = p.trainable()
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": wd},  # no decay on norms and biases
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    p.optimizer = adamw([g for g in groups if g["params"]], lr=p.lr, betas=(t.adam_beta1, t.adam_beta2))
    p.scheduler = get_scheduler(t.lr_scheduler, p.optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * steps),
                                num_training_steps=steps)


def _start_step(loop: Loop, peers: list[Peer], folder: Path, cfg: CoDistillConfig) -> tuple[int, float]:
    """Load the newest checkpoint (or the one train.resume names): (its step, the training seconds
    spent before it)."""
    step = resume_step(folder, cfg.train.resume)
    if step is None:
        return 0, 0.0
    state = loop.load(folder / f"checkpoint-{step}", "train.resume", reseed=cfg.seed + step)
    for p in peers:
        p.history = state["log_history"][p.name]
    print(f"[kdflow] resuming {', '.join(p.name for p in peers)} from checkpoint-{step}")
    return step, state.get("seconds", 0.0)


def train_peers(peers: list[Peer], cfg: CoDistillConfig, folder: Path, kd_weight: float, val_rows: Rows | None,
                label: str, writer: Any = None) -> dict[str, Any]:
    """Train `peers` together (or one peer alone with kd_weight=0) on one `Loop`: every peer with its
    own optimizer and scheduler, all in one checkpoint, folder/checkpoint-N. Under P processes a step
    takes batch_size * grad_accum rows on each."""
    t = cfg.train
    loop = Loop(t.bf16)
    n_rows = len(peers[0].examples)
    steps = total_steps(cfg, n_rows, loop.world)
    for p in peers:
        _make_optimizer(p, cfg, steps)
    wrapped, optimizers, schedulers = loop.prepare([p.model for p in peers], [p.optimizer for p in peers],
                                                   [p.scheduler for p in peers])
    for p, w, o, sch in zip(peers, wrapped, optimizers, schedulers):
        p.wrapped, p.optimizer, p.scheduler, p.model = w, o, sch, loop.unwrap(w)
        p.wrapped.train()
    loop.seed(cfg.seed)  # dropout and data see the same RNG in the co-trained and alone runs
    start, seconds_before = _start_step(loop, peers, folder, cfg)
    per_step = t.batch_size * t.grad_accum * loop.world
    t0, cpu0 = time.time(), time.process_time()
    tokens = 0
    pending: list[list[dict[str, float]]] = []
    for step in range(start, steps):
        rows = step_rows(n_rows, cfg.seed, step, per_step)
        tokens += sum(len(peers[0].examples[r]["input_ids"]) for r in rows)
        for p in peers:
            p.optimizer.zero_grad(set_to_none=True)
        logs = accumulate_step(peers, loop.micro_batches(rows, t.batch_size, t.grad_accum), cfg, kd_weight, loop.device,
                               loop)
        logs = [loop.sum_logs(lg) for lg in logs]
        for p, lg in zip(peers, logs):
            if t.max_grad_norm > 0:
                lg["grad_norm"] = loop.clip_grad_norm(p.wrapped, t.max_grad_norm)
            lg["learning_rate"] = p.scheduler.get_last_lr()[0]
            p.optimizer.step()
            p.scheduler.step()
        pending.append(logs)
        done = step + 1
        if done % max(t.logging_steps, 1) == 0 or done == steps or step == start:
            line = []
            for i, p in enumerate(peers):
                entry = {"step": done, **{k: sum(lg[i][k] for lg in pending) / len(pending) for k in pending[0][i]}}
                p.history.append(entry)
                line.append(f"{p.name}: loss {entry['loss']:.4f} (ce {entry['ce']:.4f}"
                            + (f", kd {entry['kd']:.4f})" if "kd" in entry else ")"))
                if writer is not None:
                    for k, v in entry.items():
                        if k != "step":
                            writer.add_scalar(f"{label}/{p.name}/{k}", v, done)
            pending = []
            print(f"[kdflow] {label} step {done}/{steps}  " + "  ".join(line), flush=True)
        if val_rows is not None and t.eval_steps > 0 and (done % t.eval_steps == 0 or done == steps):
            for p in peers:
                if p.val_examples is None:
                    p.val_examples = encode_rows(val_rows, p.tok, cfg.data)
                nll = answer_nll(p.model, p.val_examples, p.tok.pad_token_id, cfg.eval.batch_size)["nll"]
                p.wrapped.train()
                p.history.append({"step": done, "eval_loss": nll})
                if writer is not None:
                    writer.add_scalar(f"{label}/{p.name}/eval_loss", nll, done)
        if (t.save_steps > 0 and done % t.save_steps == 0) or done == steps:
            loop.save(folder / f"checkpoint-{done}", {
                "step": done, "max_steps": steps, "peers": [p.name for p in peers],
                "log_history": {p.name: p.history for p in peers}, "seconds": seconds_before + time.time() - t0})
            prune(folder, t.save_total_limit, protect={done})
    seconds = time.time() - t0
    cpu = loop.sum_logs({"cpu": time.process_time() - cpu0})["cpu"]  # of every process, this session
    for p in peers:
        p.model = loop.release(p.wrapped)
        p.model.eval()
        p.wrapped = None
    return {"steps": steps, "start_step": start, "seconds": seconds_before + seconds, "processes": loop.world,
            "cpu_seconds_this_session": cpu,
            "tokens_per_second": tokens / seconds if seconds > 0 and tokens else None}


# ----------------------------------------------------------------------------------------------
# Building peers


def _base_of(cfg: CoDistillConfig, spec: PeerSpec) -> Any:
    return spec.base if spec.base is not None else cfg.base


def _peer_tokenizer(cfg: CoDistillConfig, spec: PeerSpec) -> Any:
    m = spec.model
    if m.init == "pretrained" or (m.init == "config" and m.name):
        return load_tokenizer(m)
    if not _base_of(cfg, spec).name:
        raise ConfigError(f"peer '{spec.name}': init={m.init} needs base.name (or peers[].base.name)")
    return load_tokenizer(_base_of(cfg, spec))


def build_peer(cfg: CoDistillConfig, k: int, tok: Any, examples: list[dict[str, Any]], group: int,
               bases: dict[str, Any], device: torch.device) -> Peer:
    """Peer k with its initial weights; the same call always gives the same weights. `bases` keeps
    the models that pruned or config-initialised peers derive from, loaded once each."""
    import transformers

    spec = cfg.peers[k]
    seed = spec.seed if spec.seed is not None else cfg.seed + k
    transformers.set_seed(seed)
    m = spec.model
    base = None
    if m.init == "prune_teacher" or (m.init == "config" and not m.name):
        key = model_identity(_base_of(cfg, spec))
        if key not in bases:
            bases[key] = load_model(_base_of(cfg, spec)).eval()
        base = bases[key]
    model = place(build_student(m, base, _base_of(cfg, spec)), role=f"peer {spec.name}", device=device)
    lr = spec.learning_rate if spec.learning_rate is not None else cfg.train.learning_rate
    return Peer(spec, seed, tok, model, examples, group, lr)


def _prepare_for_training(p: Peer, cfg: CoDistillConfig) -> None:
    import transformers

    transformers.set_seed(p.seed)
    p.model = apply_lora(p.model, p.spec.model.lora)
    if cfg.train.gradient_checkpointing:
        p.model.config.use_cache = False
        p.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if p.spec.model.lora.enabled:
            p.model.enable_input_require_grads()


def _save_final(p: Peer, folder: Path) -> None:
    save_model(p.model, p.tok, folder / "model")  # a plain model (LoRA merged into a copy)
    if p.spec.model.lora.enabled:
        p.model.save_pretrained(folder / "adapter")


# ----------------------------------------------------------------------------------------------
# Evaluation, cached across interruptions


def _eval_cached(out: Path, file: str, key: dict[str, Any], p: Peer, rows: Rows, cfg: CoDistillConfig, label: str) -> EvalResult:
    return evaluate_cached(out / "eval" / f"{file}.json", key, p.model, p.tok, rows, cfg.data, cfg.eval, label)


def _peer_key(cfg: CoDistillConfig, p: Peer) -> dict[str, Any]:
    spec = to_dict(p.spec)
    spec.pop("learning_rate"), spec.pop("weight_decay")
    return {"peer": spec, "base": to_dict(_base_of(cfg, p.spec)), "seed": p.seed, "data_settings": to_dict(cfg.data)}


def _train_key(cfg: CoDistillConfig) -> dict[str, Any]:
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("resume", "num_threads", "report_to")}
    return {"train": train, "seed": cfg.seed}


# ----------------------------------------------------------------------------------------------
# The run


def _check(cfg: CoDistillConfig) -> None:
    import re

    if len(cfg.peers) < 2:
        raise ConfigError(f"codistill needs at least 2 peers under `peers`, got {len(cfg.peers)}")
    if cfg.kd.hidden_weight > 0:
        # kd.* is shared with `kdflow distill`; the hidden-state term is not wired between peers yet
        raise ConfigError("kd.hidden_weight applies to `kdflow distill` (method kd/hard_token); codistill does not "
                          "implement the hidden-state term between peers yet: set kd.hidden_weight=0")
    names = [p.name for p in cfg.peers]
    for i, n in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", n or ""):
            raise ConfigError(f"setting 'peers[{i}].name' must be a non-empty folder name (letters, digits, _ . -), got {n!r}")
        if names.count(n) > 1:
            raise ConfigError(f"peer names must be unique; repeated: {n}")
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give the training rows (a .jsonl/.csv/.parquet file or hf:<id>@<split>)")
    bad = [r for r in cfg.train.report_to if r not in ("tensorboard", "none")]
    if bad:
        raise ConfigError(f"train.report_to: codistill logs to tensorboard or none, not {', '.join(bad)}")


def _peers_device(cfg: CoDistillConfig) -> torch.device:
    """The one device every peer trains on (each peer's model.device: auto or cpu, all alike)."""
    wanted = {p.model.device for p in cfg.peers}
    if len(wanted) > 1:
        raise ConfigError(f"peers[].model.device differ ({', '.join(sorted(wanted))}): peers train together on one "
                          "device; give them all the same device")
    return run_device(cfg.peers[0].model, "peers[0].model")


def run_codistill(cfg: CoDistillConfig) -> dict[str, Any]:
    _check(cfg)
    t_start = time.time()
    # Read and encode every split before loading models: a bad row stops the run early.
    train_rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    val_rows = read_rows(cfg.data.validation, "data.validation").head(cfg.data.max_eval_rows) if cfg.data.validation else None
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows) if cfg.data.test else None
    for i, spec in enumerate(cfg.peers):
        check_student(spec.model, _base_of(cfg, spec), f"peers[{i}].model")
    _peers_device(cfg)
    out = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads, ignore=("baseline_alone",))
    toks = [_peer_tokenizer(cfg, s) for s in cfg.peers]
    encoded: list[list[dict[str, Any]]] = []
    groups: list[int] = []
    for tok in toks:
        ex = encode_rows(train_rows, tok, cfg.data)
        if test_rows is not None:
            encode_rows(test_rows.head(cfg.eval.max_rows), tok, cfg.data)
        same = [g for g, other in enumerate(encoded) if other == ex]
        groups.append(groups[same[0]] if same else len(encoded))
        encoded.append(ex)
    device = _peers_device(cfg)
    bases: dict[str, Any] = {}
    peers = [build_peer(cfg, k, toks[k], encoded[k], groups[k], bases, device) for k in range(len(cfg.peers))]
    if len(set(groups)) > 1:  # some peers tokenize the data differently: align them once, before training
        turns = [row_turns(r, w, cfg.data) for r, w in zip(train_rows.items, train_rows.locations)]
        for p in peers:
            p.bridges = {q.name: make_bridge(q, p, turns, cfg) for q in peers if q.group != p.group}

    results: dict[str, EvalResult] = {}
    for p in peers if test_rows is not None and cfg.evaluate_before else []:
        results[f"{p.name} (before)"] = _eval_cached(out, f"{p.name}_before", _peer_key(cfg, p), p, test_rows, cfg, f"{p.name} (before)")
    params = {p.name: count_parameters(p.model)[0] for p in peers}
    for p in peers:
        _prepare_for_training(p, cfg)
        total, trainable = count_parameters(p.model)
        print(f"[kdflow] peer {p.name}: {total / 1e6:.3f}M parameters, {trainable / 1e6:.2f}M trained, lr {p.lr:g}, "
              f"tokenizer {tokenizer_fingerprint(p.tok)}")
    writer = None
    if "tensorboard" in cfg.train.report_to and processes.is_main():
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package: only when asked for

        writer = SummaryWriter(str(out / "runs"))
    train_info = {"codistill": train_peers(peers, cfg, out / "peers", cfg.kd.kd_weight, val_rows, "codistill", writer)}
    run_key = {**_train_key(cfg), "kd": to_dict(cfg.kd), "peers": [to_dict(s) for s in cfg.peers],
               "base": to_dict(cfg.base)}
    for p in peers:
        processes.on_main(lambda: _save_final(p, out / "peers" / p.name))
        if test_rows is not None:
            results[f"{p.name} (co-trained)"] = _eval_cached(out, f"{p.name}_cotrained", {**_peer_key(cfg, p), "run": run_key},
                                                             p, test_rows, cfg, f"{p.name} (co-trained)")
    histories = {p.name: p.history for p in peers}
    alone_histories: dict[str, list] = {}
    peers.clear()  # free the co-trained models
    if cfg.baseline_alone:
        for k in range(len(cfg.peers)):
            p = build_peer(cfg, k, toks[k], encoded[k], groups[k], bases, device)
            _prepare_for_training(p, cfg)
            train_info[f"alone:{p.name}"] = train_peers([p], cfg, out / "alone" / p.name, 0.0, val_rows, f"alone {p.name}",
                                                        writer)
            processes.on_main(lambda: _save_final(p, out / "alone" / p.name))
            alone_histories[p.name] = p.history
            alone_key = {**_peer_key(cfg, p), "run": _train_key(cfg), "lr": p.lr, "wd": p.spec.weight_decay}
            if test_rows is not None:
                results[f"{p.name} (alone)"] = _eval_cached(out, f"{p.name}_alone", alone_key, p, test_rows, cfg, f"{p.name} (alone)")
    if writer is not None:
        writer.close()

    order = [f"{s.name} ({w})" for s in cfg.peers for w in ("before", "alone", "co-trained")]
    results = {k: results[k] for k in order if k in results}
    metrics = {
        "method": "codistill", "variant": cfg.kd.variant, "kd_weight": cfg.kd.kd_weight,
        "token_scope": cfg.kd.token_scope, "peers": {n: {"parameters": params[n]} for n in params},
        "train": train_info, "eval": {k: v.metrics for k, v in results.items()},
        "seconds_total": time.time() - t_start,
    }

    def write_outputs() -> None:
        write_json(out / "metrics.json", metrics)
        write_json(out / "log_history.json", {"codistill": histories, "alone": alone_histories})
        curves = _plot(out, histories, alone_histories)
        write_atomic(out / "report.md", _report(cfg, metrics, results, curves))

    processes.on_main(write_outputs)
    print()
    print(format_table({k: v.metrics for k, v in results.items()}))
    print(f"\n[kdflow] run folder: {out}  (report.md, metrics.json, loss curves, peers/<name>/model)")
    return metrics


def _series(history: list[dict[str, float]], key: str) -> list[tuple[float, float]]:
    return [(float(h["step"]), float(h[key])) for h in history if key in h]


def _plot(out: Path, histories: dict[str, list], alone: dict[str, list]) -> list[str]:
    """loss_curve.png: every peer's L_i; loss_<peer>.png: its CE and KD, next to the alone baseline."""
    plots = {"loss_curve.png": ("kdflow codistill: each peer's loss L_i",
                                {f"{n} loss": _series(h, "loss") for n, h in histories.items()})}
    for name, h in histories.items():
        a = alone.get(name, [])
        plots[f"loss_{name}.png"] = (f"peer {name}", {
            "co-trained CE": _series(h, "ce"), "co-trained KD (mean over peers)": _series(h, "kd"),
            "co-trained validation NLL": _series(h, "eval_loss"), "alone CE": _series(a, "ce"),
            "alone validation NLL": _series(a, "eval_loss")})
    for file, (title, series) in plots.items():
        if any(series.values()):
            plot_curves(out / file, {k: v for k, v in series.items() if v}, title)
    return [file for file, (_, series) in plots.items() if any(series.values())]


def _describe_peer(s: PeerSpec, cfg: CoDistillConfig, params: int) -> str:
    m = s.model
    how = {"pretrained": f"`{m.name}`", "config": f"random weights from {'`' + m.name + '`' if m.name else 'the base'} config",
           "prune_teacher": f"`{_base_of(cfg, s).name}` pruned to layers {m.keep_layers or 'every ' + str(m.keep_every)}"}[m.init]
    lr = s.learning_rate if s.learning_rate is not None else cfg.train.learning_rate
    return f"- **{s.name}**: {how} — {params / 1e6:.{1 if params >= 1e6 else 3}f}M parameters{', LoRA r=' + str(m.lora.r) if m.lora.enabled else ''}, lr {lr:g}"


def _report(cfg: CoDistillConfig, metrics: dict[str, Any], results: dict[str, EvalResult], curves: list[str]) -> str:
    kd = cfg.kd
    term = (f"τ² · mean_j {kd.divergence}(sg(p_j)_τ ‖ p_i,τ), τ = {kd.temperature}" if kd.variant == "soft"
            else "mean_j CE(argmax sg(p_j), p_i)")
    lines = ["# kdflow codistill", "", f"{len(cfg.peers)} peers trained together on the same batches:", ""]
    lines += [_describe_peer(s, cfg, metrics["peers"][s.name]["parameters"]) for s in cfg.peers]
    tr = metrics["train"]["codistill"]
    speed = f" ({tr['tokens_per_second']:.0f} batch tokens/s, all peers together)" if tr.get("tokens_per_second") else ""
    lines += ["", f"- loss of peer i: {kd.kd_weight:g} · {term} + {1 - kd.kd_weight:g} · CE; KD tokens: {kd.token_scope}",
              f"- training: {tr['steps']} steps × {cfg.train.batch_size * cfg.train.grad_accum} rows"
              f"{' (resumed at step ' + str(tr['start_step']) + ')' if tr['start_step'] else ''} in {tr['seconds']:.0f} s"
              f"{speed}, data `{cfg.data.train}`"]
    if cfg.baseline_alone:
        lines.append("- baseline **alone**: each peer from the same initial weights, trained with CE only for the same "
                     "steps, batches and seeds")
    lines += ["", f"## Test split (`{cfg.data.test}`, first {cfg.eval.max_rows} rows)", "",
              format_table({k: v.metrics for k, v in results.items()}) or "(no test split)", ""]
    for f in curves:
        lines += [f"![{f}]({f})", ""]
    for name, res in [(n, r) for n, r in results.items() if r.examples and "before" not in n]:
        lines += examples_markdown(name, res.examples)
    return "\n".join(lines)
