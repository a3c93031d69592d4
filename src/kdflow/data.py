"""Rows -> token sequences with labels on response tokens only.

A row is a prompt/response pair (field names configurable) or a chat (`messages`, the last turn
being the assistant's answer). With a chat template the prompt is rendered with the generation
prompt and the answer is tokenised after it, so that training sees exactly the token sequence
that generation produces from the same prompt.

Labels are built from spans, never by comparing ids with `pad_token_id`: many chat models use
one id for padding and end-of-sequence, and an id-based mask silently drops every answer's EOS.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable

from kdflow.config import DataConfig
from kdflow.errors import DataError

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Reading rows


@dataclass
class Rows:
    """Rows of one source plus where each came from, for error messages."""

    source: str
    items: list[dict[str, Any]]
    locations: list[str]  # "file:line" or "source row N"

    def __len__(self) -> int:
        return len(self.items)

    def head(self, n: int | None) -> "Rows":
        if n is None:
            return self
        return Rows(self.source, self.items[:n], self.locations[:n])


def read_rows(spec: str, role: str = "data") -> Rows:
    """Read rows from a local file (.jsonl/.json/.csv/.parquet), a saved datasets folder, or hf:<id>[#config]@<split>."""
    path = Path(spec).expanduser()
    if spec.startswith("hf:"):
        rows = _read_hub(spec)
    elif not path.exists():
        raise DataError(f"{role} file {path} not found")
    elif path.is_dir():
        rows = _read_saved_dataset(path)
    else:
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        suffix = path.suffix.lower()
        if suffix not in readers:
            raise DataError(f"{role} file {path}: unsupported format '{suffix}'; use .jsonl, .json, .csv, .parquet, "
                            "a datasets folder or hf:<id>@<split>")
        rows = readers[suffix](path)
    if len(rows) == 0:  # an empty split would train on nothing or report perplexity 1.0
        raise DataError(f"{role} {spec} has no rows; give a file with at least one row")
    return rows


def _text(path: Path) -> str:
    """The file as UTF-8 text (a leading BOM dropped); bytes that are not UTF-8 are an error naming the line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def _read_jsonl(path: Path) -> Rows:
    items, locs = [], []
    # split on newlines only: str.splitlines would also cut at U+2028 and friends, which JSON strings may hold
    for n, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(obj).__name__}")
        items.append(obj)
        locs.append(f"{path}:{n}")
    return Rows(str(path), items, locs)


def _read_json(path: Path) -> Rows:
    try:
        obj = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(o, dict) for o in obj):
        raise DataError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    return Rows(str(path), obj, [f"{path} row {i + 1}" for i in range(len(obj))])


def _read_csv(path: Path) -> Rows:
    import io

    items, locs = [], []
    reader = csv.DictReader(io.StringIO(_text(path), newline=""))
    try:
        for row in reader:
            if None in row:  # more cells than the header names
                raise DataError(f"{path}:{reader.line_num}: {len(row[None])} more cell(s) than the header has columns")
            items.append(dict(row))
            locs.append(f"{path}:{reader.line_num}")
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    return Rows(str(path), items, locs)


def _read_parquet(path: Path) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        items = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0][:200]}); "
                        "write it again or give another file") from None
    return Rows(str(path), items, [f"{path} row {i + 1}" for i in range(len(items))])


def _read_saved_dataset(path: Path) -> Rows:
    import datasets

    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(f"{path} is a folder but not a dataset saved with save_to_disk") from None
    except (pa.ArrowException, OSError, ValueError, KeyError) as e:
        raise DataError(f"{path}: the saved dataset cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "save it again with save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(f"{path} holds several splits ({', '.join(ds)}); point at one split's folder")
    items = list(ds)
    return Rows(str(path), items, [f"{path} row {i + 1}" for i in range(len(items))])


def _read_hub(spec: str) -> Rows:
    import datasets

    body = spec[3:]
    if "@" not in body:
        raise DataError(f"dataset '{spec}' needs a split: hf:<id>[#config]@<split>, e.g. hf:org/name@train")
    ident, split = body.rsplit("@", 1)
    name, _, subset = ident.partition("#")
    try:
        ds = datasets.load_dataset(name, subset or None, split=split)
    except Exception as e:  # datasets raises many types; all mean "cannot get it"
        raise DataError(f"could not load dataset '{spec}': {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    items = list(ds)
    return Rows(spec, items, [f"{spec} row {i + 1}" for i in range(len(items))])


def rows_fingerprint(rows: Rows) -> str:
    h = hashlib.sha256()
    for item in rows.items:
        h.update(json.dumps(item, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Rows -> prompt / response text


@dataclass
class Turns:
    """A row as chat turns: the prompt messages and the reference answer."""

    messages: list[dict[str, str]]
    response: str


def row_turns(row: dict[str, Any], where: str, cfg: DataConfig) -> Turns:
    if cfg.messages_field in row and row[cfg.messages_field] is not None:
        msgs = row[cfg.messages_field]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field '{cfg.messages_field}' must be a non-empty list of {{role, content}}")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: {cfg.messages_field}[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (role 'assistant'), got '{msgs[-1]['role']}'")
        if not msgs[-1]["content"].strip():
            raise DataError(f"{where}: the assistant's answer is empty")
        if len(msgs) < 2 or not any(m["content"].strip() for m in msgs[:-1]):
            raise DataError(f"{where}: the chat has no prompt before the assistant's answer")
        return Turns([{"role": m["role"], "content": m["content"]} for m in msgs[:-1]], msgs[-1]["content"])
    for fname in (cfg.prompt_field, cfg.response_field):
        if fname not in row:
            raise DataError(
                f"{where}: missing field '{fname}' (row has: {', '.join(map(str, row)) or 'nothing'}); "
                f"set data.prompt_field / data.response_field, or give a '{cfg.messages_field}' chat")
        if not isinstance(row[fname], str):
            raise DataError(f"{where}: field '{fname}' must be text, got {type(row[fname]).__name__}")
        if not row[fname].strip():
            raise DataError(f"{where}: field '{fname}' is empty")
    return Turns([{"role": "user", "content": row[cfg.prompt_field]}], row[cfg.response_field])


def uses_chat_template(tok: Any, cfg: DataConfig) -> bool:
    has = bool(getattr(tok, "chat_template", None))
    if cfg.chat_template == "always" and not has:
        raise DataError("data.chat_template=always but the tokenizer has no chat template; set it to auto or never")
    return has if cfg.chat_template == "auto" else cfg.chat_template == "always"


@dataclass
class ResponseEncoding:
    ids: list[int]
    text: str  # what `ids` tokenise: the answer, plus the template's end marker when it writes one
    spans: list[tuple[int, int]] | None  # character span of each id in `text`, when asked for


class Encoder:
    """Turns rows into token ids the same way for training, scoring and generation."""

    def __init__(self, tok: Any, cfg: DataConfig):
        self.tok = tok
        self.cfg = cfg
        self.chat = uses_chat_template(tok, cfg)
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer has no EOS token, so answers cannot be terminated; set tokenizer.eos_token")
        probe = tok("a").input_ids
        self.add_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id

    def prompt_text(self, turns: Turns) -> str:
        if self.chat:
            msgs = list(turns.messages)
            if self.cfg.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.cfg.system_prompt}] + msgs
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = "\n".join(m["content"] for m in turns.messages)
        return self.cfg.prompt_template.format(prompt=text)

    def prompt_ids(self, turns: Turns) -> list[int]:
        ids = self.tok(self.prompt_text(turns), add_special_tokens=False).input_ids
        if not self.chat and self.add_bos:
            ids = [self.tok.bos_token_id] + ids
        return ids

    def response_ids(self, turns: Turns, ended: bool = True) -> list[int]:
        """The answer's tokens and its end (the template's end marker, or EOS); with `ended=False`, the
        answer's tokens alone: for an answer cut short (a generation that reached its token limit),
        which must not teach the model to stop there."""
        enc = self.response_encoding(turns)
        if ended:
            return enc.ids
        answer = turns.response
        at = enc.text.find(answer)
        if at < 0:  # a template that trims the answer
            answer = answer.strip()
            at = enc.text.find(answer)
        if at < 0:
            return enc.ids[:-1] if enc.ids and enc.ids[-1] == self.eos_id else enc.ids
        # The tokens that spell the text up to the answer's end are those shared with the tokenisation
        # of that text alone; a token merging the answer's last characters with the end marker is dropped.
        alone = self.tok(enc.text[:at + len(answer)], add_special_tokens=False).input_ids
        n = 0
        while n < min(len(alone), len(enc.ids)) and alone[n] == enc.ids[n]:
            n += 1
        return enc.ids[:n]

    def response_encoding(self, turns: Turns, spans: bool = False) -> "ResponseEncoding":
        """The answer's token ids, the text they tokenise, and (optionally) each id's character span.

        The text is the answer followed by the template's end marker when the chat template writes
        one, else the answer alone (EOS is then appended as an id with the empty span (n, n)).
        Spans come from a fast tokenizer's offset mapping; cross-tokenizer alignment needs them.
        """
        rest, templated = turns.response, False
        if self.chat:
            msgs = list(turns.messages)
            if self.cfg.system_prompt and msgs[0]["role"] != "system":
                msgs = [{"role": "system", "content": self.cfg.system_prompt}] + msgs
            prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            full = self.tok.apply_chat_template(msgs + [{"role": "assistant", "content": turns.response}], tokenize=False)
            if full.startswith(prompt):
                rest, templated = full[len(prompt):], True
                # The answer ends at EOS; template whitespace after it is never generated.
                eos = self.tok.eos_token
                if rest.rstrip().endswith(eos):
                    rest = rest.rstrip()
            # else: a template that rewrites earlier turns when an answer is added: fall back to the
            # answer text followed by EOS, which is what generation from the prompt must produce.
        if spans:
            try:
                enc = self.tok(rest, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError:
                from kdflow.errors import AlignmentError

                raise AlignmentError(
                    f"tokenizer {type(self.tok).__name__} gives no character offsets (it is not a fast tokenizer); "
                    "set align.sequence=dtw to align by token strings instead") from None
            ids, offsets = list(enc.input_ids), [tuple(o) for o in enc.offset_mapping]
        else:
            ids, offsets = self.tok(rest, add_special_tokens=False).input_ids, None
        if not templated or not ids or ids[-1] != self.eos_id:
            ids = ids + [self.eos_id]
            if offsets is not None:
                offsets.append((len(rest), len(rest)))
        return ResponseEncoding(ids, rest, offsets)

    def encode(self, row: dict[str, Any], where: str, row_index: int, ended: bool = True) -> dict[str, Any]:
        turns = row_turns(row, where, self.cfg)
        p = self.prompt_ids(turns)
        r = self.response_ids(turns, ended)
        limit = self.cfg.max_length
        if len(p) + self.cfg.min_response_tokens > limit:
            raise DataError(
                f"{where}: the prompt is {len(p)} tokens, which leaves fewer than data.min_response_tokens="
                f"{self.cfg.min_response_tokens} answer tokens within data.max_length={limit}; raise data.max_length or shorten the prompt")
        r = r[: limit - len(p)]  # answers are cut at the end, never removed
        return {
            "input_ids": p + r,
            "labels": [IGNORE_INDEX] * len(p) + r,
            "prompt_len": len(p),
            "row_index": row_index,
        }


def encode_rows(rows: Rows, tok: Any, cfg: DataConfig, unended: Collection[int] = ()) -> list[dict[str, Any]]:
    """Every row as an example; rows whose index is in `unended` keep their answer without an end (no EOS target)."""
    enc = Encoder(tok, cfg)
    return [enc.encode(row, where, i, ended=i not in unended)
            for i, (row, where) in enumerate(zip(rows.items, rows.locations))]


def reference_answers(rows: Rows, cfg: DataConfig) -> list[str]:
    return [row_turns(row, where, cfg).response for row, where in zip(rows.items, rows.locations)]


def accepted_answers(rows: Rows, cfg: DataConfig) -> list[list[str]]:
    """Every answer a grader accepts per row: the reference first, then data.references_field's
    entries (a list, or a string joined by data.references_separator)."""
    from kdflow.scoring import split_references

    out = []
    for row, where in zip(rows.items, rows.locations):
        accepted = [row_turns(row, where, cfg).response]
        if cfg.references_field:
            if cfg.references_field not in row:
                raise DataError(f"{where}: missing field '{cfg.references_field}' (data.references_field); "
                                f"row has: {', '.join(map(str, row))}")
            value = row[cfg.references_field]
            if value is not None and not isinstance(value, (str, list, tuple)):
                raise DataError(f"{where}: field '{cfg.references_field}' must be text or a list of texts, "
                                f"got {type(value).__name__}")
            accepted += [a for a in split_references(value, cfg.references_separator) if a not in accepted]
        out.append(accepted)
    return out


def prompts_of(rows: Rows, tok: Any, cfg: DataConfig) -> list[list[int]]:
    enc = Encoder(tok, cfg)
    return [enc.prompt_ids(row_turns(row, where, cfg)) for row, where in zip(rows.items, rows.locations)]


# ----------------------------------------------------------------------------------------------
# Batching


class ListDataset:
    """A list of examples as a map-style dataset (what Trainer's DataLoader needs)."""

    def __init__(self, examples: list[dict[str, Any]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]


def collate(examples: Iterable[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Right-pad a list of examples. Padding gets attention 0 and label IGNORE_INDEX."""
    import torch

    examples = list(examples)
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["input_ids"])
        input_ids[i, :L] = torch.tensor(e["input_ids"])
        attention[i, :L] = 1
        labels[i, :L] = torch.tensor(e["labels"])
    batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
             "row_index": torch.tensor([e.get("row_index", -1) for e in examples])}
    for key in examples[0]:
        if key.startswith("teacher_"):  # per-example extras (e.g. cached teacher targets) stay lists
            batch[key] = [e[key] for e in examples]
    return batch


class Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(examples, self.pad_id)


def left_pad(prompts: list[list[int]], pad_id: int, width: int = 0) -> tuple[Any, Any]:
    """Left-pad prompts for batched generation (to `width` columns at least): (input_ids, attention_mask)."""
    import torch

    width = max(width, max(len(p) for p in prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------
# Federated partitions


def partition_rows(rows: Rows, public_rows: int, clients: int, private_rows: int | None = None,
                   scheme: str = "equal", field: str | None = None, alpha: float = 0.5, seed: int = 0) -> tuple[Rows, list[Rows]]:
    """Split rows into one public part (same order for everyone) and `clients` private parts.

    scheme "equal": shuffled rows dealt into equal parts. scheme "dirichlet": for each value of
    `field` (e.g. part of speech), the rows with that value are shared among clients in
    proportions drawn from Dirichlet(alpha) — small alpha gives each client a skewed mix.
    """
    import numpy as np

    n = len(rows)
    if public_rows < 0 or clients < 1:
        raise DataError("public_rows must be >= 0 and there must be at least one client")
    if public_rows >= n:
        raise DataError(f"{rows.source} has {n} rows: not enough for {public_rows} public rows and {clients} clients")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    public_idx = sorted(order[:public_rows].tolist())  # sorted: the public set keeps the file's order
    rest = order[public_rows:]
    if private_rows is not None:
        rest = rest[: private_rows * clients]
    if scheme == "equal":
        parts = [sorted(p.tolist()) for p in np.array_split(rest, clients)]
    elif scheme == "dirichlet":
        if not field:
            raise DataError("partition scheme 'dirichlet' needs a field to skew by (e.g. pos)")
        groups: dict[str, list[int]] = {}
        for i in rest.tolist():
            row = rows.items[i]
            if field not in row:
                raise DataError(f"{rows.locations[i]}: missing field '{field}' used to partition the clients")
            groups.setdefault(str(row[field]), []).append(i)
        parts = [[] for _ in range(clients)]
        for key in sorted(groups):
            idx = groups[key]
            props = rng.dirichlet([alpha] * clients)
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for c, chunk in enumerate(np.split(np.array(idx), cuts)):
                parts[c].extend(chunk.tolist())
        parts = [sorted(p) for p in parts]
    else:
        raise DataError(f"unknown partition scheme '{scheme}'; use equal or dirichlet")
    for c, p in enumerate(parts):
        if not p:
            raise DataError(f"client {c} received no private rows; use more rows, more even partitions or a larger alpha")

    def take(idx: list[int], tag: str) -> Rows:
        return Rows(f"{rows.source} [{tag}]", [rows.items[i] for i in idx], [rows.locations[i] for i in idx])

    return take(public_idx, "public"), [take(p, f"client {c}") for c, p in enumerate(parts)]
