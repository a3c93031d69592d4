"""`kdflow compare`: which method should I use on my task?

One config names the shared settings (teacher, student, data, training, evaluation — those of
`kdflow distill`) and a list of variants (sft, kd with any divergence, hard_token, seqkd, gkd, minillm)
run once per seed. Every variant gets its own run folder `<output_dir>/<variant>/seed-<s>/`, so a
finished one is never rerun and an interrupted one resumes from its checkpoints: a long
comparison spans several sittings by running the same command again. The teacher is adapted once
(`teacher.adapt`), checked once on the validation rows, and scored once on the test rows; kd and
hard_token variants share one teacher cache per temperature; seqkd variants share the teacher's
generated answers.

The leaderboard (methods.md §13) reports, per variant, each metric's mean ± sd over seeds and a
95% row-bootstrap interval, and its difference from the baseline (plain SFT of the same student,
steps and data) with a paired interval: per-row scores are averaged over seeds first, then the
rows are resampled, the same rows for both models.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from kdflow import processes
from kdflow.config import (CompareConfig, DistillConfig, MiniLLMConfig, VariantSpec, _set_path, dump_yaml, from_dict,
                           parse_override, to_dict, validate)
from kdflow.errors import ConfigError

LOWER_IS_BETTER = {"answer_nll", "ece", "exaccerr", "perplexity"}
PER_ROW = {"exact_match", "answer_nll", "rougeL", "sampled_rougeL", "answer_tokens"}
COMPARE_ONLY = ("variants", "seeds", "baseline", "share_teacher_cache", "minillm", "metrics")


@dataclasses.dataclass
class Planned:
    variant: VariantSpec
    seed: int
    folder: Path
    cfg: Any  # DistillConfig or MiniLLMConfig


# ----------------------------------------------------------------------------------------------
# Plan: every variant x seed as a validated config, before anything runs


def _check(cfg: CompareConfig) -> None:
    if not cfg.variants:
        raise ConfigError("compare: `variants` is empty; list the methods to compare, e.g. "
                          "[{name: sft, method: sft}, {name: kd, method: kd}]")
    names = [v.name for v in cfg.variants]
    for i, v in enumerate(cfg.variants):
        if not v.name or not v.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"variants[{i}].name={v.name!r}: give a label of letters, digits, - and _ (it names a folder)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"compare: variant names must be unique; {dup[0]!r} appears twice")
    if cfg.baseline not in names:
        raise ConfigError(f"compare.baseline={cfg.baseline!r} is not a variant; variants: {', '.join(names)}")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"compare: seeds={cfg.seeds} must be a non-empty list of distinct integers")
    base = next(v for v in cfg.variants if v.name == cfg.baseline)
    if base.start == "baseline":
        raise ConfigError(f"variants: the baseline ({cfg.baseline}) has start: baseline; it cannot start from itself "
                          "(set start: student on it)")
    starts = [v for v in cfg.variants if _from_baseline(v)]
    if starts and base.method != "sft":
        raise ConfigError(f"variant {starts[0].name} ({starts[0].method}) starts from the baseline's student, so the "
                          f"baseline ({cfg.baseline}) must be an sft variant")
    for m in cfg.metrics:
        if m not in PER_ROW | {"ece", "exaccerr", "distinct_2"}:
            raise ConfigError(f"compare.metrics: unknown metric {m!r}; choose from exact_match, answer_nll, rougeL, "
                              "ece, sampled_rougeL, exaccerr, answer_tokens, distinct_2")


def _apply(tree: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    tree = copy.deepcopy(tree)
    for ov in overrides:
        keys, value = parse_override(ov)
        if keys[0] in ("output_dir", "seed", "method"):
            raise ConfigError(f"{where}: '{ov}' cannot be overridden per variant (compare sets {keys[0]})")
        _set_path(tree, keys, value)
    return tree


def plan(cfg: CompareConfig) -> list[Planned]:
    """Every variant x seed as a validated config (errors surface before any model loads)."""
    _check(cfg)
    out = Path(cfg.output_dir)
    shared = {k: v for k, v in to_dict(cfg).items() if k not in COMPARE_ONLY}
    plans = []
    base = next(v for v in cfg.variants if v.name == cfg.baseline)
    for seed in cfg.seeds:
        for i, v in enumerate(sorted(cfg.variants, key=_from_baseline)):  # those that continue it after the baseline
            folder = out / v.name / f"seed-{seed}"
            where = f"variants[{cfg.variants.index(v)}] ({v.name})"
            base_student = out / base.name / f"seed-{seed}" / "student"
            if v.method == "minillm":
                tree = {"output_dir": str(folder), "seed": seed, "teacher": shared["teacher"],
                        "student": {"init": "pretrained", "name": str(base_student),
                                    "dtype": shared["student"]["dtype"]},
                        "data": shared["data"], "minillm": to_dict(cfg.minillm), "eval": shared["eval"],
                        "evaluate_teacher": False, "evaluate_before": False}
                cls: type = MiniLLMConfig
            else:
                tree = {**shared, "method": v.method, "seed": seed, "output_dir": str(folder),
                        "evaluate_teacher": False, "evaluate_before": False}
                if v.start == "baseline":
                    tree["student"] = _continued_student(shared["student"], base_student)
                cls = DistillConfig
            try:
                run_cfg = from_dict(cls, _apply(tree, v.overrides, where))
                validate(run_cfg)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            plans.append(Planned(v, seed, folder, run_cfg))
    return plans


def _from_baseline(v: VariantSpec) -> bool:
    return v.method == "minillm" or v.start == "baseline"


def _continued_student(shared: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The shared student section for a variant that continues from the baseline's saved student: the
    saved folder loaded as a pretrained model (LoRA merged on saving), with the shared dtype, device,
    LoRA and loading settings, and none of the settings that make a student (pruning, config)."""
    made = {"init", "name", "revision", "gguf_file", "keep_layers", "keep_every", "num_layers", "layer_selection",
            "width", "calibration_rows", "config_overrides"}
    return {**{k: v for k, v in shared.items() if k not in made}, "init": "pretrained", "name": str(folder)}


def _is_done(p: Planned) -> bool:
    """A run counts as finished when its metrics.json exists and its config is the planned one."""
    metrics, saved = p.folder / "metrics.json", p.folder / "config.yaml"
    if not (metrics.is_file() and saved.is_file()):
        return False
    import yaml

    def strip(tree: dict[str, Any]) -> dict[str, Any]:
        for section in tree.values():
            if isinstance(section, dict):
                for k in ("resume", "num_threads", "report_to"):
                    section.pop(k, None)
        return tree

    # Re-read the saved config through its dataclass, so that a run written before a setting
    # existed counts as having that setting's default: adding an option to kdflow must not
    # make every finished run of a long grid stale.
    try:
        saved_cfg = from_dict(type(p.cfg), yaml.safe_load(saved.read_text()))
    except (ConfigError, TypeError, ValueError):
        return False
    return strip(yaml.safe_load(dump_yaml(saved_cfg))) == strip(yaml.safe_load(dump_yaml(p.cfg)))


# ----------------------------------------------------------------------------------------------
# Shared pieces: the adapted teacher, its check and test scores, teacher caches, seqkd answers


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _share_teacher(plans: list[Planned], teacher: Any) -> None:
    for p in plans:
        p.cfg = dataclasses.replace(p.cfg, teacher=teacher)


def _complete(cache: Path) -> bool:
    return (cache / "manifest.json").is_file() and bool(json.loads((cache / "manifest.json").read_text()).get("complete"))


def _share_caches(cfg: CompareConfig, plans: list[Planned], build: Callable[[DistillConfig], Any]) -> None:
    """One teacher cache per distinct (temperature, k, token scope, ...) among kd/hard_token variants."""
    out = Path(cfg.output_dir)
    for p in plans:
        c = p.cfg
        if isinstance(c, MiniLLMConfig):
            continue
        if c.method == "seqkd":
            gen = to_dict(c.seqkd)
            gen.pop("cache_file")
            p.cfg = dataclasses.replace(c, seqkd=dataclasses.replace(
                c.seqkd, cache_file=c.seqkd.cache_file or str(out / "shared" / f"seqkd-{_digest(gen)}.jsonl")))
        elif (cfg.share_teacher_cache and c.method in ("kd", "hard_token") and c.kd.kd_weight > 0
              and not c.teacher_cache.dir and not c.teachers):
            # (several teachers use their own `cache` entries.) A hidden-state variant shares a cache that also
            # holds the teacher's hidden states (every block unless teacher_cache.hidden names some), so it
            # differs from its logit-only sibling by the hidden term alone, not by an online teacher
            tc = c.teacher_cache
            if c.kd.hidden_weight > 0 and str(tc.hidden) == "none":
                tc = dataclasses.replace(tc, hidden="all")
            temp = 1.0 if c.method == "hard_token" else c.kd.temperature
            key = {"t": temp, "scope": c.kd.token_scope, "cache": {k: v for k, v in to_dict(tc).items() if k != "dir"}}
            folder = out / "shared" / f"teacher-cache-{_digest(key)}"
            p.cfg = dataclasses.replace(c, teacher_cache=dataclasses.replace(tc, dir=str(folder)))
    built: set[str] = set()

    def ensure(folder: str, c: DistillConfig, what: str) -> None:
        if folder not in built:
            if not _complete(Path(folder)):
                print(f"[kdflow] compare: building {what} {folder}")
                build(c)
            built.add(folder)

    for p in plans:
        c = p.cfg
        if isinstance(c, DistillConfig):
            for e in c.teachers:  # several teachers: each entry's own cache
                if e.cache:
                    ensure(e.cache, dataclasses.replace(c, teachers=[e]), "the teacher cache")
            if c.teacher_cache.dir:
                ensure(c.teacher_cache.dir, c, "the shared teacher cache")


def run_compare(cfg: CompareConfig) -> dict[str, Any]:
    import transformers

    from kdflow.data import read_rows
    from kdflow.evaluate import evaluate_cached
    from kdflow.methods.kd import run_cache_teacher, run_distill
    from kdflow.methods.minillm import run_minillm
    from kdflow.report import write_atomic
    from kdflow.teachers import check_teacher, check_teacher_settings, get_teacher

    plans = plan(cfg)
    if cfg.data.train is None or cfg.data.test is None:
        raise ConfigError("compare needs data.train and data.test (choose recipes on data.validation, report on test)")
    if cfg.teacher.name:
        check_teacher_settings(cfg.teacher)
    train_rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    val_rows = read_rows(cfg.data.validation, "data.validation").head(cfg.data.max_eval_rows) if cfg.data.validation else None
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows)
    out = Path(cfg.output_dir)

    def start() -> None:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", dump_yaml(cfg))

    processes.on_main(start)
    if cfg.train.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    transformers.set_seed(cfg.seed)
    t0 = time.time()

    ready = get_teacher(cfg.teacher, cfg.data, train_rows) if cfg.teacher.name else None

    def teacher_model() -> tuple[Any, Any]:
        return ready.model(), ready.tokenizer

    teacher_check = teacher_scores = None
    if ready is not None:
        _share_teacher(plans, ready.spec)
        teacher_check = check_teacher(ready.spec, teacher_model, val_rows, cfg.data, cfg.eval)
        key = {"teacher": ready.identity, "data": to_dict(cfg.data)}
        res = evaluate_cached(out / "shared" / "teacher_test.json", key, teacher_model, None, test_rows, cfg.data,
                              cfg.eval, "teacher")
        teacher_scores = {"metrics": res.metrics, "per_row": res.per_row}
        ready.release()  # each run loads what it needs
    gc.collect()
    _share_caches(cfg, plans, run_cache_teacher)

    todo = [p for p in plans if not _is_done(p)]
    print(f"[kdflow] compare: {len(plans)} runs ({len(cfg.variants)} variants x {len(cfg.seeds)} seeds), "
          f"{len(plans) - len(todo)} already finished")
    for n, p in enumerate(todo, 1):
        print(f"\n[kdflow] compare: run {n}/{len(todo)} — {p.variant.name} ({p.variant.method}), seed {p.seed} -> {p.folder}")
        (run_minillm if isinstance(p.cfg, MiniLLMConfig) else run_distill)(p.cfg)
        gc.collect()

    board = leaderboard(cfg, plans, teacher_scores, teacher_check)
    board["seconds_this_session"] = time.time() - t0
    from kdflow.report import write_json

    text = leaderboard_markdown(board, cfg)

    def write_outputs() -> None:
        write_json(out / "leaderboard.json", board)
        plot_leaderboard(out / "leaderboard.png", board, cfg)
        write_atomic(out / "leaderboard.md", text)

    processes.on_main(write_outputs)
    print("\n" + text)
    print(f"[kdflow] comparison folder: {out} (leaderboard.md, leaderboard.json, leaderboard.png)")
    return board


# ----------------------------------------------------------------------------------------------
# Leaderboard


def _run_scores(p: Planned) -> dict[str, Any]:
    metrics = json.loads((p.folder / "metrics.json").read_text())
    saved = json.loads((p.folder / "eval" / "student_after.json").read_text())
    train = metrics.get("train", {})
    return {"metrics": saved["metrics"], "per_row": saved.get("per_row", {}),
            "train_seconds": train.get("seconds", train.get("seconds_this_session")),
            "tokens_per_second": train.get("tokens_per_second", train.get("sampled_tokens_per_second")),
            "steps": train.get("steps")}


def _stat(metric: str, runs: list[dict[str, Any]], bins: int) -> tuple[Callable | None, int]:
    """The leaderboard statistic of `metric` over a variant's seeds, as a function of resampled row
    indices (scoring.bootstrap_stat), and the number of rows; (None, 0) when rows were not saved."""
    import numpy as np

    from kdflow.scoring import expected_calibration_error, row_mean, seed_average, token_weighted_mean

    rows = [r["per_row"] for r in runs]
    if metric == "answer_nll" and all("answer_nll" in r and "token_confidence" in r for r in rows):
        counts = [[len(t) for t in r["token_confidence"]] for r in rows]
        return token_weighted_mean([r["answer_nll"] for r in rows], counts), len(counts[0])
    if metric in PER_ROW and all(metric in r for r in rows):
        values = seed_average([r[metric] for r in rows])
        return row_mean(values), len(values)
    if metric == "ece" and all("token_confidence" in r for r in rows):
        conf = [r["token_confidence"] for r in rows]
        ok = [r["token_correct"] for r in rows]

        def ece(idx: Any) -> Any:  # re-bins every resample: a plain loop
            return np.array([sum(expected_calibration_error([x for i in one for x in c[i]], [x for i in one for x in o[i]], bins)
                                 for c, o in zip(conf, ok)) / len(conf) for one in idx])

        return ece, len(conf[0])
    return None, 0


def leaderboard(cfg: CompareConfig, plans: list[Planned], teacher: dict[str, Any] | None,
                teacher_check: dict[str, Any] | None) -> dict[str, Any]:
    from kdflow.scoring import bootstrap_stat, mean_sd, paired_bootstrap_stat

    res, seeds = cfg.eval.bootstrap_resamples, cfg.eval.bootstrap_seed
    runs: dict[str, list[dict[str, Any]]] = {}
    for p in plans:
        if (p.folder / "metrics.json").is_file():
            runs.setdefault(p.variant.name, []).append(_run_scores(p))
    base = runs.get(cfg.baseline, [])
    board: dict[str, Any] = {"baseline": cfg.baseline, "seeds": cfg.seeds, "bootstrap": {"resamples": res, "seed": seeds},
                             "teacher": teacher["metrics"] if teacher else None, "teacher_check": teacher_check,
                             "variants": {}}
    for v in cfg.variants:
        rs = runs.get(v.name, [])
        if not rs:
            continue
        entry: dict[str, Any] = {"method": v.method, "overrides": v.overrides, "seeds_done": len(rs), "metrics": {},
                                 "start": "baseline" if _from_baseline(v) else "student"}
        for m in cfg.metrics:
            vals = [r["metrics"][m] for r in rs if m in r["metrics"]]
            if not vals:
                continue
            mean, sd = mean_sd(vals)
            item: dict[str, Any] = {"mean": mean, "sd": sd, "per_seed": vals}
            n_res = min(res, 500) if m == "ece" else res  # ECE re-bins every resample: fewer keep it quick
            stat, n = _stat(m, rs, cfg.eval.calibration_bins)
            if stat is not None:
                item["interval"] = bootstrap_stat(n, stat, n_res, seeds).as_dict()
                base_stat, bn = _stat(m, base, cfg.eval.calibration_bins) if base else (None, 0)
                if v.name != cfg.baseline and base_stat is not None and bn == n and len(base) == len(rs):
                    item["vs_baseline"] = paired_bootstrap_stat(n, stat, base_stat, n_res, seeds).as_dict()
            entry["metrics"][m] = item
        secs = [r["train_seconds"] for r in rs if r["train_seconds"]]
        tps = [r["tokens_per_second"] for r in rs if r["tokens_per_second"]]
        entry["train_seconds"] = sum(secs) / len(secs) if secs else None
        entry["tokens_per_second"] = sum(tps) / len(tps) if tps else None
        entry["steps"] = rs[0]["steps"]
        if teacher and "exact_match" in entry["metrics"] and teacher["metrics"].get("exact_match"):
            entry["teacher_exact_match_kept"] = entry["metrics"]["exact_match"]["mean"] / teacher["metrics"]["exact_match"]
        head = headline_metric(cfg)
        if teacher and head in entry["metrics"] and teacher["metrics"].get(head):
            entry["teacher_kept"] = {"metric": head, "fraction": entry["metrics"][head]["mean"] / teacher["metrics"][head]}
        board["variants"][v.name] = entry
    return board


KEPT_SCORES = ("exact_match", "rougeL", "sampled_rougeL")  # higher is better and 0 means nothing learnt


def headline_metric(cfg: CompareConfig) -> str:
    """The score the "kept of teacher" column divides: the first of `metrics` that is a score
    (exact match for short answers, Rouge-L where answers are sentences and exact match is near 0)."""
    return next((m for m in cfg.metrics if m in KEPT_SCORES), "exact_match")


def _fmt(m: str, v: float) -> str:
    return f"{v:.1%}" if m == "exact_match" else f"{v:.3f}"


def leaderboard_markdown(board: dict[str, Any], cfg: CompareConfig) -> str:
    from kdflow.evaluate import scoring_rule

    lines = ["# kdflow compare — leaderboard", "",
             f"Test rows `{cfg.data.test}`; training `{cfg.data.train}`; seeds {cfg.seeds}. Each cell: mean (± sd over "
             f"seeds), then [95% row-bootstrap interval] of the seed-averaged scores; Δ: difference from "
             f"`{cfg.baseline}` on the same rows with its paired 95% interval ({board['bootstrap']['resamples']} "
             f"resamples, seed {board['bootstrap']['seed']}). Exact match: {scoring_rule(cfg.data, cfg.eval)}.", ""]
    if board.get("teacher_check"):
        tc = board["teacher_check"]
        em = f", exact match {tc['exact_match']:.1%}" if tc.get("exact_match") is not None else ""
        lines.append(f"Teacher (`{cfg.teacher.name}`, adapt: {cfg.teacher.adapt.method}) on {tc['rows']} validation "
                     f"rows: answer NLL {tc['answer_nll']:.3f}{em}"
                     + (f" — below thresholds: {'; '.join(tc['below_thresholds'])}" if tc["below_thresholds"] else ""))
        lines.append("")
    metrics = cfg.metrics
    kept_of = headline_metric(cfg)
    head = ("| variant | " + " | ".join(f"{m} | Δ {m}" for m in metrics)
            + f" | kept of teacher {'EM' if kept_of == 'exact_match' else kept_of} | train s | tokens/s |")
    lines += [head, "|---|" + "---:|---:|" * len(metrics) + "---:|---:|---:|"]
    if board.get("teacher"):
        t = board["teacher"]
        cells = [c for m in metrics for c in ((_fmt(m, t[m]) if m in t else ""), "")]
        lines.append("| teacher | " + " | ".join(cells + ["100%" if t.get(kept_of) else "", "", ""]) + " |")
    for name, e in board["variants"].items():
        cells = []
        for m in metrics:
            item = e["metrics"].get(m)
            if not item:
                cells += ["", ""]
                continue
            c = _fmt(m, item["mean"]) + (f" ± {_fmt(m, item['sd'])}" if len(item["per_seed"]) > 1 else "")
            if "interval" in item:
                c += f" [{_fmt(m, item['interval']['low'])}, {_fmt(m, item['interval']['high'])}]"
            d = item.get("vs_baseline")
            if d:
                scale = 100 if m == "exact_match" else 1
                unit = " pts" if m == "exact_match" else ""
                better = (d["low"] > 0) if m not in LOWER_IS_BETTER else (d["high"] < 0)
                worse = (d["high"] < 0) if m not in LOWER_IS_BETTER else (d["low"] > 0)
                tag = " (better)" if better else " (worse)" if worse else " (within noise)"
                cells += [c, f"{d['estimate'] * scale:+.2f}{unit} [{d['low'] * scale:+.2f}, {d['high'] * scale:+.2f}]{tag}"]
            else:
                cells += [c, "—" if name == cfg.baseline else ""]
        kept = f"{e['teacher_kept']['fraction']:.0%}" if e.get("teacher_kept") else ""
        secs = f"{e['train_seconds']:.0f}" if e.get("train_seconds") else ""
        tps = f"{e['tokens_per_second']:.0f}" if e.get("tokens_per_second") else ""
        label = f"{name} ({e['method']}{', ' + ' '.join(e['overrides']) if e['overrides'] else ''}; {e['seeds_done']} seed{'s' if e['seeds_done'] != 1 else ''})"
        if e.get("start") == "baseline":
            label += f" — after the {cfg.baseline} student's {board['variants'].get(cfg.baseline, {}).get('steps')} steps"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {kept} | {secs} | {tps} |")
    lines += ["", "![leaderboard](leaderboard.png)", ""]
    return "\n".join(lines)


def plot_labels(board: dict[str, Any], cfg: CompareConfig) -> tuple[list[str], str]:
    """The chart's variant labels and title: the number of seeds when every variant has them all, else
    each variant's finished seeds beside its name (a variant with fewer seeds is not averaged like the
    others)."""
    names = list(board["variants"])
    done = [board["variants"][n].get("seeds_done", len(cfg.seeds)) for n in names]
    if all(d == len(cfg.seeds) for d in done):
        return names, f"kdflow compare: {len(cfg.seeds)} seed(s), 95% row-bootstrap intervals"
    return ([f"{n} ({d} seed{'s' if d != 1 else ''})" for n, d in zip(names, done)],
            f"kdflow compare: seeds finished per variant in brackets (of {len(cfg.seeds)}), 95% row-bootstrap intervals")


def plot_leaderboard(path: Path, board: dict[str, Any], cfg: CompareConfig) -> None:
    """Bars of the first two leaderboard metrics with 95% intervals; the baseline hatched, the
    teacher as a dashed line."""
    from kdflow.report import pyplot

    plt = pyplot()
    if plt is None:
        return
    metrics = [m for m in cfg.metrics[:2]]
    names = list(board["variants"])
    if not names:
        return
    labels, title = plot_labels(board, cfg)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics) + 1, 4), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        means, lo, hi = [], [], []
        for n in names:
            item = board["variants"][n]["metrics"].get(m)
            mean = item["mean"] if item else float("nan")
            iv = (item or {}).get("interval")
            means.append(mean)
            lo.append(mean - iv["low"] if iv else 0.0)
            hi.append(iv["high"] - mean if iv else 0.0)
        scale = 100 if m == "exact_match" else 1
        bars = ax.bar(range(len(names)), [x * scale for x in means], yerr=[[x * scale for x in lo], [x * scale for x in hi]],
                      capsize=4, color=["#bbbbbb" if n == cfg.baseline else "#4c72b0" for n in names])
        for b, n in zip(bars, names):
            if n == cfg.baseline:
                b.set_hatch("//")
        t = board.get("teacher") or {}
        if m in t:
            ax.axhline(t[m] * scale, color="#c44e52", linestyle="--", linewidth=1, label="teacher")
            ax.legend(loc="best", fontsize=8)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{m} (%)" if m == "exact_match" else m + (" (lower is better)" if m in LOWER_IS_BETTER else ""))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    import os

    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
