"""Rollout speed: the KV-cached teacher-mixed sampler against the same loop without caches.

MiniLLM samples every answer token from 0.2 p + 0.8 q, so teacher and student both run at every
step. Same models (the bundled SmolLM2-135M-Instruct teacher, the demo's 10-layer pruned student),
same prompts (the first test rows of the WordNet task), same number of new tokens for every row
(EOS does not stop the benchmark) and the same random draws, so both loops must sample identical
tokens. The variants alternate within one process so that load from other jobs hits both alike;
the ratio of the median wall times is printed, with CPU times.

    python bench/bench_rollout.py [--batch 8] [--new-tokens 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

from common import ROOT, demo_student, load_teacher_and_tokenizer, median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per row (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine two threads spin against other jobs)")
    ap.add_argument("--mix-alpha", type=float, default=0.2)
    args = ap.parse_args()

    import torch

    from kdflow.config import DataConfig
    from kdflow.data import left_pad, prompts_of, read_rows
    from kdflow.models import freeze
    from kdflow.rollout import mixed_sample

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, tok = load_teacher_and_tokenizer()
    student = freeze(demo_student(teacher))
    rows = read_rows(str(ROOT / "data" / "wordnet_define" / "test.jsonl")).head(args.batch)
    ids, mask = left_pad(prompts_of(rows, tok, DataConfig()), tok.pad_token_id)

    def run(use_cache: bool) -> tuple[float, float, torch.Tensor]:
        w0, c0 = time.perf_counter(), time.process_time()
        ro = mixed_sample(student, teacher, ids, mask, max_new_tokens=args.new_tokens, mix_alpha=args.mix_alpha,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                          generator=torch.Generator().manual_seed(0), use_cache=use_cache, stop_at_eos=False)
        return time.perf_counter() - w0, time.process_time() - c0, ro.response_ids

    print(f"teacher {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M, student "
          f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M; batch {args.batch}, prompt width {ids.shape[1]} "
          f"tokens, {args.new_tokens} new tokens per row, torch threads {torch.get_num_threads()}")
    _, _, tokens_cached = run(True)  # warm-up for both variants
    _, _, tokens_plain = run(False)
    same = torch.equal(tokens_cached, tokens_plain)
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):
            w, c, _ = run(use_cache)
            wall[use_cache].append(w)
            cpu[use_cache].append(c)
    n_tokens = args.batch * args.new_tokens
    for use_cache, name in ((True, "KV-cached loop"), (False, "no-cache loop ")):
        w, c = median(wall[use_cache]), median(cpu[use_cache])
        print(f"{name}: median {w:7.2f} s wall, {c:7.2f} s CPU ({n_tokens / w:6.1f} sampled tokens/s); "
              f"runs {[round(t, 2) for t in wall[use_cache]]}")
    print(f"speed-up (no-cache / cached): {median(wall[False]) / median(wall[True]):.2f}x wall, "
          f"{median(cpu[False]) / median(cpu[True]):.2f}x CPU; identical tokens sampled: {same}")


if __name__ == "__main__":
    main()
