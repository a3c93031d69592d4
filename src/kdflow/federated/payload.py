"""The wire format of what a party says about the public set: arrays only, validated on receipt.

A payload is a dict of numpy arrays (never pickled):
    ids        [P, k]  uint16 when the sender's vocabulary fits, else int32 — top-k token ids
    logp       [P, k]  float16 — top-k log-probs at the transfer temperature
    tail_logp  [P]     float32 — log of the mass outside the k ids
    offsets    [N + 1] int64 — sample n owns rows offsets[n]:offsets[n+1] (its answer positions)
    ce         [N]     float32 — mean cross-entropy over the sample's answer tokens (per token, in
                       the sender's tokenization; a receiver with another tokenizer converts it to
                       NLL per answer character before comparing: `fedmkt.selection_scores`)
P counts answer positions of the N public samples in the sender's own tokenization, which the
receiver can recompute (the public set and tokenizers are shared; private data never is), so
every shape is checked against what the receiver expects — the receiver's own facts (its
vocabulary, its tokenization of the public set), never the sender's claims. Each position must be a
distribution: distinct ids, probabilities (top-k plus tail) summing to 1, and with
`finite_support` (reverse KL, which is infinite wherever the sender gives zero probability) no
zero-probability id or tail.

Over Flower the same arrays travel in an `ArrayRecord` (`to_array_record` / `from_array_record`):
each field is one or more arrays named `<field>.<i>`, split along the position axis so that no
array exceeds a byte limit. The receiver checks every array's declared dtype, shape and size
before reading its bytes (NumPy's .npy format, read with allow_pickle=False), joins the chunks and
then runs `decode`'s checks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdflow.errors import KDFlowError

FIELDS = ("ids", "logp", "tail_logp", "offsets", "ce")
# fedmkt.wire_logprobs=uint8: `logp` holds 8-bit codes, and each position its offset and scale
CODE_FIELDS = ("logp_top", "logp_scale")
DTYPES = {"ids": ("uint16", "int32"), "logp": ("float16", "uint8"), "tail_logp": ("float32",), "offsets": ("int64",),
          "ce": ("float32",), "logp_top": ("float32",), "logp_scale": ("float32",)}
LOGP_FORMATS = ("float16", "uint8")
NEG_INF_CODE = 255  # a code for probability 0; 0..254 are the levels between a position's top and lowest log-prob


def fields(logp_format: str = "float16") -> tuple[str, ...]:
    """The arrays of a payload whose log-probs travel as `logp_format` (float32: local files only)."""
    return FIELDS + (CODE_FIELDS if logp_format == "uint8" else ())


def quantize(logp: np.ndarray, tail_logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k log-probs [P, k] as 8-bit codes with a per-position offset and scale:
    logp ~ top - code * scale, 255 meaning probability 0. Levels are linear in log-probability
    between the position's largest and smallest log-prob (254 steps), so the error is at most
    scale / 2 nats; the offset is then moved so that the decoded top-k plus the (exact, float32)
    tail sum to 1, as the receiver checks."""
    lp = logp.astype(np.float64)
    finite = np.isfinite(lp)
    top = np.where(finite, lp, -np.inf).max(1) if lp.size else np.zeros(len(lp))
    low = np.where(finite, lp, np.inf).min(1) if lp.size else np.zeros(len(lp))
    top = np.where(np.isfinite(top), top, 0.0)
    low = np.where(np.isfinite(low), low, top)
    scale = (top - low) / (NEG_INF_CODE - 1)
    steps = np.where(finite, (top[:, None] - np.where(finite, lp, 0.0)) / np.where(scale > 0, scale, 1.0)[:, None], 0.0)
    codes = np.where(finite, np.clip(np.rint(steps), 0, NEG_INF_CODE - 1), NEG_INF_CODE).astype(np.uint8)
    decoded = np.where(finite, top[:, None] - codes * scale[:, None], -np.inf)
    with np.errstate(divide="ignore"):
        mass = np.exp(decoded).sum(1)
        rest = -np.expm1(tail_logp.astype(np.float64))  # 1 - tail mass
        shift = np.where((mass > 0) & (rest > 0), np.log(np.maximum(rest, 1e-300) / np.maximum(mass, 1e-300)), 0.0)
    return codes, (top + shift).astype(np.float32), scale.astype(np.float32)


def dequantize(codes: np.ndarray, top: np.ndarray, scale: np.ndarray) -> np.ndarray:
    lp = top[:, None] - codes.astype(np.float32) * scale[:, None]
    return np.where(codes == NEG_INF_CODE, -np.inf, lp).astype(np.float32)


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


def encode(out: PublicOutputs, vocab_size: int, logp_format: str = "float16") -> dict[str, np.ndarray]:
    """The payload's arrays; `logp_format`: float16, uint8 (codes, `quantize`), or float32 (a party's
    own outputs kept on its disk exactly as decoded)."""
    id_dtype = np.uint16 if vocab_size <= 65536 else np.int32
    arrays = {
        "ids": np.ascontiguousarray(out.ids, dtype=id_dtype),
        "logp": np.ascontiguousarray(out.logp, dtype=np.float32 if logp_format == "float32" else np.float16),
        "tail_logp": np.ascontiguousarray(out.tail_logp, dtype=np.float32),
        "offsets": np.ascontiguousarray(out.offsets, dtype=np.int64),
        "ce": np.ascontiguousarray(out.ce, dtype=np.float32),
    }
    if logp_format == "uint8":
        arrays["logp"], arrays["logp_top"], arrays["logp_scale"] = quantize(out.logp, arrays["tail_logp"])
    return arrays


def nbytes(arrays: dict[str, np.ndarray]) -> int:
    return int(sum(a.nbytes for a in arrays.values()))


# How far a position's total probability (top-k + tail, log-probs in float16) may be from 1.
MASS_TOLERANCE = 0.05


def decode(arrays: dict[str, np.ndarray], *, sender: str, vocab_size: int, k: int, positions: list[int],
           max_bytes: int = 2**31 - 1, finite_support: bool = False, logp_format: str = "float16") -> PublicOutputs:
    """Validate a received payload against what the receiver expects (its own `logp_format`, not the
    sender's); one clear error if it is not."""
    expected = fields(logp_format)
    missing = [f for f in expected if f not in arrays]
    extra = [f for f in arrays if f not in expected]
    if missing or extra:
        raise PayloadError(f"payload from {sender}: fields {missing} missing, {extra} unexpected")
    size = nbytes(arrays)
    if size > max_bytes:
        raise PayloadError(f"payload from {sender} is {size} bytes, over the limit of {max_bytes}")
    n = len(positions)
    total = int(sum(positions))
    expect = {"ids": (total, None), "logp": (total, None), "tail_logp": (total,), "offsets": (n + 1,), "ce": (n,)}
    dtypes = {"ids": (np.uint16, np.int32), "logp": {"float16": (np.float16,), "uint8": (np.uint8,),
                                                     "float32": (np.float32, np.float16)}[logp_format],
              "tail_logp": (np.float32,), "offsets": (np.int64,), "ce": (np.float32,)}
    if logp_format == "uint8":
        expect.update({"logp_top": (total,), "logp_scale": (total,)})
        dtypes.update({"logp_top": (np.float32,), "logp_scale": (np.float32,)})
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
    if logp_format == "uint8":
        top, scale = arrays["logp_top"], arrays["logp_scale"]
        if not (np.isfinite(top).all() and np.isfinite(scale).all()) or (scale < 0).any():
            raise PayloadError(f"payload from {sender}: per-position log-prob offsets and scales must be finite, "
                               "scales >= 0")
        lp = dequantize(logp, top, scale)
    else:
        lp = logp.astype(np.float32)
    if np.isnan(lp).any() or (lp > 1e-3).any() or np.isposinf(lp).any():
        raise PayloadError(f"payload from {sender}: log-probs must be finite or -inf and <= 0")
    tail = arrays["tail_logp"]
    if np.isnan(tail).any() or (tail > 1e-3).any():
        raise PayloadError(f"payload from {sender}: tail log-mass must be <= 0 and not NaN")
    if ids.size:
        srt = np.sort(ids, axis=1)
        dup = (srt[:, 1:] == srt[:, :-1]).any(1)
        if dup.any():
            raise PayloadError(f"payload from {sender}: position {int(np.argmax(dup))} lists a token id twice")
    with np.errstate(divide="ignore", invalid="ignore"):
        mass = np.logaddexp(np.logaddexp.reduce(lp, axis=1), tail.astype(np.float32))
    bad = ~(np.abs(mass) <= MASS_TOLERANCE)
    if bad.any():
        i = int(np.argmax(bad))
        raise PayloadError(f"payload from {sender}: the probabilities at position {i} sum to {float(np.exp(mass[i])):.3g}, "
                           "not 1 (top-k plus tail)")
    if finite_support:
        zero = np.isneginf(lp).any(1) | (np.isneginf(tail) & (ids.shape[1] < vocab_size))
        if zero.any():
            raise PayloadError(f"payload from {sender}: position {int(np.argmax(zero))} gives a token or its tail "
                               "probability 0, where reverse KL (fedmkt.divergence=rkl) is infinite")
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


# ----------------------------------------------------------------------------------------------
# Flower array records, in chunks


def split_rows(a: np.ndarray, chunk_bytes: int) -> list[np.ndarray]:
    """`a` cut along its first axis into pieces of at most `chunk_bytes` (at least one row each)."""
    if a.nbytes <= chunk_bytes or a.ndim == 0 or a.shape[0] <= 1:
        return [a]
    row = max(a.nbytes // a.shape[0], 1)
    rows = max(chunk_bytes // row, 1)
    return [a[s:s + rows] for s in range(0, a.shape[0], rows)]


def to_array_record(arrays: dict[str, np.ndarray], chunk_bytes: int = 64 * 2**20) -> Any:
    """An encoded payload as a Flower `ArrayRecord`: field `f` becomes arrays `f.0`, `f.1`, ... ."""
    from flwr.app import Array, ArrayRecord

    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    record = ArrayRecord()
    for name in FIELDS + tuple(f for f in CODE_FIELDS if f in arrays):
        for i, piece in enumerate(split_rows(arrays[name], chunk_bytes)):
            record[f"{name}.{i}"] = Array(np.ascontiguousarray(piece))
    return record


def read_array(arr: Any, what: str, dtypes: tuple[str, ...], shape: tuple[int | None, ...] | None = None) -> np.ndarray:
    """One received Flower `Array` as NumPy: its serialisation, dtype, declared shape and byte count
    are checked before its bytes are read (NumPy's .npy format, allow_pickle=False); `None` in
    `shape` accepts any length on that axis."""
    from flwr.app import Array

    if not isinstance(arr, Array) or arr.stype != "numpy.ndarray":
        raise PayloadError(f"{what} is serialised as '{getattr(arr, 'stype', type(arr).__name__)}', not a NumPy array")
    if arr.dtype not in dtypes:
        raise PayloadError(f"{what} must be {' or '.join(dtypes)}, got {arr.dtype}")
    declared = tuple(arr.shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in declared) or (
            shape is not None and (len(declared) != len(shape) or any(s is not None and d != s for d, s in zip(declared, shape)))):
        raise PayloadError(f"{what} has shape {list(declared)}" + (f", expected {list(shape)}" if shape is not None else ""))
    size = int(np.prod(declared, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
    if len(arr.data) > size + 4096:
        raise PayloadError(f"{what} carries {len(arr.data)} bytes for shape {list(declared)}")
    try:
        a = arr.numpy()  # np.load(allow_pickle=False)
    except Exception as e:  # a malformed .npy buffer
        raise PayloadError(f"{what} is not a readable NumPy array ({e})") from None
    if str(a.dtype) != arr.dtype or tuple(a.shape) != declared:
        raise PayloadError(f"{what} holds {a.dtype}{list(a.shape)}, declared {arr.dtype}{list(declared)}")
    return a


def record_bytes(content: Any) -> int:
    """Bytes carried by all arrays of a received RecordDict (counted before any is read)."""
    return int(sum(len(a.data) for rec in content.array_records.values() for a in rec.values()))


_KEY = re.compile(r"^([a-z_]+)\.(0|[1-9][0-9]{0,8})$")


def from_array_record(record: Any, *, sender: str, vocab_size: int, k: int, positions: list[int],
                      max_bytes: int = 2**31 - 1, finite_support: bool = False,
                      logp_format: str = "float16") -> PublicOutputs:
    """Read a received `ArrayRecord` back into `PublicOutputs`, rejecting it (PayloadError) unless every
    chunk is a plain NumPy array of the field's dtype and the right shape, the chunks are complete,
    the total size is within `max_bytes`, and the joined payload passes `decode`'s checks."""
    from flwr.app import ArrayRecord

    if not isinstance(record, ArrayRecord):
        raise PayloadError(f"payload from {sender}: expected an ArrayRecord, got {type(record).__name__}")
    chunks: dict[str, dict[int, Any]] = {}
    for key, arr in record.items():
        m = _KEY.match(key)
        if not m or m.group(1) not in fields(logp_format):
            raise PayloadError(f"payload from {sender}: unexpected array '{key}' (expected <field>.<chunk> for fields "
                               f"{', '.join(fields(logp_format))})")
        chunks.setdefault(m.group(1), {})[int(m.group(2))] = arr
    missing = [f for f in fields(logp_format) if f not in chunks]
    if missing:
        raise PayloadError(f"payload from {sender}: fields {missing} missing")
    # Everything below is decided from the declared metadata, before any bytes are read.
    declared, tails = 0, {}
    for name, parts in chunks.items():
        if sorted(parts) != list(range(len(parts))):
            raise PayloadError(f"payload from {sender}: '{name}' chunks {sorted(parts)} are not 0..{len(parts) - 1}")
        for i in range(len(parts)):
            arr = parts[i]
            if arr.stype != "numpy.ndarray":
                raise PayloadError(f"payload from {sender}: '{name}.{i}' is serialised as '{arr.stype}', not a NumPy array")
            if arr.dtype not in DTYPES[name]:
                raise PayloadError(f"payload from {sender}: '{name}' must be {' or '.join(DTYPES[name])}, got {arr.dtype}")
            shape = tuple(arr.shape)
            if not shape or any(not isinstance(d, int) or d < 0 for d in shape):
                raise PayloadError(f"payload from {sender}: '{name}.{i}' has shape {shape}")
            tail = shape[1:]
            if tails.setdefault(name, tail) != tail:
                raise PayloadError(f"payload from {sender}: '{name}' chunks disagree on shape ({tails[name]} vs {tail})")
            declared += int(np.prod(shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
            if declared > max_bytes:
                raise PayloadError(f"payload from {sender} declares more than {max_bytes} bytes, over the limit")
            if len(arr.data) > int(np.prod(shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize + 4096:
                raise PayloadError(f"payload from {sender}: '{name}.{i}' carries {len(arr.data)} bytes for shape {shape}")
    arrays = {}
    for name, parts in chunks.items():
        pieces = [read_array(parts[i], f"payload from {sender}: '{name}.{i}'", DTYPES[name]) for i in range(len(parts))]
        arrays[name] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return decode(arrays, sender=sender, vocab_size=vocab_size, k=k, positions=positions, max_bytes=max_bytes,
                  finite_support=finite_support, logp_format=logp_format)


def record_nbytes(record: Any) -> int:
    """Bytes of array data a record declares (the payload size, as `nbytes` counts it)."""
    return int(sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize for a in record.values()))
