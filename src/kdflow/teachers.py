"""The teacher section: one specification of the teacher, and the one way a verb gets it ready.

What `teacher:` (config.TeacherSpec) holds, in the order a teacher is made ready:
  which weights   name / revision / gguf_file, and `lora_adapter` (a peft adapter on top)
  first adapted?  `adapt`: fine-tune on data.train once, into a folder keyed by teacher, rows and settings
  how loaded      dtype (auto: bf16 on a GPU that has it), `load_in` (8/4-bit, bitsandbytes, CUDA),
                  `device` (one device; default the process's) or `device_map` (spread over devices)
  good enough?    `check`: scored on validation rows before training (warn or stop)
  where it runs    `server`: behind an HTTP endpoint (vLLM's completions API with prompt log-probs, or
                  `kdflow serve-teacher`); `model()` is then a kdflow.serving.TeacherClient, not weights
A list `teachers:` belongs here too, so that every method keeps asking for its teacher in the same single call.

A method gets its teacher from `get_teacher(spec, data, train_rows)` and from nothing else (distill,
cache-teacher, minillm, compare; fedmkt's server is a party, not a teacher). It settles which weights
teach — adapting the teacher first if asked — and returns a `Teacher`: the spec naming those weights
(identities, caches and tokenizers are taken from it), the tokenizer, and `model()`, which loads the
frozen model on first use — LoRA applied, quantised, on its device or spread over devices — so a verb
that trains from a teacher cache never loads the weights at all. `teacher_identity(spec)` is what
caches and manifests record: the weights and every setting that changes the teacher's numbers.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdflow import processes
from kdflow.config import AdaptSpec, DataConfig, EvalConfig, TeacherSpec, TrainConfig, to_dict
from kdflow.data import Rows, rows_fingerprint
from kdflow.errors import ConfigError
from kdflow.models import cache_root, dtype_name, model_identity

ADAPTED_MARKER = "kdflow_adapted.json"


# ----------------------------------------------------------------------------------------------
# The ready teacher


@dataclass
class Teacher:
    """A teacher ready to teach. `spec` names the weights that teach (the adapted folder after
    teacher.adapt); the model loads on the first `model()` call and stays until `release()`."""

    spec: TeacherSpec
    tokenizer: Any
    _model: Any = field(default=None, repr=False)

    @property
    def identity(self) -> str:
        return teacher_identity(self.spec)

    @property
    def served(self) -> bool:
        return self.spec.server.url is not None

    def model(self) -> Any:
        if self._model is None:
            if self.served:
                from kdflow.serving import TeacherClient

                self._model = TeacherClient.from_spec(self.spec, len(self.tokenizer))
            else:
                self._model = load_teacher(self.spec)
        return self._model

    def release(self) -> None:
        self._model = None


def get_teacher(spec: TeacherSpec, data: DataConfig, train_rows: Rows | None) -> Teacher:
    """The one way a verb gets its teacher: settings checked, adapted if asked (`prepare_teacher`),
    tokenizer loaded; the weights load when `model()` is first called."""
    from kdflow.models import load_tokenizer

    check_teacher_settings(spec)
    spec = prepare_teacher(spec, data, train_rows)
    return Teacher(spec, load_tokenizer(spec))


def check_teacher_settings(spec: TeacherSpec, setting: str = "teacher") -> None:
    """Everything about loading the teacher that can be refused before any weights load: a device
    this machine lacks, 8/4-bit without CUDA or bitsandbytes, a missing adapter, settings that
    exclude each other."""
    import importlib.util
    import os

    import torch

    from kdflow.models import run_device

    if spec.server.url is not None:
        _check_server_settings(spec, setting)
        return
    if spec.device_map is not None:
        if spec.device != "auto":
            raise ConfigError(f"{setting}.device={spec.device} and {setting}.device_map={spec.device_map} both say where "
                              f"the teacher goes; set one of them")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1:
            raise ConfigError(f"{setting}.device_map spreads one teacher over every GPU this process sees, and each of the "
                              f"{world} processes of this launch would load its own: build a teacher cache in one process "
                              f"(kdflow cache-teacher with {setting}.device_map), then train from it under the launcher")
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = run_device(spec, setting).type == "cuda"
    if spec.load_in != "none":
        if not on_cuda:
            where = f"{setting}.device={spec.device}" if spec.device != "auto" else "this machine has no CUDA GPU"
            raise ConfigError(f"{setting}.load_in={spec.load_in} needs a CUDA GPU (bitsandbytes), but {where}; set "
                              f"{setting}.load_in=none (a smaller dtype such as {setting}.dtype=bfloat16 also halves memory)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{setting}.load_in={spec.load_in} needs the bitsandbytes package: pip install bitsandbytes, "
                              f"or set {setting}.load_in=none")
    if spec.lora_adapter is not None and not (Path(spec.lora_adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{setting}.lora_adapter={spec.lora_adapter}: no adapter_config.json there; give a folder "
                          "saved by peft (save_pretrained of a PeftModel)")
    if spec.adapt.method != "none" and (spec.device_map is not None or spec.load_in != "none"):
        raise ConfigError(f"{setting}.adapt trains the teacher's weights on one device, which a teacher loaded with "
                          f"{setting}.device_map or {setting}.load_in does not allow here; adapt it unquantised on one "
                          f"device (or elsewhere) and point {setting}.name at the adapted folder")


def _check_server_settings(spec: TeacherSpec, setting: str) -> None:
    from urllib.parse import urlparse

    url = urlparse(spec.server.url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"{setting}.server.url={spec.server.url}: give http://host:port (the server's address, "
                          "without /v1)")
    loading = [k for k, on in (("adapt", spec.adapt.method != "none"), ("lora_adapter", spec.lora_adapter is not None),
                               ("load_in", spec.load_in != "none"), ("device_map", spec.device_map is not None)) if on]
    if loading:
        raise ConfigError(f"{setting}.{loading[0]} sets how kdflow loads the teacher's weights, but {setting}.server.url "
                          f"says the server runs it: prepare the teacher where it is served (e.g. serve the folder "
                          f"teacher.adapt wrote) and remove {setting}.{loading[0]}")


def is_served(teacher: Any) -> bool:
    """Whether a teacher handed to a method is a server client rather than local weights."""
    from kdflow.serving import TeacherClient

    return isinstance(teacher, TeacherClient)


def teacher_identity(spec: TeacherSpec) -> str:
    """What caches and manifests record of a teacher: where its weights come from and every loading
    setting that changes its numbers (dtype, quantisation, a LoRA adapter's contents). Not where it
    runs: one teacher gives the same targets on any device, up to rounding. A float32 teacher without
    adapter or quantisation is identified by its weights alone, as before these settings existed."""
    parts = [model_identity(spec)]
    dtype = dtype_name(spec, "teacher")
    if dtype != "float32":
        parts.append(f"dtype={dtype}")
    if spec.load_in != "none":
        parts.append(f"load_in={spec.load_in}")
    if spec.lora_adapter is not None:
        parts.append(f"lora={_adapter_digest(Path(spec.lora_adapter))}")
    if spec.server.url is not None:
        # a server computes in its own precision and code: its targets are not the local teacher's
        parts.append(f"served={spec.server.model or 'default'}")
    return "|".join(parts)


def _adapter_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name.startswith("adapter_"):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def _bnb_config(spec: TeacherSpec) -> Any:
    import torch
    from transformers import BitsAndBytesConfig

    if spec.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def _with_adapter(model: Any, spec: TeacherSpec) -> Any:
    """The LoRA adapter on the teacher. Merged into the weights (W + BA computed once) when they are
    plain floats: the teacher then runs as fast as without an adapter and every code path sees a plain
    model. A quantised teacher keeps it as an adapter: merging into 8/4-bit weights would round the
    update away."""
    from kdflow.models import with_adapter

    return with_adapter(model, spec.lora_adapter, merge=spec.load_in == "none")


def load_teacher(spec: TeacherSpec) -> Any:
    """The frozen teacher of `spec`, loaded as its settings say and placed (`models.place`)."""
    from kdflow.models import freeze, load_model, place, run_device

    check_teacher_settings(spec)
    loading: dict[str, Any] = {}
    device = None
    if spec.device_map is not None:
        loading["device_map"] = spec.device_map
    else:
        device = run_device(spec, "teacher")
    if spec.load_in != "none":
        loading["quantization_config"] = _bnb_config(spec)
    model = load_model(spec, device, **loading)
    if spec.lora_adapter is not None:
        model = _with_adapter(model, spec)
    return place(freeze(model), spec, "teacher", device, move=spec.device_map is None)


def _data_settings(data: DataConfig) -> dict[str, Any]:
    """The data settings that decide the tokens the teacher is trained on."""
    keys = ("prompt_field", "response_field", "messages_field", "system_prompt", "chat_template", "prompt_template",
            "max_length", "min_response_tokens")
    return {k: getattr(data, k) for k in keys}


def adapted_key(spec: TeacherSpec, rows: Rows, data: DataConfig) -> dict[str, Any]:
    adapt = {k: v for k, v in to_dict(spec.adapt).items() if k != "dir"}
    if spec.adapt.method != "lora":
        adapt.pop("lora")
    return {"teacher": teacher_identity(dataclasses.replace(spec, dtype=_adapt_dtype(spec))), "dtype": _adapt_dtype(spec),
            "rows": rows_fingerprint(rows), "data": _data_settings(data), "adapt": adapt, "format": 1}


def _adapt_dtype(spec: TeacherSpec) -> str:
    # Adaptation trains the weights: in float32 unless a dtype was chosen (teacher.adapt.bf16 adds autocast);
    # dtype auto only decides how the adapted teacher is loaded to teach.
    return "float32" if spec.dtype == "auto" else spec.dtype


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
    # the adapted folder holds the teacher with its lora_adapter merged in
    return dataclasses.replace(spec, name=str(folder), gguf_file=None, revision=None, lora_adapter=None, adapt=AdaptSpec())


def _adapt(spec: TeacherSpec, data: DataConfig, rows: Rows, folder: Path) -> None:
    """Fine-tune the teacher on `rows` with CE on the answers; save the (merged) model to `folder`."""
    import torch
    import transformers

    from kdflow.data import Collator, ListDataset, encode_rows
    from kdflow.losses import HeadLossSpec, head_losses, shifted_masks
    from kdflow.models import apply_lora, load_model, load_tokenizer, run_device, selected_hidden
    from kdflow.report import atomic_folder, write_json
    from kdflow.training import make_token_normalized_trainer_class, train_or_restore, training_arguments, last_checkpoint

    a = spec.adapt
    t0 = time.time()
    print(f"[kdflow] adapting the teacher to the task ({a.method}, {a.steps} steps, lr {a.learning_rate}) on "
          f"{len(rows)} rows; saved once to {folder}")
    transformers.set_seed(a.seed)
    tok = load_tokenizer(spec)
    model = load_model(dataclasses.replace(spec, dtype=_adapt_dtype(spec)))  # on the CPU: the Trainer places it
    if spec.lora_adapter is not None:
        model = _with_adapter(model, spec)
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

    trainer = AdaptTrainer(model=model, args=training_arguments(train, work, a.seed, has_eval=False,
                                                                 device=run_device(spec, "teacher"),
                                                                 bf16_setting="teacher.adapt.bf16"),
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
    if spec.server.url is not None:
        print("[kdflow] teacher check skipped: the teacher runs behind teacher.server, which gives log-probs, not "
              "generations to score")
        return None
    if val_rows is None or len(val_rows) == 0:
        print("[kdflow] teacher check skipped: no data.validation rows to score the teacher on")
        return None
    from kdflow.evaluate import evaluate_model, scoring_rule
    from kdflow.report import write_json

    ecfg = dataclasses.replace(eval_cfg, max_rows=c.max_rows, sample_seeds=[], exposure_bias=False, show_examples=3)
    rows = val_rows.head(c.max_rows)
    key = {"teacher": teacher_identity(spec), "rows": rows_fingerprint(rows), "data": to_dict(data),
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
