"""Benchmark (b): align 1,000 sample pairs — WordNet rows tokenised by SmolLM2 and by a WordNet-trained tokenizer.

Each sample is one row's text (prompt, newline, answer) tokenised by both tokenizers. Timed in one run:
  - ours, character offsets (the default): boundary points of both tokenisations + pairing;
  - ours, DTW option: the characters both token sequences spell (canonical token strings), aligned
    by an edit-distance path; tokens pair where the path joins their starts;
  - reference: FedMKT's alignment written plainly — token strings with the word-start marker removed,
    both sequences padded to 512 tokens as its pipeline pads them, a pure-Python double loop filling
    the DTW matrix with an edit distance per cell (a C function called per pair, as the reference
    calls editdistance.eval), then the backtrack with np.argmin. Timed on a sample and extrapolated;
    also timed without the padding, to show how much of the gap the padding alone explains.
Tokenisation (a fast tokenizer's batch call, offsets included) is timed separately: the reference
starts from token ids too.

    python bench/bench_align.py [--kind unigram] [--pairs 1000] [--ref-sample 3]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from align_common import smollm2_tokenizer, trained_tokenizer
from common import ROOT


def reference_dtw(series_1, series_2, dist) -> list[list[int]]:
    """The reference's DTW (cost matrix filled cell by cell in Python), returning for each element of
    series_2 the elements of series_1 on its path."""
    n, m = len(series_1), len(series_2)
    matrix = np.zeros((n + 1, m + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, a in enumerate(series_1):
        for j, b in enumerate(series_2):
            matrix[i + 1, j + 1] = dist(a, b) + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i, j = n - 1, m - 1
    mapping_2 = [[] for _ in range(m)]
    while i > 0 or j > 0:
        mapping_2[j].append(i)
        diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = matrix[i - 1, j] if i > 0 else np.inf
        left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([diag, up, left])
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    mapping_2[0].append(0)
    return mapping_2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", default="unigram", help="WordNet-trained tokenizer family (bpe, wordpiece, unigram)")
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--ref-sample", type=int, default=3, help="pairs timed with the padded reference")
    ap.add_argument("--pad-to", type=int, default=512)
    args = ap.parse_args()

    from rapidfuzz.distance import Levenshtein

    from kdflow.align.sequence import boundary_points, pair_by_dtw, pair_by_points
    from kdflow.align.vocab import MARKER, canonical_vocab

    send, recv = smollm2_tokenizer(), trained_tokenizer(args.kind)
    sv, rv = canonical_vocab(send), canonical_vocab(recv)
    rows = [json.loads(x) for x in (ROOT / "data" / "wordnet_define" / "train.jsonl").read_text().splitlines()]
    texts = [f"{r['prompt']}\n{r['response']}" for r in rows[:args.pairs]]

    t0 = time.perf_counter()
    s_enc = send(texts, add_special_tokens=False, return_offsets_mapping=True)
    r_enc = recv(texts, add_special_tokens=False, return_offsets_mapping=True)
    t_tok = time.perf_counter() - t0
    samples = [(t, list(r_enc.input_ids[i]), [tuple(o) for o in r_enc.offset_mapping[i]],
                list(s_enc.input_ids[i]), [tuple(o) for o in s_enc.offset_mapping[i]]) for i, t in enumerate(texts)]
    space = lambda v, ids: [bool(v.texts[i]) and v.texts[i].replace(MARKER, " ").isspace() for i in ids]  # noqa: E731
    mean_len = np.mean([len(x[1]) + len(x[3]) for x in samples]) / 2

    def ours_offsets():
        return [pair_by_points(boundary_points(rs, t, space(rv, ri), 0, len(t)), boundary_points(ss, t, space(sv, si), 0, len(t)))
                for t, ri, rs, si, ss in samples]

    low = rv.scheme.lowercase or sv.scheme.lowercase
    strings = lambda v, ids: [v.texts[i].lower() if low else v.texts[i] for i in ids]  # noqa: E731

    def ours_dtw():
        return [pair_by_dtw(strings(rv, ri), strings(sv, si)) for _, ri, _, si, _ in samples]

    w, c = time.perf_counter(), time.process_time()
    off = ours_offsets()
    t_off, c_off = time.perf_counter() - w, time.process_time() - c
    w, c = time.perf_counter(), time.process_time()
    dtw = ours_dtw()
    t_dtw, c_dtw = time.perf_counter() - w, time.process_time() - c

    # the reference: convert_ids_to_tokens, strip each tokenizer's marker, pad, DTW cell by cell
    s_mark, r_mark = "Ġ", {"unigram": "▁", "wordpiece": "##", "bpe": "Ġ"}[args.kind]
    dist = lambda a, b: Levenshtein.distance(a.replace(s_mark, ""), b.replace(r_mark, ""))  # noqa: E731

    def reference(i: int, pad: bool) -> list[list[int]]:
        _, ri, _, si, _ = samples[i]
        if pad:
            ri = ri + [recv.pad_token_id] * (args.pad_to - len(ri))
            si = si + [send.pad_token_id] * (args.pad_to - len(si))
        return reference_dtw(send.convert_ids_to_tokens(si), recv.convert_ids_to_tokens(ri), dist)

    ref = {}
    for pad in (True, False):
        n = args.ref_sample if pad else min(50, args.pairs)
        w, c = time.perf_counter(), time.process_time()
        for i in range(n):
            reference(i, pad)
        ref[pad] = ((time.perf_counter() - w) / n * args.pairs, (time.process_time() - c) / n * args.pairs, n)

    paired_off = np.mean([float((p >= 0).mean()) for p in off])
    paired_dtw = np.mean([float((p >= 0).mean()) for p in dtw])
    same = np.mean([float((a == b).mean()) for a, b in zip(off, dtw)])
    print(f"\n{args.pairs} sample pairs: WordNet 'define' rows (prompt + answer, {mean_len:.1f} tokens on average), "
          f"SmolLM2 ({len(sv)} tokens) -> WordNet {args.kind} ({len(rv)} tokens)")
    print(f"  tokenisation of both sides with offsets (batch call): {t_tok:.2f} s")
    print(f"  ours, offsets: {t_off:.3f} s wall / {c_off:.3f} s CPU  ({1e6 * t_off / args.pairs:.0f} us per pair); "
          f"{100 * paired_off:.1f}% of receiver tokens paired")
    print(f"  ours, DTW:     {t_dtw:.3f} s wall / {c_dtw:.3f} s CPU  ({1e6 * t_dtw / args.pairs:.0f} us per pair); "
          f"{100 * paired_dtw:.1f}% paired; same pairing as offsets for {100 * same:.1f}% of receiver tokens")
    for pad, label in ((True, f"padded to {args.pad_to}"), (False, "unpadded")):
        w, c, n = ref[pad]
        print(f"  reference DTW, {label}: {w:.1f} s wall / {c:.1f} s CPU for {args.pairs} pairs "
              f"(extrapolated from {n}); ratio to ours: offsets {w / t_off:.0f}x wall ({c / c_off:.0f}x CPU), "
              f"DTW {w / t_dtw:.0f}x wall ({c / c_dtw:.0f}x CPU)")
    print(f"  goal: alignment at least 100x the reference -> "
          f"{'met' if ref[True][0] / t_off >= 100 else 'NOT met'} ({ref[True][0] / t_off:.0f}x)")


if __name__ == "__main__":
    main()
