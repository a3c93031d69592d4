"""The compression table (docs/compression.md): size, CPU generation speed and quality of a teacher and
its compressed students, measured side by side in one run.

Each model is `LABEL=FOLDER` or `LABEL=FOLDER@SCORES.json`, where SCORES.json is what kdflow wrote when it
scored the model on the test rows (`kdflow eval ... output=`, a run's eval/student_after.json, or a
comparison's shared/teacher_test.json, whose teacher folder may be left out: `teacher=@.../teacher_test.json`):
the quality columns come from there, with 95% row-bootstrap intervals recomputed from its per-row scores,
and the fraction of the teacher's exact match kept with a paired interval on the same rows. The first
model is the teacher.

Measured here: parameters; bytes of the weight files as shipped (a float model is counted as it saves
in bfloat16, the precision it runs in; a quantized export as its folder holds it); greedy generation
tokens/s at batch 1 and batch 16 on the CPU (bfloat16; exported students through kdflow's loader, i.e.
PyTorch's int8/int4 CPU kernels, and with --eager also through torchao's own layers), every model timed
once per round, rounds interleaved, the median reported, each answer forced to --new-tokens tokens.

    python bench/bench_compress.py --prompts data/wordnet_antonym/test.jsonl \\
        teacher=DIR@teacher_test.json layer-kd=DIR@student_after.json int8=DIR@int8.json ... \\
        [--rounds 3] [--new-tokens 16] [--threads 1] [--eager] [--out docs/compression_table]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import median

GOAL = {"bytes": 0.25, "speed": 2.0, "exact_match": 0.90}  # the goal, against the teacher


def parse_model(text: str) -> dict:
    if "=" not in text:
        sys.exit(f"bench_compress: {text!r} is not LABEL=FOLDER[@SCORES.json]")
    label, rest = text.split("=", 1)
    folder, _, scores = rest.partition("@")
    if not folder and scores and Path(scores).is_file():  # a comparison's teacher_test.json names its teacher
        folder = json.loads(Path(scores).read_text()).get("key", {}).get("teacher", "")
    if not Path(folder).is_dir():
        sys.exit(f"bench_compress: model folder {folder} not found")
    if scores and not Path(scores).is_file():
        sys.exit(f"bench_compress: scores file {scores} not found")
    return {"label": label, "folder": folder, "scores": scores or None}


def parameters(folder: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(folder)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def shipped_bytes(folder: str) -> tuple[int, str]:
    """Bytes of the weight files as the model ships: an export as written, a float model saved in bf16."""
    import torch

    from kdflow.compress.quantize import folder_bytes
    from kdflow.config import ModelSpec
    from kdflow.models import load_model

    if (Path(folder) / "kdflow_export.json").is_file():
        return folder_bytes(folder), json.loads((Path(folder) / "kdflow_export.json").read_text())["scheme"]
    model = load_model(ModelSpec(name=folder), dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return folder_bytes(tmp), "bf16"


def load_for_speed(folder: str, eager: bool) -> object:
    import torch
    from transformers import AutoModelForCausalLM

    from kdflow.config import ModelSpec
    from kdflow.models import load_model

    if eager:  # torchao's own layers, as transformers loads them (with the KV cache, as kdflow's loader)
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.config.use_cache = model.generation_config.use_cache = True
    elif (Path(folder) / "kdflow_export.json").is_file():
        model = load_model(ModelSpec(name=folder))  # kdflow's loader: PyTorch's CPU kernels
    else:
        model = load_model(ModelSpec(name=folder), dtype=torch.bfloat16)
    return model.eval()


def tokens_per_second(model, prompts: list[list[int]], pad_id: int, new_tokens: int) -> float:
    import torch
    from transformers import GenerationConfig

    from kdflow.data import left_pad

    ids, mask = left_pad(prompts, pad_id)
    gen = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad_id, eos_token_id=pad_id)
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
        seconds = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == new_tokens
    return len(prompts) * new_tokens / seconds


def quality(scores: str | None, teacher_rows: dict | None, resamples: int = 2000) -> dict:
    """Exact match and answer NLL with 95% row-bootstrap intervals, and the share of the teacher's exact
    match kept (paired on the same rows), from a kdflow scores file."""
    if not scores:
        return {}
    from kdflow.scoring import bootstrap_stat, row_mean, token_weighted_mean

    saved = json.loads(Path(scores).read_text())
    rows = saved.get("per_row", {})
    out = {"rows": int(saved["metrics"]["rows"])}
    em, nll = rows.get("exact_match"), rows.get("answer_nll")
    if em:
        out["exact_match"] = bootstrap_stat(len(em), row_mean(em), resamples).as_dict()
    if nll:
        counts = [[len(t) for t in rows["token_confidence"]]]
        out["answer_nll"] = bootstrap_stat(len(nll), token_weighted_mean([nll], counts), resamples).as_dict()
    t_em = (teacher_rows or {}).get("exact_match")
    if em and t_em and len(t_em) == len(em):
        import numpy as np

        a, b = np.asarray(em, dtype=float), np.asarray(t_em, dtype=float)
        out["kept"] = bootstrap_stat(len(em), lambda idx: a[idx].mean(-1) / np.maximum(b[idx].mean(-1), 1e-9),
                                     resamples).as_dict()
    return out


def cell(iv: dict | None, pct: bool = False) -> str:
    if not iv:
        return ""
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    return f"{f(iv['estimate'])} [{f(iv['low'])}, {f(iv['high'])}]"


def table(rows: list[dict], threads: int, new_tokens: int, rounds: int) -> str:
    t = rows[0]
    lines = [f"| model | parameters | bytes (MiB) | × teacher bf16 bytes | tokens/s, batch 1 | tokens/s, batch 16 | "
             f"× teacher speed (b1 / b16) | exact match [95% CI] | answer NLL [95% CI] | teacher EM kept [95% CI] |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        q = r.get("quality", {})
        lines.append(
            f"| {r['label']} | {r['parameters'] / 1e6:.1f}M | {r['bytes'] / 2**20:.1f} ({r['format']}) | "
            f"{r['bytes'] / t['bytes']:.2f} | {r['tps'][1]:.1f} | {r['tps'][16]:.1f} | "
            f"{r['tps'][1] / t['tps'][1]:.2f} / {r['tps'][16] / t['tps'][16]:.2f} | {cell(q.get('exact_match'), True)} | "
            f"{cell(q.get('answer_nll'))} | {cell(q.get('kept'), True)} |")
    lines += ["", f"Speed: greedy generation of {new_tokens} tokens per answer on the CPU, {threads} thread(s), bfloat16 "
                  f"activations, median of {rounds} interleaved rounds. Goal: ≤ {GOAL['bytes']:.0%} of the teacher's "
                  f"bf16 bytes, ≥ {GOAL['speed']:.0f}× its speed, ≥ {GOAL['exact_match']:.0%} of its exact match."]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> bool:
    from kdflow.report import pyplot

    plt = pyplot()
    scored = [r for r in rows if "exact_match" in r.get("quality", {})]  # the torchao-eager rows are speed only
    if plt is None or not scored or scored[0] is not rows[0]:
        return False
    t = rows[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for r in scored:
        em = r["quality"]["exact_match"]
        x = r["bytes"] / 2**20
        ax.errorbar([x], [100 * em["estimate"]], yerr=[[100 * (em["estimate"] - em["low"])], [100 * (em["high"] - em["estimate"])]],
                    fmt="o", capsize=3, color="#c44e52" if r is t else "#4c72b0")
        ax.annotate(r["label"], (x, 100 * em["estimate"]), textcoords="offset points", xytext=(5, 4), fontsize=7)
    ax.axvline(GOAL["bytes"] * t["bytes"] / 2**20, color="gray", linestyle=":", linewidth=1, label="1/4 of the teacher's bytes")
    ax.axhline(100 * GOAL["exact_match"] * t["quality"]["exact_match"]["estimate"], color="gray", linestyle="--",
               linewidth=1, label="90% of the teacher's exact match")
    ax.set_xscale("log")
    ax.set_xlabel("weights on disk (MiB, log scale)")
    ax.set_ylabel("exact match on the test rows (%)")
    ax.set_title("Quality against size (95% row-bootstrap intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="LABEL=FOLDER[@SCORES.json]; the first is the teacher")
    ap.add_argument("--prompts", required=True, help="rows whose prompts are generated from (a test split)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eager", action="store_true", help="also time exported students through torchao's own layers")
    ap.add_argument("--out", help="write OUT.md, OUT.json and OUT.png")
    args = ap.parse_args()

    import torch

    from kdflow.config import DataConfig, ModelSpec
    from kdflow.data import prompts_of, read_rows
    from kdflow.models import load_tokenizer

    torch.set_num_threads(args.threads)
    specs = [parse_model(m) for m in args.models]
    if args.eager:
        specs += [dict(s, label=f"{s['label']} (torchao eager)", eager=True, scores=None) for s in specs
                  if (Path(s["folder"]) / "kdflow_export.json").is_file()]
    tok = load_tokenizer(ModelSpec(name=specs[0]["folder"]))
    prompts = prompts_of(read_rows(args.prompts).head(16), tok, DataConfig())
    teacher_rows = json.loads(Path(specs[0]["scores"]).read_text()).get("per_row") if specs[0]["scores"] else None
    rows = []
    for s in specs:
        nbytes, fmt = shipped_bytes(s["folder"])
        rows.append({"label": s["label"], "folder": s["folder"], "parameters": parameters(s["folder"]), "bytes": nbytes,
                     "format": fmt + (", torchao eager" if s.get("eager") else ""),
                     "quality": quality(s["scores"], teacher_rows), "model": load_for_speed(s["folder"], s.get("eager", False)),
                     "runs": {1: [], 16: []}})
        print(f"[bench] {s['label']}: {rows[-1]['parameters'] / 1e6:.1f}M parameters, {nbytes / 2**20:.1f} MiB ({fmt})",
              flush=True)
    for r in rows:  # warm-up: first calls allocate and pick kernels
        tokens_per_second(r["model"], prompts[:1], tok.pad_token_id, 2)
    for rnd in range(args.rounds):
        for batch in (1, 16):
            for r in rows:
                r["runs"][batch].append(tokens_per_second(r["model"], prompts[:batch], tok.pad_token_id, args.new_tokens))
        print(f"[bench] round {rnd + 1}/{args.rounds}: " + ", ".join(
            f"{r['label']} {r['runs'][1][-1]:.1f}/{r['runs'][16][-1]:.1f}" for r in rows), flush=True)
    for r in rows:
        r["tps"] = {b: median(v) for b, v in r["runs"].items()}
        del r["model"]
    text = table(rows, args.threads, args.new_tokens, args.rounds)
    print()
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text + "\n")
        out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
        drawn = plot(rows, out.with_suffix(".png"))
        print(f"\n[bench] written: {out.with_suffix('.md')}, .json" + (", .png" if drawn else " (no plot: matplotlib or "
                                                                          "the teacher's scores missing)"))


if __name__ == "__main__":
    main()
