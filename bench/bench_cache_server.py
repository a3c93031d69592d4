"""`kdflow cache-teacher` through a teacher server against the same command with the teacher loaded locally.

Same machine, same rows, same k, one run side by side: the bundled SmolLM2-135M-Instruct teacher (float32),
N rows of WordNet definitions. The server is `kdflow serve-teacher` on 127.0.0.1 in its own process,
started (and its model loaded) before the clock starts, as a user's long-running server would be; the
client side is the real `kdflow cache-teacher` with teacher.server.url. Each command runs in a fresh
process, timed from its start to its exit (model or tokenizer loading included). Prints the wall times,
their ratio (server / local), and how far the two caches agree: the share of top-k ids in common
and the largest difference of their log-probs over common ids.

    python bench/bench_cache_server.py [--rows 256] [--k 64]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, TRAIN

TEACHER = "bundled:smollm2-135m-instruct"


def kdflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdflow", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONWARNINGS="ignore")
    work = Path(tempfile.mkdtemp(prefix="bench_cache_server_"))
    common = [f"teacher.name={TEACHER}", f"student.name={TEACHER}", f"data.train={TRAIN}", f"data.max_train_rows={args.rows}",
              f"teacher_cache.k={args.k}", "teacher.check.mode='off'", "teacher.dtype=float32", "kd.temperature=1"]
    port = free_port()
    server = subprocess.Popen(kdflow("serve-teacher", f"teacher.name={TEACHER}", "teacher.dtype=float32",
                                     f"serve.port={port}", f"serve.max_logprobs={args.k}", "serve.model_name=teacher",
                                     "serve.idle_timeout=600"),
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        while "serving teacher" not in line:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                sys.exit("serve-teacher did not start")
        url = re.search(r"http://[\d.]+:\d+", line).group(0)
        with urllib.request.urlopen(url + "/health", timeout=30):
            pass
        local = timed(kdflow("cache-teacher", *common, f"teacher_cache.dir={work / 'local'}"), env)
        served = timed(kdflow("cache-teacher", *common, f"teacher_cache.dir={work / 'served'}",
                              f"teacher.server.url={url}", "teacher.server.model=teacher"), env)
    finally:
        server.terminate()
        server.wait(timeout=60)
    from kdflow.teacher_cache import cache_agreement

    agree = cache_agreement(work / "served", work / "local")
    overlap, worst, positions = agree["overlap"], agree["max_abs_logp_diff"], agree["positions"]
    print(f"cache-teacher, {args.rows} rows ({positions} answer positions), k={args.k}, {TEACHER} float32, "
          f"{os.cpu_count()} CPUs")
    print(f"  local teacher:            {local:7.1f} s")
    print(f"  through serve-teacher:    {served:7.1f} s")
    print(f"  served / local:           {served / local:7.2f}x")
    print(f"  top-k ids in common: {overlap:.2%}; largest log-prob difference on common ids: {worst:.2e}")


if __name__ == "__main__":
    main()
