"""Which sender position corresponds to which receiver position (methods.md §6.2).

Both models read the same text, cut into different tokens. A position predicts the next token, so
the position before receiver token j is paired with the position before sender token k when both
have read exactly the same text: the same characters, whitespace included. Everything here works
at token level — token j of the receiver is paired with token k of the sender, and the caller turns
that into positions (the position predicting token j is the one before it). Unpaired tokens get -1;
the KD term masks them, or, as an option, puts a one-hot on the receiver's own next token (never on
the current token: the reference's off-by-one).

Two ways to find the pairs:
- **character offsets** (default; needs fast tokenizers): `boundary_points` + `pair_by_points`;
- **DTW over the spelled text** (no tokenizer offsets needed): `pair_by_dtw`.
Neither ever sees padding: callers pass the real tokens of one example.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Bump when a pairing rule changes: teacher caches record it and refuse targets paired by another rule.
PAIRING_VERSION = 2


def boundary_points(spans: Sequence[tuple[int, int]], text: str, space_only: Sequence[bool] | None = None,
                    origin: int = 0, limit: int | None = None) -> np.ndarray:
    """For each token, how much of the text (relative to `origin`) has been read before it, or -1.

    spans: each token's (start, end) in `text` (a tokenizer's offset mapping; zero-width spans are
    fine). space_only: tokens whose own text is only whitespace / word-start markers.

    The point of token j is the consumed prefix: the furthest end of the tokens before it. Two
    positions with the same point have read the same characters, whatever each tokenizer does with
    spaces: one writes a standalone space before digits (`▁`, `2`, … as Llama-2 and Mistral do),
    another attaches it (`Ġ202`), WordPiece drops it. The position before `▁` (read "in") pairs
    with the one before `Ġ202` (read "in"), not the one before `2` (read "in ").

    - A token that begins before that end (a byte-level token holding the second half of an emoji,
      whose first half an earlier token read) has no point: the model has read part of a character.
    - A whitespace-only token whose span covers no whitespace (a SentencePiece `▁` prepended to the
      text, which offsets place on the next character) reads nothing. When such zero-width tokens
      share a point with the token after them, the last one keeps the point: it is the one that
      predicts the text itself.
    - Points outside [0, limit] (text before the shared answer, or after it) are -1.
    """
    n = len(spans)
    out = np.full(n, -1, dtype=np.int64)
    reach = 0  # furthest end of the tokens so far: what has been read
    owner: dict[int, int] = {}
    for j, (start, end) in enumerate(spans):
        if space_only is not None and space_only[j] and end > start and not text[start:end].isspace():
            if not any(c.isspace() for c in text[start:end]):
                end = start  # an inserted marker that the offsets place on the next character
        if start >= reach:
            rel = reach - origin
            if rel >= 0 and (limit is None or rel <= limit):
                if rel in owner:
                    out[owner[rel]] = -1
                owner[rel] = j
                out[j] = rel
        reach = max(reach, end)
    return out


def pair_by_points(receiver_points: np.ndarray, sender_points: np.ndarray) -> np.ndarray:
    """For each receiver token, the sender token with the same point (both read the same text before it), or -1."""
    where = {int(p): k for k, p in enumerate(sender_points) if p >= 0}
    return np.array([where.get(int(p), -1) if p >= 0 else -1 for p in receiver_points], dtype=np.int64)


def pair_by_dtw(receiver_tokens: Sequence[str], sender_tokens: Sequence[str]) -> np.ndarray:
    """For each receiver token, the sender token that begins after the same aligned text (or -1).

    Without offsets, the text each side has read is what its tokens spell. Both spellings are aligned
    character by character (an edit-distance alignment: the dynamic-programming path of DTW with a
    0/1 cost per character, computed by rapidfuzz), and receiver token j is paired with sender token
    k when the path passes through (characters before j, characters before k): both have read text
    that aligns up to there. Where the spellings agree this is exactly the consumed-prefix rule of
    `boundary_points`; where they differ (word-start markers one tokenizer writes and the other does
    not, case, bytes of split characters) the path absorbs the difference and the pairing resumes.

    FedMKT's DTW runs over whole tokens with an edit-distance cost per token pair; its path joins
    tokens of different contexts whenever one tokenizer splits a word the other keeps whole
    (`utiliz|e the` against `utilize the` pairs `e` with `the`, and `util|ize` pairs `ize` with `the`
    under raw costs). At character level that cannot happen: `e` begins after "utiliz", which no
    sender token does, so it stays unpaired and `the` pairs with `the`.
    """
    from rapidfuzz.distance import Levenshtein

    n, m = len(receiver_tokens), len(sender_tokens)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0 or m == 0:
        return out
    r_text, s_text = "".join(receiver_tokens), "".join(sender_tokens)
    r_start = np.concatenate([[0], np.cumsum([len(t) for t in receiver_tokens])[:-1]])
    s_start = np.concatenate([[0], np.cumsum([len(t) for t in sender_tokens])[:-1]])
    # the points (receiver characters read, sender characters read) the alignment path passes through
    on_path: dict[int, list[int]] = {0: [0]}
    for op in Levenshtein.opcodes(r_text, s_text):
        a, b = op.src_end - op.src_start, op.dest_end - op.dest_start
        if op.tag in ("equal", "replace") and a == b:
            steps = [(op.src_start + d, op.dest_start + d) for d in range(1, a + 1)]
        elif op.tag == "delete":
            steps = [(op.src_start + d, op.dest_start) for d in range(1, a + 1)]
        elif op.tag == "insert":
            steps = [(op.src_start, op.dest_start + d) for d in range(1, b + 1)]
        else:  # a replacement of unequal lengths: only its ends are aligned
            steps = [(op.src_end, op.dest_end)]
        for i, k in steps:
            on_path.setdefault(i, []).append(k)
    # Zero-length tokens share their start with the token after them; the last of a run keeps it
    # (as in boundary_points), and on a point that several sender tokens share, so does the last.
    last_sender = {int(p): k for k, p in enumerate(s_start)}
    last_receiver = {int(p): j for j, p in enumerate(r_start)}
    used = -1
    for j, p in enumerate(r_start):
        if last_receiver[int(p)] != j:
            continue
        ks = [last_sender[b] for b in on_path.get(int(p), []) if b in last_sender]
        if ks and max(ks) > used:
            out[j] = used = max(ks)
    return out
