"""Rollout speed: the KV-cached teacher-mixed sampler against the same loop without caches.

Same models (the bundled SmolLM2-135M-Instruct teacher and the demo's 10-layer pruned student),
same prompts (the first test rows of the WordNet task), same number of new tokens for every row
(EOS does not stop the benchmark), same random draws: both loops must sample identical tokens.
The two variants alternate within one process so that machine load hits both alike; the
ratio of the medians is printed.

    python bench/bench_rollout.py [--batch 8] [--new-tokens 32] [--repeats 3] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from kdflow.config import DataConfig, ModelSpec, StudentSpec  # noqa: E402
from kdflow.data import left_pad, prompts_of, read_rows  # noqa: E402
from kdflow.models import build_student, freeze, load_model, load_tokenizer  # noqa: E402
from kdflow.rollout import mixed_sample  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO_LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens sampled per row (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (after one warm-up each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--mix-alpha", type=float, default=0.2)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = ModelSpec(name="bundled:smollm2-135m-instruct")
    tok = load_tokenizer(spec)
    teacher = freeze(load_model(spec))
    student = freeze(build_student(StudentSpec(init="prune_teacher", keep_layers=DEMO_LAYERS), teacher, spec))
    rows = read_rows(str(ROOT / "data" / "wordnet_define" / "test.jsonl")).head(args.batch)
    ids, mask = left_pad(prompts_of(rows, tok, DataConfig()), tok.pad_token_id)

    def run(use_cache: bool) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        ro = mixed_sample(student, teacher, ids, mask, max_new_tokens=args.new_tokens, mix_alpha=args.mix_alpha,
                          eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok),
                          generator=torch.Generator().manual_seed(0), use_cache=use_cache, stop_at_eos=False)
        return time.perf_counter() - t0, ro.response_ids

    print(f"teacher 134.5M (30 layers), student {sum(p.numel() for p in student.parameters()) / 1e6:.1f}M "
          f"({len(DEMO_LAYERS)} layers); batch {args.batch}, prompt width {ids.shape[1]} tokens, "
          f"{args.new_tokens} new tokens per row, torch threads {torch.get_num_threads()}")
    _, tokens_cached = run(True)  # warm-up (allocations, kernels) for both variants
    _, tokens_plain = run(False)
    same = torch.equal(tokens_cached, tokens_plain)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for use_cache in (True, False):  # alternate: load changes hit both variants alike
            times[use_cache].append(run(use_cache)[0])
    cached, plain = statistics.median(times[True]), statistics.median(times[False])
    n_tokens = args.batch * args.new_tokens
    print(f"KV-cached loop : median {cached:7.2f} s  ({n_tokens / cached:6.1f} sampled tokens/s)  runs {[round(t, 2) for t in times[True]]}")
    print(f"no-cache loop  : median {plain:7.2f} s  ({n_tokens / plain:6.1f} sampled tokens/s)  runs {[round(t, 2) for t in times[False]]}")
    print(f"speed-up (no-cache / cached): {plain / cached:.2f}x; identical tokens sampled: {same}")


if __name__ == "__main__":
    main()
