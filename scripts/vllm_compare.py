"""Compare a teacher cache built through a server (vLLM) with one built locally in float32.

Usage: python scripts/vllm_compare.py SERVED_CACHE LOCAL_CACHE [--reference LOCAL_BF16_CACHE]
       [--min-overlap F] [--max-mean-diff F] [--max-top1-diff F]

Per position: the share of the k ids both caches hold, and the difference of the log-probs the two
give to the same ids. Exits 1 when a tolerance fails.

- Without --reference (the server computed in float32, like the local cache): the two must agree to
  rounding — top-k overlap >= 99%, mean |difference| on shared ids <= 1e-3 nats, top-1 token's
  |difference| <= 0.01 nats everywhere.
- With --reference, a cache the local teacher built in bfloat16 (the server computed in bfloat16):
  bfloat16 itself moves near-tied tail ids in and out of the top k and shifts log-probs by a few
  hundredths, so the served cache is held to what local bfloat16 costs against the same float32
  cache — overlap at most 1 point below the reference's, mean |difference| at most 1.5 times the
  reference's — and the top-1 token's |difference| <= 0.5 nats everywhere.
An explicit --min-overlap / --max-mean-diff / --max-top1-diff replaces the derived tolerance.
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
    ap.add_argument("--reference", help="a local bfloat16 cache of the same rows: the tolerance is what it costs")
    ap.add_argument("--min-overlap", type=float)
    ap.add_argument("--max-mean-diff", type=float)
    ap.add_argument("--max-top1-diff", type=float)
    a = ap.parse_args()

    report = cache_agreement(a.served, a.local)
    if a.reference:
        ref = cache_agreement(a.reference, a.local)
        report["reference_local_bf16_vs_fp32"] = ref
        tol = {"min_overlap": ref["overlap"] - 0.01, "max_mean_diff": 1.5 * ref["mean_abs_logp_diff"],
               "max_top1_diff": 0.5}
    else:
        tol = {"min_overlap": 0.99, "max_mean_diff": 1e-3, "max_top1_diff": 0.01}
    for key in tol:
        if getattr(a, key) is not None:
            tol[key] = getattr(a, key)
    report["tolerance"] = tol
    k, overlap = report["k"], report["overlap"]
    print(json.dumps(report, indent=1))
    ok = (overlap >= tol["min_overlap"] and report["mean_abs_logp_diff"] <= tol["max_mean_diff"]
          and report["top1_max_abs_diff"] <= tol["max_top1_diff"])
    print(f"[test-vllm] top-{k} overlap {overlap:.2%} (>= {tol['min_overlap']:.2%}), log-prob |difference| on shared "
          f"ids: mean {report['mean_abs_logp_diff']:.4g} (<= {tol['max_mean_diff']:.4g}), max "
          f"{report['max_abs_logp_diff']:.4g}; top-1 max {report['top1_max_abs_diff']:.4g} "
          f"(<= {tol['max_top1_diff']:.4g}): {'PASS' if ok else 'FAIL'}")
    if a.reference:
        ref = report["reference_local_bf16_vs_fp32"]
        print(f"[test-vllm] reference, local bfloat16 vs local float32: overlap {ref['overlap']:.2%}, mean "
              f"{ref['mean_abs_logp_diff']:.4g}, max {ref['max_abs_logp_diff']:.4g}, top-1 max "
              f"{ref['top1_max_abs_diff']:.4g}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
