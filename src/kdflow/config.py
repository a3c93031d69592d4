"""Typed configuration: YAML files plus `key=value` overrides, validated up front.

Every section is a dataclass whose fields are the YAML keys. Unknown or misspelled keys, wrong
types and out-of-range choices stop the run with one sentence that names the key and lists what
is valid. Below the CLI nothing reads raw dicts: methods receive these objects.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdflow.errors import ConfigError


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None, range: str | None = None,
        check: Any = None) -> Any:
    """A dataclass field with a help text (shown by `kdflow <verb> --help`).

    `range` declares the valid values of a numeric setting (of each item, for a list): "> 0", ">= 1",
    "[0, 1)", or alternatives joined by " or " ("-1 or >= 1"). `validate` checks every value against
    it, NaN and infinities included, and `--help` shows it. `check(value, key)` is a further test
    that needs more than a range (e.g. a name that transformers must know); it raises ConfigError.
    """
    meta = {"help": help, "range": range, "check": check}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


_NUMBER = r"-?\d+(?:\.\d*)?(?:e-?\d+)?"
_BOUND = re.compile(rf"(>=|>|<=|<)\s*({_NUMBER})")
_INTERVAL = re.compile(rf"([\[(])\s*({_NUMBER})\s*,\s*({_NUMBER})\s*([\])])")


def in_range(value: float, spec: str) -> bool:
    """Whether `value` satisfies a range declared with `opt(range=...)`; NaN and infinities never do."""
    if not math.isfinite(value):
        return False
    for part in spec.split(" or "):
        part = part.strip()
        if m := _INTERVAL.fullmatch(part):
            lo, hi = float(m.group(2)), float(m.group(3))
            if (lo < value or (m.group(1) == "[" and value == lo)) and (value < hi or (m.group(4) == "]" and value == hi)):
                return True
        elif m := _BOUND.fullmatch(part):
            bound = float(m.group(2))
            if {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[m.group(1)]:
                return True
        elif re.fullmatch(_NUMBER, part):
            if value == float(part):
                return True
        else:
            raise ValueError(f"unreadable range {spec!r}")
    return False


def _range_text(spec: str) -> str:
    return f"lie in {spec}" if _INTERVAL.fullmatch(spec.strip()) else f"be {spec}"


def _scheduler_name(value: str, key: str) -> None:
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if value not in names:
        raise ConfigError(f"setting '{key}': unknown scheduler {value!r}{_did_you_mean(value, names)}; "
                          f"transformers knows: {', '.join(names)}")


def _answer_pattern(value: str | None, key: str) -> None:
    from kdflow.scoring import compile_pattern

    compile_pattern(value, key)


def _report_targets(value: list[str], key: str) -> None:
    """Logger names transformers knows, and installed: a typo or a missing package stops the run
    here, not after the models have loaded."""
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    names = ["none", "all", *INTEGRATION_TO_CALLBACK]
    for v in value:
        if v not in names:
            raise ConfigError(f"setting '{key}': unknown logger {v!r}{_did_you_mean(v, names)}; valid: {', '.join(names)}")
    missing = [v for v in value if v not in ("none", "all") and v not in get_available_reporting_integrations()]
    if missing:
        raise ConfigError(f"setting '{key}': {missing[0]} is not installed; install it (pip install {missing[0]}) "
                          f"or leave it out ({key}=[none] logs nowhere)")


def _hidden_layers(value: str | int, key: str) -> None:
    from kdflow.hidden import check_hidden_layers

    if isinstance(value, int):  # YAML 1.1 reads one pair such as 2:6 as a base-60 number
        raise ConfigError(f"setting '{key}': YAML read {value} as a number (a single pair such as 2:6 reads as base 60); "
                          "quote it: '2:6'")
    check_hidden_layers(value, key)


def _cache_hidden(value: str | int, key: str) -> None:
    value = str(value)
    if value not in ("none", "all") and not re.fullmatch(r"\d+(\s*,\s*\d+)*", value.strip()):
        raise ConfigError(f"setting '{key}': {value!r}; give none, all, or layer indices such as 3,6,9")


def _did_you_mean(value: str, names: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(str(value), names, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# Sections shared by every method


def _device_name(value: str, key: str) -> None:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ConfigError(f"setting '{key}': {value!r} is not a device; give auto (the process's device), cpu, cuda, "
                          "cuda:N or mps")


@dataclass
class ModelSpec:
    name: str | None = opt(None, "Hub id, local folder, path to a .gguf file, or 'bundled:smollm2-135m-instruct'")
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) when `name` is a Hub id")
    gguf_file: str | None = opt(None, "GGUF file name inside the folder or Hub repo given by `name`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "float32", "weights dtype (auto: bfloat16 on a CUDA GPU that supports it, else float32); losses are always "
                   "computed in float32")
    trust_remote_code: bool = opt(False, "allow model code shipped with a Hub repo")
    device: str = opt("auto", "where the model runs: auto (the process's device: the GPU a launcher gives this "
                              "process, else the GPU, else MPS, else the CPU), cpu, cuda, cuda:N or mps. A trained model "
                              "takes auto or cpu (choose GPUs with CUDA_VISIBLE_DEVICES or a launcher)",
                      check=_device_name)


@dataclass
class LoraSpec:
    enabled: bool = opt(False, "train a LoRA adapter (peft) instead of all weights")
    r: int = opt(8, "LoRA rank", range=">= 1")
    alpha: int = opt(16, "LoRA alpha (scale = alpha / r)", range=">= 1")
    dropout: float = opt(0.05, "LoRA dropout", range="[0, 1)")
    target_modules: list[str] = opt(factory=lambda: ["q_proj", "v_proj"], help="module names that get adapters")


@dataclass
class WidthSpec:
    """Width pruning (methods.md §12, after Minitron): every layer keeps the same sizes, so the pruned model is a
    plain model of its architecture whose config states them."""

    hidden_size: int | None = opt(None, "embedding channels kept (the residual stream, embeddings and head), ranked by "
                                        "the mean |output| of every RMSNorm over calibration tokens", range=">= 1")
    intermediate_size: int | None = opt(None, "MLP channels kept per layer, ranked by the mean |act(gate) * up| feeding "
                                              "the down projection", range=">= 1")
    num_key_value_heads: int | None = opt(None, "attention KV groups kept per layer, each whole (its key/value head and "
                                                "all its query heads), ranked by the summed norm of their heads' outputs",
                                          range=">= 1")
    num_attention_heads: int | None = opt(None, "query heads kept per layer, in whole GQA groups: a multiple of the "
                                                "KV groups kept, each group keeping its strongest heads", range=">= 1")

    def any(self) -> bool:
        return any(v is not None for v in (self.hidden_size, self.intermediate_size, self.num_key_value_heads,
                                           self.num_attention_heads))


@dataclass
class StudentSpec(ModelSpec):
    init: Literal["pretrained", "config", "prune_teacher"] = opt(
        "pretrained",
        "pretrained: load `name`; config: random weights from the teacher's (or `name`'s) config with "
        "`config_overrides`; prune_teacher: copy the teacher keeping only some transformer layers (num_layers, "
        "keep_layers, keep_every) and/or narrower widths (`width`)")
    keep_layers: list[int] | None = opt(None, "prune_teacher: indices of the teacher layers to keep, in order",
                                        range=">= 0")
    keep_every: int | None = opt(None, "prune_teacher: keep every n-th layer (0, n, 2n, ...) and always the last one",
                                 range=">= 1")
    num_layers: int | None = opt(None, "prune_teacher: keep this many layers, chosen by `layer_selection` (instead of "
                                       "keep_layers / keep_every)", range=">= 2")
    layer_selection: Literal["importance", "loss", "uniform"] = opt(
        "importance", "num_layers: importance keeps the blocks that change the hidden state most (1 - cosine between a "
                      "block's input and output on calibration rows of data.train; the first and last always); loss "
                      "keeps those whose removal alone raises the answer loss of the calibration rows most (one forward "
                      "per layer); uniform spreads them evenly")
    width: WidthSpec = opt(factory=lambda: WidthSpec(), help="prune_teacher: narrower sizes, the channels and heads kept "
                                                             "chosen by activation magnitude on calibration rows (after "
                                                             "any layer pruning)")
    calibration_rows: int = opt(128, "num_layers with importance or loss, and width pruning: rows of data.train the "
                                     "importance is measured on", range=">= 1")
    config_overrides: dict[str, Any] = opt(factory=dict, help="init=config: model config fields to change, e.g. {num_hidden_layers: 4}")
    lora: LoraSpec = opt(factory=LoraSpec, help="optional LoRA adapter on the student")


@dataclass
class AdaptSpec:
    method: Literal["none", "sft", "lora"] = opt(
        "none", "fine-tune the teacher on data.train before it teaches: sft (all weights), lora (an adapter, merged "
                "after training), none. The adapted teacher is saved once under `dir`, keyed by a hash of teacher, "
                "data and these settings, and reused by every later run")
    steps: int = opt(150, "optimizer steps of the adaptation", range=">= 1")
    learning_rate: float = opt(1e-4, "peak learning rate (lora usually wants ~1e-3, sft ~1e-4)", range="> 0")
    batch_size: int = opt(8, "rows per optimizer step", range=">= 1")
    warmup_ratio: float = opt(0.05, "fraction of steps with linear warm-up", range="[0, 1]")
    lr_scheduler: str = opt("cosine", "transformers scheduler name", check=_scheduler_name)
    weight_decay: float = opt(0.0, "AdamW weight decay", range=">= 0")
    bf16: bool = opt(False, "bf16 autocast while adapting (losses stay float32)")
    seed: int = opt(0, "seed of the adaptation (data order, LoRA init); part of the folder's key", range="[0, 4294967295]")
    lora: LoraSpec = opt(factory=lambda: LoraSpec(enabled=True, r=16, alpha=32, dropout=0.05, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), help="method=lora: the adapter")
    dir: str | None = opt(None, "where adapted teachers are kept (default $KDFLOW_CACHE/adapted_teachers)")


@dataclass
class TeacherCheckSpec:
    mode: Literal["warn", "error", "off"] = opt(
        "warn", "before training, score the teacher on data.validation with the run's scorer; warn (or stop) when it is "
                "below the thresholds: a teacher that cannot answer the task teaches the wrong thing")
    max_rows: int = opt(150, "validation rows scored", range=">= 1")
    max_answer_nll: float = opt(3.0, "threshold on the teacher's answer NLL (nats/token)", range="> 0")
    min_exact_match: float = opt(0.0, "threshold on the teacher's exact match (0 disables; set it for short-answer tasks)", range="[0, 1]")


@dataclass
class ServerSpec:
    url: str | None = opt(None, "http://host:port of an OpenAI-compatible completions server (vLLM, or `kdflow "
                                "serve-teacher`) serving teacher.name: its top-k prompt log-probs replace the local "
                                "teacher in cache-teacher, kd, hard_token and gkd (teacher.name still gives the tokenizer)")
    model: str | None = opt(None, "model name the server serves (vLLM: --served-model-name, default its --model); "
                                  "unset: sent without a name, which vLLM answers when it serves one model")
    timeout: float = opt(60.0, "seconds to wait for one answer", range="> 0")
    retries: int = opt(3, "retries of a failed or invalid answer, with exponential backoff", range=">= 0")
    backoff: float = opt(1.0, "seconds before the first retry; doubled for each further one", range=">= 0")
    concurrency: int = opt(2, "requests in flight at once", range=">= 1")
    batch_size: int = opt(8, "sequences per request", range=">= 1")


@dataclass
class TeacherSpec(ModelSpec):
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "weights dtype: auto is bfloat16 on a CUDA GPU that supports it (a frozen teacher loses nothing that "
                "matters), else float32; losses are always computed in float32")
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = opt(
        None, "spread a teacher larger than one device over the GPUs (and CPU memory), as transformers' big-model "
              "loading does; replaces `device`")
    load_in: Literal["none", "8bit", "4bit"] = opt(
        "none", "load the teacher quantised to 8 or 4 bits (bitsandbytes, CUDA only; 4bit is NF4 computing in bf16)")
    lora_adapter: str | None = opt(None, "folder of a peft LoRA adapter trained on this teacher: merged into its weights, "
                                         "or kept as an adapter on a quantised teacher")
    adapt: AdaptSpec = opt(factory=AdaptSpec, help="fine-tune the teacher on the task first (methods.md: every paper "
                                                    "adapts the teacher before distilling)")
    check: TeacherCheckSpec = opt(factory=TeacherCheckSpec, help="score the teacher on validation rows before training")
    server: ServerSpec = opt(factory=ServerSpec, help="a teacher behind an HTTP server (vLLM's completions API with "
                                                      "prompt_logprobs): no local teacher weights are loaded")


@dataclass
class TeacherEntry(TeacherSpec):
    label: str = opt("", "the teacher's label in logs, metrics and the report (default: teacher<i>, from 1)")
    weight: float = opt(1.0, "fixed weight of this teacher (multi_teacher.rule=fixed); weights are normalised to sum 1",
                        range="> 0")
    cache: str | None = opt(None, "this teacher's own cache folder: `kdflow cache-teacher` fills it, `kdflow distill` "
                                  "trains from it (teacher_cache.k and the other cache settings apply)")


@dataclass
class MultiTeacherConfig:
    rule: Literal["fixed", "min_ce", "confidence"] = opt(
        "fixed", "how the teachers of `teachers` combine, always as a weighted sum of their divergences "
                 "sum_j w_j D(p_j || q) (methods/README): fixed: w_j the entries' weights; min_ce: per sample the teacher "
                 "with the lowest answer NLL per character of the reference answer (kdflow.selection); confidence: per "
                 "token w_j = softmax_j(-entropy_j / confidence_temperature)")
    confidence_temperature: float = opt(1.0, "temperature of the confidence rule's softmax over negative entropies (nats)",
                                        range="> 0")


@dataclass
class DataConfig:
    train: str | None = opt(None, "training rows: .jsonl/.json/.csv/.parquet file, a datasets folder, or hf:<id>[#config]@<split>")
    validation: str | None = opt(None, "validation rows (same forms as `train`); used for eval during training when eval_steps > 0")
    test: str | None = opt(None, "test rows, evaluated at the end of a run")
    prompt_field: str = opt("prompt", "field holding the prompt text")
    response_field: str = opt("response", "field holding the reference answer")
    references_field: str | None = opt(None, "field holding every accepted answer (a list, or one string joined by "
                                             "references_separator), for exact match; the response is always accepted")
    references_separator: str = opt("|", "separator of accepted answers in a references_field string")
    messages_field: str = opt("messages", "field holding a chat (list of {role, content}); used when a row has it")
    system_prompt: str | None = opt(None, "system message added before the prompt when a chat template is used")
    chat_template: Literal["auto", "always", "never"] = opt("auto", "use the tokenizer's chat template (auto: when it has one)")
    prompt_template: str = opt("{prompt}\n", "without a chat template: how the prompt is written before the answer")
    max_length: int = opt(256, "maximum tokens of prompt + answer; answers are cut at the end, prompts never",
                          range=">= 2")
    min_response_tokens: int = opt(4, "a prompt that leaves fewer answer tokens than this is an error", range=">= 1")
    max_train_rows: int | None = opt(None, "use only the first N training rows", range=">= 1")
    max_eval_rows: int | None = opt(None, "use only the first N validation/test rows", range=">= 1")


@dataclass
class TrainConfig:
    learning_rate: float = opt(5e-5, "peak learning rate", range="> 0")
    num_epochs: float = opt(1.0, "passes over the training data (ignored when max_steps > 0)", range="> 0")
    max_steps: int = opt(-1, "optimizer steps; -1 uses num_epochs", range="-1 or >= 1")
    batch_size: int = opt(8, "sequences per micro-batch and process (an optimizer step takes batch_size x "
                             "grad_accum x processes)", range=">= 1")
    grad_accum: int = opt(1, "micro-batches per optimizer step", range=">= 1")
    warmup_ratio: float = opt(0.0, "fraction of steps with linear warm-up", range="[0, 1]")
    weight_decay: float = opt(0.0, "AdamW weight decay", range=">= 0")
    adam_beta1: float = opt(0.9, "AdamW beta1", range="[0, 1)")
    adam_beta2: float = opt(0.999, "AdamW beta2", range="[0, 1)")
    lr_scheduler: str = opt("linear", "transformers scheduler name: linear, cosine, constant, ...",
                            check=_scheduler_name)
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", range=">= 0")
    logging_steps: int = opt(5, "log losses every N optimizer steps", range=">= 1")
    save_steps: int = opt(50, "write a checkpoint every N optimizer steps (0: only at the end)", range=">= 0")
    save_total_limit: int = opt(2, "keep at most N checkpoints", range=">= 1")
    eval_steps: int = opt(0, "evaluate validation loss every N steps (0: never during training)", range=">= 0")
    bf16: bool = opt(False, "mixed precision bf16 for the student (losses stay float32)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    resume: str = opt("auto", "auto: continue from the newest checkpoint in output_dir; never; or a checkpoint path")
    report_to: list[str] = opt(factory=lambda: ["tensorboard"], help="transformers loggers: tensorboard, wandb, none ...",
                             check=_report_targets)
    num_threads: int = opt(0, "torch CPU threads (0: leave torch's default)", range=">= 0")


@dataclass
class EvalConfig:
    max_rows: int | None = opt(None, "evaluate on the first N test rows (null: the whole split, up to 1,000 rows)",
                               range=">= 1")
    batch_size: int = opt(16, "sequences per batch for scoring and generation", range=">= 1")
    max_new_tokens: int = opt(48, "generation length limit", range=">= 1")
    greedy: bool = opt(True, "greedy generation: Rouge-L, exact match, distinct-n")
    match: Literal["exact", "contains"] = opt(
        "exact", "exact: the normalised answer equals an accepted answer; contains: an accepted answer appears in it "
                 "as whole words")
    answer_pattern: str | None = opt(None, "regular expression that extracts the answer from a generation before "
                                           "matching (its group, or the whole match, at the last match; no match: the "
                                           "whole text), e.g. 'is \"?([\\w-]+)\"?[.]?$'", check=_answer_pattern)
    sample_seeds: list[int] = opt(factory=list, help="also sample once per seed and report mean Rouge-L, length and distinct-n",
                                  range="[0, 4294967295]")
    sample_temperature: float = opt(1.0, "sampling temperature for sampled generation (not the KD temperature)",
                                    range="> 0")
    sample_top_p: float = opt(1.0, "nucleus sampling threshold for sampled generation", range="(0, 1]")
    calibration_bins: int = opt(15, "bins of the expected calibration error of the next-token distribution on answer "
                                    "tokens", range=">= 1")
    exposure_bias: bool = opt(False, "also measure exposure bias (ExAccErr against the teacher on the model's own "
                                     "samples vs the teacher's; needs the teacher and one tokenizer)")
    bootstrap_resamples: int = opt(2000, "row-bootstrap resamples of every paired interval", range=">= 100")
    bootstrap_seed: int = opt(0, "seed of the bootstrap resampling (recorded)", range="[0, 4294967295]")
    show_examples: int = opt(3, "generated examples written into the report", range=">= 0")


# ----------------------------------------------------------------------------------------------
# Method sections


@dataclass
class KDConfig:
    divergence: Literal["fkl", "rkl", "jsd", "skl", "srkl", "tv"] = opt(
        "fkl", "fkl forward KL(p||q), rkl reverse KL(q||p), jsd generalized JSD(beta), skl skew KL, srkl skew reverse KL, tv total variation")
    kd_weight: float = opt(0.5, "weight of the KD term; the CE term gets 1 - kd_weight", range="[0, 1]")
    temperature: float = opt(2.0, "KD temperature applied to teacher and student logits; the KD term is multiplied by temperature^2",
                             range="> 0")
    jsd_beta: float = opt(0.5, "beta of the generalized JSD (mixture m = beta p + (1 - beta) q)", range="[0, 1]")
    skew_alpha: float = opt(0.1, "alpha of skew KL / skew reverse KL", range="[0, 1]")
    token_scope: Literal["response", "all"] = opt("response", "positions in the KD term: response tokens, or all non-padding tokens")
    chunk_tokens: int = opt(0, "compute CE and KD from hidden states this many tokens at a time, recomputing each chunk's "
                               "logits in backward: bounds memory to chunk x vocabulary (0: all at once, fastest)",
                               range=">= 0")
    sparse_mode: Literal["tail", "renorm"] = opt(
        "tail", "a top-k teacher (cache, cross-tokenizer): tail keeps its leftover mass as one bucket against the student's "
                "mass outside the k ids; renorm renormalises the teacher over its k ids")
    hidden_weight: float = opt(0.0, "weight of the hidden-state term (0: off), added to the loss: per mapped layer pair "
                                    "the distance between the student's (projected) and the teacher's hidden states at the "
                                    "KD positions, averaged over pairs; needs a teacher with the student's tokenizer",
                               range=">= 0")
    hidden_loss: Literal["mse", "cosine"] = opt("mse", "hidden-state distance: mse of the layer-normalised states, or "
                                                       "1 - cosine")
    hidden_layers: str | int = opt("auto", "layer pairs of the hidden-state term: auto (a student pruned from the teacher maps "
                                     "each kept block to the block it came from, any other uniformly), uniform (student "
                                     "block i to teacher block round(i L_t / L_s)), or student:teacher pairs such as "
                                     "2:6,4:12 (output_hidden_states indices: 0 the embeddings, i the output of block i)",
                             check=_hidden_layers, range=">= 0")
    hidden_embeddings: bool = opt(False, "with hidden_layers auto/uniform, also pair the embedding outputs")


@dataclass
class TeacherCacheConfig:
    dir: str | None = opt(None, "teacher cache folder: `kdflow cache-teacher` fills it, `kdflow distill` trains from it "
                                "without running the teacher")
    k: int = opt(64, "teacher tokens kept per position", range=">= 1")
    logp_dtype: Literal["float16", "bfloat16"] = opt("float16", "storage type of the cached log-probs")
    store_tail: bool = opt(True, "also store the exact log of the mass outside the top k (float32, 4 bytes per position)")
    shard_size: int = opt(512, "examples per shard file (an interrupted build resumes after the last complete shard)",
                          range=">= 1")
    batch_size: int = opt(16, "sequences per teacher forward while caching", range=">= 1")
    hidden: str | int = opt("none", "also store the teacher's hidden states at the KD positions, for kd.hidden_weight: none, "
                              "all (every block), or output_hidden_states indices such as 3,6,9 (large: 2 bytes x "
                              "hidden size x layers per position; cache-teacher prints it)", check=_cache_hidden,
                            range=">= 0")


@dataclass
class AlignConfig:
    sequence: Literal["offsets", "dtw"] = opt(
        "offsets", "how teacher and student positions are paired when their tokenizers differ: offsets pairs positions "
                   "that have read exactly the same answer text, spaces included (fast tokenizers); dtw, without "
                   "offsets, aligns the text both token sequences spell character by character (edit-distance DTW) "
                   "and pairs positions whose text read so far aligns. FedMKT's DTW over whole tokens is not used: it "
                   "pairs tokens of different contexts when one tokenizer splits a word the other keeps whole "
                   "(utiliz|e the: e with the)")
    unpaired: Literal["mask", "onehot_next"] = opt(
        "mask", "student positions with no teacher counterpart: mask leaves them out of the KD term; onehot_next "
                "gives them a one-hot target on the student's own next token")
    top_k: int = opt(64, "online teacher: its top-k tokens per position are carried into the student's vocabulary "
                         "(with a teacher cache, teacher_cache.k is used)", range=">= 1")
    vocab_map_cache: bool = opt(True, "keep the MinED vocabulary maps under $KDFLOW_CACHE/vocab_maps (built once per "
                                      "tokenizer pair)")


@dataclass
class SeqKDConfig:
    cache_file: str | None = opt(None, "where the teacher's generated answers are stored (default: <output_dir>/seqkd_generations.jsonl)")
    do_sample: bool = opt(False, "sample the teacher's answers instead of greedy decoding")
    temperature: float = opt(1.0, "sampling temperature of the teacher's generation", range="> 0")
    top_p: float = opt(1.0, "nucleus sampling threshold of the teacher's generation", range="(0, 1]")
    max_new_tokens: int = opt(64, "maximum answer length generated by the teacher", range=">= 1")
    batch_size: int = opt(16, "prompts per generation batch", range=">= 1")
    seed: int = opt(0, "sampling seed", range="[0, 4294967295]")


@dataclass
class GKDConfig:
    lmbda: float = opt(0.5, "probability that a batch's answers are sampled from the student now (on-policy); "
                            "otherwise the dataset's answers (or, with seq_kd, the teacher's) are used", range="[0, 1]")
    seq_kd: bool = opt(False, "off-policy batches take answers the teacher samples now instead of the dataset's "
                              "(the GKD paper's third source)")
    temperature: float = opt(1.0, "sampling temperature of the generated answers (the KD term's is kd.temperature)",
                             range="> 0")
    top_p: float = opt(1.0, "nucleus sampling threshold of the generated answers", range="(0, 1]")
    max_new_tokens: int = opt(32, "longest generated answer; one cut there has no end (no EOS target)", range=">= 1")


@dataclass
class QuantSpec:
    """Weight-only quantization through torchao (methods.md §12): the scheme of `kdflow export` and of
    quantization-aware training. What stays unquantized (norms) is bfloat16, as are the activations."""

    scheme: Literal["none", "int8", "int4"] = opt(
        "none", "int8: every linear layer of the blocks int8 per output row; int4: int4 in groups of `group_size` input "
                "channels (symmetric); none: keep the weights as they are")
    group_size: int = opt(32, "int4: input channels sharing one scale (must divide every linear layer's input width)",
                          range="32 or 64 or 128 or 256")
    embeddings: Literal["int8", "keep"] = opt(
        "int8", "the input embeddings and the output head (tied or not): int8 per row (a vocabulary row shares one "
                "scale), or kept in the model's precision")


@dataclass
class TrainQuantSpec(QuantSpec):
    qat: bool = opt(False, "quantization-aware training: the student's block linear layers see their weights "
                           "fake-quantized with `scheme` in every forward (straight-through gradients), so training "
                           "adapts them to the quantization; the run then saves the quantized student")


@dataclass
class DistillConfig:
    method: Literal["sft", "kd", "hard_token", "seqkd", "gkd"] = opt(
        "kd", "sft: cross-entropy only; kd: soft-label KD; hard_token: CE on the teacher's argmax; seqkd: train on the "
              "teacher's generated answers; gkd: on-policy KD, the divergence of kd.divergence on answers the student "
              "samples (gkd.lmbda of the batches)")
    output_dir: str = opt("runs/distill", "run folder: checkpoints, resolved config, metrics, report")
    seed: int = opt(0, "random seed", range="[0, 4294967295]")
    teacher: TeacherSpec = opt(factory=lambda: TeacherSpec(name="bundled:smollm2-135m-instruct"), help="the frozen teacher")
    teachers: list[TeacherEntry] = opt(factory=list, help="several teachers for method kd (each with its own model, "
                                                        "tokenizer, adapter, adapt, cache and weight): KD targets come "
                                                        "from these, combined by multi_teacher.rule; `teacher` then only "
                                                        "names the model a pruned student starts from")
    multi_teacher: MultiTeacherConfig = opt(factory=MultiTeacherConfig, help="how several `teachers` combine")
    student: StudentSpec = opt(factory=StudentSpec, help="the model being trained")
    data: DataConfig = opt(factory=DataConfig, help="rows and how they become tokens")
    kd: KDConfig = opt(factory=KDConfig, help="soft- and hard-label KD settings")
    seqkd: SeqKDConfig = opt(factory=SeqKDConfig, help="sequence-level KD: teacher generation settings")
    gkd: GKDConfig = opt(factory=GKDConfig, help="on-policy distillation (method gkd): where each batch's answers come "
                                                 "from and how they are sampled")
    teacher_cache: TeacherCacheConfig = opt(factory=TeacherCacheConfig, help="offline teacher: top-k log-probs computed once")
    align: AlignConfig = opt(factory=AlignConfig, help="cross-tokenizer KD (teacher and student tokenizers differ): "
                                                      "position pairing and vocabulary mapping")
    train: TrainConfig = opt(factory=TrainConfig, help="optimisation (transformers.Trainer)")
    eval: EvalConfig = opt(factory=EvalConfig, help="final evaluation on the test split")
    evaluate_teacher: bool = opt(True, "evaluate the teacher at the end too")
    evaluate_before: bool = opt(True, "evaluate the student before training")
    quantize: TrainQuantSpec = opt(factory=TrainQuantSpec, help="scheme != none: also save the trained student "
                                   "quantized (student_<scheme>/, as `kdflow export` writes it) and score that one as the "
                                   "student after training; qat: train it quantization-aware")


@dataclass
class MiniLLMSettings:
    """MiniLLM (methods.md §5): rollouts, the loss and its optimisation."""

    mix_alpha: float = opt(0.2, "teacher share of the sampling mixture: tokens are drawn from mix_alpha p + (1 - mix_alpha) q",
                           range="[0, 1]")
    sample_temperature: float = opt(1.0, "temperature of the rollout sampling only (not of any loss); the importance "
                                         "weights correct towards the untempered student", range="> 0")
    max_new_tokens: int = opt(48, "longest sampled response (tokens, EOS included)", range=">= 1")
    rollout_batch_size: int = opt(16, "prompts sampled per rollout by each process; each rollout is trained on for "
                                      "inner_epochs passes", range=">= 1")
    batch_size: int = opt(8, "rollout sequences per optimizer step and process (must divide rollout_batch_size)",
                          range=">= 1")
    micro_batch_size: int = opt(0, "sequences per forward/backward inside one optimizer step (0: batch_size); "
                                   "losses are normalised by the whole step's token count", range=">= 0")
    inner_epochs: int = opt(2, "passes over each rollout batch (PPO-style inner epochs)", range=">= 1")
    clip_ratio: float = opt(0.2, "PPO clipping of the ratio q_theta / q_rollout to [1 - clip_ratio, 1 + clip_ratio]",
                            range="> 0")
    single_step_weight: float = opt(1.0, "weight of the single-step term: the exact token-level reverse KL at each sampled prefix",
                                    range=">= 0")
    pg_weight: float = opt(1.0, "weight of the long-term policy-gradient term (length-normalised returns of the later tokens)",
                           range=">= 0")
    single_step_importance: bool = opt(True, "weight the single-step term by the importance weight q/p~ like the "
                                             "paper's Eq. 6 (false: unweighted, like the authors' code)")
    lm_coef: float = opt(0.0, "coefficient of the optional language-modelling loss on lm_data (0: off)", range=">= 0")
    lm_data: str | None = opt(None, "rows for the language-modelling loss: a `text` field (plain text, every token) "
                                    "or prompt/response rows (answer tokens); same file forms as data.train")
    lm_text_field: str = opt("text", "field of lm_data rows holding plain text")
    lm_batch_size: int = opt(8, "lm_data rows per optimizer step and process", range=">= 1")
    learning_rate: float = opt(5e-6, "peak learning rate (AdamW)", range="> 0")
    max_steps: int = opt(100, "optimizer steps; a rollout is drawn whenever the previous one is used up", range=">= 1")
    warmup_ratio: float = opt(0.0, "fraction of steps with linear warm-up", range="[0, 1]")
    lr_scheduler: str = opt("constant", "transformers scheduler name: constant, linear, cosine, ...",
                            check=_scheduler_name)
    weight_decay: float = opt(0.0, "AdamW weight decay", range=">= 0")
    adam_beta1: float = opt(0.9, "AdamW beta1", range="[0, 1)")
    adam_beta2: float = opt(0.999, "AdamW beta2", range="[0, 1)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 disables)", range=">= 0")
    bf16: bool = opt(False, "autocast student and teacher forwards to bf16 (rollouts and training); losses stay float32")
    logging_steps: int = opt(1, "log losses and rollout statistics every N optimizer steps", range=">= 1")
    save_steps: int = opt(20, "checkpoint at the first rollout boundary at or after every N optimizer steps (0: only at the end)",
                          range=">= 0")
    save_total_limit: int = opt(2, "keep at most N checkpoints", range=">= 1")
    resume: str = opt("auto", "auto: continue from the newest checkpoint in output_dir; never; or a checkpoint path")
    num_threads: int = opt(0, "torch CPU threads (0: leave torch's default)", range=">= 0")


@dataclass
class MiniLLMConfig:
    output_dir: str = opt("runs/minillm", "run folder: checkpoints, resolved config, metrics, report")
    seed: int = opt(0, "random seed (data order, rollouts, minibatches)", range="[0, 4294967295]")
    teacher: TeacherSpec = opt(factory=lambda: TeacherSpec(name="bundled:smollm2-135m-instruct"), help="the frozen teacher p")
    student: StudentSpec = opt(factory=StudentSpec, help="the student q; start it from an SFT checkpoint (init: pretrained, "
                                                          "name: runs/<sft run>/student)")
    data: DataConfig = opt(factory=DataConfig, help="prompts for rollouts come from data.train; data.test is evaluated")
    minillm: MiniLLMSettings = opt(factory=MiniLLMSettings, help="rollouts, loss and optimisation")
    eval: EvalConfig = opt(factory=EvalConfig, help="final evaluation on the test split (set sample_seeds: MiniLLM's "
                                                    "claims are about sampled generations)")
    evaluate_teacher: bool = opt(True, "evaluate the teacher at the end too")
    evaluate_before: bool = opt(True, "evaluate the student before training")


@dataclass
class PeerSpec:
    name: str = opt("", "the peer's label: names its folder (peers/<name>/), curves and table rows")
    model: StudentSpec = opt(factory=StudentSpec, help="how the peer is built: pretrained `name`, init=config, or "
                                                        "init=prune_teacher from `base` (keep_layers / keep_every); lora")
    base: ModelSpec | None = opt(None, "model that init=prune_teacher / init=config start from (null: the run's `base`)")
    learning_rate: float | None = opt(None, "this peer's peak learning rate (null: train.learning_rate)", range="> 0")
    weight_decay: float | None = opt(None, "this peer's AdamW weight decay (null: train.weight_decay)", range=">= 0")
    seed: int | None = opt(None, "seed of this peer's random weights (init=config) and LoRA init (null: run seed + position)",
                           range="[0, 4294967295]")


@dataclass
class CoDistillKDConfig(KDConfig):
    variant: Literal["soft", "hard"] = opt(
        "soft", "soft: tau^2 * D(sg(p_j)_tau || p_i_tau) with kd.divergence; hard: CE against peer j's argmax token")


@dataclass
class CoDistillConfig:
    output_dir: str = opt("runs/codistill", "run folder: peers/<name>/checkpoint-N, resolved config, metrics, report")
    seed: int = opt(0, "random seed (data order, and the peers' seeds unless they set their own)",
                    range="[0, 4294967295]")
    base: ModelSpec = opt(factory=lambda: ModelSpec(name="bundled:smollm2-135m-instruct"),
                          help="default model that peers with init=prune_teacher or init=config derive from")
    peers: list[PeerSpec] = opt(factory=list, help="the N >= 2 models trained together, each with its own settings")
    data: DataConfig = opt(factory=DataConfig, help="rows and how they become tokens (each peer uses its own tokenizer)")
    kd: CoDistillKDConfig = opt(factory=CoDistillKDConfig, help="mutual distillation: model i gets kd_weight * mean over "
                                                                "peers j != i of the KD term + (1 - kd_weight) * CE")
    train: TrainConfig = opt(factory=TrainConfig, help="optimisation, shared by all peers (learning rate per peer)")
    align: AlignConfig = opt(factory=AlignConfig, help="peers with different tokenizers: how a peer's distribution is "
                                                       "carried to another's positions and vocabulary (kdflow.align)")
    eval: EvalConfig = opt(factory=EvalConfig, help="final evaluation of every peer on the test split")
    evaluate_before: bool = opt(True, "evaluate every peer before training too")
    baseline_alone: bool = opt(False, "also train each peer alone (CE only) for the same steps, batches and seeds, "
                                      "and add it to the table")


@dataclass
class VariantSpec:
    name: str = opt("", "the variant's label: names its folder (<output_dir>/<name>/seed-<s>/) and its leaderboard row")
    method: Literal["sft", "kd", "hard_token", "seqkd", "gkd", "minillm"] = opt(
        "kd", "sft, kd, hard_token, seqkd, gkd (kdflow distill), or minillm (kdflow minillm, starting from the same seed's "
              "`baseline` variant's student, which must be an sft variant)")
    overrides: list[str] = opt(factory=list, help="key=value settings on top of the shared ones, e.g. "
                                                 "['kd.divergence=rkl', 'kd.kd_weight=1.0']")
    start: Literal["student", "baseline"] = opt(
        "student", "student: the variant's student is made by the shared `student` section (as the baseline's is); "
                   "baseline: it continues from the same seed's `baseline` student (which must be an sft variant), "
                   "for SFT-then-distill recipes such as the GKD paper's. Its steps (train.max_steps, overridable) come "
                   "on top of the baseline's, so compare it with an sft variant that also starts from the baseline. "
                   "minillm variants always start from the baseline")


@dataclass
class CompareConfig(DistillConfig):
    output_dir: str = opt("runs/compare", "comparison folder: one run folder per variant and seed, the shared teacher "
                                          "cache and seqkd answers, leaderboard.md/.json/.png")
    variants: list[VariantSpec] = opt(factory=list, help="the methods compared; every other setting of this file is "
                                                        "shared by all of them (`method` is set by each variant)")
    seeds: list[int] = opt(factory=lambda: [0], help="training seeds; every variant runs once per seed", range="[0, 4294967295]")
    baseline: str = opt("sft", "the variant every other one is compared with (paired intervals of the difference)")
    share_teacher_cache: bool = opt(True, "kd and hard_token variants train from one teacher cache (top-k log-probs, "
                                          "teacher_cache.k) built once per temperature, instead of running the teacher online")
    minillm: MiniLLMSettings = opt(factory=MiniLLMSettings, help="settings of minillm variants")
    metrics: list[str] = opt(factory=lambda: ["exact_match", "answer_nll", "rougeL", "ece"],
                             help="leaderboard columns (the first two are plotted): exact_match, answer_nll, rougeL, "
                                  "ece, sampled_rougeL, exaccerr, answer_tokens, distinct_2")


@dataclass
class ServeSection:
    host: str = opt("127.0.0.1", "address to listen on (loopback unless serve.allow_remote)")
    port: int = opt(8000, "port to listen on (0: any free port, printed)", range="[0, 65535]")
    allow_remote: bool = opt(False, "allow a non-loopback serve.host (the server has no authentication)")
    model_name: str | None = opt(None, "name clients send as `model` (default: teacher.name)")
    max_logprobs: int = opt(64, "largest prompt_logprobs (k) a request may ask for", range=">= 1")
    max_prompts: int = opt(64, "most sequences in one request", range=">= 1")
    max_tokens: int = opt(4096, "longest sequence in a request", range=">= 1")
    idle_timeout: float = opt(0.0, "stop after this many seconds without a request (0: never)", range=">= 0")
    max_requests: int = opt(0, "stop after this many requests (0: never)", range=">= 0")


@dataclass
class ServeConfig:
    teacher: TeacherSpec = opt(factory=lambda: TeacherSpec(name="bundled:smollm2-135m-instruct"), help="the teacher served")
    data: DataConfig = opt(factory=DataConfig, help="only for teacher.adapt (the rows the teacher is adapted on)")
    serve: ServeSection = opt(factory=ServeSection, help="where and how much to serve")


@dataclass
class EvalRunConfig:
    model: ModelSpec = opt(factory=ModelSpec, help="model to evaluate (a run's student folder, Hub id, .gguf, bundled:...)")
    lora_adapter: str | None = opt(None, "folder of a peft adapter to put on the model")
    data: DataConfig = opt(factory=DataConfig, help="the `test` rows are evaluated")
    eval: EvalConfig = opt(factory=EvalConfig, help="what to measure")
    output: str | None = opt(None, "write metrics JSON here (default: print only)")
    seed: int = opt(0, "random seed", range="[0, 4294967295]")


@dataclass
class ExportConfig:
    model: ModelSpec = opt(factory=ModelSpec, help="the model to quantize (a run's student folder, a local folder or Hub id)")
    output: str = opt("", "folder to write: a model folder that AutoModelForCausalLM.from_pretrained loads (torchao "
                          "installed), with its tokenizer and kdflow_export.json (scheme, sizes)")
    quantize: QuantSpec = opt(factory=lambda: QuantSpec(scheme="int8"), help="the quantization scheme")


@dataclass
class PartyConfig:
    name: str = opt("", "party name used in reports, checkpoints and payload errors")
    model: StudentSpec = opt(factory=lambda: StudentSpec(lora=LoraSpec(enabled=True)),
                             help="the party's model; its base weights stay frozen and a LoRA adapter is trained")
    prune_from: str | None = opt(None, "model.init=prune_teacher or config: the model (a name as in model.name) to take "
                                       "layers or the config from")
    learning_rate: float = opt(3e-4, "this party's learning rate", range="> 0")
    adapt: AdaptSpec = opt(factory=AdaptSpec, help="server only: fine-tune the server's base model on the public set "
                                                   "before the rounds (as teacher.adapt; private rows never reach it). "
                                                   "The adapted copy is saved once under $KDFLOW_CACHE and reused")


@dataclass
class FedDataConfig(DataConfig):
    public_rows: int = opt(256, "rows of data.train that form the public set, shared by every party in the same order",
                           range=">= 1")
    private_rows: int | None = opt(256, "private rows per client (null: split all remaining rows)", range=">= 1")
    partition: Literal["equal", "dirichlet"] = opt("equal", "equal parts, or skewed per value of partition_field")
    partition_field: str | None = opt("pos", "row field whose values are skewed across clients (dirichlet)")
    dirichlet_alpha: float = opt(0.5, "Dirichlet concentration: small values give each client a skewed mix",
                                 range="> 0")


@dataclass
class FedMKTSection:
    rounds: int = opt(3, "communication rounds", range=">= 1")
    top_k: int = opt(64, "top-k log-probs exchanged per position (the paper uses 128)", range=">= 1")
    temperature: float = opt(1.0, "temperature of the exchanged distributions and of the KD term", range="> 0")
    ce_weight: float = opt(0.9, "lambda: weight of the CE on public labels; the KD term gets 1 - lambda",
                           range="[0, 1]")
    divergence: Literal["fkl", "rkl", "jsd", "skl", "srkl", "tv"] = opt("fkl", "KD divergence D(sender || receiver)")
    sparse_mode: Literal["tail", "renorm"] = opt("tail", "how a top-k distribution is compared (see kd.sparse_mode)")
    selection: Literal["dualmince", "reference", "none", "weighted"] = opt(
        "dualmince", "dualmince: the lowest-CE sender, only where it beats the receiver (others leave the KD term); "
                     "reference: as dualmince but others distil towards the receiver's own earlier distribution; "
                     "none: always the lowest-CE sender; weighted: senders mixed by softmax(-CE), KD weighted by the "
                     "chance the mix beats the receiver")
    private_epochs: int = opt(1, "client epochs on its private data per round", range=">= 0")
    public_epochs: int = opt(1, "client epochs on the public set with the server's knowledge per round", range=">= 0")
    server_epochs: int = opt(1, "server epochs on the public set per round", range=">= 0")
    fedavg: bool = opt(False, "homogeneous clients: average client adapters (FedAvg) after each round")
    reset_optimizer: bool = opt(False, "start every phase with a fresh optimizer, as the reference code does")
    eval_every: int = opt(1, "evaluate every party on the test split every N rounds (and after the last)", range=">= 1")
    wire_logprobs: Literal["float16", "uint8"] = opt(
        "float16", "how top-k log-probs travel between parties: float16, or uint8 codes with a per-position offset and "
                   "scale (k=128: 396 instead of 516 bytes per position; error at most half a level, see payload.quantize)")
    save_merged: bool = opt(False, "also write each party's final model with its LoRA merged (final/<name>/merged/, a "
                                   "plain model folder) beside the adapter (final/<name>/adapter/)")


@dataclass
class FlowerSection:
    superlink: str | None = opt(None, "`kdflow fedmkt-flower`: address host:port of a running SuperLink to submit the run to "
                                      "(deployment: one `flower-supernode` per client); null runs a local simulation")
    insecure: bool = opt(False, "deployment: talk to the SuperLink without TLS (loopback or a trusted network only)")
    root_certificates: str | None = opt(None, "deployment: PEM file of the CA that signed the SuperLink's certificate")
    min_clients: int = opt(1, "a phase goes on when at least this many clients replied in time; fewer stop the run",
                           range=">= 1")
    reply_timeout: float = opt(900.0, "seconds the server waits for the clients' replies in each phase; a client that "
                                      "fails or has not replied by then is left out of the round", range="> 0")
    connect_timeout: float = opt(120.0, "seconds the server waits before round 1 for every client's SuperNode to connect",
                                 range="> 0")
    chunk_bytes: int = opt(64 * 2**20, "payload arrays larger than this are sent as several arrays, split along the "
                                       "position axis", range=">= 1")
    max_payload_bytes: int = opt(2**31 - 1, "a received payload declaring more bytes than this is rejected unread",
                                 range=">= 1")
    state_dir: str | None = opt(None, "where each client keeps its adapter, optimizer and last outputs between messages "
                                      "(default <output_dir>/flower-clients/<client name>); node config `state-dir` overrides it")
    client_cpus: int = opt(1, "simulation: CPU cores reserved per simulated client (clients run in parallel up to the "
                              "machine's cores)", range=">= 1")


@dataclass
class FedMKTConfig:
    output_dir: str = opt("runs/fedmkt", "run folder: per-round checkpoints, metrics, report")
    seed: int = opt(0, "random seed (partitions, shuffling, LoRA init)", range="[0, 4294967295]")
    server: PartyConfig = opt(factory=lambda: PartyConfig(
        name="server", model=StudentSpec(name="bundled:smollm2-135m-instruct", lora=LoraSpec(enabled=True))),
        help="the server LLM")
    clients: list[PartyConfig] = opt(factory=list, help="the client small models (one: the one-to-one setting)")
    data: FedDataConfig = opt(factory=FedDataConfig, help="data.train is split into the public set and private parts")
    fedmkt: FedMKTSection = opt(factory=FedMKTSection, help="the FedMKT round")
    train: TrainConfig = opt(factory=lambda: TrainConfig(weight_decay=0.1, adam_beta2=0.95, report_to=["none"]),
                             help="optimisation shared by every party (learning rates are per party)")
    eval: EvalConfig = opt(factory=EvalConfig, help="per-round evaluation on data.test")
    align: AlignConfig = opt(factory=AlignConfig, help="how distributions cross between parties with different tokenizers "
                                                       "(top_k is fedmkt.top_k here)")
    flower: FlowerSection = opt(factory=FlowerSection, help="`kdflow fedmkt-flower`: the same rounds over Flower")
    baselines: list[Literal["zero_shot", "standalone", "public_only", "centralized", "private_public", "llm2slm", "fedavg"]] = opt(
        factory=lambda: ["zero_shot", "standalone", "public_only", "centralized"],
        help="comparisons run from the same config: zero_shot, standalone (clients on private data), public_only "
             "(server on the public set), centralized (server on all data), private_public (clients on private + "
             "public), llm2slm (server frozen, one-way), fedavg (homogeneous clients, adapters averaged)")


# ----------------------------------------------------------------------------------------------
# Loading, validation, overrides


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:  # Optional[X]: report X's own, more precise error
            return _coerce(value, arms[0], key)
        for arg in arms:
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"setting '{key}': {value!r} is not {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"setting '{key}': expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"setting '{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"setting '{key}': expected a list ({_type_name(tp)}), got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"setting '{key}': expected a mapping, got {value!r}")
        return dict(value)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"setting '{key}': expected a mapping of {tp.__name__} keys, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"setting '{key}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"setting '{key}': expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"setting '{key}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"setting '{key}': expected a string, got {value!r}")
    raise ConfigError(f"setting '{key}': unsupported type {tp}")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "", base: Any = None) -> Any:
    """Build dataclass `cls` from a mapping, on top of `base` (default: cls()).

    A section given partially keeps the defaults of the keys it does not name (so
    `teacher: {dtype: bfloat16}` keeps the default teacher). Unknown keys are errors that list
    the valid ones.
    """
    base = cls() if base is None else base
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"setting '{prefix.rstrip('.') or 'config'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        where = f" under '{prefix.rstrip('.')}'" if prefix else ""
        import difflib

        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown setting '{prefix}{unknown[0]}'{hint}; valid keys{where}: {', '.join(names)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if _is_dataclass_type(tp) and isinstance(v, dict):
            kwargs[k] = from_dict(tp, v, prefix=f"{prefix}{k}.", base=getattr(base, k))
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return dataclasses.replace(base, **kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not key=value (for example train.max_steps=10)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({e.problem})") from None
    return key.strip().split("."), value


_INDEXED = re.compile(r"(\w+)\[(\d+)\]")


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set tree[a][b]... = value; a part `name[i]` steps into item i of an existing list."""
    node = tree
    for n, part in enumerate(path):
        last = n == len(path) - 1
        m = _INDEXED.fullmatch(part)
        if m:
            items = node.get(m.group(1))
            i = int(m.group(2))
            where = ".".join(path[:n + 1])
            if not isinstance(items, list) or i >= len(items):
                size = len(items) if isinstance(items, list) else 0
                raise ConfigError(f"override '{where}': '{m.group(1)}' has {size} items here; "
                                  f"give the whole list ({m.group(1)}=[...]) or index an existing item")
            if last:
                items[i] = value
                return
            if not isinstance(items[i], dict):
                items[i] = {}
            node = items[i]
            continue
        if last:
            node[part] = value
            return
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt


def load_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Any:
    """Read YAML `path` (optional), apply `key=value` overrides, validate into `cls`."""
    text = ""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        data = p.read_bytes()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise ConfigError(f"config file {p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8") from None
    return load_config_text(cls, text, overrides, where=f"config file {path}")


def load_config_text(cls: type, text: str, overrides: list[str] | None = None, where: str = "config") -> Any:
    """As `load_config`, from YAML text (e.g. a config carried inside a Flower run config)."""
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of settings")
    for ov in overrides or []:
        keys, value = parse_override(ov)
        _set_path(tree, keys, value)
    cfg = from_dict(cls, tree)
    validate(cfg)
    return cfg


def validate(cfg: Any) -> None:
    """Check every setting against what its field declares: the range of a number (NaN and
    infinities are never in range), and any further `check`."""
    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            key = prefix + f.name
            if dataclasses.is_dataclass(v):
                walk(v, key + ".")
                continue
            if isinstance(v, list) and v and dataclasses.is_dataclass(v[0]):
                for i, item in enumerate(v):
                    walk(item, f"{key}[{i}].")
                continue
            spec = f.metadata.get("range")
            if spec is not None and v is not None and not isinstance(v, str):  # (the text arm of `str | int`)
                for i, x in enumerate(v) if isinstance(v, list) else [(None, v)]:
                    if not in_range(x, spec):
                        where = key if i is None else f"{key}[{i}]"
                        got = f"{x}" if math.isfinite(x) else f"{x}, which is not a finite number"
                        raise ConfigError(f"setting '{where}' must {_range_text(spec)}, got {got}")
            if f.metadata.get("check") is not None and v is not None:
                f.metadata["check"](v, key)
    walk(cfg, "")
    _check_jsd_endpoints(cfg)
    _check_kd_is_finite(cfg)


def _check_jsd_endpoints(cfg: Any) -> None:
    """The generalized JSD is 0 for every pair of distributions at beta = 0 and 1: a KD term that trains
    nothing. GKD's paper and TRL call beta = 0 / 1 forward / reverse KL (they special-case both), so a
    user coming from them means fkl / rkl (methods.md §1, §9); say so rather than jump silently."""
    if not (isinstance(cfg, DistillConfig) and cfg.method in ("kd", "gkd") and cfg.kd.kd_weight > 0
            and cfg.kd.divergence == "jsd"):
        return
    beta = cfg.kd.jsd_beta
    if beta in (0.0, 1.0):
        other = "fkl" if beta == 0.0 else "rkl"
        raise ConfigError(f"kd.divergence=jsd with kd.jsd_beta={beta:g} is zero for any teacher and student (the JSD "
                          f"vanishes at both ends); the beta = {beta:g} of the GKD paper and TRL is "
                          f"kd.divergence={other} here, or give 0 < kd.jsd_beta < 1")


def _check_kd_is_finite(cfg: Any) -> None:
    """Refuse, before anything loads, a KD divergence that is infinite against the targets the run would
    build (losses.check_sparse_divergence). Checked whenever the KD term runs, even if the teacher turns
    out to share the student's tokenizer: those settings only act on top-k and cross-tokenizer targets."""
    from kdflow.losses import check_sparse_divergence

    if isinstance(cfg, DistillConfig) and cfg.method in ("kd", "gkd") and cfg.kd.kd_weight > 0:
        args = (cfg.kd.divergence, cfg.kd.sparse_mode, cfg.align.unpaired, cfg.kd.skew_alpha)
        keys = ("kd.divergence", "kd.sparse_mode", "align.unpaired", "kd.skew_alpha")
    elif isinstance(cfg, CoDistillConfig) and cfg.kd.variant == "soft" and cfg.kd.kd_weight > 0:
        args = (cfg.kd.divergence, cfg.kd.sparse_mode, cfg.align.unpaired, cfg.kd.skew_alpha)
        keys = ("kd.divergence", "kd.sparse_mode", "align.unpaired", "kd.skew_alpha")
    elif isinstance(cfg, FedMKTConfig) and cfg.fedmkt.ce_weight < 1:
        # FedMKT's KD term always compares top-k payloads, with the default skew alpha
        args = (cfg.fedmkt.divergence, cfg.fedmkt.sparse_mode, cfg.align.unpaired, 0.1)
        keys = ("fedmkt.divergence", "fedmkt.sparse_mode", "align.unpaired", "skew alpha")
    else:
        return
    try:
        check_sparse_divergence(*args, keys=keys)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf setting, for --help."""
    rows = []
    hints = typing.get_type_hints(cls)
    inst = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        value = getattr(inst, f.name)
        if _is_dataclass_type(tp):
            rows.append((prefix + f.name, "section", "", f.metadata.get("help", "")))
            rows.extend(describe(tp, prefix + f.name + ".", value))
        elif typing.get_origin(tp) is list and _is_dataclass_type(typing.get_args(tp)[0]):
            # a list of sections (e.g. peers): document the keys of one item
            rows.append((prefix + f.name, "section", "", f.metadata.get("help", "") + " (a list; keys of each item below)"))
            rows.extend(describe(typing.get_args(tp)[0], prefix + f.name + "[i].", None))
        else:
            spec = f.metadata.get("range")
            shown = _type_name(tp) + ("" if not spec else f" in {spec}" if _INTERVAL.fullmatch(spec) else f" {spec}")
            rows.append((prefix + f.name, shown, repr(value), f.metadata.get("help", "")))
    return rows
