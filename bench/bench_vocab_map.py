"""Benchmark (a): the MinED vocabulary map, SmolLM2 (49,152 tokens) <-> a 32k tokenizer trained on WordNet.

Ours: `kdflow.align.vocab` — canonical token text, exact matches by dict, the rest by rapidfuzz's C++
`cdist` in length buckets — both directions, disk cache off. Reference: FedMKT's algorithm written
plainly, for every sender token without an exact match a Python `min` over the whole receiver
vocabulary, with the same tie-break key as ours, timed on a random sample of unmatched tokens in the
same run and extrapolated to all of them, in two variants:
  - "C per pair": the edit distance is a C function called once per pair (rapidfuzz's
    Levenshtein.distance, as the reference calls editdistance.eval) — the reference as it runs;
  - "pure Python": a textbook two-row Levenshtein in Python.
The sampled reference answers are checked against our map (they must be identical).

    python bench/bench_vocab_map.py [--kinds unigram,wordpiece,bpe] [--sample 20] [--sample-python 2]
"""

from __future__ import annotations

import argparse
import random
import time

from align_common import smollm2_tokenizer, trained_tokenizer


def levenshtein_py(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def reference_min(query: str, receiver, cand_ids: list[int], distance) -> int:
    """FedMKT's MinED for one token: Python min over the whole vocabulary (our tie-break key)."""
    from kdflow.align.vocab import MARKER

    strip = lambda t: t[1:] if t.startswith(MARKER) else t  # noqa: E731
    sq = strip(query)
    return min(cand_ids, key=lambda i: (distance(query, receiver.texts[i]), sq != strip(receiver.texts[i]),
                                        receiver.texts[i], int(receiver.byte_fallback[i]), i))


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="unigram,wordpiece", help="trained tokenizer families to compare with SmolLM2")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sample", type=int, default=20, help="unmatched tokens per direction timed with the C-per-pair reference")
    ap.add_argument("--sample-python", type=int, default=2, help="... and with the pure-Python reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from rapidfuzz.distance import Levenshtein

    from kdflow.align.vocab import build_map, canonical_vocab

    smol = smollm2_tokenizer()
    for kind in args.kinds.split(","):
        other = trained_tokenizer(kind, args.vocab)
        (va, vb), t_canon, c_canon = timed(lambda: (canonical_vocab(smol), canonical_vocab(other)))
        ab, t_ab, c_ab = timed(lambda: build_map(va, vb))
        ba, t_ba, c_ba = timed(lambda: build_map(vb, va))
        ours_wall, ours_cpu = t_canon + t_ab + t_ba, c_canon + c_ab + c_ba
        print(f"\nSmolLM2 ({len(va)} tokens, {va.scheme.name()}) <-> WordNet {kind} ({len(vb)} tokens, {vb.scheme.name()})")
        print(f"  ours: {ours_wall:.2f} s wall / {ours_cpu:.2f} s CPU for both directions "
              f"(canonical text {t_canon:.2f} s, SmolLM2->{kind} {t_ab:.2f} s, {kind}->SmolLM2 {t_ba:.2f} s)")

        rng = random.Random(args.seed)
        ref_wall = {"C per pair": 0.0, "pure Python": 0.0}
        ref_cpu = dict(ref_wall)
        agree = total = 0
        for s, r, m, name in ((va, vb, ab, f"SmolLM2->{kind}"), (vb, va, ba, f"{kind}->SmolLM2")):
            cand = [i for i in range(len(r)) if not r.special[i]]
            exact = set(r.texts[i] for i in cand)
            low = r.scheme.lowercase
            query = {i: (s.texts[i].lower() if low else s.texts[i]) for i in range(len(s)) if not s.special[i]}
            unmatched = [i for i, q in query.items() if q not in exact]
            print(f"  {name}: {len(query) - len(unmatched)} exact matches, {len(unmatched)} tokens need edit distances")
            for label, dist, n in (("C per pair", Levenshtein.distance, args.sample),
                                   ("pure Python", levenshtein_py, args.sample_python)):
                picked = rng.sample(unmatched, min(n, len(unmatched)))
                got, w, c = timed(lambda: [reference_min(query[i], r, cand, dist) for i in picked])
                agree += sum(int(g == m[i]) for g, i in zip(got, picked))
                total += len(picked)
                ref_wall[label] += w / max(len(picked), 1) * len(unmatched)
                ref_cpu[label] += c / max(len(picked), 1) * len(unmatched)
                print(f"    reference ({label}): {1e3 * w / max(len(picked), 1):.1f} ms per unmatched token "
                      f"(mean of {len(picked)} sampled)")
        for label in ref_wall:
            print(f"  reference ({label}), extrapolated to both directions: {ref_wall[label]:.0f} s wall "
                  f"({ref_wall[label] / 60:.1f} min) / {ref_cpu[label]:.0f} s CPU; ratio to ours "
                  f"{ref_wall[label] / ours_wall:.0f}x wall, {ref_cpu[label] / ours_cpu:.0f}x CPU")
        print(f"  sampled reference answers identical to our map: {agree}/{total}")
        print(f"  goal: the map in under 30 s -> {'met' if ours_wall < 30 else 'NOT met'} ({ours_wall:.1f} s)")


if __name__ == "__main__":
    main()
