"""Training glue shared by every method: seeds, threads, run folders, resume, Trainer arguments.

Methods that fit transformers' Trainer loop subclass `TokenNormalizedTrainer`, which divides
each loss term by its token count over the whole optimizer step (all micro-batches, all ranks)
instead of per micro-batch. Methods with loops of their own run them on `kdflow.loop.Loop`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any

from kdflow import processes
from kdflow.config import TrainConfig, dump_yaml
from kdflow.errors import ConfigError
from kdflow.report import write_atomic, writing
from kdflow.runfolder import adopt, hold


def setup_run(output_dir: str | os.PathLike, cfg: Any, seed: int, num_threads: int = 0, resume: str | None = None,
              resume_key: str = "train.resume", ignore: tuple[str, ...] = ()) -> Path:
    """Take the run folder, write the resolved config beside the outputs, seed everything.

    Call it once the settings are checked and the data read, so that a run refused for either
    leaves the folder as it was. `kdflow.runfolder.hold` locks the folder against a second run;
    with `resume` (default `cfg.train.resume`) "never" it moves an earlier run's checkpoints and
    results aside, otherwise it refuses checkpoints written with other settings (resuming them
    would mix two experiments) or damaged ones. `resume_key` names the setting in messages; keys
    starting with an `ignore` prefix may change between a run and its resumption.
    """
    import transformers

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    train = getattr(cfg, "train", None)
    if resume is None:
        resume = train.resume if train is not None else "never"

    def take() -> None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir {out}: cannot create it ({e.strerror}); choose a folder you can write to") from None
        hold(out, cfg, resume, resume_key, ignore)
        write_atomic(out / "config.yaml", dump_yaml(cfg))

    # Under several processes the main one takes the folder (lock, earlier run moved aside, checkpoints
    # checked); the others wait, then only learn the settings digest their checkpoints carry.
    processes.on_main(take)
    if not processes.is_main():
        adopt(out, cfg, ignore)
    if num_threads > 0:
        import torch

        torch.set_num_threads(num_threads)
    transformers.set_seed(seed)
    return out


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` folder (one holding trainer_state.json)."""
    out = Path(output_dir)
    if not out.is_dir():
        return None
    found = []
    for p in out.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return str(max(found)[1]) if found else None


def resolve_resume(train: TrainConfig, output_dir: str | os.PathLike) -> str | None:
    if train.resume == "never":
        return None
    if train.resume == "auto":
        return last_checkpoint(output_dir)
    path = Path(train.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"train.resume={train.resume}: no trainer_state.json there; give a checkpoint-N folder, 'auto' or 'never'")
    return str(path)


def training_arguments(train: TrainConfig, output_dir: str | os.PathLike, seed: int, has_eval: bool,
                       device: Any = None, bf16_setting: str = "train.bf16") -> Any:
    """TrainingArguments for `train`; `device` (models.run_device of the trained model) cpu keeps the
    Trainer on the CPU even where a GPU is present. `train.bf16` (named `bf16_setting` in the notice)
    goes through `models.use_bf16`: float32 on a CPU without native bf16."""
    from transformers import TrainingArguments

    from kdflow.models import use_bf16

    report_to = [r for r in train.report_to if r != "none"] or "none"
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_epochs,
        max_steps=train.max_steps,
        warmup_steps=0,  # set from train.warmup_ratio once the step count is known (create_scheduler)
        weight_decay=train.weight_decay,
        optim="adamw_torch_fused",  # one pass per tensor: several times faster on CPU than the per-tensor loop
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        lr_scheduler_type=train.lr_scheduler,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=max(train.save_steps, 1),
        save_total_limit=train.save_total_limit,
        eval_strategy="steps" if (has_eval and train.eval_steps > 0) else "no",
        eval_steps=train.eval_steps if train.eval_steps > 0 else None,
        prediction_loss_only=True,
        bf16=use_bf16(train.bf16, bf16_setting, device),
        report_to=report_to,
        remove_unused_columns=False,
        seed=seed,
        dataloader_num_workers=0,
        # every parameter takes part in every forward (the head runs on the last position at least):
        # DDP need not search the graph for unused ones each step
        ddp_find_unused_parameters=False,
        ddp_broadcast_buffers=False,  # constant buffers (rotary frequencies): no sync before each forward
        use_cpu=not _has_accelerator() or (device is not None and getattr(device, "type", device) == "cpu"),
        disable_tqdm=False,
    )
    # One process drives one device; several GPUs are used through a launcher (DDP), never through
    # the Trainer's single-process DataParallel, which would also take the GPU a teacher sits on.
    args._n_gpu = min(args._n_gpu, 1)
    # TrainingArguments has no ratio any more: its `warmup_steps` reads a float below 1 as a ratio but
    # 1.0 as one step. The ratio rides along and TokenNormalizedTrainer turns it into steps.
    args.kdflow_warmup_ratio = train.warmup_ratio
    return args


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available())


def step_normalized(sums: dict[str, tuple[Any, int]], step_counts: dict[str, int] | None,
                    weights: dict[str, float]) -> tuple[Any, dict[str, float]]:
    """One micro-batch's share of a step's loss: sum_term weight * sum / (term's tokens in the step).

    `sums` holds each term's (sum over this micro-batch, count in this micro-batch); `step_counts`
    the term's count over every micro-batch of the optimizer step (and every rank). Summing the
    returned losses over the micro-batches gives weight * (total sum / total count) whatever the
    split; dividing by each micro-batch's own count would not. Without `step_counts` (evaluation)
    a micro-batch is its own step. Also returns each term's normalised value, for logging.
    """
    loss = None
    parts: dict[str, float] = {}
    for term, (value, count) in sums.items():
        weight = weights.get(term, 1.0)
        denom = step_counts.get(term, count) if step_counts is not None else count
        part = value / max(denom, 1)
        if weight != 0.0:
            loss = weight * part if loss is None else loss + weight * part
        parts[term] = float(part.detach())
    if loss is None:
        loss = next(iter(sums.values()))[0] * 0.0
    return loss, parts


def make_token_normalized_trainer_class() -> type:
    """Build the Trainer subclass lazily so importing kdflow does not import transformers."""
    import torch
    from transformers import Trainer

    class TokenNormalizedTrainer(Trainer):
        """A Trainer whose loss terms are normalised by step-level token counts.

        Subclasses implement `loss_sums(model, inputs) -> {term: (sum, count)}` and
        `count_tokens(batch) -> {term: count}`; `term_weights` gives each term's weight. Before
        each optimizer step the counts of all its micro-batches (and all ranks) are summed; each
        micro-batch then contributes weight * sum / step_count, so the accumulated gradient is
        that of the whole batch, however it is split.
        """

        loss_is_scaled_for_ga = True
        term_weights: dict[str, float] = {}

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self._term_logs: dict[str, list[float]] = {}

        # -- hooks for subclasses
        def loss_sums(self, model: Any, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
            raise NotImplementedError

        def count_tokens(self, batch: dict[str, Any]) -> dict[str, int]:
            raise NotImplementedError

        def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
            ratio = getattr(self.args, "kdflow_warmup_ratio", None)
            if ratio is not None and self.lr_scheduler is None:
                # an int >= 1 is a step count to transformers; 0 is no warm-up
                self.args.warmup_steps = math.ceil(ratio * num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

        # -- step-level counting
        def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list, Any]:
            batch_samples = []
            for _ in range(num_batches):
                try:
                    batch_samples.append(next(epoch_iterator))
                except StopIteration:
                    break
            totals: dict[str, int] = {}
            for b in batch_samples:
                for k, v in self.count_tokens(b).items():
                    totals[k] = totals.get(k, 0) + int(v)
            if self.args.world_size > 1 and totals:
                keys = sorted(totals)
                t = torch.tensor([totals[k] for k in keys], device=device)
                t = self.accelerator.gather(t.unsqueeze(0)).sum(0)
                totals = {k: int(v) for k, v in zip(keys, t.tolist())}
            return batch_samples, totals

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            sums = self.loss_sums(model, inputs)
            step_counts = num_items_in_batch if isinstance(num_items_in_batch, dict) else None
            loss, parts = step_normalized(sums, step_counts, self.term_weights)
            if model.training:
                for term, part in parts.items():
                    self._term_logs.setdefault(term, []).append(part)
            if model.training and self.args.world_size > 1:
                # DDP averages gradients over ranks; the counts above already cover all ranks.
                loss = loss * self.args.world_size
            if not torch.isfinite(loss.detach()):
                from kdflow.errors import KDFlowError

                raise KDFlowError(
                    f"the training loss became {float(loss.detach())} at step {self.state.global_step}; "
                    "lower train.learning_rate, check the data, or disable train.bf16")
            return (loss, {}) if return_outputs else loss

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            from kdflow.runfolder import stamp

            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            if self.args.should_save:
                stamp(folder)  # before trainer_state.json, whose presence marks the checkpoint complete
            with writing(folder):
                super()._save_checkpoint(model, trial)

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs and self._term_logs:
                # per-term losses summed over the micro-batches of each step, averaged over steps
                steps = max(self.state.global_step - getattr(self, "_last_term_log_step", 0), 1)
                for term, values in self._term_logs.items():
                    logs[term] = sum(values) / steps
                self._term_logs = {}
                self._last_term_log_step = self.state.global_step
            super().log(logs, start_time)

    return TokenNormalizedTrainer


def train_or_restore(trainer: Any, resume: str | None) -> tuple[float | None, bool]:
    """Run `trainer.train`, or, when `resume` is a checkpoint of a finished run, load it as is.

    transformers' loop runs one more optimizer step before it checks max_steps, so resuming a
    run that had already finished would silently train past its plan. Returns (training loss,
    whether any step ran now).
    """
    import json

    if resume:
        from transformers import TrainerState

        state = json.loads((Path(resume) / "trainer_state.json").read_text())
        if state.get("max_steps") and state["global_step"] >= state["max_steps"]:
            trainer._load_from_checkpoint(resume)
            trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            return (sum(losses) / len(losses) if losses else None), False
    return trainer.train(resume_from_checkpoint=resume).training_loss, True


# ----------------------------------------------------------------------------------------------
# Data order of custom training loops


@functools.lru_cache(maxsize=4)
def _row_order(n: int, seed: int, epoch: int) -> list[int]:
    import torch

    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def step_rows(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """Rows of optimizer step `step` in a stream of seeded per-epoch shuffles. A function of the
    step only: every model trained from it (co-trained peers, their baselines) sees the same
    batches, and a resumed run continues exactly where the interrupted one stopped."""
    out = []
    for flat in range(step * per_step, (step + 1) * per_step):
        out.append(_row_order(n, seed, flat // n)[flat % n])
    return out
