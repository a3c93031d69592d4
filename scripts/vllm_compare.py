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
from pathlib import Path


def main() -> int:
    import torch

    from kdflow.teacher_cache import TeacherCache

    ap = argparse.ArgumentParser()
    ap.add_argument("served")
    ap.add_argument("local")
    ap.add_argument("--min-overlap", type=float, default=0.99)
    ap.add_argument("--max-top1-diff", type=float, default=0.5)
    ap.add_argument("--max-mean-diff", type=float, default=0.05)
    a = ap.parse_args()

    def load(folder: str) -> dict:
        key = json.loads((Path(folder) / "manifest.json").read_text())["key"]
        return TeacherCache(folder, key).load()

    served, local = load(a.served), load(a.local)
    assert served.keys() == local.keys(), "the caches hold different examples"
    shared = positions = 0
    diffs, top1 = [], []
    for row in sorted(local):
        s, l = served[row], local[row]
        assert s["ids"].shape == l["ids"].shape, f"example {row}: {tuple(s['ids'].shape)} vs {tuple(l['ids'].shape)}"
        for ids_s, lp_s, ids_l, lp_l in zip(s["ids"].tolist(), s["logp"].tolist(), l["ids"].tolist(), l["logp"].tolist()):
            ms, ml = dict(zip(ids_s, lp_s)), dict(zip(ids_l, lp_l))
            both = set(ms) & set(ml)
            shared += len(both)
            positions += 1
            diffs += [abs(ms[t] - ml[t]) for t in both]
            if ids_l[0] in ms:
                top1.append(abs(ms[ids_l[0]] - ml[ids_l[0]]))
    k = next(iter(local.values()))["ids"].shape[1]
    d = torch.tensor(diffs)
    t1 = torch.tensor(top1)
    overlap = shared / (positions * k)
    report = {"examples": len(local), "positions": positions, "k": k, "overlap": overlap,
              "mean_abs_logp_diff": float(d.mean()), "max_abs_logp_diff": float(d.max()),
              "p99_abs_logp_diff": float(d.quantile(0.99)), "top1_max_abs_diff": float(t1.max()),
              "top1_in_both": len(top1) / positions}
    print(json.dumps(report, indent=1))
    ok = (overlap >= a.min_overlap and report["mean_abs_logp_diff"] <= a.max_mean_diff
          and report["top1_max_abs_diff"] <= a.max_top1_diff)
    print(f"[test-vllm] top-{k} overlap {overlap:.2%} (>= {a.min_overlap:.0%}), log-prob |difference| on shared ids: "
          f"mean {report['mean_abs_logp_diff']:.4f} (<= {a.max_mean_diff}), max {report['max_abs_logp_diff']:.4f}; "
          f"top-1 max {report['top1_max_abs_diff']:.4f} (<= {a.max_top1_diff}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
