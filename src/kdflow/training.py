"""Training glue shared by every method: seeds, threads, run folders, resume, Trainer arguments.

Methods that fit transformers' Trainer loop subclass `TokenNormalizedTrainer`, which divides
each loss term by its token count over the whole optimizer step (all micro-batches, all ranks)
instead of per micro-batch.
"""

from __future__ import annotations

import functools
import math
import os
import re
from pathlib import Path
from typing import Any

from kdflow.config import TrainConfig, dump_yaml
from kdflow.errors import ConfigError, DataError
from kdflow.report import atomic_folder, write_atomic, writing
from kdflow.runfolder import check_files, hold


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
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir {out}: cannot create it ({e.strerror}); choose a folder you can write to") from None
    train = getattr(cfg, "train", None)
    if resume is None:
        resume = train.resume if train is not None else "never"
    hold(out, cfg, resume, resume_key, ignore)
    write_atomic(out / "config.yaml", dump_yaml(cfg))
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
                       device: Any = None) -> Any:
    """TrainingArguments for `train`; `device` (models.run_device of the trained model) cpu keeps the
    Trainer on the CPU even where a GPU is present."""
    from transformers import TrainingArguments

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
        bf16=train.bf16,
        report_to=report_to,
        remove_unused_columns=False,
        seed=seed,
        dataloader_num_workers=0,
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


# ----------------------------------------------------------------------------------------------
# Checkpoints of custom training loops (methods that train several models, or not on Trainer)

LOOP_STATE = "loop_state.json"


def loop_checkpoints(folder: str | os.PathLike) -> dict[int, Path]:
    """Complete `checkpoint-N` folders under `folder` (those holding loop_state.json), by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / LOOP_STATE).is_file():
            found[int(m.group(1))] = p
    return found


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    import random

    import numpy as np
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = t
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
             "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_loop_checkpoint(folder: str | os.PathLike, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
    """Write one model's trainable weights (all weights, or only a LoRA adapter's), its optimizer and
    scheduler, the RNG states and `state` (step, logs, ...) to `folder`, atomically: the folder
    appears complete or not at all, so an interruption never leaves a checkpoint that resumes wrong.
    """
    import json

    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        # named_parameters() lists a tied weight once, so shared tensors never reach safetensors twice
        weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        tensors, plain = _rng_state()
        save_file(tensors, str(tmp / "rng.safetensors"))
        (tmp / LOOP_STATE).write_text(json.dumps({**state, "rng": plain}))
    return folder


def load_loop_checkpoint(folder: str | os.PathLike, model: Any, optimizer: Any, scheduler: Any,
                         restore_rng: bool = True) -> dict[str, Any]:
    """Load what `save_loop_checkpoint` wrote into `model`, `optimizer`, `scheduler`; return the state."""
    import json

    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    check_files(folder)
    try:
        weights = load_file(str(folder / "trainable.safetensors"))
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler_state = torch.load(folder / "scheduler.pt", map_location="cpu", weights_only=True)
        state = json.loads((folder / LOOP_STATE).read_text())
        rng = load_file(str(folder / "rng.safetensors")) if restore_rng else None
    except Exception as e:  # safetensors, torch and json each have their own errors for a damaged file
        raise DataError(f"checkpoint {folder} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "delete it to resume from an earlier checkpoint, or set resume=never to start over") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise ConfigError(f"{folder} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                          "use another output_dir or train.resume=never")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.device, p.dtype))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if restore_rng:
        _set_rng_state(rng, state["rng"])
    return state


def common_loop_checkpoint(folders: list[Path], resume: str, setting: str = "train.resume") -> int | None:
    """The step to resume several models trained together from: the newest checkpoint that every
    folder holds (resume=auto; an interruption while they were being saved leaves the newest one
    incomplete), or the `checkpoint-N` that `resume` names. None: start afresh (with resume=never,
    `setup_run` has moved the folder's earlier checkpoints aside).
    """
    have = [loop_checkpoints(f) for f in folders]
    common = set(have[0]).intersection(*have[1:])
    if resume == "never":
        return None
    if resume == "auto":
        return max(common) if common else None
    m = re.fullmatch(r"checkpoint-(\d+)", Path(resume).name)
    if not m:
        raise ConfigError(f"{setting}={resume}: give 'auto', 'never' or checkpoint-N (a step every model has saved)")
    if int(m.group(1)) not in common:
        raise ConfigError(f"{setting}={resume}: not every model has checkpoint-{m.group(1)}; common steps: {sorted(common)}")
    return int(m.group(1))


def prune_loop_checkpoints(folder: str | os.PathLike, keep: int, protect: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep` checkpoints (never those in `protect`)."""
    import shutil

    if keep <= 0:
        return
    found = loop_checkpoints(folder)
    for step in sorted(found)[:-keep]:
        if step not in protect:
            shutil.rmtree(found[step], ignore_errors=True)


def train_examples(model: Any, optimizer: Any, examples: list[dict[str, Any]], *, pad_id: int, batch_size: int,
                   grad_accum: int, epochs: int, seed: int, loss_sums: Any, count_tokens: Any,
                   term_weights: dict[str, float], bf16: bool = False, max_grad_norm: float = 1.0,
                   scheduler: Any = None) -> list[dict[str, float]]:
    """A plain training loop for methods that keep their own optimizer across phases (FedMKT).

    Same normalisation as `TokenNormalizedTrainer`: each term's token count is summed over the
    micro-batches of an optimizer step first, and each micro-batch contributes
    weight * sum / step_count. Returns one log entry per optimizer step.
    """
    import random

    import torch

    from kdflow.data import collate

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    logs: list[dict[str, float]] = []
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches = [collate([examples[i] for i in order[s:s + batch_size]], pad_id) for s in range(0, len(order), batch_size)]
        for s in range(0, len(batches), grad_accum):
            step_batches = batches[s:s + grad_accum]
            totals: dict[str, int] = {}
            for b in step_batches:
                for k, v in count_tokens(b).items():
                    totals[k] = totals.get(k, 0) + int(v)
            entry = {k: 0.0 for k in term_weights}
            loss_value = 0.0
            for b in step_batches:
                with torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16, enabled=bf16):
                    sums = loss_sums(model, b)
                loss = None
                for term, (value, _) in sums.items():
                    part = value / max(totals.get(term, 0), 1)
                    entry[term] = entry.get(term, 0.0) + float(part.detach())
                    w = term_weights.get(term, 1.0)
                    if w:
                        loss = w * part if loss is None else loss + w * part
                if loss is not None:
                    if not torch.isfinite(loss.detach()):
                        from kdflow.errors import KDFlowError

                        raise KDFlowError(f"the training loss became {float(loss.detach())}; lower the learning rate or check the data")
                    loss.backward()
                    loss_value += float(loss.detach())
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            entry["loss"] = loss_value
            logs.append(entry)
    model.eval()
    return logs
