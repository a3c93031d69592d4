"""Run folders: one run per folder, and checkpoints that know which run wrote them.

A run takes `<output_dir>/.kdflow.lock` (an advisory `flock`, released by the kernel when the
process dies, so a crashed run never blocks the next one) and records the digest of its settings
in every checkpoint it writes (`kdflow-run.json`). Resuming checks that digest against the run's
own: the resolved config.yaml cannot serve, since a run that fails early rewrites it before it
writes any checkpoint. Settings that do not decide what a checkpoint holds are left out of the
digest: where the run lives (`output_dir`, so a moved folder resumes), evaluation, and how it runs
(`resume`, `num_threads`, `report_to`, and the devices models run on: `device`, `device_map` — a run
started on one GPU continues on another or on the CPU).

`resume=never` moves the earlier run's checkpoints and results into `previous-<time>/` instead of
deleting them or leaving them to be picked up later.
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import json
import os
import re
import socket
import struct
import time
import zipfile
from pathlib import Path
from typing import Any

from kdflow.errors import ConfigError, DataError

LOCK = ".kdflow.lock"
STAMP = "kdflow-run.json"
PREVIOUS = "previous-"
# A complete checkpoint folder: its name, and the file written last (its presence marks it complete).
CHECKPOINTS = {re.compile(r"checkpoint-\d+"): ("trainer_state.json", "loop_state.json"),
               re.compile(r"round-\d+"): ("state.json",)}
# What a run writes at the top of its folder, moved aside together with its checkpoints by
# resume=never. Caches keyed by their own settings (teacher answers of seqkd) stay.
RUN_OUTPUTS = ("config.yaml", "metrics.json", "report.md", "log_history.json", "student", "student_adapter", "eval",
               "peers", "alone", "rounds", "baselines", "flower-clients")
_UNSTAMPED_KEYS = ("resume", "num_threads", "report_to", "device", "device_map")


@dataclasses.dataclass
class _Held:
    settings: dict[str, Any]
    digest: str
    lock_fd: int | None


_HELD: dict[Path, _Held] = {}  # run folders this process holds, by resolved path


# ----------------------------------------------------------------------------------------------
# What identifies a run


def run_settings(cfg: Any, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings that decide what the run's checkpoints hold (see the module docstring);
    keys starting with an `ignore` prefix are left out too."""
    from kdflow.config import to_dict

    def keep(key: str, name: str) -> bool:
        return not (key in ("output_dir", "eval") or key.startswith(("evaluate_",) + tuple(ignore))
                    or name in _UNSTAMPED_KEYS)

    def strip(node: Any, prefix: str) -> Any:
        if isinstance(node, dict):
            return {k: strip(v, f"{prefix}{k}.") for k, v in node.items() if keep(f"{prefix}{k}", k)}
        if isinstance(node, list):
            return [strip(v, prefix) for v in node]
        return node

    return strip(to_dict(cfg), "")


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new))
        return [k for key in keys for k in changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


# ----------------------------------------------------------------------------------------------
# Holding a folder


def hold(out: Path, cfg: Any, resume: str, resume_key: str = "train.resume", ignore: tuple[str, ...] = ()) -> None:
    """Lock `out` for this run, then make sure what is there belongs to it: with resume=never the
    earlier run's outputs are moved aside; otherwise every checkpoint must carry this run's
    settings digest and be undamaged. From here on, checkpoints written under `out` are stamped."""
    settings = run_settings(cfg, ignore)
    digest = settings_digest(settings)
    fd = _lock(out)
    stale = _HELD.pop(out.resolve(), None)  # an earlier run here whose folder has since been replaced
    if stale is not None and stale.lock_fd not in (None, fd):
        os.close(stale.lock_fd)
    _HELD[out.resolve()] = _Held(settings, digest, fd)
    try:
        if resume == "never":
            moved = move_aside(out)
            if moved is not None:
                print(f"[kdflow] {resume_key}=never: the earlier run's checkpoints and results were moved to {moved}")
            return
        found = find_checkpoints(out)
        if resume != "auto" and Path(resume).is_dir() and Path(resume).resolve() not in [p.resolve() for p in found]:
            found.append(Path(resume))
        for ckpt in found:
            _check_stamp(ckpt, out, settings, digest, resume_key)
            check_files(ckpt, resume_key)
    except BaseException:
        release(out)
        raise


def adopt(out: Path, cfg: Any, ignore: tuple[str, ...] = ()) -> None:
    """Know `out` as this run's folder without taking it: the other processes of a run whose main
    process holds it (`kdflow.processes`) need the settings digest, not the lock."""
    settings = run_settings(cfg, ignore)
    _HELD[out.resolve()] = _Held(settings, settings_digest(settings), None)


def holding() -> set[Path]:
    """The run folders this process holds."""
    return set(_HELD)


def release(out: Path | None = None) -> None:
    """Give up `out` (default: every folder this process holds)."""
    for path in [out.resolve()] if out is not None else list(_HELD):
        held = _HELD.pop(path, None)
        if held is not None and held.lock_fd is not None:
            try:
                os.ftruncate(held.lock_fd, 0)
            except OSError:
                pass
            os.close(held.lock_fd)  # closing the descriptor drops the flock


atexit.register(release)


def _lock(out: Path) -> int | None:
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not guarded against each other
        return None
    path = out / LOCK
    for held_path, held in list(_HELD.items()):
        # This process holds it already (an earlier run in the same process, maybe under another path).
        if held.lock_fd is not None and path.exists() and os.path.samestat(os.fstat(held.lock_fd), path.stat()):
            _HELD.pop(held_path)
            return held.lock_fd
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise ConfigError(f"output_dir {out}: cannot write there ({e.strerror}); choose a folder you can write to") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        owner = _read_owner(fd)
        os.close(fd)
        who = f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}" if owner else "another process"
        raise ConfigError(f"output_dir {out} is in use by another kdflow run ({who}); wait for it to finish, "
                          "or choose another output_dir") from None
    old = _read_owner(fd)
    if old and old.get("pid") != os.getpid():
        print(f"[kdflow] {path}: taking over the lock of process {old.get('pid')} on {old.get('host')} (started "
              f"{old.get('started')}), which is no longer running; its run was interrupted")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    return fd


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data) if data.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def held_run(path: Path) -> tuple[Path, _Held] | None:
    """The held run folder that `path` lies in, if any."""
    try:
        p = path.resolve()
    except OSError:
        return None
    inside = [(root, held) for root, held in _HELD.items() if p == root or root in p.parents]
    return max(inside, key=lambda rh: len(rh[0].parts)) if inside else None


def stamp(folder: Path) -> None:
    """Record the settings digest of the run that holds `folder`'s run folder (nothing outside one)."""
    found = held_run(Path(folder))
    if found is None:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    from kdflow.report import write_json

    write_json(Path(folder) / STAMP, {"settings_sha256": found[1].digest, "settings": found[1].settings})


# ----------------------------------------------------------------------------------------------
# What is in a folder


def find_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders anywhere under `out`, except in earlier runs moved aside."""
    found = []
    for root, dirs, _files in os.walk(out):
        if Path(root) == out:
            dirs[:] = [d for d in dirs if not d.startswith(PREVIOUS)]
        for d in dirs:
            for pattern, markers in CHECKPOINTS.items():
                if pattern.fullmatch(d) and any((Path(root) / d / m).is_file() for m in markers):
                    found.append(Path(root) / d)
    return sorted(found)


def move_aside(out: Path) -> Path | None:
    """Move an earlier run's checkpoints and results into `out/previous-<time>/`; None when there were none."""
    tops = {p.relative_to(out).parts[0] for p in find_checkpoints(out)}
    if not tops and not (out / "config.yaml").is_file():
        return None  # not a run folder: touch nothing
    tops |= {p.name for p in out.iterdir() if p.name.startswith("checkpoint-") or p.suffix == ".png"}
    tops |= {name for name in RUN_OUTPUTS if (out / name).exists()}
    if not tops - {"config.yaml"}:
        return None  # at most the config of a run that stopped before it wrote anything
    dest = out / (PREVIOUS + time.strftime("%Y%m%d-%H%M%S"))
    n = 1
    while dest.exists():
        n += 1
        dest = out / (PREVIOUS + time.strftime("%Y%m%d-%H%M%S") + f"-{n}")
    dest.mkdir()
    for name in sorted(tops):
        os.replace(out / name, dest / name)
    return dest


def _check_stamp(ckpt: Path, out: Path, settings: dict[str, Any], digest: str, resume_key: str) -> None:
    try:
        saved = json.loads((ckpt / STAMP).read_text())
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and saved.get("settings_sha256") == digest:
        return
    if saved is None:
        why = "without a record of their settings (written by an older kdflow or another program, or damaged)"
    else:
        changed = changed_keys(saved.get("settings") if isinstance(saved, dict) else None, settings) or ["settings"]
        why = f"of a run with other settings ({', '.join(changed[:5])} differ)"
    if out in ckpt.parents:
        raise ConfigError(f"{out} holds checkpoints {why} such as {ckpt.relative_to(out)}; use another output_dir, "
                          f"or {resume_key}=never to move them aside (into {PREVIOUS}<time>/ there)")
    raise ConfigError(f"{resume_key}={ckpt} names a checkpoint {why}; resume from one of this run's settings")


# ----------------------------------------------------------------------------------------------
# Damaged files


def check_files(folder: Path, resume_key: str = "train.resume") -> None:
    """Cheap structural checks of a checkpoint's files (JSON parses, safetensors headers match the
    file size, torch/numpy archives have their index), so a damaged checkpoint is named before a
    library fails deep inside loading it."""
    for path in sorted(Path(folder).iterdir()):
        if not path.is_file():
            continue
        problem = file_problem(path)
        if problem:
            raise DataError(f"checkpoint {folder} is damaged: {path.name} {problem}; delete that folder to resume "
                            f"from an earlier checkpoint, or set {resume_key}=never to start over")


def file_problem(path: Path) -> str | None:
    """Why `path` is not a readable JSON / safetensors / torch or numpy archive (by its suffix); None if fine."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            return safetensors_problem(path)
        elif path.suffix in (".pt", ".pth", ".bin", ".npz", ".pkl"):  # .pkl: accelerate's RNG states (torch.save)
            with zipfile.ZipFile(path):
                pass
    except (ValueError, UnicodeDecodeError):
        return "is not valid JSON"
    except zipfile.BadZipFile:
        return "is truncated or not an archive written by torch.save / numpy"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header's
    offsets cover exactly; anything else is damage."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "is truncated (no header)"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return "is truncated (header longer than the file)"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "has a damaged header"
    if not isinstance(header, dict):
        return "has a damaged header"
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    if 8 + n + max(ends, default=0) != size:
        return f"is truncated or padded ({size} bytes, the header describes {8 + n + max(ends, default=0)})"
    return None

