"""Run reports: markdown tables and PNG plots, written atomically."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be read by setting it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file so that readers see either the old or the complete new content.

    The file gets the mode an ordinary `open(path, "w")` would give (0666 less the umask), not the
    0600 of the temporary file it is written to.
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Fill a temporary sibling of `folder`, then put it in place of `folder` in one rename: readers
    (and a resumed run) see the old folder or the complete new one, never half of it.

    Inside a run folder the new folder also gets the run's settings stamp (kdflow.runfolder), so
    every checkpoint written this way says which run wrote it. Mode: 0777 less the umask.
    """
    from kdflow.runfolder import stamp

    folder = Path(folder)
    with writing(folder):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder)
        try:
            yield tmp
            stamp(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def make_temp_dir(final: Path) -> Path:
    """An empty sibling of `final` to fill and rename into place, with the mode an ordinary mkdir would
    give (0777 less the umask), not mkdtemp's 0700."""
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


_FULL_BELOW = 8 * 2**20  # bytes free under which a failed write is taken for a full disk


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in the OSError of a failed write, and turn the failures of library writers that
    raise something else on a full disk (torch.save: RuntimeError, safetensors: SafetensorError)
    into OSError(ENOSPC) when the disk holding `path` is full, so the CLI can say so in one line."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        if e.filename != str(path):  # e.g. the temporary file's name: say which output failed
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except Exception as e:
        if _free_bytes(path) < _FULL_BELOW:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _free_bytes(path: Path) -> int:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                break
    return 2**62


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


_NO_PLOTS_SAID = False


def pyplot() -> Any:
    """matplotlib.pyplot (headless), or None when matplotlib is not installed: plots are then left
    out, said once, and every number still goes to metrics.json and report.md."""
    global _NO_PLOTS_SAID
    import importlib.util

    try:
        found = importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        if not _NO_PLOTS_SAID:
            print("[kdflow] matplotlib is not installed: no plots are drawn (pip install matplotlib)")
            _NO_PLOTS_SAID = True
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]], title: str,
                xlabel: str = "optimizer step", ylabel: str = "loss") -> None:
    """One line per named series of (x, y) points, saved as PNG."""
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, points in series.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if any(series.values()):
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def loss_series(log_history: list[dict[str, Any]], keys: tuple[str, ...] = ("loss", "ce", "kd", "eval_loss")) -> dict[str, list[tuple[float, float]]]:
    """Extract per-step curves from a transformers log history."""
    out: dict[str, list[tuple[float, float]]] = {k: [] for k in keys}
    for entry in log_history:
        step = entry.get("step")
        if step is None:
            continue
        for k in keys:
            if k in entry:
                out[k].append((float(step), float(entry[k])))
    return {k: v for k, v in out.items() if v}


def examples_markdown(name: str, examples: list[dict[str, Any]]) -> list[str]:
    """Report lines for one model's generated examples: a heading, then prompt / reference / generated."""
    lines = [f"## Examples — {name}", ""]
    for ex in examples:
        lines += [f"- **prompt**: {ex['prompt']}", f"  - reference: {ex['reference']}", f"  - generated: {ex['prediction']}"]
    return lines + [""]
