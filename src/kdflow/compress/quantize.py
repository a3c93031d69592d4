"""Weight-only quantized students (methods.md §12): export through torchao, QAT, CPU kernels.

One scheme serves post-training export and quantization-aware training, so what QAT simulates is
exactly what the export stores: torchao's `IntxWeightOnlyConfig`, symmetric, int8 per output row or
int4 in groups of `group_size` input channels, on every linear layer of the transformer blocks. The
embeddings (and the output head, tied or not) are int8 per vocabulary row, or stay in bfloat16.

On disk: a folder `AutoModelForCausalLM.from_pretrained` loads through transformers' `TorchAoConfig`
(torchao installed). torchao 0.18 can only write its unpacked layout from a CPU (one int8 byte per
weight, int4 values included: its packed int4 tensors need a CUDA/XPU/NPU kernel library to be made),
so int4 saves no disk over int8 yet; it is what a 4-bit kernel then reads.

At run time on a CPU, torchao's unpacked tensors dequantize the whole weight at every call, several
times slower than a bfloat16 matmul. `use_cpu_kernels` swaps them, losslessly, for PyTorch's own
weight-only CPU kernels: `_weight_int8pack_mm` (int8 per row) and `_weight_int4pack_mm_for_cpu`
(tinygemm int4 in groups), with bfloat16 activations; an int8 embedding looks its rows up without
dequantizing the table. kdflow's loader does this for a quantized model on the CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

from kdflow.errors import ConfigError, ModelError

INT4_GROUPS = (32, 64, 128, 256)  # group sizes of the int4 CPU kernel


def require_torchao(setting: str) -> None:
    if importlib.util.find_spec("torchao") is None:
        raise ConfigError(f"{setting} needs torchao: pip install 'kdflow[compress]' (or torchao)")


def linear_config(q: Any) -> Any:
    """The torchao config of the block linear layers under scheme `q` (a QuantSpec)."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, PerGroup

    if q.scheme == "int8":
        return IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    if q.scheme == "int4":
        return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(q.group_size))
    raise ValueError(f"no quantization scheme {q.scheme!r}")


def block_linears(model: Any) -> dict[str, Any]:
    """The linear layers of the transformer blocks, by qualified name: what a scheme quantizes."""
    import torch.nn as nn

    from kdflow.models import layer_list_name, unwrap

    m = unwrap(model)
    prefix = layer_list_name(m) + "."
    return {n: mod for n, mod in m.named_modules() if n.startswith(prefix) and isinstance(mod, nn.Linear)}


def check_scheme(model_or_config: Any, q: Any, setting: str = "quantize") -> None:
    """Refuse, before any weights load, a scheme some layer cannot take: int4 groups must tile every
    block linear layer's input width (and the CPU kernel knows groups of 32, 64, 128 and 256 only)."""
    if q.scheme == "none":
        return
    require_torchao(f"{setting}.scheme={q.scheme}")
    if q.scheme != "int4":
        return
    import torch
    from transformers import AutoModelForCausalLM

    if q.group_size not in INT4_GROUPS:
        raise ConfigError(f"{setting}.group_size={q.group_size}: int4 groups of {', '.join(map(str, INT4_GROUPS))} "
                          "input channels are supported")
    model = model_or_config
    if not hasattr(model_or_config, "named_modules"):
        with torch.device("meta"):  # shapes only
            model = AutoModelForCausalLM.from_config(model_or_config)
    for name, layer in block_linears(model).items():
        if layer.in_features % q.group_size:
            divisors = [g for g in INT4_GROUPS if all(l.in_features % g == 0 for l in block_linears(model).values())]
            hint = f"choose {setting}.group_size={divisors[0]}" if divisors else f"use {setting}.scheme=int8"
            raise ConfigError(f"{setting}.scheme=int4 cannot quantize {name}: its input width {layer.in_features} is "
                              f"not a multiple of {setting}.group_size={q.group_size}; {hint}")


def torchao_config(model: Any, q: Any) -> Any:
    """transformers' TorchAoConfig for scheme `q` on `model` (its module names): one pattern for the weights of
    the block linear layers (never their biases, nor the norms beside them), the embeddings by name."""
    import re

    from torchao.quantization import FqnToConfig
    from transformers import TorchAoConfig

    from kdflow.models import layer_list_name

    prefix = layer_list_name(model)
    inner = sorted({n[len(prefix) + 1:].split(".", 1)[1] for n in block_linears(model)})
    pattern = rf"re:{re.escape(prefix)}\.\d+\.({'|'.join(re.escape(n) for n in inner)})\.weight"
    per_param: dict[str, Any] = {pattern: linear_config(q)}
    names = {id(mod): n for n, mod in model.named_modules()}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if q.embeddings == "int8":
        row8 = linear_config(type(q)(scheme="int8"))
        per_param[names[id(emb)] + ".weight"] = row8
        if head is not None and not _tied(model):
            per_param[names[id(head)] + ".weight"] = row8
    keep = [names[id(head)]] if head is not None and q.embeddings != "int8" else None
    return TorchAoConfig(FqnToConfig(per_param), modules_to_not_convert=keep,
                         include_input_output_embeddings=q.embeddings == "int8")


def _tied(model: Any) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight is emb.weight


def _drop_tied_copy(folder: Path, model: Any) -> None:
    """transformers 5.24 writes a tied quantized head twice (its dedup compares parameter names, which
    torchao's flattening renames) and then cannot load the file back (its tie check calls torch.equal,
    which torchao tensors lack). Keep the embedding's copy only: loading ties the head to it again."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    names = {id(mod): n for n, mod in model.named_modules()}
    head = names[id(model.get_output_embeddings())]
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            if not any(k.startswith(head + ".") for k in keys):
                continue
            tensors = {k: f.get_tensor(k) for k in keys if not k.startswith(head + ".")}
        if "tensor_names" in meta:
            meta["tensor_names"] = json.dumps([n for n in json.loads(meta["tensor_names"]) if not n.startswith(head + ".")])
        meta.pop(f"{head}.weight", None)
        save_file(tensors, str(path), metadata=meta)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {k: v for k, v in data.get("weight_map", {}).items() if not k.startswith(head + ".")}
        index.write_text(json.dumps(data, indent=2))


def folder_bytes(folder: str | Path) -> int:
    """Bytes of the weight files in a model folder (safetensors, or .bin)."""
    folder = Path(folder)
    files = list(folder.glob("*.safetensors")) or list(folder.glob("*.bin"))
    return sum(f.stat().st_size for f in files)


def export_quantized(spec: Any, q: Any, out: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """Quantize the model of `spec` (a ModelSpec) with scheme `q` and write it to `out` atomically: a folder
    from_pretrained loads, its tokenizer, and kdflow_export.json. Returns what that file records."""
    import torch

    from kdflow.models import count_parameters, load_model, load_tokenizer, resolve_source, _load_location
    from kdflow.report import atomic_folder

    require_torchao(f"quantize.scheme={q.scheme}")
    if q.scheme == "none":
        raise ConfigError("quantize.scheme=none: choose int8 or int4")
    from transformers import AutoConfig

    location, kwargs, source = _load_location(spec)
    config = AutoConfig.from_pretrained(location, **kwargs)
    check_scheme(config, q)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        skeleton = AutoModelForCausalLM.from_config(config)
    model = load_model(spec, dtype=torch.bfloat16, quantization_config=torchao_config(skeleton, q))
    tok = tokenizer if tokenizer is not None else load_tokenizer(spec)
    record = {"source": resolve_source(spec).identity, "scheme": q.scheme,
              "group_size": q.group_size if q.scheme == "int4" else None, "embeddings": q.embeddings,
              "linear_layers": len(block_linears(model)), "parameters": count_parameters(model)[0],
              "storage": "torchao IntxUnpackedToInt8Tensor: one int8 byte per weight (int4 values too), "
                         "bfloat16 scales; norms bfloat16",
              "torchao": _version("torchao")}
    out = Path(out)
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        if _tied(model):
            _drop_tied_copy(Path(tmp), model)
        tok.save_pretrained(tmp)
        record["bytes"] = folder_bytes(tmp)
        (Path(tmp) / "kdflow_export.json").write_text(json.dumps(record, indent=2))
    return record


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def run_export(cfg: Any) -> dict[str, Any]:
    """`kdflow export`: write a weight-only int8 or int4 copy of a model."""
    from kdflow.models import load_model

    if not cfg.model.name:
        raise ConfigError("model.name is not set: give the folder of the model to quantize (e.g. a run's student/)")
    if not cfg.output:
        raise ConfigError("output is not set: give the folder to write the quantized model to")
    if Path(cfg.output).resolve() == Path(cfg.model.name).expanduser().resolve():
        raise ConfigError(f"output {cfg.output} is the model's own folder; write the quantized copy elsewhere")
    record = export_quantized(cfg.model, cfg.quantize, cfg.output)
    print(f"[kdflow] {cfg.quantize.scheme} model written to {cfg.output}: {record['bytes'] / 2**20:.1f} MiB of weights, "
          f"{record['linear_layers']} linear layers quantized, embeddings {cfg.quantize.embeddings}")
    return record


# ----------------------------------------------------------------------------------------------
# Quantization-aware training


def prepare_qat(model: Any, q: Any) -> int:
    """Fake-quantize the block linear layers of `model` in place with scheme `q` (torchao QATConfig: the
    weights are quantized and dequantized in every forward, gradients pass straight through).
    Returns how many layers were prepared."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = set(block_linears(model))
    quantize_(model, QATConfig(linear_config(q), step="prepare"), filter_fn=lambda m, fqn: fqn in names)
    return len(names)


def finish_qat(model: Any) -> None:
    """Swap the fake-quantized layers back to plain linear layers holding the trained weights, so the
    model saves as a plain one; exporting it with the same scheme then gives the weights QAT saw."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig

    quantize_(model, QATConfig(step="convert"), filter_fn=lambda m, fqn: isinstance(m, FakeQuantizedLinear))


# ----------------------------------------------------------------------------------------------
# CPU kernels


@functools.lru_cache(maxsize=1)
def _make_modules() -> tuple[type, type, type]:
    import torch
    import torch.nn as nn

    class Int8RowLinear(nn.Module):
        """y = x W^T with W = qdata * scale (int8 per output row): PyTorch's `_weight_int8pack_mm`."""

        def __init__(self, qdata: Any, scale: Any, bias: Any = None):
            super().__init__()
            self.register_buffer("qdata", qdata)
            self.register_buffer("scale", scale)
            self.bias = bias
            self.in_features, self.out_features = qdata.shape[1], qdata.shape[0]

        def forward(self, x: Any) -> Any:
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).to(self.scale.dtype), self.qdata, self.scale)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y

    class Int8RowEmbedding(nn.Module):
        """Rows of an int8-per-row table, dequantized after the lookup (the table never is)."""

        def __init__(self, qdata: Any, scale: Any, padding_idx: int | None = None):
            super().__init__()
            self.register_buffer("qdata", qdata)
            self.register_buffer("scale", scale)
            self.padding_idx = padding_idx
            self.num_embeddings, self.embedding_dim = qdata.shape

        def forward(self, ids: Any) -> Any:
            return self.qdata[ids].to(self.scale.dtype) * self.scale[ids].unsqueeze(-1)

    class Int4GroupLinear(nn.Module):
        """y = x W^T with int4 W in groups of input channels: PyTorch's tinygemm CPU kernel
        `_weight_int4pack_mm_for_cpu`, which reads W = (u - 8) * scale + zero for u in [0, 15]."""

        def __init__(self, qdata: Any, scale: Any, group_size: int, bias: Any = None):
            super().__init__()
            n, k = qdata.shape
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((qdata.to(torch.int32) + 8).contiguous(), 1)
            # [K / group, N, 2]: (scale, zero) per group and output row; symmetric, so zero is 0
            scale_zero = torch.stack([scale.t(), torch.zeros_like(scale.t())], dim=-1).contiguous()
            self.register_buffer("packed", packed)
            self.register_buffer("scale_zero", scale_zero)
            self.group_size = group_size
            self.bias = bias
            self.in_features, self.out_features = k, n

        def forward(self, x: Any) -> Any:
            flat = x.reshape(-1, self.in_features).to(self.scale_zero.dtype)
            y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zero)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y + self.bias if self.bias is not None else y

    return Int8RowLinear, Int8RowEmbedding, Int4GroupLinear


def _unpacked(weight: Any) -> Any | None:
    """(qdata, scale, group) of a symmetric torchao IntxUnpackedToInt8Tensor weight, else None."""
    import torch

    if type(weight).__name__ != "IntxUnpackedToInt8Tensor" or weight.activation_quantization is not None:
        return None
    if weight.qdata.dim() != 2 or tuple(weight.block_size)[0] != 1 or bool((weight.zero_point != 0).any()):
        return None
    bits = {torch.int8: 8, torch.int4: 4}.get(weight.target_dtype)
    return (weight.qdata, weight.scale, bits, weight.block_size[1]) if bits else None


def use_cpu_kernels(model: Any) -> dict[str, int]:
    """Swap torchao's unpacked weight-only layers of `model` (on the CPU) for PyTorch's CPU kernels, in
    place; tied embeddings and heads keep sharing one int8 table. Returns how many modules of each kind
    were swapped. Numerics: the same weights, activations in the scales' dtype (bfloat16)."""
    import torch.nn as nn

    Int8RowLinear, Int8RowEmbedding, Int4GroupLinear = _make_modules()
    counts = {"int8_linear": 0, "int4_linear": 0, "int8_embedding": 0}
    swaps = []
    copies: dict[tuple, Any] = {}

    def aligned(t: Any) -> Any:
        # Weights read from safetensors can sit at any byte offset; the CPU kernels load them with
        # aligned vector instructions (a misaligned int8 matrix crashed _weight_int8pack_mm). A fresh
        # copy, made once per stored tensor so a tied embedding and head still share one.
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in copies:
            copies[key] = t.contiguous().clone()
        return copies[key]

    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        found = _unpacked(weight) if weight is not None else None
        if found is None or weight.device.type != "cpu":
            continue
        qdata, scale, bits, group = found
        qdata = aligned(qdata)
        if isinstance(mod, nn.Embedding) and bits == 8 and group == qdata.shape[1]:
            swaps.append((name, Int8RowEmbedding(qdata, aligned(scale[:, 0]), mod.padding_idx), "int8_embedding"))
        elif isinstance(mod, nn.Linear) and bits == 8 and group == qdata.shape[1]:
            swaps.append((name, Int8RowLinear(qdata, aligned(scale[:, 0]), mod.bias), "int8_linear"))
        elif isinstance(mod, nn.Linear) and bits == 4 and group in INT4_GROUPS and qdata.shape[1] % group == 0:
            swaps.append((name, Int4GroupLinear(qdata, scale, group, mod.bias), "int4_linear"))
    for name, new, kind in swaps:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        counts[kind] += 1
    model.__dict__["_kdflow_cpu_kernels"] = counts
    model.__dict__.pop("_kdflow_head_verdict", None)  # the head changed: probe it again
    return counts


def is_torchao_quantized(model: Any) -> bool:
    from kdflow.models import unwrap

    q = getattr(getattr(unwrap(model), "config", None), "quantization_config", None)
    method = q.get("quant_method") if isinstance(q, dict) else getattr(q, "quant_method", None)
    return str(getattr(method, "value", method)) == "torchao"
