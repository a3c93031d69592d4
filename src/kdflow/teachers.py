"""The teacher before it teaches: adaptation to the task, and a check that it can answer it.

Every paper kdflow follows (MiniLLM, GKD, DistiLLM) fine-tunes the teacher on the task first; a
general chat model asked for one-word antonyms answers in sentences, and distilling that teaches
the student to write "The" where the answer should be. `teacher.adapt` fine-tunes the teacher on
`data.train` (all weights, or a LoRA adapter merged afterwards) once, into a folder keyed by a
hash of the teacher, the training rows, the data settings and the adaptation settings; every later
run with the same settings — and any config whose `teacher.name` points at that folder — reuses it.

`teacher.check` scores the teacher on the validation rows with the run's scorer before training
and says plainly when it is below the thresholds, pointing at `teacher.adapt` and `method: seqkd`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

from kdflow import processes
from kdflow.config import AdaptSpec, DataConfig, EvalConfig, TeacherSpec, TrainConfig, to_dict
from kdflow.data import Rows, rows_fingerprint
from kdflow.errors import ConfigError
from kdflow.models import cache_root, model_identity

ADAPTED_MARKER = "kdflow_adapted.json"


def _data_settings(data: DataConfig) -> dict[str, Any]:
    """The data settings that decide the tokens the teacher is trained on."""
    keys = ("prompt_field", "response_field", "messages_field", "system_prompt", "chat_template", "prompt_template",
            "max_length", "min_response_tokens")
    return {k: getattr(data, k) for k in keys}


def adapted_key(spec: TeacherSpec, rows: Rows, data: DataConfig) -> dict[str, Any]:
    adapt = {k: v for k, v in to_dict(spec.adapt).items() if k != "dir"}
    if spec.adapt.method != "lora":
        adapt.pop("lora")
    return {"teacher": model_identity(spec), "dtype": spec.dtype, "rows": rows_fingerprint(rows),
            "data": _data_settings(data), "adapt": adapt, "format": 1}


def adapted_folder(spec: TeacherSpec, rows: Rows, data: DataConfig) -> Path:
    key = adapted_key(spec, rows, data)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    base = Path(spec.adapt.dir) if spec.adapt.dir else cache_root() / "adapted_teachers"
    stem = Path(str(spec.name)).name.replace(":", "-").lower()
    return base / f"{stem}-{spec.adapt.method}-{digest}"


def prepare_teacher(spec: TeacherSpec, data: DataConfig, train_rows: Rows | None) -> TeacherSpec:
    """The teacher the run uses: `spec` itself, or (teacher.adapt) the adapted copy, trained now if
    no earlier run made it. The returned spec names the adapted folder, so caches and reports
    record the adapted teacher's identity."""
    if spec.adapt.method == "none":
        return spec
    if train_rows is None or len(train_rows) == 0:
        raise ConfigError("teacher.adapt needs data.train: the teacher is fine-tuned on the training rows")
    folder = adapted_folder(spec, train_rows, data)
    if not (folder / ADAPTED_MARKER).is_file():
        _adapt(spec, data, train_rows, folder)
    else:
        print(f"[kdflow] adapted teacher: reusing {folder}")
    return dataclasses.replace(spec, name=str(folder), gguf_file=None, revision=None, adapt=AdaptSpec())


def _adapt(spec: TeacherSpec, data: DataConfig, rows: Rows, folder: Path) -> None:
    """Fine-tune the teacher on `rows` with CE on the answers; save the (merged) model to `folder`."""
    import torch
    import transformers

    from kdflow.data import Collator, ListDataset, encode_rows
    from kdflow.losses import HeadLossSpec, head_losses, shifted_masks
    from kdflow.models import apply_lora, load_model, load_tokenizer, selected_hidden
    from kdflow.report import atomic_folder, write_json
    from kdflow.training import make_token_normalized_trainer_class, train_or_restore, training_arguments, last_checkpoint

    a = spec.adapt
    t0 = time.time()
    print(f"[kdflow] adapting the teacher to the task ({a.method}, {a.steps} steps, lr {a.learning_rate}) on "
          f"{len(rows)} rows; saved once to {folder}")
    transformers.set_seed(a.seed)
    tok = load_tokenizer(spec)
    model = load_model(spec)
    examples = encode_rows(rows, tok, data)
    if a.method == "lora":
        model = apply_lora(model, dataclasses.replace(a.lora, enabled=True))
    work = folder.with_name(folder.name + ".work")  # checkpoints: an interrupted adaptation resumes
    train = TrainConfig(learning_rate=a.learning_rate, max_steps=a.steps, batch_size=a.batch_size,
                        warmup_ratio=a.warmup_ratio, lr_scheduler=a.lr_scheduler, weight_decay=a.weight_decay,
                        bf16=a.bf16, logging_steps=max(a.steps // 20, 1), save_steps=50, save_total_limit=1,
                        report_to=["none"])
    Base = make_token_normalized_trainer_class()

    class AdaptTrainer(Base):
        term_weights = {"ce": 1.0}

        def count_tokens(self, batch: dict[str, Any]) -> dict[str, int]:
            ce_mask, _ = shifted_masks(batch["labels"], batch["attention_mask"])
            return {"ce": int(ce_mask.sum())}

        def loss_sums(self, model: Any, inputs: dict[str, Any]) -> dict[str, tuple[torch.Tensor, int]]:
            ce_mask, _ = shifted_masks(inputs["labels"], inputs["attention_mask"])
            hidden, head = selected_hidden(model, inputs["input_ids"], inputs["attention_mask"], ce_mask)
            return head_losses(hidden, head, inputs["labels"][:, 1:][ce_mask], ce_mask[ce_mask], None, HeadLossSpec())

    trainer = AdaptTrainer(model=model, args=training_arguments(train, work, a.seed, has_eval=False),
                           train_dataset=ListDataset(examples), data_collator=Collator(tok.pad_token_id))
    loss, _ = train_or_restore(trainer, last_checkpoint(work))

    def save() -> None:  # the main process alone, when several train it together
        import shutil

        model = trainer.model
        with atomic_folder(folder) as tmp:
            if a.method == "lora":
                model.save_pretrained(tmp / "adapter")
                model = model.merge_and_unload()  # the teacher folder is a plain model every verb loads
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            write_json(tmp / ADAPTED_MARKER, {
                "key": adapted_key(spec, rows, data), "train_loss": loss, "seconds": time.time() - t0,
                "log_history": trainer.state.log_history})
        shutil.rmtree(work, ignore_errors=True)

    processes.on_main(save)
    print(f"[kdflow] adapted teacher written to {folder} ({time.time() - t0:.0f} s); point teacher.name at it to "
          "reuse it elsewhere")


# ----------------------------------------------------------------------------------------------
# Can the teacher answer the task?


def check_teacher(spec: TeacherSpec, load: Callable[[], tuple[Any, Any]], val_rows: Rows | None, data: DataConfig,
                  eval_cfg: EvalConfig) -> dict[str, Any] | None:
    """Score the teacher on up to teacher.check.max_rows validation rows with the run's scorer
    (cached per teacher, rows and settings); print plainly when it is below the thresholds, or stop
    (check.mode=error). `load()` gives (model, tokenizer) and is called only on a cache miss.
    Returns what metrics.json records, or None when the check is off or there are no rows."""
    c = spec.check
    if c.mode == "off":
        return None
    if val_rows is None or len(val_rows) == 0:
        print("[kdflow] teacher check skipped: no data.validation rows to score the teacher on")
        return None
    from kdflow.evaluate import evaluate_model, scoring_rule
    from kdflow.report import write_json

    ecfg = dataclasses.replace(eval_cfg, max_rows=c.max_rows, sample_seeds=[], exposure_bias=False, show_examples=3)
    rows = val_rows.head(c.max_rows)
    key = {"teacher": model_identity(spec), "rows": rows_fingerprint(rows), "data": to_dict(data),
           "eval": to_dict(ecfg)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root() / "teacher_checks" / f"{digest}.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        metrics, examples = saved["metrics"], saved["examples"]
    else:
        model, tok = load()
        print(f"[kdflow] teacher check: scoring the teacher on {len(rows)} validation rows")
        res = evaluate_model(model, tok, rows, data, ecfg, progress=False, name="teacher")
        metrics, examples = res.metrics, res.examples
        processes.on_main(lambda: write_json(path, {"key": key, "metrics": metrics, "examples": examples}))
    below = []
    if metrics["answer_nll"] > c.max_answer_nll:
        below.append(f"answer NLL {metrics['answer_nll']:.2f} > teacher.check.max_answer_nll={c.max_answer_nll}")
    if "exact_match" in metrics and metrics["exact_match"] < c.min_exact_match:
        below.append(f"exact match {metrics['exact_match']:.1%} < teacher.check.min_exact_match={c.min_exact_match}")
    result = {"rows": len(rows), "answer_nll": metrics["answer_nll"], "exact_match": metrics.get("exact_match"),
              "rougeL": metrics.get("rougeL"), "scoring": scoring_rule(data, ecfg), "below_thresholds": below,
              "examples": examples}
    em = f", exact match {metrics['exact_match']:.1%}" if "exact_match" in metrics else ""
    print(f"[kdflow] teacher on {len(rows)} validation rows: answer NLL {metrics['answer_nll']:.3f}{em}")
    if below:
        msg = (f"the teacher looks unable to answer this task ({'; '.join(below)}). A teacher that cannot answer "
               "the task teaches the wrong thing: adapt it first (teacher.adapt.method=lora or sft), or use "
               "method=seqkd on its own answers; teacher.check.mode=off silences this")
        if c.mode == "error":
            raise ConfigError(msg)
        print(f"[kdflow] WARNING: {msg}")
        if examples:
            ex = examples[0]
            print(f"[kdflow]   e.g. {ex['prompt']!r} -> teacher {ex['prediction']!r} (accepted: {ex['reference']!r})")
    return result
