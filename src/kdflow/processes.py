"""Several processes of one run (`torchrun`, `accelerate launch`): who writes, who waits, what is shared.

Every process runs the same command on the same settings and data. The rule (architecture.md,
habit 10): the main process alone writes outputs, reports and progress bars and takes the run
folder; the other processes compute their share and wait at barriers. Work that is split by rows
(evaluation, generation, the teacher cache) is split by whole batches, the very batches one process
would make, so a run on P processes computes bit for bit what one process computes, and the main
process puts the per-batch results back in order.

Results travel between processes as JSON bytes in a tensor (`all_gather_json`), never pickled:
`torch.distributed`'s object collectives unpickle what another machine sends. Python floats survive
the trip exactly (JSON writes the shortest repr that reads back as the same float).

Without a launcher every function here is the trivial single-process case: no process group is
created and nothing waits.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Callable, Iterator, TypeVar

from kdflow.errors import KDFlowError

T = TypeVar("T")


def rank() -> int:
    """This process's index among all processes of the run (0: the main process)."""
    return int(os.environ.get("RANK", "0"))


def world() -> int:
    """How many processes run this command (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def use_cpu() -> bool:
    """True when this machine has no accelerator the processes could use (they then run on CPU, gloo)."""
    import torch

    return not (torch.cuda.is_available() or (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()))


def state() -> Any:
    """accelerate's PartialState for this process: it joins the launcher's process group (gloo on CPU,
    nccl on CUDA) the first time it is asked. None for a single process."""
    if world() == 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def device() -> Any:
    """The device this process computes on: its own GPU under a launcher, else the first GPU or the CPU."""
    s = state()
    if s is not None:
        return s.device
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def barrier() -> None:
    """Wait until every process gets here."""
    if world() > 1:
        state().wait_for_everyone()


def _device() -> Any:
    s = state()
    return s.device if s.backend and "nccl" in s.backend else "cpu"


def all_gather_json(obj: Any) -> list[Any]:
    """Every process's `obj` (JSON-serialisable), in process order, on every process."""
    if world() == 1:
        return [obj]
    import torch
    import torch.distributed as dist

    dev = _device()
    data = json.dumps(obj).encode()
    n = torch.tensor([len(data)], dtype=torch.long, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    width = max(int(s) for s in sizes)
    buf = torch.zeros(width, dtype=torch.uint8, device=dev)
    if data:
        buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    bufs = [torch.zeros_like(buf) for _ in range(world())]
    dist.all_gather(bufs, buf)
    return [json.loads(bytes(b[:int(s)].cpu().numpy())) for b, s in zip(bufs, sizes)]


def broadcast_json(obj: Any) -> Any:
    """The main process's `obj`, on every process (what the others pass is ignored)."""
    if world() == 1:
        return obj
    return all_gather_json(obj if is_main() else None)[0]


def sum_over_processes(values: dict[str, float]) -> dict[str, float]:
    """Each key's sum over all processes (every process must pass the same keys)."""
    if world() == 1:
        return dict(values)
    import torch
    import torch.distributed as dist

    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


class MainProcessError(KDFlowError):
    """The main process's error, raised on the other processes too (the CLI prints it once)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only (taking the run folder, writing a shared file) while the
    others wait; every process returns its JSON-serialisable result, or raises its user error."""
    if world() == 1:
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except KDFlowError as e:
            error, exc = [type(e).__name__, str(e)], e
        except OSError as e:
            from kdflow.cli import os_error_line

            error, exc = ["OSError", os_error_line(e)], e
    shared = broadcast_json({"result": result, "error": error})
    if shared["error"] is not None:
        if is_main():
            raise exc
        raise MainProcessError(*shared["error"])
    return shared["result"]


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (filling a cache, say), the others after it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# ----------------------------------------------------------------------------------------------
# Work split by batches


def my_batches(n_items: int, batch_size: int) -> list[int]:
    """Start indices of the batches (of `batch_size` items, the last one shorter) this process takes:
    batch j goes to process j mod P."""
    return list(range(0, n_items, batch_size))[rank()::world()]


def gather_batches(mine: list[T]) -> list[T]:
    """The per-batch results of every process (`mine[i]` belongs to `my_batches(...)[i]`), in batch order."""
    if world() == 1:
        return list(mine)
    parts = all_gather_json(mine)
    out: list[T] = []
    for i in range(max(len(p) for p in parts)):
        out += [p[i] for p in parts if i < len(p)]
    return out
