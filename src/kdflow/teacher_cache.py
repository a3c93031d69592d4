"""Teacher cache: top-k teacher log-probs computed once, stored in shards with a manifest.

Layout of a cache folder:
    manifest.json            settings that must match a run, the shard list, `complete`
    shard-00000.safetensors  ids [P, k] (uint16 when the vocabulary fits, else int32; an empty slot,
                             id -1 in memory, is stored as 65535 in uint16),
                             logp [P, k] (float16 or bfloat16), tail_logp [P] (float32, optional),
                             offsets [M + 1] (int64: example m owns rows offsets[m]:offsets[m+1]),
                             row_index [M] (int64: the example's row in the dataset)
                             hidden [P, layers, H] (the logp dtype; only with teacher_cache.hidden: the
                             teacher's hidden states at the layers the manifest's key lists)

Rows are the KD positions of each example (response tokens, or all tokens for
token_scope=all), in order. Log-probs are taken after the teacher's temperature, which the
manifest records: a run with another temperature, teacher, tokenizer, dataset, k or data
settings refuses the cache instead of silently using it. Shards are written atomically and the
manifest is updated after each one, so an interrupted run resumes from the last complete shard.
Under several processes each computes and writes its share of the shards (the same files one
process writes) and the main process keeps the one manifest.
Nothing is pickled: safetensors holds plain arrays, the manifest is JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kdflow.errors import DataError
from kdflow.losses import TopKTargets, shifted_masks
from kdflow.report import write_json, writing

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EMPTY_U16 = 65535  # an empty top-k slot (id -1) in a uint16 shard


def _store_ids(ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.uint16:
        return torch.where(ids < 0, torch.full_like(ids, EMPTY_U16), ids).to(torch.int32).to(torch.uint16)
    return ids.to(dtype)


def manifest_key(*, teacher: str, teacher_tokenizer: str, student_tokenizer: str, data: str, data_settings: dict,
                 k: int, temperature: float, token_scope: str, logp_dtype: str, store_tail: bool,
                 alignment: dict | None = None, hidden_layers: list[int] | None = None) -> dict[str, Any]:
    """Everything a cached target depends on. Two runs may share a cache only if these are equal."""
    return {
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "teacher_tokenizer": teacher_tokenizer,
        "student_tokenizer": student_tokenizer,
        "data": data,
        "data_settings": data_settings,
        "k": k,
        "temperature": temperature,
        "token_scope": token_scope,
        "logp_dtype": logp_dtype,
        "store_tail": store_tail,
        "alignment": alignment,
        # only present when hidden states are stored, so caches built before this key still match
        **({"hidden_layers": hidden_layers} if hidden_layers else {}),
    }


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DataError(f"{path} is not valid JSON; delete the cache folder and run kdflow cache-teacher again") from None


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Computing top-k targets


def topk_from_logits(logits: torch.Tensor, k: int, temperature: float, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids [N, k], log-probs [N, k], tail log-mass [N]) of softmax(logits / temperature), in float32."""
    ids, lps, tails = [], [], []
    for start in range(0, logits.shape[0], chunk):
        lp = F.log_softmax(logits[start:start + chunk].float() / temperature, -1)
        top = lp.topk(min(k, lp.shape[-1]), dim=-1)
        # the mass outside the top k, summed directly (1 - covered loses it to rounding)
        tails.append(torch.logsumexp(lp.scatter(-1, top.indices, -float("inf")), -1))
        ids.append(top.indices)
        lps.append(top.values)
    return torch.cat(ids), torch.cat(lps), torch.cat(tails)


def same_tokenizer_targets(teacher: Any, vocab_size: int, k: int, temperature: float, token_scope: str,
                           hidden_layers: list[int] | None = None) -> Callable:
    """Per-batch function computing the teacher's top-k at each example's KD positions (and its hidden
    states at `hidden_layers`, [n, layers, H], when asked)."""
    from kdflow.models import selected_hidden, selected_states

    @torch.no_grad()
    def targets(batch: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        _, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"], token_scope)
        states = None
        if hidden_layers:
            hidden, head, layers = selected_states(teacher, batch["input_ids"], batch["attention_mask"], kd_mask,
                                                   hidden_layers)
            states = torch.stack(layers, 1).cpu()
        else:
            hidden, head = selected_hidden(teacher, batch["input_ids"], batch["attention_mask"], kd_mask)
        logits = torch.cat([head(hidden[s:s + 512])[..., :vocab_size].float() for s in range(0, hidden.shape[0], 512)]) \
            if hidden.shape[0] else hidden.new_zeros((0, vocab_size))
        # top-k where the teacher runs (its device); the k columns come back to be stored
        ids, lp, tail = (x.cpu() for x in topk_from_logits(logits, k, temperature))
        out, start = [], 0
        for n in kd_mask.sum(-1).tolist():
            out.append({"ids": ids[start:start + n], "logp": lp[start:start + n], "tail_logp": tail[start:start + n]})
            if states is not None:
                out[-1]["hidden"] = states[start:start + n]
            start += n
        return out

    return targets


# ----------------------------------------------------------------------------------------------
# Writing


def build_cache(folder: str | os.PathLike, key: dict[str, Any], examples: list[dict[str, Any]], pad_id: int,
                compute: Callable[[dict[str, Any]], list[dict[str, torch.Tensor]]], batch_size: int = 16,
                shard_size: int = 512, vocab_size: int = 0, progress: bool = True) -> dict[str, Any]:
    """Compute and store targets for every example, resuming after the last complete shard."""
    from tqdm.auto import tqdm

    from kdflow import processes
    from kdflow.data import collate

    folder = Path(folder)

    def open_manifest() -> dict[str, Any]:
        if folder.exists() and not folder.is_dir():
            raise DataError(f"teacher_cache.dir {folder} is a file, not a folder; choose another teacher_cache.dir")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = _read_manifest(folder)
        if manifest is not None:
            changed = _diff(manifest["key"], key)
            if changed:
                raise DataError(f"teacher cache {folder} was built with other settings ({', '.join(changed)} differ); "
                                "use another teacher_cache.dir or delete this one")
            if manifest.get("shard_size") != shard_size:
                raise DataError(f"teacher cache {folder} uses shard_size {manifest.get('shard_size')}; keep it to resume")
        else:
            manifest = {"key": key, "shard_size": shard_size, "examples": len(examples), "shards": [], "complete": False}
            write_json(folder / MANIFEST, manifest)
        return manifest

    manifest = processes.on_main(open_manifest)
    done = sum(s["examples"] for s in manifest["shards"])
    if manifest["complete"] and done == len(examples):
        return manifest
    # uint16 keeps 65535 free to mark empty slots (-1), which cross-tokenizer targets have
    id_dtype = torch.uint16 if 0 < vocab_size <= EMPTY_U16 else torch.int32
    lp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[key["logp_dtype"]]
    main, world = processes.is_main(), processes.world()
    bar = tqdm(total=len(examples), initial=done, desc="teacher cache", disable=not (progress and main))
    t0 = time.time()
    # Shard j holds examples j*shard_size onwards, whoever computes it: each of P processes computes
    # one shard of every round of P and writes its file; the main process lists the round's shards
    # in the manifest, which therefore names a complete prefix of the shards at every moment.
    first_shards = range(len(manifest["shards"]), -(-len(examples) // shard_size), world)
    for first in first_shards:
        j = first + processes.rank()
        entry = None
        if j * shard_size < len(examples):
            entry = _write_shard(folder, j, examples[j * shard_size:(j + 1) * shard_size], pad_id, compute,
                                 batch_size, key, id_dtype, lp_dtype, collate)
        entries = [e for e in processes.all_gather_json(entry) if e is not None]
        manifest["shards"] += entries
        if main:
            write_json(folder / MANIFEST, manifest)
        bar.update(sum(e["examples"] for e in entries))
    bar.close()
    manifest["complete"] = True
    manifest["build_seconds"] = manifest.get("build_seconds", 0.0) + (time.time() - t0)
    positions = sum(s["positions"] for s in manifest["shards"])
    manifest["positions"] = positions
    manifest["bytes_per_position"] = sum(s["bytes"] for s in manifest["shards"]) / max(positions, 1)
    return processes.on_main(lambda: (write_json(folder / MANIFEST, manifest), manifest)[1])


def _write_shard(folder: Path, j: int, shard: list[dict[str, Any]], pad_id: int, compute: Callable, batch_size: int,
                 key: dict[str, Any], id_dtype: torch.dtype, lp_dtype: torch.dtype, collate: Callable) -> dict[str, Any]:
    """Compute shard `j` and write it atomically; return its manifest entry."""
    from safetensors.torch import save_file

    per_example: list[dict[str, torch.Tensor]] = []
    for b in range(0, len(shard), batch_size):
        per_example.extend(compute(collate(shard[b:b + batch_size], pad_id)))
    counts = [int(t["ids"].shape[0]) for t in per_example]
    tensors = {
        "ids": _store_ids(torch.cat([t["ids"] for t in per_example]), id_dtype),
        "logp": torch.cat([t["logp"] for t in per_example]).to(lp_dtype),
        "offsets": torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()), dtype=torch.int64),
        "row_index": torch.tensor([e["row_index"] for e in shard], dtype=torch.int64),
    }
    if key["store_tail"]:
        tensors["tail_logp"] = torch.cat([t["tail_logp"] for t in per_example]).float()
    if key.get("hidden_layers"):
        tensors["hidden"] = torch.cat([t["hidden"] for t in per_example]).to(lp_dtype)
    if key.get("alignment") is not None:
        tensors["valid"] = torch.cat([t["valid"] for t in per_example]).to(torch.uint8)
    name = f"shard-{j:05d}.safetensors"
    tmp = folder / (name + ".tmp")
    with writing(folder / name):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, folder / name)
    return {"file": name, "examples": len(shard), "positions": sum(counts), "sha256": _sha256(folder / name),
            "bytes": (folder / name).stat().st_size}


# ----------------------------------------------------------------------------------------------
# Reading


class TeacherCache:
    """A complete cache whose manifest matches the run; hands out per-example targets.

    Opening it checks what is cheap to check (shard names stay inside the folder, files have their
    recorded sizes); each shard's checksum and contents (finite log-probs, ids inside the student's
    vocabulary, consistent offsets) are checked when it is read. A damaged cache is refused in one
    line naming the shard, never passed on to the loss.
    """

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any], vocab_size: int | None = None):
        self.folder = Path(folder)
        self.vocab_size = vocab_size
        manifest = _read_manifest(self.folder)
        if manifest is None:
            raise DataError(f"no teacher cache at {self.folder}: run `kdflow cache-teacher` with the same config first")
        where = self.folder / MANIFEST
        if not isinstance(manifest, dict) or not isinstance(manifest.get("key"), dict) \
                or not isinstance(manifest.get("shards"), list):
            raise DataError(f"{where} is not a teacher cache manifest; delete the folder and run `kdflow cache-teacher` again")
        changed = _diff(manifest["key"], key)
        if changed:
            detail = "; ".join(f"{c}: cache {manifest['key'].get(c)!r} vs run {key.get(c)!r}" for c in changed[:3])
            raise DataError(f"teacher cache {self.folder} does not match this run ({detail}); "
                            "rebuild it with `kdflow cache-teacher` or point teacher_cache.dir elsewhere")
        for shard in manifest["shards"]:
            self._check_entry(shard, where)
        if not manifest.get("complete"):
            raise DataError(f"teacher cache {self.folder} is incomplete ({sum(s['examples'] for s in manifest['shards'])}"
                            f" of {manifest['examples']} examples); run `kdflow cache-teacher` again to finish it")
        self.manifest = manifest

    def _check_entry(self, shard: Any, where: Path) -> None:
        fields = {"file": str, "examples": int, "positions": int, "sha256": str, "bytes": int}
        if not isinstance(shard, dict) or any(not isinstance(shard.get(k), t) for k, t in fields.items()):
            raise DataError(f"{where}: a shard entry lacks {', '.join(fields)}; rebuild the cache with `kdflow cache-teacher`")
        name = shard["file"]
        # A manifest names files inside its own folder only: "../x" or an absolute path is refused.
        if Path(name).name != name or name in ("", ".", "..") or not name.endswith(".safetensors"):
            raise DataError(f"{where} names the shard {name!r}, which is not a file inside the cache folder; "
                            "rebuild the cache with `kdflow cache-teacher`")
        path = self.folder / name
        if not path.is_file():
            raise DataError(f"teacher cache shard {path} is missing; rebuild the cache")
        size = path.stat().st_size
        if size != shard["bytes"]:
            raise DataError(f"teacher cache shard {path} has {size} bytes, the manifest says {shard['bytes']} (damaged "
                            "or cut short); rebuild the cache with `kdflow cache-teacher`")

    def load(self, verify: bool = True) -> dict[int, dict[str, torch.Tensor]]:
        """row_index -> {ids [n, k] int64, logp [n, k] float32, tail_logp [n], valid [n]}.

        Each shard is read once; with `verify` its SHA-256 is compared with the manifest's first."""
        from safetensors.torch import load as load_bytes

        out: dict[int, dict[str, torch.Tensor]] = {}
        for shard in self.manifest["shards"]:
            path = self.folder / shard["file"]
            data = path.read_bytes()
            if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise DataError(f"teacher cache shard {path} is damaged (its checksum differs from the manifest's); "
                                "rebuild the cache with `kdflow cache-teacher`")
            try:
                t = load_bytes(data)
            except Exception as e:  # safetensors' own error type for a bad header
                raise DataError(f"teacher cache shard {path} cannot be read ({e}); rebuild the cache") from None
            problem = self._shard_problem(t, shard)
            if problem:
                raise DataError(f"teacher cache shard {path}: {problem}; rebuild the cache with `kdflow cache-teacher`")
            ids, logp, offsets = t["ids"], t["logp"], t["offsets"]
            if ids.dtype == torch.uint16:
                ids = ids.to(torch.int32).long()
                ids[ids == EMPTY_U16] = -1
            else:
                ids = ids.long()
            for m, row in enumerate(t["row_index"].tolist()):
                a, b = int(offsets[m]), int(offsets[m + 1])
                entry = {"ids": ids[a:b], "logp": logp[a:b].float()}
                if "tail_logp" in t:
                    entry["tail_logp"] = t["tail_logp"][a:b]
                if "valid" in t:
                    entry["valid"] = t["valid"][a:b].bool()
                if "hidden" in t:
                    entry["hidden"] = t["hidden"][a:b]
                out[row] = entry
        return out

    def _shard_problem(self, t: dict[str, torch.Tensor], shard: dict[str, Any]) -> str | None:
        """What is wrong with one shard's arrays, or None."""
        k = self.manifest["key"]["k"]
        need = {"ids", "logp", "offsets", "row_index"}
        if not need <= set(t):
            return f"missing arrays {sorted(need - set(t))}"
        ids, logp, offsets, rows = t["ids"], t["logp"], t["offsets"], t["row_index"]
        n = ids.shape[0] if ids.dim() == 2 else -1
        if ids.dim() != 2 or ids.shape != logp.shape or ids.shape[1] > k or offsets.dim() != 1 \
                or offsets.numel() != rows.numel() + 1 or rows.numel() != shard["examples"] or n != shard["positions"]:
            return "inconsistent shapes"
        if int(offsets[0]) != 0 or int(offsets[-1]) != n or bool((offsets[1:] < offsets[:-1]).any()):
            return "inconsistent offsets"
        total = self.manifest.get("examples")
        if bool((rows < 0).any()) or (isinstance(total, int) and bool((rows >= total).any())):
            return "row indices outside the dataset"
        for name in ("logp", "tail_logp"):
            if name in t:
                x = t[name].float()
                # -inf is a probability of 0 (an empty slot, no mass outside the top k); NaN, +inf and
                # positive values are no log-probability at all.
                if bool(torch.isnan(x).any()) or bool((x > 1e-3).any()):
                    bad = int((torch.isnan(x) | (x > 1e-3)).nonzero()[0][0])
                    return f"{name} holds a value that is no log-probability (NaN, +inf or > 0) at position {bad}"
        wide = ids.to(torch.int64)
        if ids.dtype == torch.uint16:
            wide = torch.where(wide == EMPTY_U16, torch.full_like(wide, -1), wide)
        limit = self.vocab_size
        if bool((wide < -1).any()) or (limit is not None and bool((wide >= limit).any())):
            worst = int(wide.max()) if limit is not None and bool((wide >= limit).any()) else int(wide.min())
            return f"token id {worst} is outside the student's vocabulary (0..{(limit or 0) - 1})"
        stored = self.manifest["key"].get("hidden_layers")
        if stored:
            h = t.get("hidden")
            if h is None or h.dim() != 3 or h.shape[0] != n or h.shape[1] != len(stored):
                return "the hidden states are missing or have the wrong shape"
            if not bool(torch.isfinite(h.float()).all()):
                return "the hidden states hold a NaN or infinite value"
        if "valid" in t and bool((t["valid"] > 1).any()):
            return "the 'valid' flags are not 0 or 1"
        return None

    def attach(self, examples: list[dict[str, Any]], token_scope: str) -> None:
        """Add `teacher_*` fields to each example; check each example's KD positions match the cache."""
        targets = self.load()
        for e in examples:
            t = targets.get(e["row_index"])
            if t is None:
                raise DataError(f"teacher cache {self.folder} has no entry for training row {e['row_index'] + 1}; rebuild it")
            labels = torch.tensor([e["labels"]])
            attn = torch.ones_like(labels)
            _, kd_mask = shifted_masks(labels, attn, token_scope)
            n = int(kd_mask.sum())
            if t["ids"].shape[0] != n:
                raise DataError(f"teacher cache {self.folder}: training row {e['row_index'] + 1} has {n} KD positions but "
                                f"the cache holds {t['ids'].shape[0]}; the data changed, rebuild the cache")
            for name, value in t.items():
                e[f"teacher_{name}"] = value


def batch_targets(batch: dict[str, Any]) -> TopKTargets:
    """Concatenate the per-example cached targets of a collated batch, in row-major position order."""
    ids = torch.cat(batch["teacher_ids"])
    logp = torch.cat(batch["teacher_logp"])
    tail = torch.cat(batch["teacher_tail_logp"]) if "teacher_tail_logp" in batch else None
    valid = torch.cat(batch["teacher_valid"]) if "teacher_valid" in batch else None
    weight = torch.cat(batch["teacher_weight"]) if "teacher_weight" in batch else None
    return TopKTargets(ids, logp, valid, tail, weight)


def cache_agreement(a: str | Path, b: str | Path) -> dict[str, Any]:
    """How far two caches of the same examples agree (e.g. one built through a server, one locally): per
    position the share of top-k ids both hold, and the |difference| of the log-probs they give the same ids
    (`top1`: at cache b's top-1 token, where cache a holds it too)."""
    def load(folder: str | Path) -> dict[int, dict[str, torch.Tensor]]:
        return TeacherCache(folder, json.loads((Path(folder) / "manifest.json").read_text())["key"]).load()

    ca, cb = load(a), load(b)
    if ca.keys() != cb.keys():
        raise DataError(f"the caches {a} and {b} hold different examples")
    shared = positions = 0
    diffs, top1 = [], []
    for row in sorted(cb):
        x, y = ca[row], cb[row]
        if x["ids"].shape != y["ids"].shape:
            raise DataError(f"example {row}: {tuple(x['ids'].shape)} in {a} against {tuple(y['ids'].shape)} in {b}")
        for ids_a, lp_a, ids_b, lp_b in zip(x["ids"].tolist(), x["logp"].tolist(), y["ids"].tolist(), y["logp"].tolist()):
            ma, mb = dict(zip(ids_a, lp_a)), dict(zip(ids_b, lp_b))
            both = set(ma) & set(mb)
            shared += len(both)
            positions += 1
            diffs += [abs(ma[t] - mb[t]) for t in both]
            if ids_b[0] in ma:
                top1.append(abs(ma[ids_b[0]] - mb[ids_b[0]]))
    k = next(iter(cb.values()))["ids"].shape[1]
    d, t1 = torch.tensor(diffs), torch.tensor(top1)
    return {"examples": len(cb), "positions": positions, "k": k, "overlap": shared / (positions * k),
            "mean_abs_logp_diff": float(d.mean()), "max_abs_logp_diff": float(d.max()),
            "p99_abs_logp_diff": float(d.quantile(0.99)), "top1_max_abs_diff": float(t1.max()),
            "top1_in_both": len(top1) / positions}
