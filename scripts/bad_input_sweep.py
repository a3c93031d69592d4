"""Run the real `kdflow` CLI over bad inputs and faults; write the table to docs/reliability.md.

Every case is a bad config, data file, model folder, cache, checkpoint or disk fault that kdflow
must refuse with one clear line (exit 2, `kdflow: error: ...`, no traceback). Each runs as
`python -m kdflow <verb> ...` in a fresh process, on tiny models and data made here in a temporary
folder, and is classified as

    clear       exit 2, one `kdflow: error:` line, no traceback
    traceback   a traceback, another exit code, or an error that is not one line
    silent      exit 0: the bad input was accepted

    python scripts/bad_input_sweep.py                 # all cases, writes docs/reliability.md (~10 min)
    python scripts/bad_input_sweep.py -k cache,eval -v  # cases whose name contains "cache" or "eval", no doc

Adding a case: append a `Case` to CASES. `args` are formatted with the workspace's paths
({teacher}, {student}, {train}, {out}, {tmp}, ... see `Workspace.paths`); `setup(ws, case_dir)`
makes what the case needs inside its own folder (`{case}`); `fault` names a fault injected in the
child process (see FAULTS) without any hook in kdflow itself.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


# ----------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    verb: str
    args: list[str]
    what: str  # the bad input, in words, for the table
    setup: Callable[["Workspace", Path], None] | None = None
    fault: str | None = None
    cleanup: Callable[["Workspace", Path], None] | None = None


@dataclass
class Outcome:
    case: Case
    kind: str  # clear | traceback | silent
    message: str
    seconds: float


def classify(returncode: int, stderr: str) -> tuple[str, str]:
    """(kind, message) of one finished command that should have refused its input."""
    lines = [line for line in stderr.splitlines() if line.startswith("kdflow: error: ")]
    if returncode == 0:
        return "silent", "(exit 0)"
    if "Traceback (most recent call last)" in stderr or returncode != 2 or len(lines) != 1:
        tail = [line for line in stderr.strip().splitlines() if line.strip()]
        return "traceback", (tail[-1] if tail else f"exit {returncode}")[:300]
    return "clear", lines[0][len("kdflow: error: "):]


# --- setups ---------------------------------------------------------------------------------------


def write(name: str, content: str | bytes) -> Callable[["Workspace", Path], None]:
    def setup(ws: "Workspace", case: Path) -> None:
        path = case / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return setup


def rows(name: str, items: list[Any]) -> Callable[["Workspace", Path], None]:
    return write(name, "".join(json.dumps(r) + "\n" for r in items))


def model_copy(change: Callable[[Path], None]) -> Callable[["Workspace", Path], None]:
    """The tiny student copied to {case}/model, then damaged by `change(folder)`."""
    def setup(ws: "Workspace", case: Path) -> None:
        shutil.copytree(ws.student, case / "model")
        change(case / "model")
    return setup


def truncate(path_in: str, keep: float = 0.5) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        p = folder / path_in
        p.write_bytes(p.read_bytes()[: int(p.stat().st_size * keep)])
    return change


def garbage(path_in: str, content: bytes = b"\x00garbage{") -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        (folder / path_in).write_bytes(content)
    return change


def run_copy(source: str, change: Callable[[Path], None] | None = None) -> Callable[["Workspace", Path], None]:
    """A finished run folder (ws.<source>) copied to {case}/run, then damaged by `change(run)`."""
    def setup(ws: "Workspace", case: Path) -> None:
        shutil.copytree(getattr(ws, source), case / "run")
        if change is not None:
            change(case / "run")
    return setup


def cache_copy(change: Callable[[Path], None]) -> Callable[["Workspace", Path], None]:
    def setup(ws: "Workspace", case: Path) -> None:
        shutil.copytree(ws.cache, case / "cache")
        change(case / "cache")
    return setup


def flip_last_bytes(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        p = folder / name
        data = bytearray(p.read_bytes())
        data[-4:] = bytes(b ^ 0xFF for b in data[-4:])
        p.write_bytes(bytes(data))
    return change


def edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        edit(m)
        (folder / "manifest.json").write_text(json.dumps(m))
    return change


def nan_in_shard(folder: Path) -> None:
    """A shard whose log-probs hold NaN, with a manifest that matches it (as a buggy writer would leave)."""
    from safetensors.torch import load_file, save_file

    m = json.loads((folder / "manifest.json").read_text())
    path = folder / m["shards"][0]["file"]
    t = load_file(str(path))
    t["logp"] = t["logp"].clone()
    t["logp"].view(-1)[0] = float("nan")
    save_file({k: v.contiguous() for k, v in t.items()}, str(path))
    m["shards"][0].update(sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size)
    (folder / "manifest.json").write_text(json.dumps(m))


def newest(pattern: str, change: Callable[[Path], None]) -> Callable[[Path], None]:
    """Apply `change` to the newest folder matching `pattern` under the run."""
    def apply(run: Path) -> None:
        found = sorted(run.glob(pattern), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        change(found[-1])
    return apply


def hold_lock(ws: "Workspace", case: Path) -> None:
    """Another process holding the run folder's lock while the case runs."""
    out = case / "run"
    out.mkdir(parents=True)
    code = ("import fcntl, os, time\n"
            f"fd = os.open({str(out / '.kdflow.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, b'{\"pid\": %d, \"host\": \"sweep\", \"started\": \"now\"}' % os.getpid())\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    ws.holders[case] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    ws.holders[case].stdout.readline()


def release_lock(ws: "Workspace", case: Path) -> None:
    proc = ws.holders.pop(case, None)
    if proc is not None:
        proc.kill()
        proc.wait()


# --- the list ------------------------------------------------------------------------------------

# Shared argument sets: a cheap SFT run of the tiny student, and KD from the tiny teacher.
SFT = ["method=sft", "teacher.name=null", "student.name={student}", "data.train={train}", "output_dir={case}/run",
       "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=1", "train.report_to=[none]",
       "evaluate_before=false", "evaluate_teacher=false"]
KD = ["teacher.name={teacher}", "student.name={student}", "data.train={train}", "output_dir={case}/run",
      "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=1", "train.report_to=[none]",
      "evaluate_before=false", "evaluate_teacher=false"]
RESUME = [a for a in SFT if a != "train.max_steps=1"] + ["train.max_steps=2", "train.save_steps=1"]
EVAL = ["model.name={student}", "data.test={test}", "eval.max_rows=2", "eval.max_new_tokens=2"]
MINI = ["teacher.name={teacher}", "student.name={student}", "data.train={train}", "output_dir={case}/run",
        "data.max_train_rows=8", "minillm.max_steps=2", "minillm.rollout_batch_size=2", "minillm.batch_size=2",
        "minillm.max_new_tokens=4", "minillm.inner_epochs=1", "minillm.save_steps=1", "evaluate_before=false",
        "evaluate_teacher=false"]
PEERS = "peers=[{{name: a, model: {{name: {student}}}}}, {{name: b, model: {{name: {student}}}}}]"
CODI = ["base.name={teacher}", PEERS, "data.train={train}", "output_dir={case}/run", "data.max_train_rows=8",
        "train.batch_size=4", "train.max_steps=1", "train.report_to=[none]", "evaluate_before=false"]
FED = ["server={{name: server, model: {{name: {teacher}, lora: {{enabled: true}}}}}}",
       "clients=[{{name: c1, model: {{name: {student}, lora: {{enabled: true}}}}}}]",
       "data.train={train}", "data.test={test}", "data.public_rows=8", "data.private_rows=8", "fedmkt.rounds=1",
       "output_dir={case}/run", "baselines=[zero_shot]", "eval.max_rows=2", "eval.max_new_tokens=2"]
CACHE = ["teacher.name={teacher}", "student.name={student}", "data.train={train}", "teacher_cache.dir={case}/cache",
         "data.max_train_rows=8", "teacher_cache.k=8", "kd.temperature=2.0"]

CMP = ["teacher.name={teacher}", "student.name={student}", "data.train={train}", "data.test={test}",
       "output_dir={case}/run", "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=1",
       "train.report_to=[none]", "variants=[{{name: sft, method: sft}}, {{name: kd, method: kd}}]"]
PRUNE = ["method=sft", "teacher.name={teacher}", "student.init=prune_teacher", "data.train={train}",
         "output_dir={case}/run", "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=1",
         "train.report_to=[none]", "evaluate_before=false", "evaluate_teacher=false"]


def _without(args: list[str], *prefixes: str) -> list[str]:
    return [a for a in args if not a.startswith(prefixes)]


CASES: list[Case] = [
    # -- settings -----------------------------------------------------------------------------
    Case("lr-scheduler-typo", "distill", [*SFT, "train.lr_scheduler=cosin"], "train.lr_scheduler=cosin"),
    Case("logging-steps-0", "distill", [*SFT, "train.logging_steps=0"], "train.logging_steps=0"),
    Case("report-to-typo", "distill", [*SFT, "train.report_to=[tensorbord]"], "train.report_to=[tensorbord]"),
    Case("report-to-missing-wandb", "distill", [*SFT, "train.report_to=[wandb]"], "train.report_to=[wandb], wandb not installed"),
    Case("max-steps-0", "distill", [*SFT, "train.max_steps=0"], "train.max_steps=0"),
    Case("max-steps-negative", "distill", [*SFT, "train.max_steps=-5"], "train.max_steps=-5"),
    Case("num-epochs-0", "distill", [*_without(SFT, "train.max_steps"), "train.num_epochs=0"], "train.num_epochs=0"),
    Case("max-train-rows-negative", "distill", [*SFT, "data.max_train_rows=-1"], "data.max_train_rows=-1"),
    Case("weight-decay-negative", "distill", [*SFT, "train.weight_decay=-0.1"], "train.weight_decay=-0.1"),
    Case("grad-norm-negative", "distill", [*SFT, "train.max_grad_norm=-1"], "train.max_grad_norm=-1"),
    Case("save-steps-negative", "distill", [*SFT, "train.save_steps=-1"], "train.save_steps=-1"),
    Case("temperature-nan", "distill", [*KD, "kd.temperature=.nan"], "kd.temperature=.nan"),
    Case("temperature-inf", "distill", [*KD, "kd.temperature=inf"], "kd.temperature=inf"),
    Case("learning-rate-nan", "distill", [*SFT, "train.learning_rate=nan"], "train.learning_rate=nan"),
    Case("test-max-rows-0", "distill", [*SFT, "data.test={test}", "eval.max_rows=0"], "eval.max_rows=0"),
    Case("min-response-tokens-negative", "distill", [*SFT, "data.min_response_tokens=-1"], "data.min_response_tokens=-1"),
    Case("seed-negative", "distill", [*SFT, "seed=-1"], "seed=-1"),
    Case("batch-size-0", "distill", [*SFT, "train.batch_size=0"], "train.batch_size=0"),
    Case("max-length-1", "distill", [*SFT, "data.max_length=1"], "data.max_length=1"),
    Case("top-p-0", "distill", [*SFT, "eval.sample_top_p=0"], "eval.sample_top_p=0"),
    Case("lora-rank-0", "distill", [*SFT, "student.lora.enabled=true", "student.lora.r=0"], "student.lora.r=0"),
    Case("unknown-key", "distill", [*SFT, "train.lerning_rate=0.1"], "misspelled key train.lerning_rate"),
    Case("wrong-type", "distill", [*SFT, "train.batch_size=big"], "train.batch_size=big"),
    Case("bad-choice", "distill", [*SFT, "method=distil"], "method=distil"),
    Case("config-file-missing", "distill", ["--config", "{case}/none.yaml"], "--config of a missing file"),
    Case("config-bad-yaml", "distill", ["--config", "{case}/c.yaml"], "config file that is not YAML", write("c.yaml", "a: [1,\n")),
    Case("config-top-level-list", "distill", ["--config", "{case}/c.yaml"], "config file holding a list", write("c.yaml", "- 1\n- 2\n")),
    Case("config-not-utf8", "distill", ["--config", "{case}/c.yaml"], "config file in Latin-1", write("c.yaml", b"method: kd # \xe9\n")),
    Case("override-not-key-value", "distill", [*SFT, "train"], "override without '='"),
    Case("overrides-unknown-field", "distill", [*SFT, "student.init=config", "student.config_overrides={{no_such: 1}}"],
         "student.config_overrides with an unknown field"),
    Case("overrides-wrong-type", "distill", [*SFT, "student.init=config", "student.config_overrides={{hidden_size: wide}}"],
         "student.config_overrides hidden_size: wide"),
    Case("overrides-negative-layers", "distill", [*SFT, "student.init=config",
                                                  "student.config_overrides={{num_hidden_layers: -1}}"],
         "student.config_overrides num_hidden_layers: -1"),
    Case("overrides-heads-mismatch", "distill", [*SFT, "student.init=config",
                                                 "student.config_overrides={{num_key_value_heads: 3}}"],
         "student.config_overrides: 3 KV heads for 4 attention heads"),
    Case("prune-without-layers", "distill", [*KD, "student.init=prune_teacher"], "student.init=prune_teacher, no keep_layers"),
    Case("prune-layer-out-of-range", "distill", [*KD, "student.init=prune_teacher", "student.keep_layers=[0, 9]"],
         "student.keep_layers beyond the teacher's 4 layers"),
    Case("lora-unknown-module", "distill", [*SFT, "student.lora.enabled=true", "student.lora.target_modules=[nope]"],
         "student.lora.target_modules=[nope]"),
    Case("kd-without-teacher", "distill", [*_without(KD, "teacher.name"), "teacher.name=null"], "method kd, teacher.name null"),
    Case("hard-token-other-scope", "distill", [*_without(KD, "student.name"), "student.name={other}", "method=hard_token",
                                               "kd.token_scope=all"],
         "kd.token_scope=all with a student of another tokenizer"),
    # -- data -----------------------------------------------------------------------------------
    Case("train-missing", "distill", [*_without(SFT, "data.train"), "data.train={case}/none.jsonl"], "data.train missing file"),
    Case("train-not-set", "distill", [*_without(SFT, "data.train")], "data.train not set"),
    Case("non-utf8-jsonl", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"], "JSONL with a Latin-1 byte",
         write("t.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')),
    Case("non-utf8-csv", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.csv"], "CSV with a Latin-1 byte",
         write("t.csv", b"prompt,response\na,b\ncaf\xe9,b\n")),
    Case("bad-json-line", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"], "JSONL line that is not JSON",
         write("t.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "a", \n')),
    Case("json-not-list", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.json"], "JSON object instead of a list",
         write("t.json", '{"prompt": "a"}')),
    Case("corrupt-parquet", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.parquet"], "parquet file that is not",
         write("t.parquet", b"PAR1 not really")),
    Case("unsupported-suffix", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.txt"], "data.train a .txt file",
         write("t.txt", "hello\n")),
    Case("empty-train", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"], "empty training file",
         write("t.jsonl", "")),
    Case("empty-validation", "distill", [*SFT, "data.validation={case}/v.jsonl", "train.eval_steps=1"],
         "empty validation file, eval_steps=1", write("v.jsonl", "\n")),
    Case("empty-test", "distill", [*SFT, "data.test={case}/t.jsonl"], "empty test file", write("t.jsonl", "")),
    Case("row-missing-field", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"], "row without 'response'",
         rows("t.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "a", "answer": "b"}])),
    Case("row-number-prompt", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"], "prompt that is a number",
         rows("t.jsonl", [{"prompt": 3, "response": "b"}])),
    Case("chat-ends-with-user", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.jsonl"],
         "chat whose last turn is the user's",
         rows("t.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}])),
    Case("prompt-too-long", "distill", [*SFT, "data.max_length=8"], "prompts longer than data.max_length=8"),
    Case("csv-extra-cells", "distill", [*_without(SFT, "data.train"), "data.train={case}/t.csv"], "CSV row with extra cells",
         write("t.csv", "prompt,response\na,b,c,d\n")),
    Case("folder-not-dataset", "distill", [*_without(SFT, "data.train"), "data.train={case}/folder"], "a plain folder as data",
         write("folder/readme", "x")),
    Case("hub-dataset-no-split", "distill", [*_without(SFT, "data.train"), "data.train=hf:org/name"], "hf: id without @split"),
    Case("unreadable-train", "distill", SFT, "training file unreadable (EIO)", fault="eio-read-train"),
    # -- models ---------------------------------------------------------------------------------
    Case("model-missing", "distill", [*_without(SFT, "student.name"), "student.name={case}/nope/a/b"], "student.name missing path"),
    Case("model-truncated-weights", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student folder, model.safetensors cut in half", model_copy(truncate("model.safetensors"))),
    Case("model-garbage-weights", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student folder, model.safetensors garbage", model_copy(garbage("model.safetensors"))),
    Case("model-bad-config", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student folder, config.json not JSON", model_copy(garbage("config.json"))),
    Case("model-bad-tokenizer", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student folder, tokenizer.json not JSON", model_copy(garbage("tokenizer.json", b"{bad"))),
    Case("model-empty-folder", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student folder with nothing in it", write("model/.keep", "")),
    Case("gguf-corrupt", "distill", [*_without(KD, "teacher.name"), "teacher.name={case}/t.gguf"], "teacher .gguf with a bad header",
         write("t.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)),
    Case("gguf-not-gguf", "distill", [*_without(KD, "teacher.name"), "teacher.name={case}/t.gguf"], "teacher .gguf that is text",
         write("t.gguf", "hello")),
    Case("model-config-mismatch", "distill", [*_without(SFT, "student.name"), "student.name={case}/model"],
         "student config.json whose hidden_size does not fit the weights",
         model_copy(lambda m: (m / "config.json").write_text(
             (m / "config.json").read_text().replace('"hidden_size": 32', '"hidden_size": 64')))),
    Case("model-plain-file", "distill", [*_without(SFT, "student.name"), "student.name={train}"], "student.name a data file"),
    # -- output folders and disks ---------------------------------------------------------------
    Case("output-dir-is-file", "distill", [*_without(SFT, "output_dir"), "output_dir={case}/f"], "output_dir is a file",
         write("f", "x")),
    Case("output-dir-under-file", "distill", [*_without(SFT, "output_dir"), "output_dir={case}/f/run"],
         "output_dir inside a file", write("f", "x")),
    Case("disk-full-first-write", "distill", SFT, "ENOSPC on the first write", fault="enospc-write"),
    Case("read-only-output", "distill", SFT, "EACCES on the first write", fault="eacces-write"),
    Case("read-only-filesystem", "distill", SFT, "EROFS on the first write", fault="erofs-write"),
    Case("disk-full-checkpoint", "distill", [*SFT, "train.save_steps=1"], "disk full while torch/safetensors save a checkpoint",
         fault="enospc-library"),
    Case("disk-full-report", "distill", SFT, "ENOSPC writing metrics.json at the end", fault="enospc-metrics"),
    Case("locked-folder", "distill", SFT, "another run holds the folder", hold_lock, cleanup=release_lock),
    # -- checkpoints ----------------------------------------------------------------------------
    Case("checkpoint-truncated-weights", "distill", RESUME, "newest checkpoint's model.safetensors cut",
         run_copy("sft_run", newest("checkpoint-*", truncate("model.safetensors", 0.9)))),
    Case("checkpoint-bad-trainer-state", "distill", RESUME, "newest checkpoint's trainer_state.json garbage",
         run_copy("sft_run", newest("checkpoint-*", garbage("trainer_state.json")))),
    Case("checkpoint-truncated-optimizer", "distill", RESUME, "newest checkpoint's optimizer.pt cut",
         run_copy("sft_run", newest("checkpoint-*", truncate("optimizer.pt")))),
    Case("checkpoint-other-settings", "distill", [*RESUME, "train.learning_rate=0.001"], "resume=auto, other learning rate",
         run_copy("sft_run")),
    Case("checkpoint-without-stamp", "distill", RESUME, "checkpoint written by an older kdflow (no settings record)",
         run_copy("sft_run", newest("checkpoint-*", lambda c: (c / "kdflow-run.json").unlink()))),
    Case("resume-other-run", "distill", [*_without(RESUME, "output_dir"), "output_dir={case}/new",
                                         "train.resume={case}/run/checkpoint-1", "train.learning_rate=0.001"],
         "train.resume names another run's checkpoint (other settings)", run_copy("sft_run")),
    Case("resume-path-missing", "distill", [*SFT, "train.resume={case}/none/checkpoint-3"], "train.resume names nothing"),
    # -- teacher cache --------------------------------------------------------------------------
    Case("cache-missing", "distill", [*KD, "teacher_cache.dir={case}/none"], "teacher_cache.dir empty"),
    Case("cache-flipped-byte", "distill", [*KD, *CACHE[3:]], "shard with 4 flipped bytes",
         cache_copy(flip_last_bytes("shard-00000.safetensors"))),
    Case("cache-truncated-shard", "distill", [*KD, *CACHE[3:]], "shard cut short",
         cache_copy(lambda c: truncate("shard-00000.safetensors")(c))),
    Case("cache-escaping-path", "distill", [*KD, *CACHE[3:]], "manifest naming ../../x.safetensors",
         cache_copy(edit_manifest(lambda m: m["shards"][0].update(file="../../x.safetensors")))),
    Case("cache-nan", "distill", [*KD, *CACHE[3:]], "shard with NaN log-probs (manifest matching)", cache_copy(nan_in_shard)),
    Case("cache-bad-manifest", "distill", [*KD, *CACHE[3:]], "manifest.json not JSON",
         cache_copy(lambda c: (c / "manifest.json").write_text("{"))),
    Case("cache-manifest-shape", "distill", [*KD, *CACHE[3:]], "manifest whose shards is not a list",
         cache_copy(edit_manifest(lambda m: m.update(shards={"a": 1})))),
    Case("cache-other-temperature", "distill", [*KD, *CACHE[3:-1], "kd.temperature=1.0"], "cache made at another temperature",
         cache_copy(lambda c: None)),
    Case("cache-shard-missing", "distill", [*KD, *CACHE[3:]], "a shard file deleted",
         cache_copy(lambda c: (c / "shard-00000.safetensors").unlink())),
    Case("cache-teacher-dir-is-file", "cache-teacher", [*_without(CACHE, "teacher_cache.dir"), "teacher_cache.dir={case}/f"],
         "teacher_cache.dir is a file", write("f", "x")),
    Case("cache-teacher-disk-full", "cache-teacher", CACHE, "disk full while a shard is written", fault="enospc-library"),
    Case("cache-teacher-no-dir", "cache-teacher", _without(CACHE, "teacher_cache.dir"), "cache-teacher without teacher_cache.dir"),
    Case("cache-teacher-k-0", "cache-teacher", [*CACHE, "teacher_cache.k=0"], "teacher_cache.k=0"),
    # -- eval -----------------------------------------------------------------------------------
    Case("eval-missing-adapter", "eval", [*EVAL, "lora_adapter={case}/none"], "lora_adapter that does not exist"),
    Case("eval-no-test", "eval", ["model.name={student}"], "data.test not set"),
    Case("eval-empty-test", "eval", [*_without(EVAL, "data.test"), "data.test={case}/t.jsonl"], "empty test file",
         write("t.jsonl", "")),
    Case("eval-bad-row", "eval", [*_without(EVAL, "data.test"), "data.test={case}/t.jsonl"], "test row without 'response'",
         rows("t.jsonl", [{"prompt": "a"}])),
    Case("eval-missing-model", "eval", [*_without(EVAL, "model.name"), "model.name={case}/nope/a/b"], "model.name missing path"),
    Case("eval-output-folder", "eval", [*EVAL, "output={case}"], "output is a folder"),
    Case("eval-max-rows-0", "eval", [*EVAL, "eval.max_rows=0"], "eval.max_rows=0"),
    # -- minillm --------------------------------------------------------------------------------
    Case("minillm-batch-not-dividing", "minillm", [*MINI, "minillm.batch_size=3", "minillm.rollout_batch_size=4"],
         "batch_size 3 for rollouts of 4"),
    Case("minillm-max-steps-0", "minillm", [*MINI, "minillm.max_steps=0"], "minillm.max_steps=0"),
    Case("minillm-lm-coef-no-data", "minillm", [*MINI, "minillm.lm_coef=0.5"], "lm_coef without lm_data"),
    Case("minillm-scheduler-typo", "minillm", [*MINI, "minillm.lr_scheduler=cosin"], "minillm.lr_scheduler=cosin"),
    Case("minillm-other-tokenizer", "minillm", [*_without(MINI, "student.name"), "student.name={other}"],
         "a student with another tokenizer (MiniLLM needs the teacher's)"),
    Case("minillm-damaged-checkpoint", "minillm", [*_without(MINI, "output_dir"), "output_dir={case}/run"],
         "newest loop checkpoint's model.safetensors cut",
         run_copy("minillm_run", newest("checkpoint-*", truncate("model.safetensors")))),
    Case("minillm-checkpoint-optimizer-cut", "minillm", [*_without(MINI, "output_dir"), "output_dir={case}/run"],
         "newest loop checkpoint's optimizer.bin cut",
         run_copy("minillm_run", newest("checkpoint-*", truncate("optimizer.bin")))),
    Case("minillm-bad-loop-state", "minillm", [*_without(MINI, "output_dir"), "output_dir={case}/run"],
         "newest loop checkpoint's loop_state.json garbage",
         run_copy("minillm_run", newest("checkpoint-*", garbage("loop_state.json")))),
    # -- codistill ------------------------------------------------------------------------------
    Case("codistill-one-peer", "codistill", [*_without(CODI, "peers"), "peers=[{{name: a, model: {{name: {student}}}}}]"],
         "one peer"),
    Case("codistill-duplicate-names", "codistill", [*_without(CODI, "peers"),
                                                    "peers=[{{name: a, model: {{name: {student}}}}}, {{name: a}}]"],
         "two peers named a"),
    Case("codistill-report-to-wandb", "codistill", [*CODI, "train.report_to=[wandb]"], "report_to wandb"),
    Case("codistill-bad-overrides", "codistill", [*_without(CODI, "peers"),
                                                  "peers=[{{name: a, model: {{name: {student}}}}}, {{name: b, model: "
                                                  "{{init: config, config_overrides: {{no_such: 1}}}}}}]"],
         "peer with an unknown config_overrides field"),
    # -- fedmkt ---------------------------------------------------------------------------------
    Case("fedmkt-no-clients", "fedmkt", [*_without(FED, "clients"), "clients=[]"], "no clients"),
    Case("fedmkt-rounds-0", "fedmkt", [*FED, "fedmkt.rounds=0"], "fedmkt.rounds=0"),
    Case("fedmkt-public-too-large", "fedmkt", [*FED, "data.public_rows=100000"], "more public rows than data"),
    Case("fedmkt-private-negative", "fedmkt", [*FED, "data.private_rows=-8"], "data.private_rows=-8"),
    Case("fedmkt-no-test", "fedmkt", [*_without(FED, "data.test")], "data.test not set"),
    # -- compare ----------------------------------------------------------------------------------
    Case("compare-method-typo", "compare", [*CMP, "variants=[{{name: a, method: sft}}, {{name: b, method: kdd}}]"],
         "variant method kdd"),
    Case("compare-duplicate-names", "compare", [*CMP, "variants=[{{name: a, method: sft}}, {{name: a, method: kd}}]"],
         "two variants named a"),
    Case("compare-baseline-missing", "compare", [*CMP, "baseline=plain"], "baseline not among the variants"),
    Case("compare-no-seeds", "compare", [*CMP, "seeds=[]"], "seeds=[]"),
    Case("compare-bad-override", "compare", [*CMP, "variants=[{{name: sft, method: sft}}, "
                                                   "{{name: b, method: kd, overrides: ['kd.divergnce=rkl']}}]"],
         "a variant override with a misspelled key"),
    Case("compare-no-test", "compare", [*_without(CMP, "data.test")], "data.test not set"),
    # -- pruning and export ----------------------------------------------------------------------
    Case("prune-too-many-layers", "distill", [*PRUNE, "student.num_layers=99"], "student.num_layers larger than the teacher"),
    Case("prune-width-too-wide", "distill", [*PRUNE, "student.width.intermediate_size=100000"],
         "student.width larger than the model"),
    Case("prune-width-splits-gqa", "distill", [*PRUNE, "student.width.num_attention_heads=3"],
         "query heads that split a GQA group"),
    Case("export-scheme-typo", "export", ["model.name={student}", "output={case}/out", "quantize.scheme=int3"],
         "quantize.scheme=int3"),
    Case("export-no-model", "export", ["model.name={case}/missing", "output={case}/out"], "model folder missing"),
    Case("export-no-output", "export", ["model.name={student}"], "output not set"),
    Case("export-int4-group-size", "export", ["model.name={student}", "output={case}/out", "quantize.scheme=int4",
                                              "quantize.group_size=7"], "int4 group size that tiles no layer"),
]


# ----------------------------------------------------------------------------------------------
# Faults injected in the child process (`--child FAULT -- <kdflow args>`), not hooks in kdflow


def _raise(code: int, name: str) -> None:
    raise OSError(code, os.strerror(code), name)


def _install_fault(fault: str, train: str | None) -> None:
    import tempfile as tf

    if fault in ("enospc-write", "eacces-write", "erofs-write"):
        code = {"enospc-write": errno.ENOSPC, "eacces-write": errno.EACCES, "erofs-write": errno.EROFS}[fault]
        real_mkstemp = tf.mkstemp
        tf.mkstemp = lambda *a, **k: _raise(code, str(Path(k.get("dir", ".")) / "tmp")) if k.get("dir") else real_mkstemp(*a, **k)
    elif fault == "enospc-metrics":
        real_mkstemp = tf.mkstemp
        tf.mkstemp = lambda *a, **k: (_raise(errno.ENOSPC, k["prefix"]) if str(k.get("prefix", "")).startswith("metrics.json")
                                      else real_mkstemp(*a, **k))
    elif fault == "enospc-library":
        # torch.save and safetensors report a full disk as RuntimeError / SafetensorError; the disk reads full.
        import shutil as sh

        import safetensors.torch as st
        import torch

        def full(*a: Any, **k: Any) -> None:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

        torch.save = full
        st.save_file = full
        real_usage = sh.disk_usage
        sh.disk_usage = lambda p: real_usage(p)._replace(free=0)
    elif fault == "eio-read-train":
        real_read = Path.read_bytes
        Path.read_bytes = lambda self: _raise(errno.EIO, str(self)) if str(self) == train else real_read(self)
    else:
        raise SystemExit(f"unknown fault {fault}")


def child(fault: str, argv: list[str]) -> int:
    train = next((a.split("=", 1)[1] for a in argv if a.startswith("data.train=")), None)
    _install_fault(fault, train)
    from kdflow.cli import main

    return main(argv)


# ----------------------------------------------------------------------------------------------
# The workspace: tiny models, data, a teacher cache and finished runs to damage


class Workspace:
    """Paths of the tiny models, data and finished outputs the cases use; `build()` makes them."""

    def __init__(self, root: Path):
        self.root = root
        self.holders: dict[Path, subprocess.Popen] = {}
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                        PYTHONWARNINGS="ignore", KDFLOW_CACHE=str(root / "kdflow-cache"),
                        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        self.teacher, self.student, self.other = root / "teacher", root / "student", root / "other"
        self.train, self.val, self.test = (root / f"{s}.jsonl" for s in ("train", "validation", "test"))
        self.cache = root / "good-cache" / "cache"
        self.sft_run = root / "good-sft" / "run"
        self.minillm_run = root / "good-minillm" / "run"

    def build(self) -> None:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import DATA, tiny_llama, train_tokenizer, write_jsonl  # the tests' own tiny fixtures

        tok = train_tokenizer("bpe")
        for name, layers, hidden, seed in (("teacher", 4, 48, 1), ("student", 2, 32, 2)):
            model = tiny_llama(tok, layers=layers, hidden=hidden, seed=seed)
            model.save_pretrained(self.root / name)
            tok.save_pretrained(self.root / name)
        other = train_tokenizer("unigram")
        tiny_llama(other, layers=2, hidden=32, seed=3).save_pretrained(self.root / "other")
        other.save_pretrained(self.root / "other")
        for split, n in (("train", 32), ("validation", 4), ("test", 4)):
            lines = (DATA / f"{split}.jsonl").read_text().splitlines()[:n]
            write_jsonl(self.root / f"{split}.jsonl", [json.loads(line) for line in lines])
        # finished outputs that cases copy and damage
        for verb, args, folder in (("cache-teacher", CACHE, self.cache.parent), ("distill", RESUME, self.sft_run.parent),
                                   ("minillm", MINI, self.minillm_run.parent)):
            cmd = [sys.executable, "-m", "kdflow", verb, *[a.format(**self.paths(folder)) for a in args]]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"the good {verb} run failed:\n{proc.stderr[-3000:]}")

    def paths(self, case: Path) -> dict[str, str]:
        return {"teacher": str(self.teacher), "student": str(self.student), "other": str(self.other),
                "train": str(self.train), "validation": str(self.val), "test": str(self.test), "case": str(case),
                "tmp": str(self.root)}


def run_case(ws: Workspace, case: Case) -> Outcome:
    folder = ws.root / "cases" / case.name
    folder.mkdir(parents=True)
    args = [a.format(**ws.paths(folder)) for a in case.args]
    if case.fault:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", case.fault, "--", case.verb, *args]
    else:
        cmd = [sys.executable, "-m", "kdflow", case.verb, *args]
    t0 = time.time()
    try:
        if case.setup is not None:
            case.setup(ws, folder)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ws.env, timeout=900, cwd=ws.root)
        kind, message = classify(proc.returncode, proc.stderr)
    except subprocess.TimeoutExpired:
        kind, message = "traceback", "timed out"
    finally:
        if case.cleanup is not None:
            case.cleanup(ws, folder)
    return Outcome(case, kind, message.replace(str(ws.root) + "/", "").replace(str(ws.root), "."), time.time() - t0)


# ----------------------------------------------------------------------------------------------
# Report


def markdown(outcomes: list[Outcome], seconds: float) -> str:
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("clear", "traceback", "silent")}
    lines = [
        "# Reliability: bad inputs and faults",
        "",
        "Generated by `python scripts/bad_input_sweep.py` (the real `kdflow` CLI in a fresh process per case, on",
        "tiny models and data made in a temporary folder; paths below are relative to it). A case is **clear**",
        "when kdflow exits 2 with one `kdflow: error:` line and no traceback, a **traceback** otherwise, and",
        "**silent** when it exits 0 although the input is bad. Disk faults are injected in the child process",
        "(an OSError, or a library writer's error with the disk reading full), as CI runs as root.",
        "",
        f"**{len(outcomes)} cases: {counts['clear']} clear, {counts['traceback']} tracebacks, "
        f"{counts['silent']} silent** ({seconds / 60:.1f} minutes).",
        "",
        "| case | verb | bad input | outcome | message |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        msg = o.message.replace("|", "\\|")
        lines.append(f"| {o.case.name} | {o.case.verb} | {o.case.what.replace('|', '/')}"
                     f"{' (fault ' + o.case.fault + ')' if o.case.fault else ''} | {o.kind} | {msg} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", help="only cases whose name contains this, or one of these (comma-separated); "
                                    "the doc is then not written")
    parser.add_argument("-v", action="store_true", help="print each outcome as it comes")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.k or any(k in c.name for k in args.k.split(","))]
    names = [c.name for c in CASES]
    assert len(set(names)) == len(names), "case names must be unique"
    root = Path(tempfile.mkdtemp(prefix="kdflow-sweep-"))
    t0 = time.time()
    try:
        ws = Workspace(root)
        ws.build()
        outcomes = []
        for case in cases:
            o = run_case(ws, case)
            outcomes.append(o)
            if args.v or o.kind != "clear":
                print(f"{o.kind:9} {case.name:32} {o.seconds:5.1f}s  {o.message[:150]}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"workspace kept: {root}")
    text = markdown(outcomes, time.time() - t0)
    print(next(line for line in text.splitlines() if line.startswith("**") and " cases: " in line))
    if not args.k:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    return 0 if all(o.kind == "clear" for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
