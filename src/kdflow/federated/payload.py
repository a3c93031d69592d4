"""The wire format of what a party says about the public set: arrays only, validated on receipt.

A payload is a dict of numpy arrays (never pickled):
    ids        [P, k]  uint16 when the sender's vocabulary fits, else int32 — top-k token ids
    logp       [P, k]  float16 — top-k log-probs at the transfer temperature
    tail_logp  [P]     float32 — log of the mass outside the k ids
    offsets    [N + 1] int64 — sample n owns rows offsets[n]:offsets[n+1] (its answer positions)
    ce         [N]     float32 — mean cross-entropy over the sample's answer tokens
P counts answer positions of the N public samples in the sender's own tokenization, which the
receiver can recompute (the public set and tokenizers are shared; private data never is), so
every shape is checked against what the receiver expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from kdflow.errors import KDFlowError

FIELDS = ("ids", "logp", "tail_logp", "offsets", "ce")


class PayloadError(KDFlowError):
    """A received payload is malformed; it is rejected as a whole."""


@dataclass
class PublicOutputs:
    """A party's top-k distributions and per-sample CE on the public set (decoded, in memory)."""

    ids: np.ndarray
    logp: np.ndarray
    tail_logp: np.ndarray
    offsets: np.ndarray
    ce: np.ndarray

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, b = int(self.offsets[n]), int(self.offsets[n + 1])
        return self.ids[a:b], self.logp[a:b], self.tail_logp[a:b]


def encode(out: PublicOutputs, vocab_size: int) -> dict[str, np.ndarray]:
    id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
    return {
        "ids": np.ascontiguousarray(out.ids, dtype=id_dtype),
        "logp": np.ascontiguousarray(out.logp, dtype=np.float16),
        "tail_logp": np.ascontiguousarray(out.tail_logp, dtype=np.float32),
        "offsets": np.ascontiguousarray(out.offsets, dtype=np.int64),
        "ce": np.ascontiguousarray(out.ce, dtype=np.float32),
    }


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


def decode(arrays: dict[str, np.ndarray], *, sender: str, vocab_size: int, k: int, positions: list[int],
           max_bytes: int = 2**31 - 1) -> PublicOutputs:
    """Validate a received payload against what the receiver expects; one clear error if it is not."""
    missing = [f for f in FIELDS if f not in arrays]
    extra = [f for f in arrays if f not in FIELDS]
    if missing or extra:
        raise PayloadError(f"payload from {sender}: fields {missing} missing, {extra} unexpected")
    size = nbytes(arrays)
    if size > max_bytes:
        raise PayloadError(f"payload from {sender} is {size} bytes, over the limit of {max_bytes}")
    n = len(positions)
    total = int(sum(positions))
    expect = {"ids": (total, None), "logp": (total, None), "tail_logp": (total,), "offsets": (n + 1,), "ce": (n,)}
    dtypes = {"ids": (np.uint16, np.int32), "logp": (np.float16,), "tail_logp": (np.float32,), "offsets": (np.int64,),
              "ce": (np.float32,)}
    for name, shape in expect.items():
        a = arrays[name]
        if not isinstance(a, np.ndarray) or a.dtype.type not in dtypes[name]:
            raise PayloadError(f"payload from {sender}: '{name}' must be {' or '.join(d.__name__ for d in dtypes[name])}, "
                               f"got {getattr(a, 'dtype', type(a))}")
        if a.ndim != len(shape) or any(s is not None and a.shape[i] != s for i, s in enumerate(shape)):
            raise PayloadError(f"payload from {sender}: '{name}' has shape {a.shape}, expected {shape} "
                               f"({n} public samples, {total} answer positions)")
    ids, logp = arrays["ids"], arrays["logp"]
    if ids.shape != logp.shape or not 1 <= ids.shape[1] <= k:
        raise PayloadError(f"payload from {sender}: ids {ids.shape} and logp {logp.shape} must match with 1..{k} columns")
    if ids.size and int(ids.max()) >= vocab_size:
        raise PayloadError(f"payload from {sender}: token id {int(ids.max())} is outside the vocabulary of {vocab_size}")
    if ids.dtype == np.int32 and ids.size and int(ids.min()) < 0:
        raise PayloadError(f"payload from {sender}: negative token id {int(ids.min())}")
    if not np.array_equal(arrays["offsets"], np.concatenate([[0], np.cumsum(positions)]).astype(np.int64)):
        raise PayloadError(f"payload from {sender}: offsets do not match the public set's answer positions")
    lp = logp.astype(np.float32)
    if np.isnan(lp).any() or (lp > 1e-3).any() or np.isposinf(lp).any():
        raise PayloadError(f"payload from {sender}: log-probs must be finite or -inf and <= 0")
    tail = arrays["tail_logp"]
    if np.isnan(tail).any() or (tail > 1e-3).any():
        raise PayloadError(f"payload from {sender}: tail log-mass must be <= 0 and not NaN")
    ce = arrays["ce"]
    if not np.isfinite(ce).all() or (ce < 0).any():
        raise PayloadError(f"payload from {sender}: per-sample cross-entropies must be finite and >= 0")
    return PublicOutputs(ids.astype(np.int64), lp, tail.astype(np.float32), arrays["offsets"].copy(), ce.copy())


def reference_format_bytes(out: PublicOutputs) -> int:
    """Size of the same content in the reference implementation's format: per position, the top-k
    logits and int64 ids as nested Python lists, serialised as text."""
    n = len(out.ce)
    per_sample = []
    for i in range(n):
        ids, lp, _ = out.sample(i)
        per_sample.append({"logits": lp.astype(np.float32).tolist(), "ids": ids.astype(np.int64).tolist(),
                           "ce": float(out.ce[i])})
    return len(json.dumps(per_sample).encode())
