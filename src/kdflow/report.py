"""Run reports: markdown tables and PNG plots, written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write a file so that readers see either the old or the complete new content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
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
    (and a resumed run) see the old folder or the complete new one, never half of it."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        yield tmp
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


def plot_curves(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]], title: str,
                xlabel: str = "optimizer step", ylabel: str = "loss") -> None:
    """One line per named series of (x, y) points, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
