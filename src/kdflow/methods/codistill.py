"""`kdflow codistill`: N >= 2 models learn from each other on the same batches (methods.md §4).

For peer i, with peers j != i as teachers whose distributions are stop-gradient targets:

    soft: L_i = kd_weight * tau^2 * mean_j D(sg(p_j)_tau || p_i_tau) + (1 - kd_weight) * CE(y, p_i)
    hard: L_i = kd_weight *         mean_j CE(argmax sg(p_j), p_i)    + (1 - kd_weight) * CE(y, p_i)
    L_total = sum_i L_i

Peers share no parameters and every target is detached, so one backward of L_total gives each
peer exactly the gradient of its own L_i. Each term is a (sum, count) pair normalised by its
token count over the whole optimizer step (all micro-batches), as everywhere in kdflow.

Transformers' Trainer holds one model, so this file has its own small loop: every peer has its
own optimizer, scheduler and learning rate (full or LoRA training), and its own checkpoints in
`output_dir/peers/<name>/checkpoint-N`; re-running the same command resumes all peers from their
newest common checkpoint. Every peer is evaluated before and after training, optionally next to
the same peer trained alone (`baseline_alone`), and the run writes config.yaml, metrics.json,
report.md and loss curves.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdflow.config import CoDistillConfig, PeerSpec, to_dict
from kdflow.data import Rows, collate, encode_rows, read_rows, rows_fingerprint
from kdflow.errors import ConfigError, DataError, KDFlowError
from kdflow.evaluate import EvalResult, answer_nll, evaluate_model, format_table
from kdflow.losses import DenseTeacher, HeadLossSpec, TopKTargets, get_divergence, head_losses, shifted_masks
from kdflow.models import (apply_lora, build_student, count_parameters, load_model, load_tokenizer, model_identity,
                           save_model, selected_hidden, tokenizer_fingerprint)
from kdflow.report import plot_curves, write_atomic, write_json
from kdflow.training import (load_loop_checkpoint, loop_checkpoints, prune_loop_checkpoints, save_loop_checkpoint,
                             setup_run, step_normalized, step_rows)

# ----------------------------------------------------------------------------------------------
# Peers


@dataclass
class Peer:
    """One model being trained, with everything it owns."""

    spec: PeerSpec
    seed: int
    tok: Any
    model: Any
    examples: list[dict[str, Any]]  # the training rows in this peer's tokenization
    group: int  # peers of one group tokenize every row into identical ids
    lr: float = 0.0
    optimizer: Any = None
    scheduler: Any = None
    history: list[dict[str, float]] = field(default_factory=list)
    val_examples: list[dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class PeerOutputs:
    """A peer's forward pass on one micro-batch, at the positions its losses use."""

    hidden: torch.Tensor  # [n, H] final hidden states (or logits, for heads that are not plain)
    head: torch.nn.Module
    ce_targets: torch.Tensor  # [n] next token, -100 outside the CE term
    kd_rows: torch.Tensor  # [n] bool, rows in the KD term


def check_transfer(sender: Peer, receiver: Peer) -> None:
    """Stop before training when the sender's distribution cannot be carried to the receiver."""
    if sender.group != receiver.group:
        raise ConfigError(f"peers '{sender.name}' and '{receiver.name}' tokenize the data differently; "
                          "co-distillation across tokenizers needs kdflow.align, which this build lacks")


def peer_targets(sender: Peer, receiver: Peer, out: PeerOutputs) -> DenseTeacher | TopKTargets:
    """The sender's next-token distribution at the receiver's KD rows, as a stop-gradient target.

    Same tokenization: the sender's own detached hidden states and its head (applied under
    no_grad) at the same rows. Peers with different tokenizers need methods.md §6 (vocabulary
    map, sequence alignment, top-k projection into the receiver's vocabulary, returned as
    TopKTargets with a `valid` mask); that is the seam where `kdflow.align` plugs in.
    """
    check_transfer(sender, receiver)
    return DenseTeacher(out.hidden[out.kd_rows].detach(), out.head)


def pair_count(sender: Peer, receiver: Peer, kd_mask: torch.Tensor) -> int:
    """Tokens of one micro-batch in the receiver's KD term for this sender (all of its KD rows when
    the tokenization is shared; an alignment would count only the positions it can pair)."""
    return int(kd_mask.sum())


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
                    c[f"kd:{q.name}"] = c.get(f"kd:{q.name}", 0) + pair_count(q, p, kd_mask)
    return counts


def forward_peer(p: Peer, batch: dict[str, torch.Tensor], token_scope: str, device: torch.device) -> PeerOutputs:
    ids, attn, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    ce_mask, kd_mask = shifted_masks(labels, attn, token_scope)
    positions = ce_mask | kd_mask
    hidden, head = selected_hidden(p.model, ids, attn, positions)
    ce_targets = labels[:, 1:][positions].masked_fill(~ce_mask[positions], -100)
    return PeerOutputs(hidden, head, ce_targets, kd_mask[positions])


def peer_loss_sums(i: int, peers: list[Peer], outs: list[PeerOutputs], spec: HeadLossSpec) -> dict[str, tuple[torch.Tensor, int]]:
    """Peer i's (sum, count) per term: "ce", and "kd:<j>" against every other peer j."""
    me = outs[i]
    if spec.kind == "none":
        return head_losses(me.hidden, me.head, me.ce_targets, me.kd_rows, None, spec)
    sums: dict[str, tuple[torch.Tensor, int]] = {}
    no_ce = torch.full_like(me.ce_targets, -100)
    for j, q in enumerate(peers):
        if j == i:
            continue
        pair_spec = copy.copy(spec)
        pair_spec.vocab_size = len(peers[i].tok)  # padded heads: compare real tokens only
        teacher = peer_targets(q, peers[i], outs[j])
        r = head_losses(me.hidden, me.head, me.ce_targets if "ce" not in sums else no_ce, me.kd_rows, teacher, pair_spec)
        if "ce" not in sums:
            sums["ce"] = r["ce"]
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
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cfg.train.bf16):
        outs = [forward_peer(p, batches[p.group], cfg.kd.token_scope, device) for p in peers]
        return [step_normalized(peer_loss_sums(i, peers, outs, spec), counts[i], weights) for i in range(len(peers))]


def accumulate_step(peers: list[Peer], micro_batches: list[list[int]], cfg: CoDistillConfig, kd_weight: float,
                    device: torch.device) -> list[dict[str, float]]:
    """Backward of L_total = sum_i L_i over the micro-batches of one step (gradients add up in
    `.grad`). Returns each peer's normalised terms for logging: loss, ce, kd (mean over peers)."""
    counts = step_counts(peers, micro_batches, cfg.kd.token_scope)
    logs = [{"loss": 0.0, "ce": 0.0} for _ in peers]
    for rows in micro_batches:
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
        total.backward()  # peers share no parameters and targets are detached: each gets dL_i/dθ_i
    return logs


# ----------------------------------------------------------------------------------------------
# The loop


def total_steps(cfg: CoDistillConfig, n_rows: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    per_epoch = math.ceil(n_rows / (cfg.train.batch_size * cfg.train.grad_accum))
    return max(1, math.ceil(cfg.train.num_epochs * per_epoch))


def _make_optimizer(p: Peer, cfg: CoDistillConfig, steps: int) -> None:
    from transformers import get_scheduler

    t = cfg.train
    wd = p.spec.weight_decay if p.spec.weight_decay is not None else t.weight_decay
    params = p.trainable()
    groups = [{"params": [q for q in params if q.ndim >= 2], "weight_decay": wd},  # no decay on norms and biases
              {"params": [q for q in params if q.ndim < 2], "weight_decay": 0.0}]
    p.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=p.lr, betas=(t.adam_beta1, t.adam_beta2))
    p.scheduler = get_scheduler(t.lr_scheduler, p.optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * steps),
                                num_training_steps=steps)


def _start_step(peers: list[Peer], folder: Path, cfg: CoDistillConfig) -> tuple[int, float]:
    """Load the newest checkpoint that every peer has (or the one train.resume names).

    Returns its step and the training seconds spent before it."""
    have = [loop_checkpoints(folder / p.name) for p in peers]
    common = set(have[0]).intersection(*have[1:])
    resume = cfg.train.resume
    if resume == "never":
        for p, found in zip(peers, have):
            for ckpt in found.values():
                shutil.rmtree(ckpt, ignore_errors=True)  # stale checkpoints would mix with the new run's
        return 0, 0.0
    if resume == "auto":
        if not common:
            return 0, 0.0
        step = max(common)
    else:
        name = Path(resume).name
        if not name.startswith("checkpoint-") or not name[len("checkpoint-"):].isdigit():
            raise ConfigError(f"train.resume={resume}: give 'auto', 'never' or checkpoint-N (a step every peer has saved)")
        step = int(name[len("checkpoint-"):])
        if step not in common:
            raise ConfigError(f"train.resume={resume}: not every peer has checkpoint-{step}; common steps: {sorted(common)}")
    for k, p in enumerate(peers):
        state = load_loop_checkpoint(have[k][step], p.model, p.optimizer, p.scheduler, restore_rng=(k == 0))
        p.history = state["log_history"]
    print(f"[kdflow] resuming {', '.join(p.name for p in peers)} from checkpoint-{step}")
    return step, state.get("seconds", 0.0)


def train_peers(peers: list[Peer], cfg: CoDistillConfig, folder: Path, kd_weight: float, val_rows: Rows | None,
                label: str, writer: Any = None) -> dict[str, Any]:
    """Train `peers` together (or one peer alone with kd_weight=0); checkpoints under folder/<name>/."""
    t = cfg.train
    device = next(peers[0].model.parameters()).device
    n_rows = len(peers[0].examples)
    steps = total_steps(cfg, n_rows)
    for p in peers:
        _make_optimizer(p, cfg, steps)
        p.model.train()
    import transformers

    transformers.set_seed(cfg.seed)  # dropout and data see the same RNG in the co-trained and alone runs
    start, seconds_before = _start_step(peers, folder, cfg)
    per_step = t.batch_size * t.grad_accum
    t0 = time.time()
    tokens = 0
    pending: list[list[dict[str, float]]] = []
    for step in range(start, steps):
        rows = step_rows(n_rows, cfg.seed, step, per_step)
        micro = [rows[k * t.batch_size:(k + 1) * t.batch_size] for k in range(t.grad_accum)]
        tokens += sum(len(peers[0].examples[r]["input_ids"]) for r in rows)
        for p in peers:
            p.optimizer.zero_grad(set_to_none=True)
        logs = accumulate_step(peers, micro, cfg, kd_weight, device)
        for p, lg in zip(peers, logs):
            if t.max_grad_norm > 0:
                lg["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(p.trainable(), t.max_grad_norm))
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
                p.history.append({"step": done, "eval_loss": nll})
                if writer is not None:
                    writer.add_scalar(f"{label}/{p.name}/eval_loss", nll, done)
        if (t.save_steps > 0 and done % t.save_steps == 0) or done == steps:
            for p in peers:
                save_loop_checkpoint(folder / p.name / f"checkpoint-{done}", p.model, p.optimizer, p.scheduler,
                                     {"step": done, "max_steps": steps, "log_history": p.history,
                                      "seconds": seconds_before + time.time() - t0})
            for p in peers:  # only once every peer holds the new one: the newest common step survives
                prune_loop_checkpoints(folder / p.name, t.save_total_limit, protect={done})
    seconds = time.time() - t0
    for p in peers:
        p.model.eval()
    return {"steps": steps, "start_step": start, "seconds": seconds_before + seconds,
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
    model = build_student(m, base, _base_of(cfg, spec)).to(device)
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
    path = out / "eval" / f"{file}.json"
    key = {**key, "eval": to_dict(cfg.eval), "data": rows_fingerprint(rows)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return EvalResult(saved["metrics"], saved["examples"])
    print(f"[kdflow] evaluating {label} on {min(len(rows), cfg.eval.max_rows or len(rows))} test rows")
    res = evaluate_model(p.model, p.tok, rows, cfg.data, cfg.eval, name=label)
    write_json(path, {"key": key, "metrics": res.metrics, "examples": res.examples})
    return res


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
    names = [p.name for p in cfg.peers]
    for i, n in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*", n or ""):
            raise ConfigError(f"setting 'peers[{i}].name' must be a non-empty folder name (letters, digits, _ . -), got {n!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"peer names must be unique; repeated: {', '.join(dup)}")
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give the training rows (a .jsonl/.csv/.parquet file or hf:<id>@<split>)")
    bad = [r for r in cfg.train.report_to if r not in ("tensorboard", "none")]
    if bad:
        raise ConfigError(f"train.report_to: codistill logs to tensorboard or none, not {', '.join(bad)}")


def run_codistill(cfg: CoDistillConfig) -> dict[str, Any]:
    _check(cfg)
    out = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads, ignore=("baseline_alone",),
                    has_checkpoints=lambda o: any(loop_checkpoints(d) for d in [*o.glob("peers/*"), *o.glob("alone/*")]))
    t_start = time.time()
    # Read and encode every split before loading models: a bad row stops the run early.
    train_rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    if len(train_rows) == 0:
        raise DataError(f"{cfg.data.train} has no rows")
    val_rows = read_rows(cfg.data.validation, "data.validation").head(cfg.data.max_eval_rows) if cfg.data.validation else None
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows) if cfg.data.test else None
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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bases: dict[str, Any] = {}
    peers = [build_peer(cfg, k, toks[k], encoded[k], groups[k], bases, device) for k in range(len(cfg.peers))]
    for p in peers:
        for q in peers:
            if q is not p:
                check_transfer(q, p)  # fails now, before any training, if a pair cannot be bridged

    results: dict[str, EvalResult] = {}
    if test_rows is not None and cfg.evaluate_before:
        for p in peers:
            results[f"{p.name} (before)"] = _eval_cached(out, f"{p.name}_before", _peer_key(cfg, p), p, test_rows, cfg,
                                                         f"{p.name} (before)")
    params = {p.name: count_parameters(p.model)[0] for p in peers}
    for p in peers:
        _prepare_for_training(p, cfg)
        total, trainable = count_parameters(p.model)
        print(f"[kdflow] peer {p.name}: {total / 1e6:.3f}M parameters, {trainable / 1e6:.2f}M trained, lr {p.lr:g}, "
              f"tokenizer {tokenizer_fingerprint(p.tok)}")
    writer = None
    if "tensorboard" in cfg.train.report_to:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "runs"))
    train_info = {"codistill": train_peers(peers, cfg, out / "peers", cfg.kd.kd_weight, val_rows, "codistill", writer)}
    run_key = {**_train_key(cfg), "kd": to_dict(cfg.kd), "peers": [to_dict(s) for s in cfg.peers],
               "base": to_dict(cfg.base)}
    for p in peers:
        _save_final(p, out / "peers" / p.name)
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
            train_info[f"alone:{p.name}"] = train_peers([p], cfg, out / "alone", 0.0, val_rows, f"alone {p.name}", writer)
            _save_final(p, out / "alone" / p.name)
            alone_histories[p.name] = p.history
            if test_rows is not None:
                alone_key = {**_peer_key(cfg, p), "run": _train_key(cfg), "lr": p.lr, "wd": p.spec.weight_decay}
                results[f"{p.name} (alone)"] = _eval_cached(out, f"{p.name}_alone", alone_key,
                                                            p, test_rows, cfg, f"{p.name} (alone)")
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
    write_json(out / "metrics.json", metrics)
    write_json(out / "log_history.json", {"codistill": histories, "alone": alone_histories})
    curves = _plot(out, histories, alone_histories)
    write_atomic(out / "report.md", _report(cfg, metrics, results, curves))
    print()
    print(format_table({k: v.metrics for k, v in results.items()}))
    print(f"\n[kdflow] run folder: {out}  (report.md, metrics.json, loss curves, peers/<name>/model)")
    return metrics


def _series(history: list[dict[str, float]], key: str) -> list[tuple[float, float]]:
    return [(float(h["step"]), float(h[key])) for h in history if key in h]


def _plot(out: Path, histories: dict[str, list], alone: dict[str, list]) -> list[str]:
    files = []
    total = {f"{n} loss": _series(h, "loss") for n, h in histories.items()}
    if any(total.values()):
        plot_curves(out / "loss_curve.png", total, "kdflow codistill: each peer's loss L_i")
        files.append("loss_curve.png")
    for name, h in histories.items():
        series = {"co-trained CE": _series(h, "ce"), "co-trained KD (mean over peers)": _series(h, "kd"),
                  "co-trained validation NLL": _series(h, "eval_loss")}
        if name in alone:
            series.update({"alone CE": _series(alone[name], "ce"), "alone validation NLL": _series(alone[name], "eval_loss")})
        series = {k: v for k, v in series.items() if v}
        if series:
            plot_curves(out / f"loss_{name}.png", series, f"peer {name}")
            files.append(f"loss_{name}.png")
    return files


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
    for name, res in results.items():
        if res.examples and "before" not in name:
            lines += [f"## Examples — {name}", ""]
            for ex in res.examples:
                lines += [f"- **prompt**: {ex['prompt']}", f"  - reference: {ex['reference']}", f"  - generated: {ex['prediction']}"]
            lines.append("")
    return "\n".join(lines)
