"""Compare a teacher cache built through a server (vLLM, bfloat16) with one built locally (float32).

Usage: python scripts/vllm_compare.py SERVED_CACHE LOCAL_CACHE [--min-overlap 0.99] [--max-top1-diff 0.5]
       [--max-mean-diff 0.05]

Per position: the share of the k ids both caches hold (near-ties may swap in bf16), and the
difference of the log-probs the two give to the same ids. Tolerances (stated, for bf16 vs fp32 on
the bundled 135M teacher): overlap >= 99%; on the ids both hold, mean |difference| <= 0.05 nats and
the top-1 token's |difference| <= 0.5 nats everywhere. Exits 1 when any fails.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    from kdflow.teacher_cache import cache_agreement

    ap = argparse.ArgumentParser()
    ap.add_argument("served")
    ap.add_argument("local")
    ap.add_argument("--min-overlap", type=float, default=0.99)
    ap.add_argument("--max-top1-diff", type=float, default=0.5)
    ap.add_argument("--max-mean-diff", type=float, default=0.05)
    a = ap.parse_args()

    report = cache_agreement(a.served, a.local)
    k, overlap = report["k"], report["overlap"]
    print(json.dumps(report, indent=1))
    ok = (overlap >= a.min_overlap and report["mean_abs_logp_diff"] <= a.max_mean_diff
          and report["top1_max_abs_diff"] <= a.max_top1_diff)
    print(f"[test-vllm] top-{k} overlap {overlap:.2%} (>= {a.min_overlap:.0%}), log-prob |difference| on shared ids: "
          f"mean {report['mean_abs_logp_diff']:.4f} (<= {a.max_mean_diff}), max {report['max_abs_logp_diff']:.4f}; "
          f"top-1 max {report['top1_max_abs_diff']:.4f} (<= {a.max_top1_diff}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
