"""Evaluation: answer NLL / perplexity, greedy and sampled generation, Rouge-L, exact match, distinct-n."""

from __future__ import annotations

import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kdflow.config import DataConfig, EvalConfig
from kdflow.data import Rows, collate, encode_rows, left_pad, prompts_of, reference_answers, row_turns


# ----------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def answer_nll(model: Any, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 16,
               progress: bool = False) -> dict[str, Any]:
    """Mean negative log-likelihood of the reference answers (nats/token), and per example."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, per_example = 0.0, 0, []
    batches = range(0, len(examples), batch_size)
    for start in tqdm(batches, desc="answer NLL", disable=not progress, leave=False):
        batch = collate(examples[start:start + batch_size], pad_id)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        mask = labels != -100
        tok_nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        for row_nll, row_mask in zip(tok_nll.sum(-1).tolist(), mask.sum(-1).tolist()):
            per_example.append(row_nll / max(row_mask, 1))
        total += float(tok_nll.sum())
        count += int(mask.sum())
    model.train(was_training)
    nll = total / max(count, 1)
    return {"nll": nll, "perplexity": math.exp(min(nll, 50.0)), "tokens": count, "per_example_nll": per_example}


# ----------------------------------------------------------------------------------------------
# Generation


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 16,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             progress: bool = False, desc: str = "generating") -> list[list[int]]:
    """Generate an answer for each prompt (token ids, EOS and padding removed).

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
                         progress, desc)
    finally:
        base.generation_config = saved_config
        model.train(was_training)


def _generate(model: Any, tok: Any, prompts: list[list[int]], max_new_tokens: int, batch_size: int, do_sample: bool,
              temperature: float, top_p: float, seed: int, progress: bool, desc: str) -> list[list[int]]:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos_id = tok.eos_token_id
    out: list[list[int]] = []
    gen = torch.Generator().manual_seed(seed)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = prompts[start:start + batch_size]
        ids, mask = left_pad(chunk, pad_id)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad_id, "eos_token_id": eos_id}
        if do_sample:
            # transformers samples from torch's global generator: seed it per batch from our own
            # generator so results depend on (seed, batch) only, not on what ran before.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        seqs = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        for row in seqs[:, ids.shape[1]:].tolist():
            if eos_id in row:
                row = row[: row.index(eos_id)]
            out.append(row)
    return out


# ----------------------------------------------------------------------------------------------
# Text metrics


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    text = _PUNCT.sub(" ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions: list[str], references: list[str]) -> float:
    if not predictions:
        return 0.0
    return sum(normalize_answer(p) == normalize_answer(r) for p, r in zip(predictions, references)) / len(predictions)


_SCORER = None


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean Rouge-L F-measure (rouge-score, with stemming)."""
    global _SCORER
    if not predictions:
        return 0.0
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(_SCORER.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (diversity of the generations)."""
    grams: Counter = Counter()
    for t in texts:
        words = t.split()
        grams.update(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


# ----------------------------------------------------------------------------------------------
# Whole evaluation


@dataclass
class EvalResult:
    metrics: dict[str, float]
    examples: list[dict[str, str]]  # prompt, reference, greedy prediction


def evaluate_model(model: Any, tok: Any, rows: Rows, data_cfg: DataConfig, eval_cfg: EvalConfig,
                   progress: bool = True, name: str = "model") -> EvalResult:
    rows = rows.head(eval_cfg.max_rows)
    if len(rows) == 0:  # the metrics of nothing would read as NLL 0 and perplexity 1
        from kdflow.errors import DataError

        raise DataError(f"{rows.source}: no rows to evaluate")
    t0 = time.time()
    metrics: dict[str, float] = {"rows": float(len(rows))}
    examples = encode_rows(rows, tok, data_cfg)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    scored = answer_nll(model, examples, pad_id, eval_cfg.batch_size, progress=progress)
    metrics["answer_nll"] = scored["nll"]
    metrics["perplexity"] = scored["perplexity"]
    refs = reference_answers(rows, data_cfg)
    prompts = prompts_of(rows, tok, data_cfg)
    shown: list[dict[str, str]] = []
    if eval_cfg.greedy:
        ids = generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, progress=progress,
                       desc=f"{name}: greedy")
        preds = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
        metrics["rougeL"] = rouge_l(preds, refs)
        metrics["exact_match"] = exact_match(preds, refs)
        metrics["answer_tokens"] = sum(len(x) for x in ids) / max(len(ids), 1)
        prompt_texts = [row_turns(r, w, data_cfg).messages[-1]["content"] for r, w in zip(rows.items, rows.locations)]
        shown = [{"prompt": str(p), "reference": r, "prediction": g}
                 for p, r, g in list(zip(prompt_texts, refs, preds))[: eval_cfg.show_examples]]
    if eval_cfg.sample_seeds:
        per_seed = []
        for seed in eval_cfg.sample_seeds:
            ids = generate(model, tok, prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, do_sample=True,
                           temperature=eval_cfg.sample_temperature, top_p=eval_cfg.sample_top_p, seed=seed,
                           progress=progress, desc=f"{name}: sampled (seed {seed})")
            preds = [tok.decode(x, skip_special_tokens=True).strip() for x in ids]
            per_seed.append({
                "rougeL": rouge_l(preds, refs),
                "length": sum(len(x) for x in ids) / max(len(ids), 1),
                "distinct_1": distinct_n(preds, 1),
                "distinct_2": distinct_n(preds, 2),
            })
        for key in per_seed[0]:
            vals = [s[key] for s in per_seed]
            mean = sum(vals) / len(vals)
            metrics[f"sampled_{key}"] = mean
            metrics[f"sampled_{key}_std"] = (sum((v - mean) ** 2 for v in vals) / len(vals)) ** 0.5
    metrics["seconds"] = time.time() - t0
    return EvalResult(metrics, shown)


def evaluate_cached(path: Any, key: dict[str, Any], model: Any, tok: Any, rows: Rows, data_cfg: DataConfig,
                    eval_cfg: EvalConfig, name: str = "model") -> EvalResult:
    """`evaluate_model`, reusing the result saved at `path` by an earlier (interrupted) run whose
    `key` (what the model and its training depend on) and evaluation settings were the same."""
    import json
    from pathlib import Path

    from kdflow.config import to_dict
    from kdflow.data import rows_fingerprint
    from kdflow.report import write_json

    path = Path(path)
    key = {**key, "eval": to_dict(eval_cfg), "data": rows_fingerprint(rows)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return EvalResult(saved["metrics"], saved["examples"])
    print(f"[kdflow] evaluating {name} on {min(len(rows), eval_cfg.max_rows or len(rows))} test rows")
    res = evaluate_model(model, tok, rows, data_cfg, eval_cfg, name=name)
    write_json(path, {"key": key, "metrics": res.metrics, "examples": res.examples})
    return res


def format_table(results: dict[str, dict[str, float]], keys: list[str] | None = None) -> str:
    """A markdown table, one row per model."""
    if not results:
        return ""
    keys = keys or [k for k in ("answer_nll", "perplexity", "rougeL", "exact_match", "answer_tokens",
                                "sampled_rougeL", "sampled_length", "sampled_distinct_2")
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
    from kdflow.models import load_model, load_tokenizer
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
    model = load_model(cfg.model)
    if cfg.lora_adapter:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, cfg.lora_adapter)
        except Exception as e:  # peft raises whatever the adapter's files or shapes give it
            raise ModelError(f"lora_adapter {cfg.lora_adapter} does not load onto {cfg.model.name} "
                             f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give the adapter trained on this model") from None
    res = evaluate_model(model, tok, rows, cfg.data, cfg.eval, name=cfg.model.name or "model")
    print(format_table({cfg.model.name or "model": res.metrics}))
    for ex in res.examples:
        print(f"- {ex['prompt']}\n    reference: {ex['reference']}\n    generated: {ex['prediction']}")
    if cfg.output:
        write_json(cfg.output, {"model": cfg.model.name, "metrics": res.metrics, "examples": res.examples})
        print(f"[kdflow] metrics written to {cfg.output}")
    return res.metrics
