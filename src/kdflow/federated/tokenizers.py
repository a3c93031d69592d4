"""Tokenizers on the wire: what parties with different tokenizers exchange once, over Flower.

Carrying a distribution from one vocabulary to another (kdflow.align: MinED vocabulary maps,
positions paired by character offsets) needs both tokenizers on the receiving side. A tokenizer is
a public artefact, not private data: a party sends its fast tokenizer's files (`tokenizer.json` and
its configuration) as bytes, once per peer, and the receiver rebuilds it and builds the alignment
exactly as the in-process runner does with the original.

Only data files travel: `TOKENIZER_FILES`, each a JSON document (or the chat template text), within
`MAX_TOKENIZER_BYTES` in all, declared sizes checked before anything is read. A configuration that
names code to import (`auto_map`) is refused and nothing is loaded with trust_remote_code. The
rebuilt tokenizer must have the fingerprint (vocabulary and special tokens) its sender claimed.
A chat template is a Jinja template, which transformers renders in its sandbox.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from kdflow.federated.payload import PayloadError, read_array

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
MAX_TOKENIZER_BYTES = 64 * 2**20  # SmolLM2's tokenizer.json is 2 MB, a 256k-token one ~ 35 MB


def tokenizer_files(tok: Any) -> dict[str, bytes]:
    """The files that rebuild `tok` (a fast tokenizer), as bytes."""
    if not getattr(tok, "is_fast", False):
        raise PayloadError(f"tokenizer {type(tok).__name__} is not a fast tokenizer (no tokenizer.json): over Flower "
                           "parties with different tokenizers exchange tokenizer.json; use a fast tokenizer")
    with tempfile.TemporaryDirectory(prefix="kdflow-tok-") as d:
        tok.save_pretrained(d)
        return {name: (Path(d) / name).read_bytes() for name in TOKENIZER_FILES if (Path(d) / name).is_file()}


def tokenizer_record(tok: Any) -> Any:
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.frombuffer(data, dtype=np.uint8).copy())
                        for name, data in tokenizer_files(tok).items()})


def read_tokenizer_files(record: Any, sender: str, max_bytes: int = MAX_TOKENIZER_BYTES) -> dict[str, bytes]:
    """The files of a tokenizer record, checked: known names only, tokenizer.json present, declared
    sizes within `max_bytes` before any is read, JSON files parse as JSON objects, no `auto_map`."""
    names = list(record.keys())
    unknown = [n for n in names if n not in TOKENIZER_FILES]
    if unknown:
        raise PayloadError(f"tokenizer from {sender}: file '{str(unknown[0])[:60]}' is not one of {', '.join(TOKENIZER_FILES)}")
    if "tokenizer.json" not in names:
        raise PayloadError(f"tokenizer from {sender}: no tokenizer.json")
    declared = 0
    for n in names:
        arr = record[n]
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise PayloadError(f"tokenizer from {sender}: '{n}' must be a 1-D uint8 array of bytes")
        declared += int(arr.shape[0])
    if declared > max_bytes:
        raise PayloadError(f"tokenizer from {sender}: {declared} bytes, over the limit of {max_bytes}")
    files = {n: read_array(record[n], f"tokenizer from {sender}: '{n}'", ("uint8",), (record[n].shape[0],)).tobytes()
             for n in names}
    for n, data in files.items():
        if not n.endswith(".json"):
            continue
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise PayloadError(f"tokenizer from {sender}: '{n}' is not valid UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise PayloadError(f"tokenizer from {sender}: '{n}' is not a JSON object")
        if n == "tokenizer_config.json" and "auto_map" in obj:
            raise PayloadError(f"tokenizer from {sender}: tokenizer_config.json names code to load (auto_map); only "
                               "data files are accepted")
    return files


def load_tokenizer_files(files: dict[str, bytes], sender: str, fingerprint: str | None = None) -> Any:
    """A tokenizer rebuilt from checked files (as kdflow.models.load_tokenizer sets it up), whose
    fingerprint must be `fingerprint` when given."""
    from transformers import AutoTokenizer

    from kdflow.models import tokenizer_fingerprint

    with tempfile.TemporaryDirectory(prefix="kdflow-tok-") as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        try:
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code=False)
        except Exception as e:  # tokenizers and transformers raise many types for a bad file
            raise PayloadError(f"tokenizer from {sender} does not load: {type(e).__name__}: {str(e)[:200]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if fingerprint is not None and tokenizer_fingerprint(tok) != fingerprint:
        raise PayloadError(f"tokenizer from {sender}: its vocabulary and special tokens do not match the fingerprint "
                           f"{str(fingerprint)[:40]} it claims")
    return tok


def read_tokenizer(record: Any, sender: str, fingerprint: str | None = None, max_bytes: int = MAX_TOKENIZER_BYTES) -> Any:
    return load_tokenizer_files(read_tokenizer_files(record, sender, max_bytes), sender, fingerprint)


def save_tokenizer_files(files: dict[str, bytes], folder: Path) -> None:
    """Keep a received tokenizer (checked files) on disk, e.g. in a client's state folder."""
    from kdflow.report import atomic_folder

    with atomic_folder(folder) as tmp:
        for name, data in files.items():
            (tmp / name).write_bytes(data)


def load_saved_tokenizer(folder: Path, sender: str, fingerprint: str) -> Any | None:
    """A tokenizer kept by `save_tokenizer_files`, or None when there is none (or another one)."""
    if not (folder / "tokenizer.json").is_file():
        return None
    files = {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).is_file()}
    try:
        return load_tokenizer_files(files, sender, fingerprint)
    except PayloadError:
        return None
