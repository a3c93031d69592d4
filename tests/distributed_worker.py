"""What each torchrun process runs for tests/test_distributed.py: several kdflow commands in a row.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_worker.py PLAN.json

PLAN.json is a list of {"argv": [kdflow arguments], "grads": folder or null, "hang_at": folder name or null}.
With "grads", each optimizer's gradients at its first step are written to grads/rank<R>.safetensors
(what the optimizer is about to apply, after the processes exchanged them). With "hang_at", the
processes stop inside the save of that checkpoint, after accelerate wrote its files and before the
folder is complete, and wait there to be killed.
Many commands in one launch: starting processes is the expensive part on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def capture_first_steps(folder: str | os.PathLike, rank: int = 0):
    """Record each optimizer's gradients at its first step; returns a function that writes them and
    removes the hook."""
    import torch
    from safetensors.torch import save_file
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen: dict[int, int] = {}
    grads: dict[str, torch.Tensor] = {}

    def hook(optimizer, args, kwargs):
        if id(optimizer) in seen:
            return
        k = seen[id(optimizer)] = len(seen)
        for g, group in enumerate(optimizer.param_groups):
            for i, p in enumerate(group["params"]):
                if p.grad is not None:
                    grads[f"{k}.{g}.{i}"] = p.grad.detach().clone().contiguous()

    handle = register_optimizer_step_pre_hook(hook)

    def finish() -> None:
        handle.remove()
        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(grads, str(Path(folder) / f"rank{rank}.safetensors"))

    return finish


def hang_in_save(name: str, marker: Path) -> None:
    """Make the processes stop for good inside the save of checkpoint `name` (see the module docstring);
    each writes its pid to `marker`.rank<R> first (torchrun starts each process in a session of its
    own, so killing the launcher's process group does not reach them)."""
    import accelerate

    original = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, *args, **kwargs):
        out = original(self, output_dir, *args, **kwargs)
        if Path(output_dir).name == name + ".partial":
            marker.with_name(f"{marker.name}.rank{self.process_index}").write_text(str(os.getpid()))
            time.sleep(600)
        return out

    accelerate.Accelerator.save_state = save_state


def main() -> int:
    import torch

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    assert world == int(os.environ.get("KDFLOW_TEST_PROCESSES", world)), f"{world} processes were started"
    from kdflow.cli import main as kdflow

    for cmd in json.loads(Path(sys.argv[1]).read_text()):
        finish = capture_first_steps(cmd["grads"], rank) if cmd.get("grads") else None
        if cmd.get("hang_at"):
            hang_in_save(cmd["hang_at"], Path(sys.argv[1]).with_suffix(".saving"))
        rc = kdflow(cmd["argv"])
        if finish is not None:
            finish()
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
