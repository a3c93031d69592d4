"""Shared set-up for the benchmarks: the bundled teacher, the demo's pruned student, WordNet batches."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("KDFLOW_CACHE", str(ROOT / ".cache" / "kdflow"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(ROOT / "src"))

DEMO_LAYERS = [0, 3, 6, 9, 12, 15, 18, 21, 24, 29]
TRAIN = ROOT / "data" / "wordnet_define" / "train.jsonl"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t


def load_teacher_and_tokenizer():
    from kdflow.config import ModelSpec
    from kdflow.models import freeze, load_model, load_tokenizer

    spec = ModelSpec(name="bundled:smollm2-135m-instruct")
    return freeze(load_model(spec)), load_tokenizer(spec)


def demo_student(teacher):
    from kdflow.models import prune_layers

    return prune_layers(teacher, DEMO_LAYERS)


def wordnet_examples(tok, n: int, max_length: int = 128):
    from kdflow.config import DataConfig
    from kdflow.data import encode_rows, read_rows

    return encode_rows(read_rows(str(TRAIN)).head(n), tok, DataConfig(max_length=max_length))
