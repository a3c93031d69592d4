"""`kdflow distill`: SFT, soft-label KD, token-level hard-label KD and sequence-level KD.

    L = kd_weight * tau^2 * D(p_tau || q_tau) + (1 - kd_weight) * CE(y, q)        (method kd)
    L = kd_weight * CE(argmax p, q)          + (1 - kd_weight) * CE(y, q)        (method hard_token)
    L = CE(y_teacher, q), y_teacher generated once by the teacher and cached      (method seqkd)
    L = CE(y, q)                                                                  (method sft)

Each term is a (sum, count) pair normalised by its token count over the whole optimizer step.
The teacher runs online, or not at all when `teacher_cache.dir` holds its top-k log-probs
(`kdflow cache-teacher` computes them once). A teacher with another tokenizer works for kd and
hard_token: `kdflow.align` pairs positions over the answer and carries the teacher's top-k into the
student's vocabulary (the `align` settings). The run ends by evaluating the teacher, the student before and the student after training on
the test split, and writes config.yaml, metrics.json, report.md and loss_curve.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdflow import multiteacher, processes
from kdflow.config import DistillConfig, ModelSpec, to_dict
from kdflow.data import Collator, ListDataset, Rows, encode_rows, prompts_of, read_rows, rows_fingerprint, row_turns
from kdflow.diagnostics import find_stall, make_stall_watch, stall_advice, stall_message
from kdflow.errors import ConfigError, DataError
from kdflow.evaluate import EvalResult, differences_markdown, evaluate_cached, format_table, generate, scoring_rule
from kdflow.hidden import hidden_sum, layer_map
from kdflow.losses import DenseTeacher, HeadLossSpec, TopKTargets, get_divergence, head_losses, shifted_masks
from kdflow.models import (apply_lora, build_student, check_student, count_parameters, load_model, load_tokenizer,
                           place, require_same_tokenizer, run_device, save_model, selected_hidden, selected_states,
                           tokenizer_fingerprint)
from kdflow.teachers import check_teacher, check_teacher_settings, get_teacher, is_served, teacher_identity
from kdflow.teacher_cache import TeacherCache, batch_targets, build_cache, manifest_key, same_tokenizer_targets
from kdflow.report import examples_markdown, loss_series, plot_curves, write_atomic, write_json
from kdflow.runfolder import run_settings
from kdflow.training import (make_token_normalized_trainer_class, resolve_resume, setup_run, train_or_restore,
                             training_arguments)


def make_distill_trainer_class() -> type:
    Base = make_token_normalized_trainer_class()

    class DistillTrainer(Base):
        """Trainer for sft / kd / hard_token. The teacher runs online under no_grad, or its top-k
        log-probs come with each example from the teacher cache (`teacher=None`). A teacher with
        another tokenizer comes with `cross` (kdflow.align.targets.CrossTokenizer), which turns it
        into aligned top-k targets in the student's vocabulary."""

        def __init__(self, *args: Any, cfg: DistillConfig, teacher: Any | None, vocab_size: int,
                     cross: Any | None = None, hidden_pairs: list[tuple[int, int]] | None = None,
                     teacher_width: int | None = None, slots: list["TeacherSlot"] | None = None,
                     hidden_columns: list[int] | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.cfg = cfg
            self.teacher = teacher
            self.cross = cross
            self.slots = slots or None  # several teachers (cfg.teachers): they replace `teacher` and `cross`
            self.teacher_weight_sums = [0.0] * len(slots or [])  # per teacher, its weights summed over KD rows
            self.teacher_rows = 0
            uses_teacher = cfg.method in ("kd", "hard_token", "gkd")
            w = cfg.kd.kd_weight if uses_teacher else 0.0
            self.term_weights = {"ce": 1.0 - w, "kd": w}
            # Hidden-state term (methods.md §10): the layer pairs, and a projection when widths differ.
            # The projection is trained with the student (an extra optimizer group) and saved in
            # checkpoints only, never in the student folder.
            self.hidden_pairs = hidden_pairs if (uses_teacher and cfg.kd.hidden_weight > 0 and hidden_pairs) else None
            self.projection = None
            self.hidden_columns = hidden_columns  # per pair, its column among the layers a teacher cache holds
            if self.hidden_pairs:
                self.term_weights["hidden"] = cfg.kd.hidden_weight
                width = int(self.model.config.hidden_size)
                if teacher_width is not None and teacher_width != width:
                    from kdflow.hidden import HiddenProjection

                    self.projection = HiddenProjection(self.hidden_pairs, width, teacher_width,
                                                       seed=cfg.seed).to(self.args.device)
            self.spec = HeadLossSpec(
                kind={"kd": "soft", "gkd": "soft", "hard_token": "hard"}.get(cfg.method, "none") if w > 0 else "none",
                divergence=get_divergence(cfg.kd.divergence, cfg.kd.jsd_beta, cfg.kd.skew_alpha),
                temperature=cfg.kd.temperature, sparse_mode=cfg.kd.sparse_mode, vocab_size=vocab_size,
                chunk_tokens=cfg.kd.chunk_tokens)
            # The teacher stays where teachers.load_teacher placed it (its own device, or spread over
            # several): selected_hidden feeds it there and DenseTeacher brings its logits back.

        def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
            opt = super().create_optimizer(*args, **kwargs)
            if self.projection is not None and not getattr(self, "_projection_in_optimizer", False):
                # before the scheduler is made, so the group follows the same schedule
                opt.add_param_group({"params": list(self.projection.parameters()), "weight_decay": 0.0})
                self._projection_in_optimizer = True
            return opt

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            loss = super().training_step(model, inputs, num_items_in_batch)
            if self.projection is not None and self.args.world_size > 1:
                # The projection lives outside the DDP-wrapped student, so DDP does not average its gradient:
                # do it here, after every backward (linear, so accumulated micro-batches stay right). Each
                # process's loss is scaled by the world size (compute_loss), hence sum / world.
                import torch.distributed as dist

                params = list(self.projection.parameters())
                # a micro-batch without KD positions leaves a process without a gradient; every process must join
                # the same collectives, and where none has one the step stays as one process would leave it
                has = torch.tensor([float(any(p.grad is not None for p in params))], device=params[0].device)
                dist.all_reduce(has, op=dist.ReduceOp.MAX)
                if has.item() > 0:
                    for p in params:
                        if p.grad is None:
                            p.grad = torch.zeros_like(p)
                        dist.all_reduce(p.grad)
                        p.grad.div_(self.args.world_size)
            return loss

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            super()._save_checkpoint(model, trial)
            if self.projection is not None and self.args.should_save:
                from safetensors.torch import save_file

                folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
                save_file({k: v.detach().cpu().contiguous() for k, v in self.projection.state_dict().items()},
                          str(folder / PROJECTION_FILE))

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            path = Path(resume_from_checkpoint) / PROJECTION_FILE
            if self.projection is not None:
                if not path.is_file():
                    raise DataError(f"{resume_from_checkpoint} has no {PROJECTION_FILE} (the hidden-state projection); "
                                    "it was saved by a run without kd.hidden_weight: start the run afresh")
                from safetensors.torch import load_file

                self.projection.load_state_dict(load_file(str(path), device=str(self.args.device)))

        def count_tokens(self, batch: dict[str, Any]) -> dict[str, int]:
            ce_mask, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"], self.cfg.kd.token_scope)
            counts = {"ce": int(ce_mask.sum())}
            if self.spec.kind != "none":
                if "teacher_valid" in batch:  # cross-tokenizer targets: only aligned positions count
                    counts["kd"] = int(sum(int(v.sum()) for v in batch["teacher_valid"]))
                else:
                    counts["kd"] = int(kd_mask.sum())
            if self.hidden_pairs:
                counts["hidden"] = int(kd_mask.sum())
            if self.slots and self.spec.kind != "none":
                coverage, choice = self._coverage(batch, kd_mask)
                counts["kd"] = int(multiteacher.support(self.cfg.multi_teacher.rule, coverage, choice).any(0).sum())
            return counts

        def _coverage(self, batch: dict[str, Any], kd_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            """Per teacher, the KD rows it has a target for [m, N]; per row, its sample's chosen teacher."""
            n = int(kd_mask.sum())
            rows = []
            for slot in self.slots:
                v = batch.get(slot.prefix + "valid")
                rows.append(torch.cat([x.cpu().bool() for x in v]) if v is not None else torch.ones(n, dtype=torch.bool))
            choice = None
            if "teacher_choice" in batch:
                per_sample = torch.stack([c.cpu().long().reshape(()) for c in batch["teacher_choice"]])
                choice = torch.repeat_interleave(per_sample, kd_mask.sum(-1).cpu())
            return torch.stack(rows), choice

        def _multi_loss_sums(self, model: Any, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
            """CE plus sum_j w_j D(p_j || q) over the teachers of cfg.teachers (kdflow.multiteacher)."""
            input_ids, attention, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            ce_mask, kd_mask = shifted_masks(labels, attention, self.cfg.kd.token_scope)
            use_kd = self.spec.kind != "none" and all(s.model is not None or (s.prefix + "ids") in inputs
                                                      for s in self.slots)
            positions = (kd_mask | ce_mask) if use_kd else ce_mask
            hidden, head = selected_hidden(model, input_ids, attention, positions)
            ce_targets = labels[:, 1:][positions].masked_fill(~ce_mask[positions], -100)
            if not use_kd:  # validation batches without cached targets score CE only
                return head_losses(hidden, head, ce_targets, kd_mask[positions], None,
                                   HeadLossSpec(vocab_size=self.spec.vocab_size, chunk_tokens=self.spec.chunk_tokens))
            T = self.cfg.kd.temperature
            targets = []
            for slot in self.slots:
                view = _view(inputs, slot.prefix)
                if slot.model is None:
                    targets.append(batch_targets(view))
                elif slot.cross is not None:
                    targets.append(slot.cross.targets(slot.model, view, self.cfg.align.top_k, T))
                else:
                    with torch.no_grad():
                        t_hidden, t_head = selected_hidden(slot.model, input_ids, attention, kd_mask)
                    targets.append(DenseTeacher(t_hidden, t_head))
            coverage, choice = self._coverage(inputs, kd_mask)
            device = hidden.device
            rule = self.cfg.multi_teacher.rule
            entropy = None
            if rule == "confidence":
                entropy = torch.stack([_target_entropy(t, T, self.spec.vocab_size).to(device) for t in targets])
            w = multiteacher.row_weights(rule, coverage.to(device), [s.weight for s in self.slots], entropy,
                                         None if choice is None else choice.to(device),
                                         self.cfg.multi_teacher.confidence_temperature)
            sums: dict[str, tuple[torch.Tensor, int]] = {}
            kd_total = hidden.new_zeros((), dtype=torch.float32)
            no_ce = torch.full_like(ce_targets, -100)  # the CE term is the same for every teacher: take it once
            for j, t in enumerate(targets):
                t.row_weight = w[j].to(t.logp.device if isinstance(t, TopKTargets) else device)
                part = head_losses(hidden, head, ce_targets if j == 0 else no_ce, kd_mask[positions], t, self.spec)
                if j == 0:
                    sums["ce"] = part["ce"]
                kd_total = kd_total + part["kd"][0]
            if model.training:
                for j in range(len(self.slots)):
                    self.teacher_weight_sums[j] += float(w[j].sum())
                self.teacher_rows += int((w.sum(0) > 0).sum())
            sums["kd"] = (kd_total, int((w.sum(0) > 0).sum()))
            return sums

        def loss_sums(self, model: Any, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
            if self.slots:
                return self._multi_loss_sums(model, inputs)
            input_ids, attention = inputs["input_ids"], inputs["attention_mask"]
            labels = inputs["labels"]
            ce_mask, kd_mask = shifted_masks(labels, attention, self.cfg.kd.token_scope)
            online = self.teacher is not None and (self.cross is None or "teacher_src" in inputs)
            use_kd = self.spec.kind != "none" and (online or "teacher_ids" in inputs)
            # One set of positions serves both terms: response tokens (and all tokens for token_scope=all).
            positions = (kd_mask | ce_mask) if use_kd else ce_mask
            pairs = self.hidden_pairs if use_kd else None
            s_layers: list[torch.Tensor] = []
            t_layers: list[torch.Tensor] = []
            if pairs:
                hidden, head, s_layers = selected_states(model, input_ids, attention, positions,
                                                         [s for s, _ in pairs], kd_mask)
            else:
                hidden, head = selected_hidden(model, input_ids, attention, positions)
            ce_targets = labels[:, 1:][positions].masked_fill(~ce_mask[positions], -100)
            teacher = None
            if use_kd:
                if self.cross is not None and self.teacher is not None:
                    teacher = self.cross.targets(self.teacher, inputs, self.cfg.align.top_k, _target_temperature(self.cfg))
                elif is_served(self.teacher):
                    from kdflow.serving import served_targets

                    teacher = served_targets(self.teacher, inputs, kd_mask, self.cfg.align.top_k)
                elif self.teacher is not None:
                    with torch.no_grad():
                        if pairs:
                            t_hidden, t_head, t_layers = selected_states(self.teacher, input_ids, attention, kd_mask,
                                                                         [t for _, t in pairs])
                        else:
                            t_hidden, t_head = selected_hidden(self.teacher, input_ids, attention, kd_mask)
                    teacher = DenseTeacher(t_hidden, t_head)
                else:
                    teacher = batch_targets(inputs)
                    if pairs:  # [N_kd, pairs, H_t] cached beside the top-k
                        cached = torch.cat(inputs["teacher_hidden"]).to(hidden.device)
                        cols = self.hidden_columns or list(range(len(pairs)))
                        t_layers = [cached[:, c] for c in cols]
            spec = self.spec if use_kd else HeadLossSpec(vocab_size=self.spec.vocab_size,
                                                         chunk_tokens=self.spec.chunk_tokens)
            # Validation batches without cached targets score CE only.
            sums = head_losses(hidden, head, ce_targets, kd_mask[positions], teacher, spec)
            if pairs:
                sums["hidden"] = hidden_sum(s_layers, t_layers, self.cfg.kd.hidden_loss, self.projection,
                                            self.cfg.kd.chunk_tokens)
            return sums

    return DistillTrainer


PROJECTION_FILE = "hidden_projection.safetensors"  # in checkpoints only: the student folder never holds it

# Per-example fields a teacher's alignment or cache attaches; with several teachers each teacher keeps
# its own under "teacher_<j>_" (the collator keeps every "teacher_*" field as a list).
_TEACHER_FIELDS = ("teacher_input_ids", "teacher_src", "teacher_valid", "teacher_ids", "teacher_logp",
                   "teacher_tail_logp")


@dataclasses.dataclass
class TeacherSlot:
    """One teacher of cfg.teachers as the trainer sees it."""

    label: str
    prefix: str  # "teacher_<j>_": where its per-example fields live
    weight: float
    model: Any = None  # None: its targets come from its cache
    cross: Any = None  # its alignment when its tokenizer differs from the student's


def _move_fields(examples: list[dict[str, Any]], prefix: str) -> None:
    for e in examples:
        for key in _TEACHER_FIELDS:
            if key in e:
                e[prefix + key[len("teacher_"):]] = e.pop(key)


def _view(inputs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """The batch as one teacher's single-teacher code expects it: its fields under plain teacher_* names."""
    view = {k: v for k, v in inputs.items() if not k.startswith("teacher_")}
    view.update({"teacher_" + k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)})
    return view


def _target_entropy(t: Any, temperature: float, vocab_size: int | None) -> torch.Tensor:
    """Entropy per KD row of a teacher's target at the KD temperature (what it teaches)."""
    if isinstance(t, TopKTargets):
        return multiteacher.entropy_topk(t.logp, t.ids, t.tail_logp)
    n = t.count()
    out = []
    for start in range(0, n, 512):
        logits = t.logits(torch.arange(start, min(start + 512, n), device=t.hidden.device))
        out.append(multiteacher.entropy_dense(logits[..., :vocab_size] if vocab_size else logits, temperature))
    return torch.cat(out) if out else torch.zeros(0)


# ----------------------------------------------------------------------------------------------
# Sequence-level KD: teacher answers generated once, cached beside the run


SEQKD_FORMAT = 2  # 2: each line records whether the answer was cut at max_new_tokens


def seqkd_rows(cfg: DistillConfig, rows: Rows, teacher: Any, teacher_tok: Any, out: Path) -> tuple[Rows, list[bool]]:
    """Replace each row's answer by the teacher's generated answer (cached in a JSONL file).

    Returns the rows and, per row, whether the teacher's answer was cut at seqkd.max_new_tokens
    without ending: such an answer is trained on without an end (no EOS target, `encode_rows(...,
    unended=...)`), so the student does not learn to stop where the teacher was stopped.
    The cache records the teacher, tokenizer, data and generation settings; a cache made with
    other settings is an error rather than silently reused. An interrupted generation resumes.
    """
    s = cfg.seqkd
    path = Path(s.cache_file) if s.cache_file else out / "seqkd_generations.jsonl"
    manifest = {
        "format": SEQKD_FORMAT,
        "teacher": teacher_identity(cfg.teacher),
        "tokenizer": tokenizer_fingerprint(teacher_tok),
        "data": rows_fingerprint(rows),
        "generation": {"do_sample": s.do_sample, "temperature": s.temperature, "top_p": s.top_p,
                       "max_new_tokens": s.max_new_tokens, "seed": s.seed},
        "data_settings": {"chat_template": cfg.data.chat_template, "system_prompt": cfg.data.system_prompt,
                          "prompt_template": cfg.data.prompt_template},
    }
    man_path = path.with_suffix(".manifest.json")

    def read_done() -> list[list[Any]]:  # the main process reads what an earlier run generated
        done: list[str] = []
        cut: list[bool] = []
        if man_path.is_file():
            old = json.loads(man_path.read_text())
            if old.get("format") != SEQKD_FORMAT:
                raise DataError(f"{path} was written by an older kdflow that did not record which answers were cut at "
                                f"seqkd.max_new_tokens; delete it and {man_path.name} to generate the answers again")
            if old != manifest:
                diff = [k for k in manifest if old.get(k) != manifest[k]]
                raise DataError(f"{path} was generated with other settings ({', '.join(diff)} differ); delete it or set seqkd.cache_file to a new file")
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                            done.append(entry["response"])
                            cut.append(bool(entry["truncated"]))
                        except (json.JSONDecodeError, KeyError, TypeError):
                            del done[len(cut):]
                            break  # a line cut by an interruption: regenerate from here
        else:
            write_json(man_path, manifest)
        return [done, cut]

    done, cut = processes.on_main(read_done)
    prompts = prompts_of(rows, teacher_tok, cfg.data)

    def line(text: str, truncated: bool) -> str:
        return json.dumps({"response": text, "truncated": truncated}, ensure_ascii=False) + "\n"

    if len(done) < len(prompts):
        from tqdm.auto import tqdm

        main = processes.is_main()
        if main:
            write_atomic(path, "".join(line(r, c) for r, c in zip(done, cut)))
        bar = tqdm(total=len(prompts), initial=len(done), desc="seqkd: teacher generates answers", disable=not main)
        # Each process generates one batch of every round of P batches; the main process appends the
        # round in order, so an interruption loses at most one round.
        per_round = s.batch_size * processes.world()
        with open(path, "a", encoding="utf-8") if main else contextlib.nullcontext() as f:
            for first in range(len(done), len(prompts), per_round):
                start = first + processes.rank() * s.batch_size
                mine = []
                if start < len(prompts) and is_served(teacher):
                    eos = teacher_tok.eos_token_id
                    ids = [x[:-1] if x and x[-1] == eos else x for x in teacher.generate(
                        prompts[start:start + s.batch_size], s.max_new_tokens,
                        s.temperature if s.do_sample else 0.0, s.top_p if s.do_sample else 1.0, s.seed + start)]
                elif start < len(prompts):
                    ids = generate(teacher, teacher_tok, prompts[start:start + s.batch_size], s.max_new_tokens,
                                   s.batch_size, do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p,
                                   seed=s.seed + start, shared=False)
                    # generate() removes EOS: an answer as long as the limit never produced one
                    mine = [[teacher_tok.decode(x, skip_special_tokens=True).strip() or teacher_tok.eos_token,
                             len(x) >= s.max_new_tokens] for x in ids]
                for answers in processes.all_gather_json(mine):
                    for text, truncated in answers:
                        done.append(text)
                        cut.append(truncated)
                        if main:
                            f.write(line(text, truncated))
                if main:
                    f.flush()
                bar.update(min(per_round, len(prompts) - first))
        bar.close()
    items = []
    for row, where, answer in zip(rows.items, rows.locations, done):
        turns = row_turns(row, where, cfg.data)
        items.append({"messages": turns.messages + [{"role": "assistant", "content": answer}]})
    return Rows(f"{path} (teacher answers for {rows.source})", items, list(rows.locations)), cut


# ----------------------------------------------------------------------------------------------
# The run


def _eval_cached(out: Path, name: str, model: Any, tok: Any, rows: Rows, cfg: DistillConfig,
                 teacher: Any = None) -> EvalResult:
    """Evaluate, reusing a result saved by an earlier (interrupted) run with the same settings."""
    # the settings that identify the run's checkpoints (not where the folder is: a moved run reuses its results)
    return evaluate_cached(out / "eval" / f"{name}.json", {"run": run_settings(cfg)}, model, tok, rows, cfg.data,
                           cfg.eval, name, teacher=teacher)


def _data_settings(cfg: DistillConfig) -> dict[str, Any]:
    """The data settings that decide which tokens an example has (part of a cache's identity)."""
    d = cfg.data
    return {"prompt_field": d.prompt_field, "response_field": d.response_field, "messages_field": d.messages_field,
            "system_prompt": d.system_prompt, "chat_template": d.chat_template, "prompt_template": d.prompt_template,
            "max_length": d.max_length, "min_response_tokens": d.min_response_tokens}


def _student_tokenizer(cfg: DistillConfig, teacher_tok: Any) -> Any:
    if cfg.student.init == "pretrained" or (cfg.student.init == "config" and cfg.student.name):
        return load_tokenizer(cfg.student)
    if teacher_tok is None:
        raise ConfigError("no tokenizer: set teacher.name or student.name")
    return teacher_tok


def _read_splits(cfg: DistillConfig) -> tuple[Rows, Rows | None, Rows | None]:
    # Read every data file first: a bad row should stop the run before minutes of model loading.
    if cfg.data.train is None:
        raise ConfigError("data.train is not set: give the training rows (a .jsonl/.csv/.parquet file or hf:<id>@<split>)")
    train_rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    val_rows = read_rows(cfg.data.validation, "data.validation").head(cfg.data.max_eval_rows) if cfg.data.validation else None
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows) if cfg.data.test else None
    return train_rows, val_rows, test_rows


def _cache_key(cfg: DistillConfig, train_rows: Rows, teacher_tok: Any, tok: Any, cross: Any = None) -> dict[str, Any]:
    c = cfg.teacher_cache
    return manifest_key(teacher=teacher_identity(cfg.teacher), teacher_tokenizer=tokenizer_fingerprint(teacher_tok),
                        student_tokenizer=tokenizer_fingerprint(tok), data=rows_fingerprint(train_rows),
                        data_settings=_data_settings(cfg), k=c.k,
                        temperature=_target_temperature(cfg) if cross is not None else cfg.kd.temperature,
                        token_scope=cfg.kd.token_scope, logp_dtype=c.logp_dtype, store_tail=c.store_tail,
                        alignment=cross.key() if cross is not None else None,
                        hidden_layers=_cache_hidden_layers(cfg))


def _cache_hidden_layers(cfg: DistillConfig) -> list[int] | None:
    """The teacher layers (output_hidden_states indices) teacher_cache.hidden asks the cache to hold."""
    h = str(cfg.teacher_cache.hidden)
    if h == "none":
        return None
    from kdflow.models import _read_config

    t_config = _read_config(cfg.teacher)
    n = int((getattr(t_config, "text_config", None) or t_config).num_hidden_layers)
    layers = list(range(1, n + 1)) if h == "all" else sorted({int(x) for x in h.split(",")})
    if max(layers) > n:
        raise ConfigError(f"teacher_cache.hidden={h}: the teacher has output_hidden_states indices 0..{n}")
    return layers


def _target_temperature(cfg: DistillConfig) -> float:
    """Temperature of cross-tokenizer targets: hard_token takes the argmax of the carried distribution
    at temperature 1 (probabilities of teacher tokens that land on one student token are added, so
    the temperature could change which one wins)."""
    return 1.0 if cfg.method == "hard_token" else cfg.kd.temperature


def _check_teachers(cfg: DistillConfig) -> None:
    """`teachers` settings that cannot work, refused before anything loads."""
    if not cfg.teachers:
        return
    if cfg.method != "kd":
        raise ConfigError(f"teachers: several teachers combine soft targets, which method {cfg.method} does not use; "
                          "use method kd, or keep one teacher in `teacher`")
    if cfg.kd.kd_weight <= 0:
        raise ConfigError("teachers: with kd.kd_weight=0 no teacher teaches; give kd.kd_weight > 0")
    if cfg.teacher_cache.dir:
        raise ConfigError("teachers: teacher_cache.dir names one cache; give each entry of `teachers` its own `cache`")
    if cfg.kd.hidden_weight > 0:
        raise ConfigError("kd.hidden_weight with several teachers is not supported; set kd.hidden_weight=0 or keep one "
                          "teacher")
    labels = [_label(e, i) for i, e in enumerate(cfg.teachers)]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"teachers: labels {labels} repeat; give each entry its own `label`")
    for i, e in enumerate(cfg.teachers):
        if not e.name:
            raise ConfigError(f"teachers[{i}].name is not set: give the teacher's model")
        check_teacher_settings(e, f"teachers[{i}]")


def _label(entry: Any, i: int) -> str:
    return entry.label or f"teacher{i + 1}"


def _entry_spec(entry: Any) -> Any:
    """An entry of `teachers` as the TeacherSpec every single-teacher function takes."""
    from kdflow.config import TeacherSpec

    return TeacherSpec(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(TeacherSpec)})


def _setup_teachers(cfg: DistillConfig, train_rows: Rows, val_rows: Rows | None, train_examples: list[dict[str, Any]],
                    val_examples: list[dict[str, Any]] | None, tok: Any) -> tuple[list[TeacherSlot], dict[str, Any]]:
    """Every teacher of cfg.teachers ready to teach: adapted if asked, checked, aligned when its tokenizer
    differs, or read from its cache; for rule min_ce, each sample's chosen teacher."""
    slots, entries = [], []
    total = sum(e.weight for e in cfg.teachers)
    scores = []
    for j, entry in enumerate(cfg.teachers):
        label, prefix = _label(entry, j), f"teacher_{j + 1}_"
        ready = get_teacher(_entry_spec(entry), cfg.data, train_rows)
        t_cfg = dataclasses.replace(cfg, teacher=ready.spec)
        check = check_teacher(ready.spec, lambda: (ready.model(), ready.tokenizer), val_rows, cfg.data, cfg.eval)
        cross = None
        if tokenizer_fingerprint(ready.tokenizer) != tokenizer_fingerprint(tok):
            cross = _cross_tokenizer(t_cfg, ready.tokenizer, tok)
        slot = TeacherSlot(label=label, prefix=prefix, weight=entry.weight / total, cross=cross)
        if entry.cache:
            cache = TeacherCache(entry.cache, _cache_key(t_cfg, train_rows, ready.tokenizer, tok, cross), len(tok))
            cache.attach(train_examples, cfg.kd.token_scope)
            _move_fields(train_examples, prefix)
            print(f"[kdflow] teacher {label}: training from its cache {entry.cache} (k={cfg.teacher_cache.k})")
        else:
            slot.model = ready.model()
            if cross is not None:
                print(f"[kdflow] teacher {label} alignment: {cross.prepare(train_examples, train_rows).summary()}")
                _move_fields(train_examples, prefix)
                if val_examples is not None:
                    cross.prepare(val_examples, val_rows)
                    _move_fields(val_examples, prefix)
        if cfg.multi_teacher.rule == "min_ce":
            scores.append(multiteacher.answer_scores(ready.model(), ready.tokenizer, train_rows, cfg.data))
        if slot.model is None:
            ready.release()
        slots.append(slot)
        entries.append({"label": label, "teacher": teacher_identity(ready.spec), "weight": slot.weight,
                        "cache": entry.cache, "cross_tokenizer": cross is not None, "check": check, "_ready": ready})
    multi: dict[str, Any] = {"rule": cfg.multi_teacher.rule, "entries": entries}
    if scores:
        choice = multiteacher.choose_per_sample(np.stack(scores))
        for e in train_examples:
            e["teacher_choice"] = torch.tensor(int(choice[e["row_index"]]))
        counts = np.bincount(choice, minlength=len(slots))
        multi["selected_share"] = {s.label: float(c) / len(choice) for s, c in zip(slots, counts)}
        multi["answer_nll_per_char"] = {s.label: float(np.mean(x)) for s, x in zip(slots, scores)}
        print("[kdflow] min_ce selection over the training rows: " + ", ".join(
            f"{k} {v:.1%}" for k, v in multi["selected_share"].items()))
    return slots, multi


def _teachers_metrics(cfg: DistillConfig, slots: list[TeacherSlot], multi: dict[str, Any], trainer: Any) -> dict[str, Any]:
    rows = max(trainer.teacher_rows, 1)
    out = {"rule": multi["rule"], "confidence_temperature": cfg.multi_teacher.confidence_temperature
           if multi["rule"] == "confidence" else None,
           "combination": "weighted sum of divergences, sum_j w_j D(p_j || q)",
           "teachers": [{k: v for k, v in e.items() if not k.startswith("_")} for e in multi["entries"]],
           # the mean weight each teacher had over the KD rows trained on (for min_ce: its share of rows)
           "weight_share_in_training": {s.label: w / rows for s, w in zip(slots, trainer.teacher_weight_sums)}}
    for key in ("selected_share", "answer_nll_per_char"):
        if key in multi:
            out[key] = multi[key]
    return out


def _check_hidden(cfg: DistillConfig, use_cache: bool) -> None:
    """kd.hidden_weight settings that cannot work, refused before anything loads."""
    if cfg.kd.hidden_weight <= 0:
        return
    if cfg.method == "gkd":
        raise ConfigError("kd.hidden_weight > 0 with method gkd: the hidden-state term is not implemented for "
                          "on-policy answers yet; use method kd, or set kd.hidden_weight=0")
    if cfg.method not in ("kd", "hard_token"):
        raise ConfigError(f"kd.hidden_weight > 0 adds a term to the teacher's KD term; method {cfg.method} has none "
                          "(use method kd or hard_token, or set kd.hidden_weight=0)")
    if cfg.kd.kd_weight <= 0:
        raise ConfigError("kd.hidden_weight > 0 with kd.kd_weight=0: the hidden-state term covers the KD term's "
                          "positions; give kd.kd_weight > 0")
    if use_cache and cfg.teacher_cache.hidden == "none":
        raise ConfigError(f"kd.hidden_weight > 0 with teacher_cache.dir={cfg.teacher_cache.dir}: the cache holds the "
                          "teacher's top-k log-probs, not its hidden states; build it with teacher_cache.hidden=all (or "
                          "the teacher layers the map uses, e.g. 3,6,9; large: cache-teacher prints the bytes per "
                          "token), or train with the teacher online (teacher_cache.dir=null)")


def _cross_tokenizer(cfg: DistillConfig, teacher_tok: Any, tok: Any) -> Any:
    """None when teacher and student share a tokenizer; else the alignment for cross-tokenizer KD."""
    if tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(tok):
        return None
    if cfg.method not in ("kd", "hard_token", "gkd"):
        require_same_tokenizer(teacher_tok, tok, cfg.teacher.name or "", cfg.student.name or cfg.student.init)
    if cfg.kd.token_scope != "response":
        raise ConfigError(
            f"kd.token_scope={cfg.kd.token_scope} needs teacher and student to share a tokenizer: with different "
            "tokenizers each model renders the prompt with its own chat template and only the answer text is shared; "
            "use kd.token_scope=response")
    from kdflow.align.targets import CrossTokenizer

    cross = CrossTokenizer(teacher_tok, tok, cfg.data, cfg.align)
    info = cross.maps.info
    how = "loaded from cache" if info.get("cache") == "hit" else f"built in {info.get('build_seconds', 0):.1f} s"
    print(f"[kdflow] cross-tokenizer KD: teacher tokenizer {len(teacher_tok)} tokens "
          f"({cross.teacher_vocab.scheme.name()}), student {len(tok)} ({cross.student_vocab.scheme.name()}); "
          f"MinED vocabulary maps {how}; positions paired by {cfg.align.sequence}, unpaired: {cfg.align.unpaired}")
    return cross


_SELECTION = {"importance": "block importance", "loss": "loss importance", "uniform": "uniform spacing"}


def _scheme_text(q: Any) -> str:
    linear = "int8 per output row" if q.scheme == "int8" else f"int4 in groups of {q.group_size}"
    emb = "int8 per row" if q.embeddings == "int8" else "bfloat16"
    return f"block linear layers {linear}, embeddings and head {emb}"


def _check_quantize(cfg: DistillConfig) -> None:
    """quantize settings that cannot work, refused before anything loads."""
    q = cfg.quantize
    if q.qat and q.scheme == "none":
        raise ConfigError("quantize.qat=true needs quantize.scheme=int8 or int4 (the scheme the training simulates)")
    if q.qat and cfg.student.lora.enabled:
        raise ConfigError("quantize.qat trains the student's own weights under fake quantization; it does not combine "
                          "with student.lora.enabled=true")
    if q.scheme != "none":
        from kdflow.compress.quantize import check_scheme
        from kdflow.models import planned_config

        check_scheme(planned_config(cfg.student, cfg.teacher if cfg.teacher.name else None), q)


def _check_served(cfg: DistillConfig, cache: bool = False) -> None:
    """What a teacher behind teacher.server cannot do, refused before anything loads."""
    if cfg.teacher.server.url is None:
        return
    uses_targets = cache or (cfg.method in ("kd", "gkd") and cfg.kd.kd_weight > 0)
    if uses_targets and cfg.kd.temperature != 1.0:
        raise ConfigError(f"kd.temperature={cfg.kd.temperature:g} with teacher.server: a server's prompt log-probs are "
                          "at temperature 1 and its top-k alone cannot be re-tempered exactly; set kd.temperature=1 or "
                          "run the teacher locally")
    if cfg.student.init == "prune_teacher":
        raise ConfigError("student.init=prune_teacher needs the teacher's weights, which teacher.server does not give; "
                          "prune from a local copy (teacher.server.url unset) or start from student.name")
    if cfg.eval.exposure_bias:
        raise ConfigError("eval.exposure_bias scores with the teacher's whole distribution, which teacher.server does not "
                          "give; set eval.exposure_bias=false")
    if cfg.method == "gkd" and cfg.gkd.seq_kd:
        raise ConfigError("gkd.seq_kd with teacher.server is not supported (the teacher samples inside the training "
                          "step); set gkd.seq_kd=false, or use method=seqkd, which generates through the server")


def _check_served_tokenizers(cross: Any) -> None:
    if cross is not None:
        raise ConfigError("teacher.server with a teacher whose tokenizer differs from the student's is not supported: "
                          "cross-tokenizer targets need the teacher's logits at aligned positions; run the teacher locally")


def run_cache_teacher(cfg: DistillConfig) -> dict[str, Any]:
    """`kdflow cache-teacher`: run the teacher once over data.train, store its top-k per KD position.
    With `teachers`, every entry that names a `cache` gets its own."""
    if cfg.teachers:
        done = [e for e in cfg.teachers if e.cache]
        if not done:
            raise ConfigError("teachers: no entry names a `cache` folder; give the entries to cache a `cache`")
        manifests = {}
        for i, e in enumerate(cfg.teachers):
            if e.cache:
                one = dataclasses.replace(cfg, teachers=[], teacher=_entry_spec(e),
                                          teacher_cache=dataclasses.replace(cfg.teacher_cache, dir=e.cache))
                manifests[_label(e, i)] = run_cache_teacher(one)
        return manifests
    if not cfg.teacher_cache.dir:
        raise ConfigError("teacher_cache.dir is not set: say where the cache should be written")
    if not cfg.teacher.name:
        raise ConfigError("teacher.name is not set")
    import transformers

    transformers.set_seed(cfg.seed)
    train_rows, val_rows, _ = _read_splits(cfg)
    _check_served(cfg, cache=True)
    ready = get_teacher(cfg.teacher, cfg.data, train_rows)
    cfg = dataclasses.replace(cfg, teacher=ready.spec)
    teacher_tok = ready.tokenizer
    tok = _student_tokenizer(cfg, teacher_tok)
    cross = _cross_tokenizer(cfg, teacher_tok, tok)
    examples = encode_rows(train_rows, tok, cfg.data)
    teacher = ready.model()
    check_teacher(cfg.teacher, lambda: (teacher, teacher_tok), val_rows, cfg.data, cfg.eval)
    c = cfg.teacher_cache
    if ready.served:
        from kdflow.serving import cache_compute

        if c.hidden != "none":
            raise ConfigError("teacher_cache.hidden with a served teacher: the server answers log-probs only; "
                              "set teacher_cache.hidden=none or load the teacher locally")
        _check_served_tokenizers(cross)
        compute = cache_compute(teacher, c.k, cfg.kd.token_scope)
    elif cross is not None:  # targets in the student's vocabulary, at the student's positions
        if c.hidden != "none":
            raise ConfigError("teacher_cache.hidden with a teacher of another tokenizer: hidden states of two "
                              "tokenizations do not pair position by position; set teacher_cache.hidden=none")
        print(f"[kdflow] alignment: {cross.prepare(examples, train_rows).summary()}")
        compute = cross.cache_compute(teacher, c.k, _target_temperature(cfg))
    else:
        hidden_layers = _cache_hidden_layers(cfg)
        if hidden_layers:
            width = int((getattr(teacher.config, "text_config", None) or teacher.config).hidden_size)
            bytes_per = 2 * width * len(hidden_layers)
            print(f"[kdflow] teacher cache: also storing the hidden states of {len(hidden_layers)} teacher layers, "
                  f"{bytes_per} bytes per position on top of the top-k")
        compute = same_tokenizer_targets(teacher, len(tok), c.k, cfg.kd.temperature, cfg.kd.token_scope, hidden_layers)
    manifest = build_cache(c.dir, _cache_key(cfg, train_rows, teacher_tok, tok, cross), examples, tok.pad_token_id,
                           compute, batch_size=c.batch_size, shard_size=c.shard_size, vocab_size=len(tok))
    print(f"[kdflow] teacher cache {c.dir}: {manifest['examples']} examples, {manifest['positions']} positions, "
          f"k={c.k}, {manifest['bytes_per_position']:.0f} bytes per position, {len(manifest['shards'])} shards")
    return manifest


def run_distill(cfg: DistillConfig) -> dict[str, Any]:
    t_start = time.time()
    train_rows, val_rows, test_rows = _read_splits(cfg)
    use_cache = cfg.teacher_cache.dir is not None and cfg.method in ("kd", "hard_token") and cfg.kd.kd_weight > 0

    if cfg.method != "sft" and not cfg.teacher.name:
        raise ConfigError(f"method {cfg.method} needs teacher.name")
    check_student(cfg.student, cfg.teacher if cfg.teacher.name else None, calibrated=True)
    _check_quantize(cfg)
    if cfg.method == "gkd":
        from kdflow.methods.gkd import check_gkd

        check_gkd(cfg, None)
    _check_served(cfg)
    _check_hidden(cfg, use_cache)
    _check_teachers(cfg)
    if cfg.teacher.name:
        check_teacher_settings(cfg.teacher)
    # The folder is touched only now: a run refused above leaves an earlier run's folder as it was.
    out = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads)
    ready = None
    if cfg.teacher.name:  # every use of the teacher (targets, pruning the student, its scores) sees the adapted one
        ready = get_teacher(cfg.teacher, cfg.data, train_rows)
        cfg = dataclasses.replace(cfg, teacher=ready.spec)
    teacher_tok = ready.tokenizer if ready is not None else None
    tok = _student_tokenizer(cfg, teacher_tok)
    cross = (_cross_tokenizer(cfg, teacher_tok, tok) if cfg.method in ("kd", "hard_token", "gkd") and not cfg.teachers
             else None)
    if ready is not None and ready.served:
        _check_served_tokenizers(cross)
    if cfg.method == "gkd":
        from kdflow.methods.gkd import check_gkd

        check_gkd(cfg, cross)
    if cross is not None and cfg.kd.hidden_weight > 0:
        raise ConfigError("kd.hidden_weight > 0 needs a teacher with the student's tokenizer: hidden states of two "
                          "tokenizations do not pair position by position; set kd.hidden_weight=0")
    vocab_size = len(tok)
    cache = (TeacherCache(cfg.teacher_cache.dir, _cache_key(cfg, train_rows, teacher_tok, tok, cross), vocab_size)
             if use_cache else None)

    # The teacher's weights are loaded only when something needs them: online KD, generation,
    # a student pruned from it, or its own evaluation. With a teacher cache, training never does.
    needs_teacher = ((cfg.method in ("kd", "hard_token", "gkd") and not use_cache and not cfg.teachers) or cfg.method == "seqkd"
                     or cfg.student.init == "prune_teacher"
                     or ((cfg.evaluate_teacher or cfg.eval.exposure_bias) and test_rows is not None))
    teacher = ready.model() if (needs_teacher and ready is not None) else None
    teacher_check = None
    if cfg.method != "sft" and not cfg.teachers:  # several teachers: each is checked in _setup_teachers
        teacher_check = check_teacher(cfg.teacher, lambda: (ready.model(), teacher_tok), val_rows, cfg.data, cfg.eval)
        if teacher is None:
            ready.release()  # loaded for the check only (training reads the teacher cache)
    calibration = None
    st = cfg.student
    if st.init == "prune_teacher" and ((st.num_layers and st.layer_selection != "uniform") or st.width.any()):
        calibration = (encode_rows(train_rows.head(st.calibration_rows), tok, cfg.data), tok.pad_token_id)
    pruning: dict[str, Any] = {}
    student = build_student(cfg.student, teacher, cfg.teacher if cfg.teacher.name else None, calibration, pruning)
    if cfg.quantize.qat:
        from kdflow.compress.quantize import prepare_qat

        n = prepare_qat(student, cfg.quantize)
        print(f"[kdflow] quantization-aware training: {n} linear layers see their weights fake-quantized "
              f"({_scheme_text(cfg.quantize)}) in every forward")

    # Encode (validates every row: missing fields, empty text, prompts over the limit).
    seqkd_stats = None
    unended: set[int] = set()
    if cfg.method == "seqkd":
        train_rows, cut = seqkd_rows(cfg, train_rows, teacher, teacher_tok, out)
        unended = {i for i, c in enumerate(cut) if c}
        seqkd_stats = {"answers": len(cut), "truncated": len(unended), "max_new_tokens": cfg.seqkd.max_new_tokens}
        if unended:
            print(f"[kdflow] seqkd: {len(unended)} of {len(cut)} teacher answers reached seqkd.max_new_tokens="
                  f"{cfg.seqkd.max_new_tokens} without ending; they are trained on without an end (no EOS target)")
    train_examples = encode_rows(train_rows, tok, cfg.data, unended)
    val_examples = encode_rows(val_rows, tok, cfg.data) if val_rows is not None else None
    if test_rows is not None:
        encode_rows(test_rows.head(cfg.eval.max_rows), tok, cfg.data)
    if cache is not None:
        cache.attach(train_examples, cfg.kd.token_scope)
        print(f"[kdflow] training from teacher cache {cfg.teacher_cache.dir} (k={cfg.teacher_cache.k}); the teacher is not run")
    align_stats = None
    if cache is None and cross is not None and cfg.kd.kd_weight > 0:
        align_stats = cross.prepare(train_examples, train_rows)
        print(f"[kdflow] alignment: {align_stats.summary()}")
        if val_examples is not None:
            cross.prepare(val_examples, val_rows)

    slots, multi = None, None
    if cfg.teachers:
        slots, multi = _setup_teachers(cfg, train_rows, val_rows, train_examples, val_examples, tok)

    hidden_pairs, teacher_width, hidden_columns = None, None, None
    if cfg.kd.hidden_weight > 0:
        from kdflow.models import _read_config

        t_config = teacher.config if teacher is not None else _read_config(cfg.teacher)
        t_config = getattr(t_config, "text_config", None) or t_config
        hidden_pairs = layer_map(cfg.kd.hidden_layers, student.config, int(t_config.num_hidden_layers),
                                 cfg.kd.hidden_embeddings)
        teacher_width = int(t_config.hidden_size)
        if cache is not None:  # the cached layers must include every teacher layer of the map
            stored = cache.manifest["key"].get("hidden_layers") or []
            missing = sorted({t for _, t in hidden_pairs} - set(stored))
            if missing:
                raise ConfigError(f"teacher cache {cfg.teacher_cache.dir} holds teacher layers {stored}, but the layer "
                                  f"map needs {missing} too; rebuild it with teacher_cache.hidden=all (or with those "
                                  "layers) or change kd.hidden_layers")
            hidden_columns = [stored.index(t) for _, t in hidden_pairs]
        print(f"[kdflow] hidden-state term: weight {cfg.kd.hidden_weight}, {cfg.kd.hidden_loss}, layer pairs "
              f"(student:teacher) {', '.join(f'{a}:{b}' for a, b in hidden_pairs)}"
              + (f"; a learned projection {student.config.hidden_size} -> {teacher_width} per pair (not saved with the "
                 "student)" if teacher_width != student.config.hidden_size else ""))

    total, _ = count_parameters(student)
    print(f"[kdflow] method={cfg.method} student={total / 1e6:.1f}M params, teacher="
          f"{_teacher_size(teacher)}, train rows={len(train_examples)}")

    results: dict[str, EvalResult] = {}
    if test_rows is not None and cfg.evaluate_before:
        results["student (before)"] = _eval_cached(out, "student_before", student, tok, test_rows, cfg)

    student = apply_lora(student, cfg.student.lora)
    if cfg.train.gradient_checkpointing:
        student.config.use_cache = False
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.student.lora.enabled:
            student.enable_input_require_grads()
    resume = resolve_resume(cfg.train, out)
    extra: dict[str, Any] = {}
    if cfg.method == "gkd":
        from kdflow.methods.gkd import make_gkd_trainer_class

        Trainer = make_gkd_trainer_class()
        extra = {"tokenizer": tok, "rows": train_rows}
    else:
        Trainer = make_distill_trainer_class()
    trainer = Trainer(
        model=student,
        args=training_arguments(cfg.train, out, cfg.seed, val_examples is not None,
                                device=run_device(cfg.student, "student")),
        train_dataset=ListDataset(train_examples),
        eval_dataset=ListDataset(val_examples) if val_examples else None,
        data_collator=Collator(tok.pad_token_id),
        cfg=cfg,
        teacher=teacher if (cfg.method in ("kd", "hard_token", "gkd") and not use_cache) else None,
        vocab_size=vocab_size,
        cross=cross if not use_cache else None,
        callbacks=[make_stall_watch(stall_advice(cfg.method, cfg.kd.divergence, cfg.kd.kd_weight))],
        **extra,
        hidden_pairs=hidden_pairs,
        teacher_width=teacher_width,
        slots=slots,
        hidden_columns=hidden_columns,
    )
    place(trainer.model, role="student", move=False)  # the Trainer placed it (records where)
    if getattr(trainer, "is_fsdp_enabled", False) and cfg.student.lora.enabled:
        raise ConfigError("student.lora with FSDP: a LoRA student is small enough for data parallelism; launch with a "
                          "DDP config such as configs/accelerate/ddp.yaml, or train all weights under FSDP")
    if resume:
        print(f"[kdflow] resuming from {resume}")
    t_train, cpu_train = time.time(), time.process_time()
    train_loss, trained_now = train_or_restore(trainer, resume)
    train_seconds = time.time() - t_train
    cpu_seconds = processes.sum_over_processes({"cpu": time.process_time() - cpu_train})["cpu"]

    if cfg.quantize.qat:
        from kdflow.compress.quantize import finish_qat

        finish_qat(trainer.model)
    if getattr(trainer, "is_fsdp_enabled", False):
        _save_sharded_student(trainer, tok, out / "student")
    else:
        def save_student() -> None:
            save_model(trainer.model, tok, out / "student")
            if cfg.student.lora.enabled:
                trainer.model.save_pretrained(out / "student_adapter")

        processes.on_main(save_student)
    saved = ModelSpec(name=str(out / "student"), dtype=cfg.student.dtype, trust_remote_code=cfg.student.trust_remote_code)
    export = None
    if cfg.quantize.scheme != "none":
        from kdflow.compress.quantize import export_quantized

        # What ships, and what is scored as the student after training: the quantized copy.
        export = processes.on_main(lambda: export_quantized(saved, cfg.quantize, out / f"student_{cfg.quantize.scheme}",
                                                            tokenizer=tok))
        saved = dataclasses.replace(saved, name=str(out / f"student_{cfg.quantize.scheme}"))
        print(f"[kdflow] quantized student ({_scheme_text(cfg.quantize)}) written to {saved.name}: "
              f"{export['bytes'] / 2**20:.1f} MiB of weights")

    if test_rows is not None:
        # Score the saved student exactly as `kdflow eval` scores it. The Trainer's model is not that:
        # under train.bf16 its forward stays wrapped in autocast, and a LoRA adapter is not yet merged.
        model_after = load_model(saved, trainer.args.device).to(trainer.args.device)
        same_tok = teacher is not None and not is_served(teacher) and cross is None and tokenizer_fingerprint(teacher_tok) == tokenizer_fingerprint(tok)
        results["student (after)"] = _eval_cached(out, "student_after", model_after, tok, test_rows, cfg,
                                                  teacher=teacher if same_tok else None)
        del model_after
        if cfg.evaluate_teacher and teacher is not None and not is_served(teacher):
            results["teacher"] = _eval_cached(out, "teacher", teacher, teacher_tok, test_rows, cfg)
            results = {"teacher": results.pop("teacher"), **results}
        if cfg.evaluate_teacher and slots:  # every teacher's own zero-shot scores
            own = {}
            for slot, entry in zip(slots, multi["entries"]):
                ready_j = entry.pop("_ready")
                own[f"teacher {slot.label}"] = _eval_cached(out, f"teacher_{slot.label}", ready_j.model(),
                                                            ready_j.tokenizer, test_rows, cfg)
                if slot.model is None:
                    ready_j.release()
            results = {**own, **results}

    history = trainer.state.log_history
    metrics = {
        "method": cfg.method,
        "train": {"steps": trainer.state.global_step, "seconds": train_seconds, "processes": processes.world(),
                  "cpu_seconds": cpu_seconds,  # of every process together
                  "train_loss": train_loss,
                  "tokens_per_second": (_tokens_per_second(train_examples, trainer.state.global_step, cfg, train_seconds)
                                        if trained_now and not resume else None)},
        "token_scope": cfg.kd.token_scope,
        "seqkd": seqkd_stats,
        "gkd": ({**dataclasses.asdict(cfg.gkd), "this_run": trainer.gkd_stats} if cfg.method == "gkd" else None),
        "teacher": cfg.teacher.name,
        "teacher_check": teacher_check,
        "scoring": scoring_rule(cfg.data, cfg.eval),
        "teachers": None if not slots else _teachers_metrics(cfg, slots, multi, trainer),
        "hidden": None if not hidden_pairs else {
            "weight": cfg.kd.hidden_weight, "loss": cfg.kd.hidden_loss, "layers": cfg.kd.hidden_layers,
            "pairs": [list(p) for p in hidden_pairs], "projection": teacher_width != student.config.hidden_size},
        "cross_tokenizer": None if cross is None else {
            "sequence": cfg.align.sequence, "unpaired": cfg.align.unpaired, "vocab_maps": cross.maps.info,
            "alignment": None if align_stats is None else dataclasses.asdict(align_stats)},
        "eval": {k: v.metrics for k, v in results.items()},
        "student_parameters": total,
        "student_layers": getattr(student.config, "kdflow_pruned_from_layers", None),
        "layer_importance": getattr(student.config, "kdflow_layer_importance", None),
        "layer_selection": getattr(student.config, "kdflow_layer_selection", None),
        "width_pruned": getattr(student.config, "kdflow_width_pruned", None),
        "width_importance_kept": pruning.get("width", {}).get("importance_kept"),
        "quantized": export,
        "stall": find_stall(history),
        "seconds_total": time.time() - t_start,
    }
    series = loss_series(history)

    def write_outputs() -> None:
        if pruning.get("width"):
            write_json(out / "pruning.json", pruning["width"])  # every channel's and head's score, and what was kept
        write_json(out / "metrics.json", metrics)
        write_json(out / "log_history.json", history)
        if series:
            plot_curves(out / "loss_curve.png", series, f"kdflow distill ({cfg.method})")
        write_atomic(out / "report.md", _report(cfg, metrics, results, series))

    processes.on_main(write_outputs)
    print()
    print(format_table({k: v.metrics for k, v in results.items()}))
    print(f"\n[kdflow] run folder: {out}  (report.md, metrics.json, loss_curve.png, student/)")
    return metrics


def _teacher_size(teacher: Any) -> str:
    if is_served(teacher):
        return f"served at {teacher.url}"
    return f"{(count_parameters(teacher)[0] / 1e6 if teacher is not None else 0):.1f}M"


def _save_sharded_student(trainer: Any, tok: Any, folder: Path) -> None:
    """Save a student that FSDP sharded across the processes: every process takes part in gathering
    the full weights (accelerate's recipe), the main process writes them as a plain model folder."""
    from kdflow.report import atomic_folder

    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model)

    def save() -> None:
        with atomic_folder(folder) as tmp:
            acc.unwrap_model(trainer.model).save_pretrained(tmp, state_dict=state)
            tok.save_pretrained(tmp)

    processes.on_main(save)


def _tokens_per_second(examples: list[dict[str, Any]], steps: int, cfg: DistillConfig, seconds: float) -> float:
    if seconds <= 0 or not examples:
        return 0.0
    per_seq = sum(len(e["input_ids"]) for e in examples) / len(examples)
    return per_seq * steps * cfg.train.batch_size * cfg.train.grad_accum * processes.world() / seconds


def _report(cfg: DistillConfig, metrics: dict[str, Any], results: dict[str, EvalResult], series: dict) -> str:
    lines = [f"# kdflow distill — {cfg.method}", ""]
    lines.append(f"- teacher: `{cfg.teacher.name}`")
    lines.append(f"- student: init `{cfg.student.init}` {('from `' + cfg.student.name + '`') if cfg.student.name else ''}"
                 f"{(' keeping layers ' + str(metrics['student_layers'])) if metrics.get('student_layers') else ''}"
                 f"{(' (by ' + _SELECTION[metrics['layer_selection']] + ')') if metrics.get('layer_selection') in _SELECTION else ''}"
                 f" — {metrics['student_parameters'] / 1e6:.1f}M parameters"
                 f"{' + LoRA' if cfg.student.lora.enabled else ''}")
    if metrics.get("layer_importance"):
        imp = ", ".join(f"{i}: {x:.3f}" for i, x in enumerate(metrics["layer_importance"]))
        what = {"importance": "1 − cos of each layer's input and output",
                "loss": "answer-loss increase of the calibration rows when the layer alone is skipped"}
        how = what.get(metrics["layer_selection"], "recorded when the student was pruned")
        lines.append(f"- layer importance ({how}; the highest are kept): {imp}")
    if metrics.get("width_pruned"):
        sizes = ", ".join(f"{k} {a} → {b}" for k, (a, b) in metrics["width_pruned"].items())
        kept = metrics.get("width_importance_kept") or {}
        share = ", ".join(f"{k} {v:.1%}" for k, v in kept.items() if v < 1)
        lines.append(f"- width pruned by activation magnitude on calibration rows: {sizes}"
                     + (f"; share of the importance kept: {share}" if share else "") + " (every score: pruning.json)")
    q = metrics.get("quantized")
    if q:
        lines.append(f"- quantized {'by quantization-aware training' if cfg.quantize.qat else 'after training'}: "
                     f"{_scheme_text(cfg.quantize)}; student_{q['scheme']}/ holds {q['bytes'] / 2**20:.1f} MiB of "
                     "weights and is the student scored after training")
    if cfg.method == "kd":
        lines.append(f"- loss: {cfg.kd.kd_weight} · τ² · {cfg.kd.divergence}(p_τ‖q_τ) + {1 - cfg.kd.kd_weight:g} · CE, "
                     f"τ = {cfg.kd.temperature}, KD tokens: {cfg.kd.token_scope}")
    elif cfg.method == "gkd":
        g = metrics["gkd"]
        st = g["this_run"]
        lines.append(f"- loss (on-policy, GKD): {cfg.kd.kd_weight} · τ² · {cfg.kd.divergence}"
                     f"{f'(β={cfg.kd.jsd_beta:g})' if cfg.kd.divergence == 'jsd' else ''}(p_τ‖q_τ) on the answers of each "
                     f"batch + {1 - cfg.kd.kd_weight:g} · CE on dataset answers only, τ = {cfg.kd.temperature}")
        lines.append(f"- answers: sampled by the student for a share λ = {g['lmbda']} of the batches "
                     f"(temperature {g['temperature']}, top_p {g['top_p']}, max_new_tokens {g['max_new_tokens']}), "
                     f"else {'sampled by the teacher (seq_kd)' if g['seq_kd'] else 'the dataset'}; this run: "
                     f"{st['student']} student / {st['teacher']} teacher / {st['data']} dataset micro-batches, "
                     f"{st['sampled_answers']} sampled answers of which {st['cut_answers']} cut at max_new_tokens "
                     "(no EOS target)")
    mt = metrics.get("teachers")
    if mt:
        share = ", ".join(f"{k} {v:.1%}" for k, v in mt["weight_share_in_training"].items())
        chosen = mt.get("selected_share")
        lines.append(f"- teachers: {', '.join(t['label'] + ' `' + t['teacher'] + '`' for t in mt['teachers'])}; rule "
                     f"{mt['rule']} ({mt['combination']}); share of the KD weight in training: {share}"
                     + (f"; chosen for " + ", ".join(f"{k} {v:.1%}" for k, v in chosen.items()) + " of the training rows"
                        if chosen else ""))
    hd = metrics.get("hidden")
    if hd:
        lines.append(f"- hidden-state term: + {hd['weight']} · mean over layer pairs (student:teacher "
                     f"{', '.join(f'{a}:{b}' for a, b in hd['pairs'])}) of "
                     f"{'MSE of layer-normalised states' if hd['loss'] == 'mse' else '1 − cosine'}"
                     f"{' after a learned projection (not saved)' if hd['projection'] else ''}")
    if cfg.method == "hard_token":
        lines.append(f"- loss: {cfg.kd.kd_weight} · CE(teacher argmax) + {1 - cfg.kd.kd_weight:g} · CE, tokens: {cfg.kd.token_scope}")
    elif cfg.method == "seqkd" and metrics.get("seqkd"):
        q = metrics["seqkd"]
        lines.append(f"- teacher answers: {q['answers']}, of which {q['truncated']} reached max_new_tokens="
                     f"{q['max_new_tokens']} without ending (trained on without an EOS target)")
    t = metrics["train"]
    speed = f" ({t['tokens_per_second']:.0f} tokens/s)" if t["tokens_per_second"] else " (resumed)"
    lines.append(f"- training: {t['steps']} steps in {t['seconds']:.0f} s{speed}, data `{cfg.data.train}`")
    x = metrics.get("cross_tokenizer")
    if x:
        a = x["alignment"]
        paired = f", {a['paired']} of {a['positions']} answer positions paired" if a else " (targets from the teacher cache)"
        lines.append(f"- cross-tokenizer: positions paired by {x['sequence']}{paired}, unpaired positions: {x['unpaired']}")
    if metrics.get("stall"):
        lines.append(f"- {stall_message(metrics['stall'], stall_advice(cfg.method, cfg.kd.divergence, cfg.kd.kd_weight))}")
    tc = metrics.get("teacher_check")
    if tc:
        em = f", exact match {tc['exact_match']:.1%}" if tc.get("exact_match") is not None else ""
        verdict = ("; below thresholds: " + "; ".join(tc["below_thresholds"])) if tc["below_thresholds"] else ""
        lines.append(f"- teacher check on {tc['rows']} validation rows: answer NLL {tc['answer_nll']:.3f}{em}{verdict}")
    lines.append(f"- exact match: {metrics['scoring']}")
    rows = next((int(r.metrics["rows"]) for r in results.values()), 0)
    lines += ["", f"## Test split (`{cfg.data.test}`, {rows} rows)", "",
              format_table({k: v.metrics for k, v in results.items()}) or "(no test split)", ""]
    lines += differences_markdown(results, [("student (after)", "student (before)"), ("student (after)", "teacher")],
                                  cfg.eval)
    if series:
        lines += ["## Loss", "", "![loss curve](loss_curve.png)", ""]
    for name, res in results.items():
        if res.examples:
            lines += examples_markdown(name, res.examples)
    return "\n".join(lines)
