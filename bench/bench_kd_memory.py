"""Benchmark 2: peak memory of the KD loss at 4096 tokens x vocabulary 49152, chunked / naive.

Each variant runs in its own fresh process that builds the same inputs (student and teacher final
hidden states [4096, 576], output heads [49152, 576] like SmolLM2's), then computes CE + KD and
its backward. The figure is the growth of the process's peak resident memory during the loss
(ru_maxrss after minus resident memory just before), so it covers every float32 tensor the loss
creates, whatever allocator reuse happens. Goal: chunked / naive <= 1/8.

    python bench/bench_kd_memory.py [--tokens 4096] [--chunk 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

VARIANTS = ("naive", "chunked", "naive_topk", "chunked_topk")


def child(variant: str, tokens: int, chunk: int, vocab: int, hidden_size: int) -> None:
    import resource

    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
    from kdflow.losses import DenseTeacher, HeadLossSpec, TopKTargets, ce_sum, get_divergence, head_losses, kd_sum, topk_kd_sum

    torch.manual_seed(0)
    torch.set_grad_enabled(True)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    t_head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    t_hidden = torch.randn(tokens, hidden_size)
    targets = torch.randint(0, vocab, (tokens,))
    rows = torch.ones(tokens, dtype=torch.bool)
    fkl = get_divergence("fkl")
    topk = None
    if variant.endswith("topk"):  # a cached teacher: top-64 ids and log-probs, as the cache stores them
        ids = torch.randint(0, vocab, (tokens, 64))
        topk = TopKTargets(ids, torch.log_softmax(torch.randn(tokens, 64), -1) - 0.1)
    # touch every page of the inputs and head gradients before measuring
    (head.weight.sum() + hidden.sum()).backward()
    head.weight.grad.zero_()
    hidden.grad.zero_()

    def rss_now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss_now()
    if variant.startswith("naive"):
        logits = head(hidden)  # [tokens, vocab] at once, the way most trainers do it
        ce, _ = ce_sum(logits, targets)
        if topk is None:
            kd, _ = kd_sum(logits, t_head(t_hidden), fkl, 1.0)
        else:
            kd, _ = topk_kd_sum(logits, topk, fkl, 1.0, "tail")
    else:
        spec = HeadLossSpec(kind="soft", divergence=fkl, temperature=1.0, vocab_size=vocab, chunk_tokens=chunk)
        out = head_losses(hidden, head, targets, rows, topk if topk is not None else DenseTeacher(t_hidden, t_head), spec)
        ce, kd = out["ce"][0], out["kd"][0]
    (ce + kd).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"variant": variant, "peak_growth_bytes": peak - before, "loss": float(ce + kd)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--child", choices=VARIANTS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.tokens, args.chunk, args.vocab, args.hidden)
        return
    res = {}
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", v, "--tokens", str(args.tokens), "--chunk", str(args.chunk),
                              "--vocab", str(args.vocab), "--hidden", str(args.hidden)],
                             capture_output=True, text=True, check=True)
        res[v] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{v:>13}: peak memory growth {res[v]['peak_growth_bytes'] / 2**20:8.1f} MiB   (loss {res[v]['loss']:.4f})")
    for dense, chunked in (("naive", "chunked"), ("naive_topk", "chunked_topk")):
        r = res[chunked]["peak_growth_bytes"] / res[dense]["peak_growth_bytes"]
        print(f"{chunked} / {dense}: {r:.3f}  (1/{1 / r:.1f}; goal <= 1/8)  at {args.tokens} tokens x {args.vocab} vocabulary, chunk {args.chunk}")
    same = abs(res["naive"]["loss"] - res["chunked"]["loss"]) / abs(res["naive"]["loss"])
    print(f"naive and chunked losses agree to {same:.1e} relative")


if __name__ == "__main__":
    main()
