"""`make gpu-check`: every kdflow verb except fedmkt-flower, once each, on this machine's GPU.

Prints per verb: where its models ran (device, dtype), peak GPU memory (reset between verbs) and
tokens per second. It runs from the source tree with a bare Python that has torch, transformers,
peft and accelerate (and what they pull in) — no `make install`, no network, and none of datasets,
rouge-score (Rouge-L then shows nan), rapidfuzz, gguf, flwr, ray, matplotlib or tensorboard. The
models have SmolLM2-135M's configuration with random weights (same shapes, so speed and memory hold;
bench/gpu_assets/smollm2-135m/ holds the configuration and tokenizer, 3.4 MB); the rows are the
bundled WordNet task. The student is the teacher pruned to 6 of its 30 layers.

    PYTHONPATH=src python bench/gpu_check.py                     # on the GPU (sized for < 4 minutes)
    PYTHONPATH=src python bench/gpu_check.py --device cpu --tiny # the same verbs on tiny sizes (tests)

Exit status 0 when every verb ran, 1 otherwise (each failure's log tail is printed).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "bench" / "gpu_assets" / "smollm2-135m"
DATA = ROOT / "data" / "wordnet_define"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def sizes(tiny: bool) -> dict[str, Any]:
    """Work per verb: the full check on one GPU stays well inside 4 minutes; tiny runs in seconds on a CPU."""
    if tiny:
        return dict(config={"num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
                    keep_layers=[0, 3], peer_layers=([0, 3], [3]), train=8, validation=2, test=2, steps=1,
                    batch=4, new_tokens=2, public=4, private=4, minillm_steps=1, rollout=2, k=8, resamples=100)
    return dict(config={}, keep_layers=[0, 6, 12, 18, 24, 29], peer_layers=([0, 6, 12, 18, 24, 29], [0, 10, 20, 29]),
                train=256, validation=32, test=64, steps=30, batch=8, new_tokens=24, public=64, private=64,
                minillm_steps=4, rollout=16, k=64, resamples=1000)


# ----------------------------------------------------------------------------------------------
# Models and rows


def build_models(work: Path, tiny: bool) -> Path:
    """A folder holding SmolLM2-135M's configuration with random weights and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(ASSETS)
    for k, v in sizes(tiny)["config"].items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder = work / "teacher"
    model.save_pretrained(folder)
    for f in TOKENIZER_FILES:
        shutil.copy(ASSETS / f, folder / f)
    n = sum(p.numel() for p in model.parameters())
    print(f"[gpu-check] teacher: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {n / 1e6:.1f}M parameters "
          f"(random weights), tokenizer of SmolLM2-135M")
    return folder


def write_rows(work: Path, s: dict[str, Any]) -> dict[str, str]:
    out = {}
    (work / "data").mkdir()
    for split in ("train", "validation", "test"):
        lines = (DATA / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()[: s[split]]
        path = work / "data" / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        out[split] = str(path)
    return out


def data_tokens(teacher: Path, rows: dict[str, str], split: str) -> int:
    """Tokens of one split as the verbs encode it (prompt + answer, chat template)."""
    from kdflow.config import DataConfig, ModelSpec
    from kdflow.data import encode_rows, read_rows
    from kdflow.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(name=str(teacher)))
    return sum(len(e["input_ids"]) for e in encode_rows(read_rows(rows[split]), tok, DataConfig(max_length=128)))


# ----------------------------------------------------------------------------------------------
# The verbs


def plans(work: Path, teacher: Path, rows: dict[str, str], device: str, s: dict[str, Any], bf16: bool) -> list[dict]:
    """(name, verb, config) of each check, in an order where later ones reuse earlier outputs."""
    runs = work / "runs"
    common = {
        "data": {**rows, "max_length": 128},
        "eval": {"max_rows": s["test"], "batch_size": 32, "max_new_tokens": s["new_tokens"],
                 "bootstrap_resamples": s["resamples"]},
        "train": {"max_steps": s["steps"], "batch_size": s["batch"], "learning_rate": 1e-4, "save_steps": 0,
                  "logging_steps": 5, "report_to": ["none"], "bf16": bf16},
    }
    teacher_spec = {"name": str(teacher), "device": device, "check": {"mode": "off"}}
    student = {"init": "prune_teacher", "keep_layers": s["keep_layers"], "device": device}
    distill = {**common, "teacher": teacher_spec, "student": student, "evaluate_teacher": False,
               "evaluate_before": False}
    cache = str(work / "teacher_cache")
    lora = {"enabled": True, "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    sft_student = str(runs / "sft" / "student")
    out = [
        ("distill sft", "distill", {**distill, "method": "sft", "output_dir": str(runs / "sft")}),
        ("cache-teacher", "cache-teacher", {**distill, "method": "kd", "output_dir": str(runs / "cache"),
                                            "teacher_cache": {"dir": cache, "k": s["k"], "batch_size": 32}}),
        ("distill kd (cache)", "distill", {**distill, "method": "kd", "output_dir": str(runs / "kd_cache"),
                                           "teacher_cache": {"dir": cache, "k": s["k"]}}),
        ("distill kd (online)", "distill", {**distill, "method": "kd", "output_dir": str(runs / "kd")}),
        ("distill seqkd", "distill", {**distill, "method": "seqkd", "output_dir": str(runs / "seqkd"),
                                      "seqkd": {"max_new_tokens": s["new_tokens"], "batch_size": 64}}),
        ("eval", "eval", {"model": {"name": sft_student, "device": device}, "data": common["data"],
                          "eval": common["eval"], "output": str(runs / "eval.json")}),
        ("codistill", "codistill", {**common, "output_dir": str(runs / "codistill"),
                                    "base": {"name": str(teacher)}, "evaluate_before": False,
                                    "peers": [{"name": f"p{i}", "model": {"init": "prune_teacher", "keep_layers": keep,
                                                                         "device": device}}
                                              for i, keep in enumerate(s["peer_layers"])]}),
        ("minillm", "minillm", {"output_dir": str(runs / "minillm"), "teacher": teacher_spec,
                                "student": {"name": sft_student, "device": device}, "data": common["data"],
                                "eval": common["eval"], "evaluate_teacher": False, "evaluate_before": False,
                                "minillm": {"max_steps": s["minillm_steps"], "rollout_batch_size": s["rollout"],
                                            "batch_size": s["rollout"] // 2, "inner_epochs": 1,
                                            "max_new_tokens": s["new_tokens"], "save_steps": 0, "bf16": bf16}}),
        ("fedmkt (in-process)", "fedmkt", {
            "output_dir": str(runs / "fedmkt"), "baselines": [],
            "server": {"name": "server", "model": {"name": str(teacher), "lora": lora, "device": device}},
            "clients": [{"name": "client", "prune_from": str(teacher),
                         "model": {"init": "prune_teacher", "keep_layers": s["keep_layers"], "lora": lora,
                                   "device": device}}],
            "data": {**rows, "max_length": 128, "public_rows": s["public"], "private_rows": s["private"]},
            "fedmkt": {"rounds": 1, "top_k": s["k"]}, "eval": common["eval"],
            "train": {"batch_size": s["batch"], "report_to": ["none"], "bf16": bf16}}),
        ("compare (sft vs kd)", "compare", {
            **distill, "output_dir": str(runs / "compare"), "metrics": ["exact_match", "answer_nll"],
            "teacher_cache": {"k": s["k"]}, "variants": [{"name": "sft", "method": "sft"},
                                                         {"name": "kd", "method": "kd"}]}),
    ]
    return [{"name": n, "verb": v, "config": c} for n, v, c in out]


def tokens_per_second(plan: dict, seconds: float, tokens: dict[str, int]) -> tuple[float | None, str]:
    """The verb's own throughput where it measures one, else the tokens of its data over its wall time."""
    cfg = plan["config"]
    out = Path(cfg.get("output_dir", ""))
    try:
        if plan["verb"] == "distill":
            return json.loads((out / "metrics.json").read_text())["train"]["tokens_per_second"], "training"
        if plan["verb"] == "codistill":
            m = json.loads((out / "metrics.json").read_text())["train"]["codistill"]
            return m.get("tokens_per_second"), "training, both peers"
        if plan["verb"] == "minillm":
            return json.loads((out / "metrics.json").read_text())["train"]["sampled_tokens_per_second"], "sampled"
        if plan["verb"] == "eval":
            m = json.loads(Path(cfg["output"]).read_text())["metrics"]
            scored = tokens["test"] + m["rows"] * m["answer_tokens"]
            return scored / max(m["seconds"], 1e-9), "scored + generated"
    except (OSError, KeyError, ValueError):
        return None, "?"
    if plan["verb"] == "cache-teacher":
        return tokens["train"] / seconds, "teacher forward, wall"
    if plan["verb"] == "fedmkt":
        return tokens["train"] / seconds, "data, wall"
    return 2 * tokens["train"] / seconds, "data of both runs, wall"


def run_one(index: int, plan: dict, work: Path, device_is_cuda: bool, tokens: dict[str, int]) -> dict[str, Any]:
    import re

    import torch
    import yaml

    from kdflow import cli, models

    config = work / "configs" / f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', plan['name']).strip('-')}.yaml"
    config.parent.mkdir(exist_ok=True)
    config.write_text(yaml.safe_dump(plan["config"], sort_keys=False))
    log = work / "logs" / (config.stem + ".log")
    log.parent.mkdir(exist_ok=True)
    models.PLACEMENTS.clear()
    gc.collect()
    if device_is_cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            rc = cli.main([plan["verb"], "--config", str(config)])
        except BaseException:  # a traceback is a finding: keep it in the log, go on with the next verb
            traceback.print_exc()
            rc = -1
    seconds = time.time() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device_is_cuda else None
    tps, what = tokens_per_second(plan, seconds, tokens) if rc == 0 else (None, "")
    return {"name": plan["name"], "ok": rc == 0, "seconds": seconds, "placements": dict(models.PLACEMENTS),
            "peak_mib": peak, "tokens_per_second": tps, "what": what, "log": str(log)}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| verb | ok | seconds | models: device, dtype | peak GPU MiB | tokens/s | tokens counted |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in results:
        where = "; ".join(f"{role}: {p}" for role, p in r["placements"].items()) or "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        tps = f"{r['tokens_per_second']:.0f}" if r["tokens_per_second"] else "-"
        lines.append(f"| {r['name']} | {'yes' if r['ok'] else 'FAILED'} | {r['seconds']:.1f} | {where} | {peak} | "
                     f"{tps} | {r['what']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="device of every model: auto (the GPU when there is one), cuda, "
                                                     "cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny models and few rows (a CPU check of the script itself)")
    ap.add_argument("--work", default=None, help="keep models, runs and logs in this folder (default: a temporary one)")
    ap.add_argument("--only", nargs="*", default=None, help="run only the checks whose names start with these words")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds the whole check should take (warned when over)")
    args = ap.parse_args(argv)

    t_start = time.time()
    for k, v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(k, v)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from kdflow.models import process_device

    device = process_device() if args.device == "auto" else torch.device(args.device)
    on_cuda = device.type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        print(f"[gpu-check] --device {args.device}, but torch sees no CUDA GPU here (torch {torch.__version__})")
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="kdflow-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    # Everything the verbs cache (vocabulary maps, teacher checks) stays inside the work folder.
    os.environ["KDFLOW_CACHE"] = str(work / "cache")
    bf16 = on_cuda and torch.cuda.is_bf16_supported()
    gpu = torch.cuda.get_device_name(device) if on_cuda else "none"
    print(f"[gpu-check] torch {torch.__version__}, device {device} ({gpu}), bf16 autocast {'on' if bf16 else 'off'}, "
          f"work folder {work}")
    if args.device == "auto" and not on_cuda:
        print("[gpu-check] no GPU here: the verbs run on the CPU")
    s = sizes(args.tiny)
    try:
        teacher = build_models(work, args.tiny)
        rows = write_rows(work, s)
        tokens = {split: data_tokens(teacher, rows, split) for split in ("train", "test")}
        todo = [p for p in plans(work, teacher, rows, args.device, s, bf16)
                if not args.only or any(p["name"].startswith(w) for w in args.only)]
        results = []
        for i, p in enumerate(todo):
            r = run_one(i, p, work, on_cuda, tokens)
            results.append(r)
            print(f"[gpu-check] {r['name']}: {'ok' if r['ok'] else 'FAILED'} in {r['seconds']:.1f} s", flush=True)
            if not r["ok"]:
                tail = Path(r["log"]).read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                print("    " + "\n    ".join(tail))
        total = time.time() - t_start
        print()
        print(table(results))
        over = f" (over the {args.budget:.0f} s budget)" if total > args.budget else ""
        print(f"\n[gpu-check] {sum(r['ok'] for r in results)}/{len(results)} verbs ran, {total:.0f} s in all{over}; "
              f"logs in {work / 'logs'}")
        return 0 if all(r["ok"] for r in results) else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
