"""Evaluation: answer NLL / perplexity, greedy and sampled generation, Rouge-L, exact match, distinct-n.

Under several processes (`torchrun`, `accelerate launch`) scoring and generation are split by batch,
the batches one process would make, and gathered in order: every process gets the result one
process computes, and only the main process writes it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kdflow import processes
from kdflow.config import DataConfig, EvalConfig
from kdflow.data import Rows, accepted_answers, collate, encode_rows, left_pad, prompts_of, row_turns
from kdflow.scoring import (compile_pattern, distinct_n, expected_calibration_error, extract_answer, match_answer,
                            normalize_answer)

MAX_DEFAULT_ROWS = 1000  # eval.max_rows=null evaluates the whole split up to this many rows


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def answer_nll(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16,
               progress: bool = False) -> dict[str, Any]:
    """Mean negative log-likelihood of the reference answers (nats/token), and per example.

    Under several processes each scores its share of the batches (`kdflow.processes`) and every
    process gets the whole result, the same as one process computes."""
    from tqdm.auto import tqdm

    from kdflow.models import input_device

    was_training = model.training
    model.eval()
    device = input_device(model)
    mine = []
    for start in tqdm(processes.my_batches(len(examples), batch_size), desc="answer NLL",
                      disable=not (progress and processes.is_main()), leave=False):
        batch = collate(examples[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(logits.device)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != -100
        tok_nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        top_logp, top_id = logp.max(-1)
        keep = mask.tolist()
        mine.append({
            "total": float(tok_nll.sum()), "count": int(mask.sum()),
            "per_example": [n / max(c, 1) for n, c in zip(tok_nll.sum(-1).tolist(), mask.sum(-1).tolist())],
            # per row and answer token: the model's top probability, and whether its top token is the
            # reference token (calibration)
            "confidence": [[c for c, k in zip(row, m) if k] for row, m in zip(top_logp.exp().tolist(), keep)],
            "correct": [[float(o) for o, k in zip(row, m) if k] for row, m in zip((top_id == labels).tolist(), keep)],
        })
    model.train(was_training)
    total, count, per_example, confidence, correct = 0.0, 0, [], [], []
    for b in processes.gather_batches(mine):
        total += b["total"]
        count += b["count"]
        per_example += b["per_example"]
        confidence += b["confidence"]
        correct += b["correct"]
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": count, "per_example_nll": per_example,
            "confidence": confidence, "correct": correct}


# ----------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             progress: bool = False, desc: str = "generating", shared: bool = True) -> list[list[int]]:
    """Generate an answer for each prompt (token ids, EOS and padding removed).

    Under several processes the batches are shared out between them and every process gets every
    answer; `shared=False`: this process answers all of `prompts` itself (for callers that split
    the work their own way).

    Only the settings given here decide the generation: a checkpoint's own generation_config
    (repetition_penalty, no_repeat_ngram_size, min_new_tokens, suppressed tokens, ...) would otherwise
    fill in whatever a call leaves unset, so the same weights would be scored differently depending
    on the folder they came from. It is set aside for the call and restored afterwards.
    """
    from transformers import GenerationConfig

    from kdflow.models import unwrap

    was_training = model.training
    model.eval()
    base = unwrap(model)
    saved_config = base.generation_config
    base.generation_config = GenerationConfig()
    try:
        return _generate(model, tok, prompts, max_new_tokens, batch_size, do_sample, temperature, top_p, seed,
                         progress, desc, shared)
    finally:
        base.generation_config = saved_config
        model.train(was_training)


def _generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int, do_sample: bool,
              temperature: float, top_p: float, seed: int, progress: bool, desc: str, shared: bool) -> list[list[int]]:
    from tqdm.auto import tqdm

    from kdflow.models import input_device

    device = input_device(model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos_id = tok.eos_token_id
    # transformers samples from torch's global generator: it is seeded per batch from our own
    # generator so results depend on (seed, batch) only, not on what ran before or on which process
    # generates the batch.
    gen = torch.Generator().manual_seed(seed)
    starts = range(0, len(prompts), batch_size)
    batch_seeds = {s: int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) for s in starts} if do_sample else {}
    mine: list[list[list[int]]] = []
    todo = processes.my_batches(len(prompts), batch_size) if shared else list(starts)
    for start in tqdm(todo, desc=desc, disable=not (progress and processes.is_main()), leave=False):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_id}
        if do_sample:
            torch.manual_seed(batch_seeds[start])
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        rows = []
        for row in seqs[:, ids.shape[1]:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            rows.append(row)
        mine.append(rows)
    return [row for rows in (processes.gather_batches(mine) if shared else mine) for row in rows]


# ----------------------------------------------------------------------------------------------
# Text metrics


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Share of predictions equal to their reference after normalisation (one reference each)."""
    if not predictions:
        return 0.0
    return sum(match_answer(p, [r]) for p, r in zip(predictions, references)) / len(predictions)


_SCORER = None


def rouge_available() -> bool:
    """Whether rouge-score is installed. Without it (a minimal GPU image, say) Rouge-L is reported as
    NaN, said once on stdout, rather than as a number computed some other way: a Rouge-L that is not
    rouge-score's (its tokenizer and stemmer) would not compare with any other run's."""
    import importlib.util

    try:
        return importlib.util.find_spec("rouge_score") is not None
    except (ImportError, ValueError):
        return False


def rouge_l_scores(predictions: list[str], references: list[list[str]] | list[str]) -> list[float]:
    """Rouge-L F-measure (rouge-score, with stemming) of each prediction against the best of its
    references; NaN for each when rouge-score is not installed (`rouge_available`)."""
    global _SCORER
    if _SCORER is None:
        if rouge_available():
            from rouge_score import rouge_scorer

            _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        else:
            print("[kdflow] rouge-score is not installed: Rouge-L is reported as nan (pip install rouge-score); "
                  "answer NLL, exact match and the other metrics are unaffected")
            _SCORER = False  # said once per process
    if _SCORER is False:
        return [math.nan] * len(predictions)
    out = []
    for p, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else refs
        out.append(max(_SCORER.score(r, p)["rougeL"].fmeasure for r in refs))
    return out


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, with stemming)."""
    if not predictions:
        return 0.0
    scores = rouge_l_scores(predictions, references)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------------------------
# Whole evaluation


@dataclass
class EvalResult:
    metrics: dict[str, float]
    examples: list[dict[str, str]]  # prompt, reference, greedy prediction
    per_row: dict[str, list[float]] = field(default_factory=dict)  # row scores, for paired intervals


def eval_rows(rows: Rows, eval_cfg: EvalConfig) -> Rows:
    """The rows an evaluation scores: the first eval.max_rows, or the whole split up to 1,000 rows."""
    return rows.head(eval_cfg.max_rows if eval_cfg.max_rows is not None else MAX_DEFAULT_ROWS)


def scoring_rule(data_cfg: DataConfig, eval_cfg: EvalConfig) -> str:
    """How exact match was scored, in words, for reports."""
    rule = "normalised exact match" if eval_cfg.match == "exact" else "normalised answer contained in the generation"
    refs = f"any of `{data_cfg.references_field}` or the reference" if data_cfg.references_field else "the reference"
    extract = f", answer extracted with `{eval_cfg.answer_pattern}`" if eval_cfg.answer_pattern else ""
    return f"{rule} against {refs}{extract}"


def evaluate_model(model: Any, tok: Any, rows: Rows, data_cfg: DataConfig, eval_cfg: EvalConfig,
                   progress: bool = True, name: str = "model", teacher: Any = None) -> EvalResult:
    """Score `model` on `rows`: answer NLL and calibration under teacher forcing, greedy and sampled
    generations against the accepted answers; with `teacher` (same tokenizer) and
    eval.exposure_bias, ExAccErr. Per-row scores come back for paired comparisons."""
    rows = eval_rows(rows, eval_cfg)
    if len(rows) == 0:
        from kdflow.errors import DataError

        raise DataError(f"{rows.source}: no rows to evaluate (empty split or eval.max_rows=0); give test rows or drop data.test")
    pattern = compile_pattern(eval_cfg.answer_pattern)
    t0 = time.time()
    metrics: dict[str, float] = {"rows": float(len(rows))}
    per_row: dict[str, list[float]] = {}
    examples = encode_rows(rows, tok, data_cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scored = answer_nll(model, examples, pad_id, eval_cfg.batch_size, progress=progress)
    metrics["answer_nll"] = scored["nll"]
    metrics["perplexity"] = scored["perplexity"]
    flat_conf = [c for row in scored["confidence"] for c in row]
    flat_ok = [c for row in scored["correct"] for c in row]
    metrics["ece"] = expected_calibration_error(flat_conf, flat_ok, eval_cfg.calibration_bins)
    metrics["top1_accuracy"] = sum(flat_ok) / max(len(flat_ok), 1)
    per_row["answer_nll"] = scored["per_example_nll"]
    per_row["token_confidence"] = scored["confidence"]
    per_row["token_correct"] = scored["correct"]
    accepted = accepted_answers(rows, data_cfg)
    prompts = prompts_of(rows, tok, data_cfg)
    shown: list[dict[str, str]] = []
    if eval_cfg.greedy:
        ids = generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, progress=progress,
                       desc=f"{name}: greedy")
        preds = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
        answers = [extract_answer(p, pattern) for p in preds]
        em = [float(match_answer(a, refs, eval_cfg.match)) for a, refs in zip(answers, accepted)]
        rl = rouge_l_scores(answers, accepted)
        per_row.update(exact_match=em, rougeL=rl, answer_tokens=[float(len(x)) for x in ids])
        metrics["rougeL"] = sum(rl) / len(rl)
        metrics["exact_match"] = sum(em) / len(em)
        metrics["answer_tokens"] = sum(len(x) for x in ids) / max(len(ids), 1)
        metrics["distinct_1"] = distinct_n(preds, 1)
        metrics["distinct_2"] = distinct_n(preds, 2)
        prompt_texts = [row_turns(r, w, data_cfg).messages[-1]["content"] for r, w in zip(rows.items, rows.locations)]
        shown = [{"prompt": str(p), "reference": " | ".join(refs), "prediction": g}
                 for p, refs, g in list(zip(prompt_texts, accepted, preds))[: eval_cfg.show_examples]]
    if eval_cfg.sample_seeds:
        per_seed = []
        row_rouge = [0.0] * len(rows)
        for seed in eval_cfg.sample_seeds:
            ids = generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, do_sample=True,
                           temperature=eval_cfg.sample_temperature, top_p=eval_cfg.sample_top_p, seed=seed,
                           progress=progress, desc=f"{name}: sampled (seed {seed})")
            preds = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
            answers = [extract_answer(p, pattern) for p in preds]
            rl = rouge_l_scores(answers, accepted)
            row_rouge = [a + b / len(eval_cfg.sample_seeds) for a, b in zip(row_rouge, rl)]
            per_seed.append({
                "rougeL": sum(rl) / len(rl),
                "exact_match": sum(match_answer(a, r, eval_cfg.match) for a, r in zip(answers, accepted)) / len(answers),
                "length": sum(len(x) for x in ids) / max(len(ids), 1),
                "distinct_1": distinct_n(preds, 1),
                "distinct_2": distinct_n(preds, 2),
            })
        per_row["sampled_rougeL"] = row_rouge
        for key in per_seed[0]:
            vals = [s[key] for s in per_seed]
            mean = sum(vals) / len(vals)
            metrics[f"sampled_{key}"] = mean
            metrics[f"sampled_{key}_std"] = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    if eval_cfg.exposure_bias and teacher is not None:
        metrics.update(exposure_bias(model, teacher, tok, prompts, eval_cfg))
    metrics["seconds"] = time.time() - t0
    return EvalResult(metrics, shown, per_row)


@torch.no_grad()
def _token_kl_along(sequences: list[list[int]], prompts: list[list[int]], teacher: Any, student: Any, pad_id: int,
                    batch_size: int) -> list[list[float]]:
    """KL(p‖q) of teacher p and student q at every generated position of each prompt + answer."""
    from kdflow.models import input_device

    mine: list[list[list[float]]] = []
    t_dev, s_dev = input_device(teacher), input_device(student)
    for start in processes.my_batches(len(sequences), batch_size):
        rows = [{"input_ids": p + a, "labels": [-100] * len(p) + a} for p, a in
                zip(prompts[start:start + batch_size], sequences[start:start + batch_size])]
        batch = collate(rows, pad_id)
        mask = batch["labels"][:, 1:] != -100
        t_logp = F.log_softmax(teacher(input_ids=batch["input_ids"].to(t_dev),
                                       attention_mask=batch["attention_mask"].to(t_dev)).logits[:, :-1].float(), -1)
        s_logp = F.log_softmax(student(input_ids=batch["input_ids"].to(s_dev),
                                       attention_mask=batch["attention_mask"].to(s_dev)).logits[:, :-1].float(), -1)
        v = min(t_logp.shape[-1], s_logp.shape[-1])
        t_logp, s_logp = t_logp[..., :v].cpu(), s_logp[..., :v].cpu()
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
        mine.append([kl[i][mask[i]].tolist() for i in range(len(rows))])
    return [row for rows in processes.gather_batches(mine) for row in rows]


def exposure_bias(model: Any, teacher: Any, tok: Any, prompts: list[list[int]], eval_cfg: EvalConfig) -> dict[str, float]:
    """ExAccErr (MiniLLM §5.3 after Arora et al.): the teacher is the oracle. The per-token error at a
    step is KL(p‖q) of the next-token distributions. ε: the mean error along the teacher's own
    sampled answers (oracle prefixes); R: the mean error along the model's own sampled answers.
    ExAccErr = (R − ε) / ε, the relative excess error that generating from one's own prefixes adds
    (token-weighted over every generated position up to eval.max_new_tokens; 0 = none)."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    seed = eval_cfg.sample_seeds[0] if eval_cfg.sample_seeds else 0

    def with_eos(ids: list[list[int]]) -> list[list[int]]:
        # generate() strips EOS; the step that emits it is a decision too
        return [x + [tok.eos_token_id] if len(x) < eval_cfg.max_new_tokens else x for x in ids]

    own = with_eos(generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, do_sample=True,
                            temperature=1.0, seed=seed, desc="exposure bias: model samples"))
    oracle = with_eos(generate(teacher, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, do_sample=True,
                               temperature=1.0, seed=seed, desc="exposure bias: teacher samples"))
    kl_own = [k for row in _token_kl_along(own, prompts, teacher, model, pad_id, eval_cfg.batch_size) for k in row]
    kl_oracle = [k for row in _token_kl_along(oracle, prompts, teacher, model, pad_id, eval_cfg.batch_size) for k in row]
    r = sum(kl_own) / max(len(kl_own), 1)
    eps = sum(kl_oracle) / max(len(kl_oracle), 1)
    return {"exposure_error_own": r, "exposure_error_oracle": eps,
            "exaccerr": (r - eps) / eps if eps > 0 else float("nan")}


def _cache_key(key: dict[str, Any], rows: Rows, data_cfg: DataConfig, eval_cfg: EvalConfig) -> dict[str, Any]:
    from kdflow.config import to_dict
    from kdflow.data import rows_fingerprint

    return {**key, "eval": to_dict(eval_cfg), "data": rows_fingerprint(eval_rows(rows, eval_cfg)), "scoring": {
        "references_field": data_cfg.references_field, "references_separator": data_cfg.references_separator}}


def cached_result(path: Any, key: dict[str, Any], rows: Rows, data_cfg: DataConfig, eval_cfg: EvalConfig) -> EvalResult | None:
    """The result `evaluate_cached` saved at `path` for the same key and settings, or None."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == _cache_key(key, rows, data_cfg, eval_cfg):
            return EvalResult(saved["metrics"], saved["examples"], saved.get("per_row", {}))
    return None


def evaluate_cached(path: Any, key: dict[str, Any], model: Any, tok: Any, rows: Rows, data_cfg: DataConfig,
                    eval_cfg: EvalConfig, name: str = "model", teacher: Any = None) -> EvalResult:
    """`evaluate_model`, reusing the result saved at `path` by an earlier (interrupted) run whose
    `key` (what the model and its training depend on) and evaluation settings were the same.
    `model` may be a function returning (model, tokenizer), called only when nothing is saved."""
    from kdflow.report import write_json

    saved = cached_result(path, key, rows, data_cfg, eval_cfg)
    if saved is not None:
        return saved
    if callable(model) and not hasattr(model, "parameters"):
        model, tok = model()
    rows = eval_rows(rows, eval_cfg)
    print(f"[kdflow] evaluating {name} on {len(rows)} rows of {rows.source}")
    res = evaluate_model(model, tok, rows, data_cfg, eval_cfg, name=name, teacher=teacher)
    record = {"key": _cache_key(key, rows, data_cfg, eval_cfg), "metrics": res.metrics, "examples": res.examples,
              "per_row": res.per_row}
    processes.on_main(lambda: write_json(path, record))
    return res


def paired_differences(a: EvalResult, b: EvalResult, eval_cfg: EvalConfig) -> dict[str, Any]:
    """a − b on the same rows for every per-row metric both have, with paired 95% row-bootstrap
    intervals (answer NLL token-weighted, as reported; the others as row means)."""
    from kdflow.scoring import paired_bootstrap_stat, row_mean, token_weighted_mean

    out: dict[str, Any] = {}
    for m in ("exact_match", "answer_nll", "rougeL", "sampled_rougeL"):
        if m not in a.per_row or m not in b.per_row or len(a.per_row[m]) != len(b.per_row[m]):
            continue
        if m == "answer_nll" and "token_confidence" in a.per_row and "token_confidence" in b.per_row:
            stat_a = token_weighted_mean([a.per_row[m]], [[len(t) for t in a.per_row["token_confidence"]]])
            stat_b = token_weighted_mean([b.per_row[m]], [[len(t) for t in b.per_row["token_confidence"]]])
        else:
            stat_a, stat_b = row_mean(a.per_row[m]), row_mean(b.per_row[m])
        out[m] = paired_bootstrap_stat(len(a.per_row[m]), stat_a, stat_b, eval_cfg.bootstrap_resamples,
                                       eval_cfg.bootstrap_seed)
    return out


def differences_markdown(results: dict[str, EvalResult], pairs: list[tuple[str, str]], eval_cfg: EvalConfig) -> list[str]:
    """Report lines: for each (a, b) pair present, a − b per metric with its paired interval."""
    lines = []
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        diffs = paired_differences(results[a], results[b], eval_cfg)
        if diffs:
            cells = ", ".join(f"{m} {iv.text(3)}" for m, iv in diffs.items())
            lines.append(f"- {a} − {b}: {cells}")
    if lines:
        lines = ["## Differences on the same rows (paired 95% row-bootstrap intervals, "
                 f"{eval_cfg.bootstrap_resamples} resamples, seed {eval_cfg.bootstrap_seed})", ""] + lines + [""]
    return lines


def metric_intervals(res: EvalResult, eval_cfg: EvalConfig) -> dict[str, dict[str, float]]:
    """95% row-bootstrap intervals of one model's scores on its rows (answer NLL token-weighted, as reported)."""
    from kdflow.scoring import bootstrap_stat, row_mean, token_weighted_mean

    out = {}
    for m in ("exact_match", "answer_nll", "rougeL"):
        values = res.per_row.get(m)
        if not values:
            continue
        if m == "answer_nll" and "token_confidence" in res.per_row:
            stat = token_weighted_mean([values], [[len(t) for t in res.per_row["token_confidence"]]])
        else:
            stat = row_mean(values)
        out[m] = bootstrap_stat(len(values), stat, eval_cfg.bootstrap_resamples, eval_cfg.bootstrap_seed).as_dict()
    return out


def format_table(results: dict[str, dict[str, float]], keys: list[str] | None = None) -> str:
    """A markdown table, one row per model."""
    if not results:
        return ""
    keys = keys or [k for k in ("answer_nll", "perplexity", "rougeL", "exact_match", "ece", "answer_tokens",
                                "sampled_rougeL", "sampled_length", "sampled_distinct_2", "exaccerr")
                    if any(k in m for m in results.values())]
    head = "| model | " + " | ".join(keys) + " |"
    sep = "|---|" + "---:|" * len(keys)
    lines = [head, sep]
    for name, m in results.items():
        cells = []
        for k in keys:
            v = m.get(k)
            cells.append("" if v is None else (f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_eval(cfg: Any) -> dict[str, float]:
    """`kdflow eval`: evaluate one model (optionally with a LoRA adapter) on `data.test`."""
    from pathlib import Path

    import transformers

    from kdflow.data import read_rows
    from kdflow.errors import ConfigError, ModelError
    from kdflow.models import load_model, load_tokenizer, place, run_device
    from kdflow.report import write_json

    if not cfg.data.test:
        raise ConfigError("data.test is not set: give the rows to evaluate")
    if cfg.lora_adapter and not (Path(cfg.lora_adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"lora_adapter {cfg.lora_adapter}: no adapter_config.json there; give a folder saved by peft "
                          "(a run's student_adapter/ or peers/<name>/adapter/)")
    if cfg.output and Path(cfg.output).is_dir():
        raise ConfigError(f"output {cfg.output} is a folder; give the path of the JSON file to write")
    transformers.set_seed(cfg.seed)
    rows = read_rows(cfg.data.test, "data.test").head(cfg.data.max_eval_rows)
    tok = load_tokenizer(cfg.model)
    device = run_device(cfg.model, "model")
    model = load_model(cfg.model, device)
    if cfg.lora_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, cfg.lora_adapter)
        except Exception as e:  # peft raises whatever the adapter's files or shapes give it
            raise ModelError(f"lora_adapter {cfg.lora_adapter} does not load onto {cfg.model.name} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the adapter trained on this model") from None
    model = place(model, role="model", device=device)
    res = evaluate_model(model, tok, rows, cfg.data, cfg.eval, name=cfg.model.name or "model")
    intervals = metric_intervals(res, cfg.eval)
    print(format_table({cfg.model.name or "model": res.metrics}))
    for m, iv in intervals.items():
        print(f"  {m}: {iv['estimate']:.4f}, 95% row-bootstrap interval [{iv['low']:.4f}, {iv['high']:.4f}]")
    for ex in res.examples:
        print(f"- {ex['prompt']}\n    reference: {ex['reference']}\n    generated: {ex['prediction']}")
    if cfg.output and processes.is_main():
        # per-row scores let a later table pair this model with others scored on the same rows
        write_json(cfg.output, {"model": cfg.model.name, "metrics": res.metrics, "intervals": intervals,
                                "scoring": scoring_rule(cfg.data, cfg.eval), "examples": res.examples,
                                "per_row": res.per_row})
        print(f"[kdflow] metrics written to {cfg.output}")
    return res.metrics
