"""The training loop every custom method shares (co-distillation, MiniLLM, FedMKT parties), on accelerate.

`Loop` holds one `accelerate.Accelerator`: `prepare` puts the models (one or several, each with its
own optimizer and scheduler) on the process's device, behind DDP when `torchrun` / `accelerate
launch` started several processes (data parallelism; a sharded FSDP or DeepSpeed setup is refused:
sampling and evaluation run each process's own rows through its whole model); `micro_batch` runs
a forward/backward under the mixed-precision autocast and lets the processes exchange gradients on
the last micro-batch of an optimizer step only; `clip_grad_norm` and `save` / `load` (`save_state` /
`load_state`: weights, optimizers, schedulers and every process's RNG states) are accelerate's.

What kdflow adds on top, and keeps whatever the number of processes:
- step-level token normalisation (methods.md §0): a method counts each loss term's tokens over its
  micro-batches of the optimizer step, `step_counts` sums them over every process, and each
  micro-batch contributes weight * sum / step_count. DDP averages gradients over the P processes,
  so `backward` multiplies by P: the step's gradient is that of the whole global batch, however it
  is split between micro-batches and processes;
- global batches: an optimizer step takes batch_size * grad_accum rows per process, and
  `micro_batches` gives each process its share of the step's rows, so P processes with batch B
  compute the step one process computes with batch P * B;
- checkpoints that are complete or absent: every process writes into `checkpoint-N.partial`, the
  main process adds `loop_state.json` and the run's settings stamp and renames the folder; a LoRA
  model's checkpoint holds its adapter only (trainable parameters);
- exact resume: the same command continues from the newest checkpoint with each process's RNG
  state restored, and ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from kdflow import processes
from kdflow.errors import ConfigError, DataError

LOOP_STATE = "loop_state.json"
PARTIAL = ".partial"


class Loop:
    """One accelerate.Accelerator for a custom training loop (see the module docstring)."""

    def __init__(self, bf16: bool = False, setting: str = "train.bf16"):
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType

        from kdflow.models import use_bf16

        # Mixed precision is fixed when accelerate's shared state is first built; a run that trains
        # several loops in one process (baselines, FedMKT phases, `kdflow compare`) sets it per loop,
        # the way transformers' TrainingArguments resets it for each Trainer.
        AcceleratorState._reset_state()
        # Gradients as views into DDP's communication buckets: no copy of every gradient in and out
        # of the buckets at each step. No broadcast of buffers before every forward: a language
        # model's buffers (rotary frequencies, masks) are constants every process builds alike, and
        # the broadcast would make each micro-batch of each model wait for the slowest process.
        ddp = DistributedDataParallelKwargs(gradient_as_bucket_view=True, broadcast_buffers=False)
        self.accelerator = Accelerator(cpu=processes.use_cpu(), mixed_precision="bf16" if use_bf16(bf16, setting) else "no",
                                       step_scheduler_with_optimizer=False, kwargs_handlers=[ddp])
        if self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            # Sampling and evaluation here run each process's own rows through its own whole model;
            # a sharded model would need every process in every forward.
            raise ConfigError(f"accelerate is configured for {self.accelerator.distributed_type.value}, which shards "
                              "each model across the processes; codistill, minillm and fedmkt train with data "
                              "parallelism (every process holds whole models): launch them with a DDP config such as "
                              "configs/accelerate/ddp.yaml (FSDP: kdflow distill)")
        self.accelerator.gradient_state._set_sync_gradients(True)  # a Trainer run before may have left it off
        self.accelerator.register_save_state_pre_hook(_save_trainable_only)
        self.accelerator.register_load_state_pre_hook(_load_trainable_only)
        self.models: list[Any] = []

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> Any:
        return self.accelerator.device

    def seed(self, seed: int) -> None:
        """Seed every RNG; each process gets seed + its index (dropout differs between processes), so
        process 0 draws what a single process draws."""
        from accelerate.utils import set_seed

        set_seed(seed, device_specific=True)

    # -- setting up
    def prepare(self, models: list[Any], optimizers: list[Any], schedulers: list[Any]) -> tuple[list, list, list]:
        """Models on this process's device (behind DDP under several processes), optimizers and
        schedulers wrapped; in the order given. Checkpoints hold them in this order too."""
        out = self.accelerator.prepare(*models, *optimizers, *schedulers)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        n, m = len(models), len(optimizers)
        self.models = out[:n]
        return out[:n], out[n:n + m], out[n + m:]

    def unwrap(self, model: Any) -> Any:
        """The plain module behind a prepared model (for generation and evaluation, which must not go
        through DDP: processes generate different numbers of tokens)."""
        return self.accelerator.unwrap_model(model)

    def release(self, model: Any) -> Any:
        """The plain module with its original forward (accelerate's autocast wrapper removed), for
        saving and final evaluation: the saved model is scored as `kdflow eval` scores it."""
        return self.accelerator.unwrap_model(model, keep_fp32_wrapper=False)

    # -- one optimizer step
    def micro_batches(self, rows: list[Any], batch_size: int, grad_accum: int) -> list[list[Any]]:
        """This process's micro-batches of an optimizer step whose global rows are `rows`
        (batch_size * grad_accum * world of them): micro-batch a of process r is the (a * world + r)-th
        run of batch_size rows, so micro-batch a of all processes together is micro-batch a of one
        process with batch_size * world."""
        return [rows[(a * self.world + self.rank) * batch_size:(a * self.world + self.rank + 1) * batch_size]
                for a in range(grad_accum)]

    def step_counts(self, local: dict[str, int]) -> dict[str, int]:
        """Each term's token count over the optimizer step, summed over every process."""
        return {k: int(round(v)) for k, v in processes.sum_over_processes(local).items()}

    def sum_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Logged terms summed over the processes (each process logs its share: sum / step count)."""
        return processes.sum_over_processes(logs)

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """Forward and backward of one micro-batch, under the mixed-precision autocast; gradients are
        exchanged between processes after the step's last micro-batch only."""
        with contextlib.ExitStack() as stack:
            if not last:
                for m in self.models:
                    stack.enter_context(self.accelerator.no_sync(m))
            stack.enter_context(self.accelerator.autocast())
            yield

    def backward(self, loss: Any) -> None:
        """Backward of a loss already divided by the step's counts over every process: DDP averages the
        gradients of the processes, so the loss is multiplied by their number first."""
        self.accelerator.backward(loss * self.world if self.world > 1 else loss)

    def clip_grad_norm(self, model: Any, max_norm: float) -> float:
        """Clip to `max_norm` (0: no clipping) and return the gradient norm before clipping."""
        norm = self.accelerator.clip_grad_norm_(list(model.parameters()), max_norm if max_norm > 0 else float("inf"))
        return float(norm) if norm is not None else float("nan")

    # -- checkpoints
    def save(self, folder: str | os.PathLike, state: dict[str, Any]) -> Path:
        """Write every prepared model (trainable parameters only), optimizer, scheduler and each
        process's RNG state with accelerate's `save_state`, plus `state` as loop_state.json, into
        `folder`: atomically (the folder appears complete or not at all) and stamped with the run's
        settings digest. Every process must call it."""
        from kdflow.report import writing
        from kdflow.runfolder import stamp

        folder = Path(folder)
        tmp = folder.with_name(folder.name + PARTIAL)

        def start() -> None:
            with writing(folder):
                if tmp.exists():
                    shutil.rmtree(tmp)  # left by an interrupted save
                tmp.mkdir(parents=True)

        def finish() -> None:
            with writing(folder):
                stamp(tmp)
                (tmp / LOOP_STATE).write_text(json.dumps({**state, "processes": self.world}))
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)

        # The main process prepares and completes the folder while the others wait (and share its
        # error, if any); every process writes its part in between.
        processes.on_main(start)
        with writing(folder):
            self.accelerator.save_state(str(tmp))
        processes.barrier()
        processes.on_main(finish)
        return folder

    def load(self, folder: str | os.PathLike, resume_key: str, reseed: int = 0) -> dict[str, Any]:
        """Load what `save` wrote into the prepared objects; return the saved state. A checkpoint
        written by another number of processes resumes with the same batches, but the processes
        it lacks RNG states for are seeded from `reseed` (so not bit for bit)."""
        from accelerate.utils import set_seed

        from kdflow.runfolder import check_files

        from accelerate.utils import load as accelerate_load

        folder = Path(folder)
        check_files(folder, resume_key)
        rng = folder / f"random_states_{self.rank}.pkl"
        try:
            state = json.loads((folder / LOOP_STATE).read_text())
            if rng.is_file():
                accelerate_load(rng)  # load_state skips RNG states it cannot read without a word: read them first
            self.accelerator.load_state(str(folder))
        except (ConfigError, DataError):
            raise
        except Exception as e:  # torch, safetensors and json each have their own errors for a damaged file
            detail = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            raise DataError(f"checkpoint {folder} cannot be read ({detail}); delete it to resume from an earlier "
                            f"checkpoint, or set {resume_key}=never to start over") from None
        saved_world = int(state.get("processes", 1))
        if saved_world == self.world and not rng.is_file():
            raise DataError(f"checkpoint {folder} lacks {rng.name}, the RNG state of process {self.rank}; delete the "
                            f"folder to resume from an earlier checkpoint, or set {resume_key}=never to start over")
        if saved_world != self.world:
            if self.is_main:
                print(f"[kdflow] {folder.name} was written by {saved_world} process(es), this run has {self.world}: "
                      "training continues with the same batches, but not bit for bit")
            if not rng.is_file():
                set_seed(reseed + self.rank, device_specific=False)
        return state


def adamw(params: Any, **kwargs: Any) -> Any:
    """torch's AdamW, fused where torch has the fused kernel for the parameters' device (CPU and CUDA
    here): the same update in one pass over each tensor, several times faster on CPU than the
    per-tensor loop, which matters most where every process repeats the step (data parallelism)."""
    import torch

    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, **kwargs)


def _trainable_names(model: Any) -> set[str]:
    # named_parameters() lists a tied weight once, so shared tensors never reach safetensors twice
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _save_trainable_only(models: list[Any], weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate's save hook: keep each model's trainable parameters only (a LoRA adapter, not the
    frozen base it was built from and is rebuilt from). FSDP and DeepSpeed save their own way (no
    `weights` then)."""
    if len(weights) != len(models):
        return
    for i, model in enumerate(models):
        keep = _trainable_names(model)
        weights[i] = {k: v for k, v in weights[i].items() if k in keep}


def _load_trainable_only(models: list[Any], input_dir: str) -> None:
    """accelerate's load hook, the inverse of `_save_trainable_only`; it loads the models itself
    (accelerate's loader wants every weight) and so empties `models`."""
    import torch
    from safetensors.torch import load_file

    for i, model in enumerate(models):
        path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
        weights = load_file(str(path))
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if set(weights) != set(params):
            extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
            raise ConfigError(f"{input_dir} does not fit this model (missing {missing[:3]}, unexpected {extra[:3]}); "
                              "use another output_dir or resume=never")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(weights[n].to(p.device, p.dtype))
    models.clear()


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def checkpoints(folder: str | os.PathLike) -> dict[int, Path]:
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


def resume_step(folder: str | os.PathLike, resume: str, setting: str = "train.resume") -> int | None:
    """The step to resume from: the newest checkpoint (resume=auto), the `checkpoint-N` that `resume`
    names, or None to start afresh (with resume=never, `setup_run` has moved earlier ones aside)."""
    have = checkpoints(folder)
    if resume == "never":
        return None
    if resume == "auto":
        return max(have) if have else None
    m = re.fullmatch(r"checkpoint-(\d+)", Path(resume).name)
    if not m:
        raise ConfigError(f"{setting}={resume}: give 'auto', 'never' or checkpoint-N")
    if int(m.group(1)) not in have:
        raise ConfigError(f"{setting}={resume}: {folder} has no complete checkpoint-{m.group(1)}; there are: "
                          f"{', '.join(f'checkpoint-{s}' for s in sorted(have)) or 'none'}")
    return int(m.group(1))


def prune(folder: str | os.PathLike, keep: int, protect: set[int] = frozenset()) -> None:
    """Delete all but the newest `keep` checkpoints (never those in `protect`), and what interrupted
    saves left; the main process does it, between saves."""
    if not processes.is_main() or not Path(folder).is_dir():
        return
    for partial in Path(folder).glob(f"checkpoint-*{PARTIAL}"):
        shutil.rmtree(partial, ignore_errors=True)
    if keep <= 0:
        return
    found = checkpoints(folder)
    for step in sorted(found)[:-keep]:
        if step not in protect:
            shutil.rmtree(found[step], ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# A plain loop over examples (FedMKT's party training)


def train_examples(model: Any, optimizer: Any, examples: list[dict[str, Any]], *, pad_id: int, batch_size: int,
                   grad_accum: int, epochs: int, seed: int, loss_sums: Callable, count_tokens: Callable,
                   term_weights: dict[str, float], bf16: bool = False, max_grad_norm: float = 1.0,
                   scheduler: Any = None) -> list[dict[str, float]]:
    """Train `model` over `examples` for methods that keep their own optimizer across phases (FedMKT).

    Each epoch shuffles the examples (seeded) into batches; an optimizer step takes
    grad_accum * processes of them, spread as `Loop.micro_batches` spreads rows. Every process runs
    as many micro-batches as the busiest one, a missing one as a zero-weighted repeat, so the
    gradient exchange never waits for a process that has nothing left. Returns one log entry per
    optimizer step; the model is left in eval mode with its own forward.
    """
    import random

    import torch

    from kdflow.data import collate
    from kdflow.errors import KDFlowError

    loop = Loop(bf16)
    wrapped, (opt,), scheds = loop.prepare([model], [optimizer], [scheduler] if scheduler is not None else [])
    (wrapped,) = wrapped
    wrapped.train()
    P, r = loop.world, loop.rank
    logs: list[dict[str, float]] = []
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        per_step = grad_accum * P
        for s in range(0, len(batches), per_step):
            step = batches[s:s + per_step]
            mine = [collate([examples[i] for i in b], pad_id) for b in step[r::P]]
            n_micro = -(-len(step) // P)  # the busiest process's micro-batches
            local: dict[str, int] = {k: 0 for k in term_weights}
            for b in mine:
                for k, v in count_tokens(b).items():
                    local[k] = local.get(k, 0) + int(v)
            totals = loop.step_counts(local)
            entry = {k: 0.0 for k in term_weights}
            loss_value = 0.0
            for a in range(n_micro):
                padding = a >= len(mine)
                b = mine[a] if not padding else collate([examples[i] for i in step[0]], pad_id)
                with loop.micro_batch(last=a == n_micro - 1):
                    sums = loss_sums(wrapped, b)
                    loss = None
                    for term, (value, _) in sums.items():
                        part = value / max(totals.get(term, 0), 1)
                        if not padding:
                            entry[term] = entry.get(term, 0.0) + float(part.detach())
                        w = term_weights.get(term, 1.0)
                        if w:
                            loss = w * part if loss is None else loss + w * part
                    if loss is None:
                        continue
                    if padding:
                        loss = loss * 0.0
                    if not torch.isfinite(loss.detach()):
                        raise KDFlowError(f"the training loss became {float(loss.detach())}; lower the learning rate "
                                          "or check the data")
                    loop.backward(loss)
                    loss_value += float(loss.detach())
            loop.clip_grad_norm(wrapped, max_grad_norm)
            opt.step()
            for sched in scheds:
                sched.step()
            opt.zero_grad(set_to_none=True)
            entry["loss"] = loss_value
            logs.append(loop.sum_logs(entry))
    loop.release(wrapped).eval()
    return logs
