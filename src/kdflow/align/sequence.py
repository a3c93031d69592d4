"""Which sender position corresponds to which receiver position (methods.md §6.2).

Both models read the same text, cut into different tokens. A position predicts the next token,
so receiver position i (predicting the token that begins at character c) is paired with the
sender position whose next token also begins at c: both have then read exactly the same text.
Everything here works at token level — token j of the receiver is paired with token k of the
sender, and the caller turns that into positions (the position predicting token j is the one
before it). Unpaired tokens get -1; the KD term masks them, or, as an option, puts a one-hot on
the receiver's own next token (never on the current token: the reference's off-by-one).

Two ways to find the pairs:
- **character offsets** (default; needs fast tokenizers): `boundary_points` + `pair_by_points`;
- **DTW over token strings** (FedMKT's approach, without a tokenizer's offsets): `pair_by_dtw`.
Neither ever sees padding: callers pass the real tokens of one example.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def boundary_points(spans: Sequence[tuple[int, int]], text: str, space_only: Sequence[bool] | None = None,
                    origin: int = 0, limit: int | None = None) -> np.ndarray:
    """For each token, the character (relative to `origin`) where it begins a boundary, or -1.

    spans: each token's (start, end) in `text` (a tokenizer's offset mapping; zero-width spans are
    fine). space_only: tokens whose own text is only whitespace / word-start markers.

    - A token begins a boundary only if no earlier token reaches past its start: a byte-level
      token holding the second half of an emoji shares its character with the first half, and the
      model has then read more than the text before that character.
    - Its point is its start moved past the whitespace its span begins with: one tokenizer attaches
      the space to the next word (`Ġword`, `▁word`), another drops it (WordPiece), and all of them
      must agree on where "word" begins. A token that is only whitespace keeps its start.
    - A whitespace-only token whose span covers no whitespace (a SentencePiece `▁` prepended to
      the text, which offsets place on the next character) is zero-width. When zero-width tokens
      share a point with the token after them, the last one keeps the point: it is the one that
      predicts the text itself.
    - Points outside [0, limit] (text before the shared answer, or after it) are -1.
    """
    n = len(spans)
    out = np.full(n, -1, dtype=np.int64)
    reach = 0  # furthest end of the tokens so far
    owner: dict[int, int] = {}
    for j, (start, end) in enumerate(spans):
        if space_only is not None and space_only[j] and end > start and not text[start:end].isspace():
            if not any(c.isspace() for c in text[start:end]):
                end = start  # an inserted marker that the offsets place on the next character
        if start >= reach:
            point = start
            if end > start and not text[start:end].isspace():
                while point < end and text[point].isspace():
                    point += 1
            rel = point - origin
            if rel >= 0 and (limit is None or rel <= limit):
                if rel in owner:
                    out[owner[rel]] = -1
                owner[rel] = j
                out[j] = rel
        reach = max(reach, end)
    return out


def pair_by_points(receiver_points: np.ndarray, sender_points: np.ndarray) -> np.ndarray:
    """For each receiver token, the sender token beginning at the same point (or -1)."""
    where = {int(p): k for k, p in enumerate(sender_points) if p >= 0}
    return np.array([where.get(int(p), -1) if p >= 0 else -1 for p in receiver_points], dtype=np.int64)


def dtw_path_matrix(cost: np.ndarray) -> np.ndarray:
    """Accumulated DTW cost D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j], D[i, j-1]).

    Row by row without a Python loop over columns: with m[j] = min(D[i-1, j-1], D[i-1, j]) and P
    the running sum of row i's costs, D[i, j] = P[j] + min over k <= j of (m[k] - P[k-1]).
    """
    n, m = cost.shape
    D = np.empty((n, m), dtype=np.float64)
    P = np.cumsum(cost, axis=1)
    before = P - cost  # P[k - 1], the running sum up to the previous column
    D[0] = P[0]
    best_in = np.empty(m, dtype=np.float64)
    for i in range(1, n):
        prev = D[i - 1]
        best_in[0] = prev[0]
        np.minimum(prev[1:], prev[:-1], out=best_in[1:])
        best_in -= before[i]
        D[i] = P[i] + np.minimum.accumulate(best_in)
    return D


def pair_by_dtw(receiver_tokens: Sequence[str], sender_tokens: Sequence[str]) -> np.ndarray:
    """For each receiver token, the sender token it begins together with on the DTW path (or -1).

    The path is FedMKT's DTW over token strings with an edit-distance cost; two tokens are paired
    when the path enters their cell diagonally (or starts there): both tokens begin at that step,
    the DTW counterpart of "next tokens begin at the same character". The cost is the Levenshtein
    distance divided by the longer token's length: raw distances favour matching short tokens with
    unrelated short tokens — on "util|ize the" against "utilize the" raw costs pair "ize" with
    "the", the reference's mis-pairing; normalised costs give util-utilize, the-the and leave
    "ize" unpaired. On ties the backtrack prefers the diagonal, then the receiver's step.
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    n, m = len(receiver_tokens), len(sender_tokens)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return out
    cost = cdist(list(receiver_tokens), list(sender_tokens), scorer=Levenshtein.normalized_distance, dtype=np.float64)
    D = dtw_path_matrix(cost)
    i, j = n - 1, m - 1
    while i > 0 or j > 0:
        diag = D[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = D[i - 1, j] if i > 0 else np.inf
        left = D[i, j - 1] if j > 0 else np.inf
        if diag <= up and diag <= left:
            out[i] = j  # entered diagonally: tokens i and j begin together
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    out[0] = 0  # the path starts with both first tokens
    return out
