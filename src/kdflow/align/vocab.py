"""MinED vocabulary maps: each token of one tokenizer -> the closest token of another (FedMKT).

Token text is made comparable first (`canonical_vocab`):
- byte-level tokens (GPT-2 style `Ġ`/`Ċ` alphabets) are decoded to their bytes; SentencePiece
  byte-fallback tokens (`<0xE2>`) are bytes too. Bytes that do not form complete UTF-8
  characters become one private-use character each (U+10FF00 + byte), so the three bytes of a
  split emoji compare with the three byte tokens of another tokenizer character by character;
- the word-start convention becomes one marker, `▁`: a leading space (byte-level `Ġ`,
  SentencePiece `▁`) or, for WordPiece, the absence of the `##` continuation prefix;
- when the receiving tokenizer lowercases its input, the sender's text is lowercased before
  matching (a WordPiece vocabulary has no capitals to match).

Then, for every ordinary sender token: an exact text match maps to it; otherwise the receiver
token at minimum Levenshtein distance. Ties are broken first in favour of a token that differs
only by the word-start marker (`.` -> `▁.`), then by the receiver token's text (lexicographic,
code-point order), then by byte-fallback tokens ranking after ordinary ones, then by id — one
total order, so the map is deterministic. Special tokens never take part in
edit-distance matching: BOS/EOS/UNK/PAD (and SEP/CLS/MASK) map to the receiver's token of the
same role, other special tokens to a receiver token with the same content; a special token with
no counterpart maps to -1 (projection drops its probability, see `project.py`).

Speed: the reference does a Python `min` over the whole receiver vocabulary for every unmatched
token. Here exact matches are a dict lookup, and the rest are computed with rapidfuzz's C++
`cdist` in length buckets: a candidate whose length differs by r is at distance >= r, so bucket
rings are visited outward from the query's own length and stop once r exceeds the best
distance found (ties at that distance still get examined, which keeps the tie-break exact).

Maps are cached under `$KDFLOW_CACHE/vocab_maps/<fingerprint>-<fingerprint>/` as two `.npy`
arrays and a JSON file, written atomically and verified against digests of the canonical texts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kdflow.errors import AlignmentError

MARKER = "\u2581"  # canonical word-start marker
BYTE_BASE = 0x10FF00  # a byte that is not part of a complete UTF-8 character -> chr(BYTE_BASE + byte)
ROLES = ("eos", "bos", "unk", "pad", "sep", "cls", "mask")  # order decides a token holding several roles
MAP_VERSION = 1
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ----------------------------------------------------------------------------------------------
# Canonical token text


def _byte_level_decoder() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: printable character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


BYTE_DECODER = _byte_level_decoder()


def bytes_text(data: bytes) -> str:
    """UTF-8 text of `data`; each byte outside a complete character becomes chr(BYTE_BASE + byte)."""
    text = data.decode("utf-8", errors="surrogateescape")  # stray bytes -> U+DC80..U+DCFF
    if not any("\udc80" <= c <= "\udcff" for c in text):
        return text
    return "".join(chr(BYTE_BASE + ord(c) - 0xDC00) if "\udc80" <= c <= "\udcff" else c for c in text)


def _flatten(node: Any, key: str) -> list[dict]:
    """The components of a tokenizers pipeline stage, Sequence stages opened."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key, []) for c in _flatten(child, key)]
    return [node]


@dataclass
class Scheme:
    """How a tokenizer writes word starts and bytes in its token strings."""

    byte_level: bool = False
    space_char: str | None = None  # SentencePiece-style replacement of the space (usually ▁)
    byte_fallback: bool = False
    continuation_prefix: str | None = None  # WordPiece ##: tokens without it start a word
    word_end_suffix: str | None = None  # BPE </w> (CLIP-style)
    lowercase: bool = False

    def name(self) -> str:
        if self.byte_level:
            return "byte_level"
        if self.space_char:
            return "metaspace"
        if self.continuation_prefix:
            return "wordpiece"
        return "plain"


def detect_scheme(tok: Any, tokens: Sequence[str | None]) -> Scheme:
    """Read the scheme from the tokenizers pipeline; guess it from the vocabulary without one."""
    backend = getattr(tok, "backend_tokenizer", None)
    s = Scheme()
    if backend is not None:
        spec = json.loads(backend.to_str())
        model = spec.get("model") or {}
        decoders = _flatten(spec.get("decoder"), "decoders")
        pretoks = _flatten(spec.get("pre_tokenizer"), "pretokenizers")
        norms = _flatten(spec.get("normalizer"), "normalizers")
        for part in decoders + pretoks:
            kind = part.get("type")
            if kind == "ByteLevel":
                s.byte_level = True
            elif kind == "Metaspace":
                s.space_char = part.get("replacement") or MARKER
            elif kind == "WordPiece" and part in decoders:
                s.continuation_prefix = part.get("prefix", "##")
            elif kind == "BPEDecoder":
                s.word_end_suffix = part.get("suffix", "</w>")
            elif kind == "ByteFallback":
                s.byte_fallback = True
            elif kind == "Replace" and part in decoders and part.get("content") == " ":
                pattern = part.get("pattern", {})
                s.space_char = pattern.get("String") or s.space_char
        if model.get("byte_fallback"):
            s.byte_fallback = True
        if model.get("type") == "WordPiece" and not s.continuation_prefix:
            s.continuation_prefix = model.get("continuing_subword_prefix") or "##"
        if model.get("type") == "BPE":
            s.word_end_suffix = s.word_end_suffix or model.get("end_of_word_suffix") or None
            if model.get("continuing_subword_prefix") and not s.byte_level:
                s.continuation_prefix = s.continuation_prefix or model["continuing_subword_prefix"]
        for part in norms:
            if part.get("type") == "Lowercase" or (part.get("type") == "BertNormalizer" and part.get("lowercase")):
                s.lowercase = True
        return s
    # A tokenizer without a tokenizers pipeline (a "slow" one): look at the token strings.
    seen = [t for t in tokens if t]
    share = lambda pred: sum(1 for t in seen if pred(t)) / max(len(seen), 1)  # noqa: E731
    if share(lambda t: t.startswith("Ġ")) > 0.05:
        s.byte_level = True
    elif share(lambda t: t.startswith(MARKER)) > 0.05:
        s.space_char = MARKER
        s.byte_fallback = any(t and _BYTE_FALLBACK.fullmatch(t) for t in seen)
    elif share(lambda t: t.startswith("##")) > 0.05:
        s.continuation_prefix = "##"
    s.lowercase = bool(getattr(tok, "do_lower_case", False))
    return s


def token_text(token: str, scheme: Scheme) -> tuple[str, bool]:
    """(canonical text, is a byte-fallback token) of one ordinary token string."""
    is_byte = False
    if scheme.byte_level and all(c in BYTE_DECODER for c in token):
        text = bytes_text(bytes(BYTE_DECODER[c] for c in token))
    elif scheme.byte_fallback and _BYTE_FALLBACK.fullmatch(token):
        text, is_byte = bytes_text(bytes([int(token[3:5], 16)])), True
    else:
        text = token
        if scheme.space_char:
            text = text.replace(scheme.space_char, " ")
        if scheme.continuation_prefix:
            if text.startswith(scheme.continuation_prefix) and len(text) > len(scheme.continuation_prefix):
                text = text[len(scheme.continuation_prefix):]
            else:
                text = " " + text
        if scheme.word_end_suffix and text.endswith(scheme.word_end_suffix) and len(text) > len(scheme.word_end_suffix):
            text = text[: -len(scheme.word_end_suffix)]
    if text.startswith(" "):
        text = MARKER + text[1:]
    return text, is_byte


@dataclass
class CanonicalVocab:
    """A tokenizer's token ids as comparable text, plus what MinED needs to know about them."""

    texts: list[str]  # canonical text per id ("" for ids without a token)
    special: np.ndarray  # bool per id: special tokens (never matched by edit distance)
    byte_fallback: np.ndarray  # bool per id: SentencePiece byte tokens (rank after ordinary tokens)
    roles: dict[str, int]  # role (eos, bos, unk, pad, ...) -> id
    scheme: Scheme = field(default_factory=Scheme)

    def __len__(self) -> int:
        return len(self.texts)

    def digest(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.texts, self.special.tolist(), self.byte_fallback.tolist(), self.roles,
                             self.scheme.lowercase], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


def canonical_vocab(tok: Any) -> CanonicalVocab:
    """The canonical text of every id of a Hugging Face tokenizer (fast or slow)."""
    n = len(tok)
    tokens = tok.convert_ids_to_tokens(list(range(n)))
    scheme = detect_scheme(tok, tokens)
    special = np.zeros(n, dtype=bool)
    ids = set(getattr(tok, "all_special_ids", []) or [])
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    for i in ids:
        if 0 <= i < n:
            special[i] = True
    texts, fallback = [], np.zeros(n, dtype=bool)
    for i, t in enumerate(tokens):
        if t is None:
            texts.append("")
            special[i] = True  # a hole in the id space: nothing to match
        elif special[i]:
            texts.append(t)
        else:
            text, fallback[i] = token_text(t, scheme)
            texts.append(text)
    roles = {}
    for role in ROLES:
        rid = getattr(tok, f"{role}_token_id", None)
        if isinstance(rid, int) and 0 <= rid < n:
            roles[role] = rid
    return CanonicalVocab(texts, special, fallback, roles, scheme)


# ----------------------------------------------------------------------------------------------
# MinED


def mined_map(queries: Sequence[str], candidates: Sequence[str], candidate_penalty: Sequence[int] | None = None,
              marker: str | None = MARKER, workers: int = -1, block: int = 2048) -> np.ndarray:
    """For each query, the index of the candidate with minimum Levenshtein distance.

    Ties: first a candidate that differs from the query only by a leading word-start `marker`
    (`.` and `▁.`: one tokenizer splits punctuation off as its own word, the other glues it to
    the word before; without this rule the lexicographic tie-break would send `.` to whichever
    one-character token sorts first), then the smallest candidate text (code-point order), then
    the smallest penalty, then the smallest index. Exact matches (distance 0) come out of the
    same rule. Returns int64 indices into `candidates` (which must be non-empty).
    """
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    C = len(candidates)
    if C == 0:
        raise AlignmentError("MinED needs at least one receiver token to map to")
    pen = np.zeros(C, dtype=np.int64) if candidate_penalty is None else np.asarray(candidate_penalty, dtype=np.int64)
    order = sorted(range(C), key=lambda i: (candidates[i], int(pen[i]), i))
    order_arr = np.asarray(order, dtype=np.int64)  # rank -> candidate index
    rank = np.empty(C, dtype=np.int64)
    rank[order_arr] = np.arange(C)
    strip = (lambda t: t[len(marker):] if t.startswith(marker) else t) if marker else (lambda t: t)  # noqa: E731
    exact: dict[str, int] = {}
    loose: dict[str, list[int]] = {}
    for i in order:  # first in the order wins among equal texts
        exact.setdefault(candidates[i], i)
        loose.setdefault(strip(candidates[i]), []).append(i)

    out = np.full(len(queries), -1, dtype=np.int64)
    groups: dict[int, list[int]] = {}
    for q, text in enumerate(queries):
        hit = exact.get(text)
        if hit is None and marker:
            # the same text but for the marker: distance 1, the smallest a non-exact match can have
            hit = next((i for i in loose.get(strip(text), ()) if candidates[i] != text), None)
        if hit is not None:
            out[q] = hit
        else:
            groups.setdefault(len(text), []).append(q)
    if not groups:
        return out

    # candidates bucketed by length, each bucket in tie-break order: the first minimum of a row of
    # distances is then the best candidate of that bucket
    by_len: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}
    lengths = np.array([len(c) for c in candidates])
    for L in np.unique(lengths):
        idx = np.nonzero(lengths == L)[0]
        idx = idx[np.argsort(rank[idx])]
        by_len[int(L)] = ([candidates[i] for i in idx], idx, rank[idx])
    max_len = int(lengths.max())
    none = np.iinfo(np.int64).max

    for L, members in groups.items():
        for start in range(0, len(members), block):
            qs = members[start:start + block]
            texts = [queries[q] for q in qs]
            best_key = np.full(len(qs), none, dtype=np.int64)  # distance * C + rank
            r = 0
            while True:
                # a candidate whose length differs by r is at distance >= r: ring r can only hold
                # a better or equally good (tie) candidate for queries whose best is still >= r
                need = np.nonzero(best_key // C >= r)[0] if r > 0 else np.arange(len(qs))
                if len(need) == 0 or (L - r < 0 and L + r > max_len):
                    break
                found = best_key[need]
                cutoff = int((found // C).max()) if bool((found < none).all()) else None
                # distances fit a byte when capped by the cutoff, or when no string is that long
                small = (cutoff is not None and cutoff < 255) or max(L, max_len) < 255
                sub = [texts[i] for i in need]
                for length in sorted({L - r, L + r}):
                    if length not in by_len:
                        continue
                    ctexts, cidx, crank = by_len[length]
                    D = cdist(sub, ctexts, scorer=Levenshtein.distance, dtype=np.uint8 if small else np.int32,
                              workers=workers, score_cutoff=cutoff)
                    j = D.argmin(1)
                    key = D[np.arange(len(need)), j].astype(np.int64) * C + crank[j]
                    better = key < best_key[need]
                    best_key[need[better]] = key[better]
                r += 1
            out[np.asarray(qs)] = order_arr[best_key % C]
    return out


def build_map(sender: CanonicalVocab, receiver: CanonicalVocab, workers: int = -1) -> np.ndarray:
    """sender id -> receiver id (int64, -1 for a special token without a counterpart)."""
    out = np.full(len(sender), -1, dtype=np.int64)
    ordinary = np.nonzero(~sender.special)[0]
    cand = np.nonzero(~receiver.special)[0]
    queries = [sender.texts[i] for i in ordinary]
    if receiver.scheme.lowercase:
        queries = [q.lower() for q in queries]
    if len(ordinary):
        picked = mined_map(queries, [receiver.texts[i] for i in cand], receiver.byte_fallback[cand].astype(np.int64),
                           workers=workers)
        out[ordinary] = cand[picked]
    by_content = {}
    for i in np.nonzero(receiver.special)[0]:
        by_content.setdefault(receiver.texts[i], int(i))
    for i in np.nonzero(sender.special)[0]:
        role = next((r for r in ROLES if sender.roles.get(r) == i and r in receiver.roles), None)
        if role is not None:
            out[i] = receiver.roles[role]
        elif sender.texts[i] in by_content:
            out[i] = by_content[sender.texts[i]]
    return out


# ----------------------------------------------------------------------------------------------
# Both directions, cached on disk


@dataclass
class VocabMaps:
    """MinED maps between tokenizers A and B, both directions."""

    a_to_b: np.ndarray
    b_to_a: np.ndarray
    info: dict[str, Any]  # fingerprints, digests, build time, whether the disk cache was hit
    vocab_a: CanonicalVocab
    vocab_b: CanonicalVocab


def _cache_root() -> Path:
    from kdflow.models import cache_root

    return cache_root() / "vocab_maps"


def vocab_maps(tok_a: Any, tok_b: Any, cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
               workers: int = -1) -> VocabMaps:
    """MinED maps A->B and B->A; loaded from the disk cache when an entry for this pair exists.

    The entry is keyed by both tokenizers' fingerprints (in sorted order, so (A, B) and (B, A)
    share it) and checked against digests of both canonical vocabularies before use.
    """
    from kdflow.models import tokenizer_fingerprint

    va, vb = canonical_vocab(tok_a), canonical_vocab(tok_b)
    fa, fb = tokenizer_fingerprint(tok_a), tokenizer_fingerprint(tok_b)
    swap = fb < fa
    (v1, f1), (v2, f2) = ((vb, fb), (va, fa)) if swap else ((va, fa), (vb, fb))
    meta = {"version": MAP_VERSION, "first": f1, "second": f2, "first_digest": v1.digest(),
            "second_digest": v2.digest(), "first_size": len(v1), "second_size": len(v2),
            "first_scheme": v1.scheme.name(), "second_scheme": v2.scheme.name()}
    folder = Path(cache_dir) if cache_dir is not None else _cache_root()
    entry = folder / f"{f1}-{f2}"
    maps = _load(entry, meta) if use_cache else None
    if maps is None:
        t0 = time.perf_counter()
        m12 = build_map(v1, v2, workers)
        m21 = build_map(v2, v1, workers)
        meta["build_seconds"] = round(time.perf_counter() - t0, 3)
        maps = (m12, m21, dict(meta, cache="built"))
        if use_cache:
            _store(entry, m12, m21, meta)
    m12, m21, info = maps
    return VocabMaps(m21, m12, info, va, vb) if swap else VocabMaps(m12, m21, info, va, vb)


def _load(entry: Path, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, dict] | None:
    try:
        saved = json.loads((entry / "meta.json").read_text())
        if any(saved.get(k) != v for k, v in meta.items()):
            return None
        m12 = np.load(entry / "first_to_second.npy", allow_pickle=False)
        m21 = np.load(entry / "second_to_first.npy", allow_pickle=False)
    except (OSError, ValueError, json.JSONDecodeError):
        return None
    if m12.shape != (meta["first_size"],) or m21.shape != (meta["second_size"],):
        return None
    return m12.astype(np.int64), m21.astype(np.int64), dict(saved, cache="hit")


def _store(entry: Path, m12: np.ndarray, m21: np.ndarray, meta: dict[str, Any]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=entry.parent))
    try:
        np.save(tmp / "first_to_second.npy", m12.astype(np.int32))
        np.save(tmp / "second_to_first.npy", m21.astype(np.int32))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists():  # a stale entry (other version or digests): replace it
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # lost a race to a concurrent writer: theirs is as good
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
