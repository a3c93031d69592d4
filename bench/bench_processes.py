"""Two processes against one: training tokens/s of `kdflow distill` and `kdflow codistill` on this machine.

The real commands on the bundled SmolLM2-135M-Instruct (configs/distill_define.yaml: online soft KD into the
10-layer pruned student; configs/codistill.yaml: the 10- and 6-layer pruned peers), each process
with one torch thread, for the same global batch of 32 rows per optimizer step: 1 process with
batch_size 8 and grad_accum 4, or 2 processes (`torchrun --nproc_per_node 2`, gloo) with batch_size 8
and grad_accum 2 — the micro-batch stays the size one process runs efficiently, the processes share
the accumulation (halving batch_size instead costs a single process itself about a third more CPU
per token here: small matmuls). No evaluation, no validation, one checkpoint at the end. Each run reports the
training tokens/s kdflow measures (metrics.json: training loop only) with the training loop's CPU
time summed over the processes (what parallelism costs on top of the work, whatever else the
machine runs), and the wall and CPU time of the whole command. The variants alternate, so load from
other jobs hits both alike; per verb it prints the ratio of tokens/s (2 processes / 1 process) and
of training CPU time per token.

    python bench/bench_processes.py [--steps 12] [--repeats 1] [--verbs distill codistill]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, median

QUIET = ["data.validation=", "data.test=", "evaluate_before=false", "train.logging_steps=1000", "train.save_steps=0",
         "train.eval_steps=0", "train.num_threads=1", "train.batch_size=8", "train.report_to=[none]"]
VERBS = {
    "distill": ("configs/distill_define.yaml", ["evaluate_teacher=false"]),  # no validation rows: no teacher check
    "codistill": ("configs/codistill.yaml", ["baseline_alone=false"]),
}


def run(verb: str, world: int, steps: int, work: Path) -> dict[str, float]:
    config, extra = VERBS[verb]
    out = work / f"{verb}-p{world}"
    shutil.rmtree(out, ignore_errors=True)
    args = [verb, "--config", str(ROOT / config), f"output_dir={out}", f"train.max_steps={steps}",
            f"train.grad_accum={4 // world}", *QUIET, *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd = (launcher + ["-m", "kdflow"] if world > 1 else [sys.executable, "-m", "kdflow"]) + args
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{verb} on {world} process(es) failed:\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    train = metrics["train"]["codistill"] if verb == "codistill" else metrics["train"]
    assert train["processes"] == world, train
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    train_cpu = train["cpu_seconds_this_session" if verb == "codistill" else "cpu_seconds"]
    return {"tokens_per_second": train["tokens_per_second"], "train_seconds": train["seconds"],
            "train_cpu": train_cpu, "tokens": train["tokens_per_second"] * train["seconds"], "wall": wall, "cpu": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (32 rows each)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each variant")
    ap.add_argument("--verbs", nargs="+", default=list(VERBS), choices=list(VERBS))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kdflow-bench-processes-"))
    print(f"{os.cpu_count()} CPU cores; each process 1 torch thread; global batch 32 rows per step, {args.steps} steps")
    try:
        for verb in args.verbs:
            results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
            for _ in range(args.repeats):
                for world in (1, 2):
                    r = run(verb, world, args.steps, work)
                    results[world].append(r)
                    print(f"  {verb:9s} {world} process(es): {r['tokens_per_second']:7.1f} tokens/s; training wall "
                          f"{r['train_seconds']:.1f} s, CPU {r['train_cpu']:.1f} s (all processes); whole command "
                          f"wall {r['wall']:.1f} s, CPU {r['cpu']:.1f} s", flush=True)
            tps = {w: median([r["tokens_per_second"] for r in rs]) for w, rs in results.items()}
            cpt = {w: median([r["train_cpu"] / r["tokens"] for r in rs]) for w, rs in results.items()}
            print(f"{verb}: 2 processes x 1 thread / 1 process x 1 thread = {tps[2] / tps[1]:.2f}x training tokens/s "
                  f"({tps[2]:.1f} vs {tps[1]:.1f}); training CPU per token {cpt[2] / cpt[1]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
