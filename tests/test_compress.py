"""Compression (methods.md §12): importance scores, width pruning, torchao export, CPU kernels, QAT-KD."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.compress.prune import choose_heads, loss_importance, top_indices, width_importance
from kdflow.compress.width import WidthPlan, prune_width, target_sizes
from kdflow.config import DataConfig, ModelSpec, QuantSpec, StudentSpec, WidthSpec
from kdflow.data import collate, encode_rows, read_rows
from kdflow.errors import ConfigError
from kdflow.models import build_student, check_student, load_model, load_tokenizer, prune_layers

from conftest import tiny_llama

# the `compress` extra (`make install` installs it); width pruning needs nothing beyond the core
needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")


@pytest.fixture(scope="module")
def calib(bpe_tok, tiny_data):
    return encode_rows(read_rows(str(tiny_data["train"])).head(6), bpe_tok, DataConfig()), bpe_tok.pad_token_id


def hand_forward(model, ids):
    """A one-layer Llama computed step by step from its weights: logits, each query head's attention output,
    the MLP's act(gate) * up, and the three RMSNorm outputs."""
    cfg, layer = model.config, model.model.layers[0]
    h_dim, n_h, n_kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

    def rms(x, w):
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    x = model.model.embed_tokens.weight[ids]  # [T, H]
    t = x.shape[0]
    a = rms(x, layer.input_layernorm.weight)
    q = (a @ layer.self_attn.q_proj.weight.T).view(t, n_h, h_dim)
    k = (a @ layer.self_attn.k_proj.weight.T).view(t, n_kv, h_dim)
    v = (a @ layer.self_attn.v_proj.weight.T).view(t, n_kv, h_dim)
    inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, h_dim, 2).float() / h_dim))
    ang = torch.outer(torch.arange(t).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]

    def rope(z):
        return z * cos + torch.cat([-z[..., h_dim // 2:], z[..., :h_dim // 2]], -1) * sin

    q, k = rope(q), rope(k)
    heads = []
    for h in range(n_h):
        g = h // (n_h // n_kv)  # query head h reads KV head g
        s = (q[:, h] @ k[:, g].T) / math.sqrt(h_dim)
        s = s.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        heads.append(torch.softmax(s, -1) @ v[:, g])
    attn = torch.stack(heads, 1)  # [T, n_h, D]
    x = x + attn.reshape(t, -1) @ layer.self_attn.o_proj.weight.T
    b = rms(x, layer.post_attention_layernorm.weight)
    act = F.silu(b @ layer.mlp.gate_proj.weight.T) * (b @ layer.mlp.up_proj.weight.T)
    x = x + act @ layer.mlp.down_proj.weight.T
    f = rms(x, model.model.norm.weight)
    return f @ model.lm_head.weight.T, attn, act, [a, b, f]


def test_width_importance_matches_a_hand_computation_and_skips_padding(bpe_tok, calib):
    model = tiny_llama(bpe_tok, layers=1, hidden=32, seed=4).eval()
    examples = calib[0][:4]  # of different lengths: the batch is padded
    assert len({len(e["input_ids"]) for e in examples}) > 1
    mlp, heads, hidden, tokens = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor(e["input_ids"])
            logits, attn, act, norms = hand_forward(model, ids)
            assert torch.allclose(logits, model(ids[None]).logits[0], atol=1e-4)  # the hand model is the model
            mlp = mlp + act.abs().sum(0)
            heads = heads + attn.norm(dim=-1).sum(0)
            hidden = hidden + sum(n.abs().sum(0) for n in norms) / 3
            tokens += len(ids)
        scores = width_importance(model, examples, calib[1], batch_size=4)
    assert torch.allclose(torch.tensor(scores.mlp[0]), mlp / tokens, rtol=1e-4, atol=1e-6)
    assert torch.allclose(torch.tensor(scores.heads[0]), heads / tokens, rtol=1e-4, atol=1e-6)
    assert torch.allclose(torch.tensor(scores.hidden), hidden / tokens, rtol=1e-4, atol=1e-6)


def test_head_and_channel_choices():
    assert top_indices([0.1, 0.9, 0.5, 0.9], 2) == [1, 3]
    # 6 query heads in 3 KV groups of 2: group sums 0.3, 1.1, 0.7
    scores = [0.1, 0.2, 1.0, 0.1, 0.3, 0.4]
    assert choose_heads(scores, 3, 2, 4) == ([1, 2], [2, 3, 4, 5])
    assert choose_heads(scores, 3, 2, 2) == ([1, 2], [2, 5])  # one head per kept group, its strongest
    assert choose_heads(scores, 3, 3, 3) == ([0, 1, 2], [1, 2, 5])


def test_loss_importance_is_the_loss_of_the_model_without_each_layer(bpe_tok, calib):
    model = tiny_llama(bpe_tok, layers=3, hidden=32, seed=5).eval()
    examples, pad = calib
    scores = loss_importance(model, examples, pad, batch_size=4)
    batch = collate(examples, pad)

    def loss(m):
        with torch.no_grad():
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                     ignore_index=-100))

    full = loss(model)
    for i in range(3):
        without = prune_layers(model, [j for j in range(3) if j != i]).eval()
        assert math.isclose(scores[i], loss(without) - full, rel_tol=1e-4, abs_tol=1e-5)


def zeroed_reference(model, plan):
    """The original model with what `plan` drops zeroed: dropped MLP channels and heads contribute nothing,
    dropped hidden channels stay 0 in the residual stream, and each RMSNorm (a mean over fewer nonzero
    channels) rescaled so it normalises as the pruned model's does."""
    import copy

    ref = copy.deepcopy(model).eval()
    cfg = ref.config
    d = cfg.head_dim
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            drop_mlp = [c for c in range(cfg.intermediate_size) if c not in plan.mlp[i]]
            layer.mlp.down_proj.weight[:, drop_mlp] = 0
            drop_heads = [h for h in range(cfg.num_attention_heads) if h not in plan.heads[i]]
            for h in drop_heads:
                layer.self_attn.o_proj.weight[:, h * d:(h + 1) * d] = 0
        if plan.hidden is not None:
            n, kept = cfg.hidden_size, len(plan.hidden)
            drop = [c for c in range(n) if c not in plan.hidden]
            ref.model.embed_tokens.weight[:, drop] = 0
            for layer in ref.model.layers:
                layer.self_attn.o_proj.weight[drop] = 0
                layer.mlp.down_proj.weight[drop] = 0
            for norm in [m for l in ref.model.layers for m in (l.input_layernorm, l.post_attention_layernorm)] + [ref.model.norm]:
                norm.weight.mul_(math.sqrt(kept / n))
                norm.variance_epsilon *= kept / n
    return ref


@pytest.mark.parametrize("hidden", [None, [0, 2, 3, 5, 7, 8, 11, 12, 13, 17, 19, 20, 22, 25, 28, 30]])
def test_a_width_pruned_model_loads_with_automodel_and_computes_the_pruned_function(tmp_path, bpe_tok, hidden):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(bpe_tok, layers=2, hidden=32, seed=6).eval()  # 4 query heads in 2 KV groups, MLP 64
    plan = WidthPlan(hidden=hidden, mlp=[[0, 3, 4, 9, 10, 20, 33, 63], [1, 2, 5, 8, 13, 40, 41, 50]],
                     kv_groups=[[1], [0]], heads=[[2, 3], [0, 1]])
    pruned = prune_width(model, plan)
    pruned.save_pretrained(tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    c = loaded.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 2, 1, 8)
    assert c.hidden_size == (16 if hidden else 32)
    ids = torch.randint(0, len(bpe_tok), (2, 11))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, zeroed_reference(model, plan)(ids).logits, atol=1e-5)
        assert not torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-3)  # something was pruned
    out = loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=bpe_tok.pad_token_id)
    assert out.shape[1] == 7


def test_width_pruning_through_build_student_records_what_it_kept(tiny_dirs, calib):
    tspec = ModelSpec(name=str(tiny_dirs["teacher"]))  # 4 layers, hidden 48, MLP 96, 4 heads / 2 KV groups
    teacher = load_model(tspec)
    spec = StudentSpec(init="prune_teacher", num_layers=3, width=WidthSpec(hidden_size=40, intermediate_size=64,
                                                                          num_key_value_heads=1))
    record = {}
    student = build_student(spec, teacher, tspec, calib, record)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == \
        (3, 40, 64, 2, 1)
    assert c.kdflow_width_pruned == {"hidden_size": [48, 40], "intermediate_size": [96, 64],
                                     "num_attention_heads": [4, 2], "num_key_value_heads": [2, 1]}
    kept = record["width"]["kept"]
    assert len(kept["mlp"]) == 3 and all(len(k) == 64 for k in kept["mlp"]) and len(kept["hidden"]) == 40
    # the kept MLP channels of each kept layer are that layer's highest-scoring ones in the teacher
    layers = c.kdflow_pruned_from_layers
    scores = width_importance(teacher, calib[0], calib[1])
    assert kept["mlp"] == [top_indices(scores.mlp[i], 64) for i in layers]
    assert 0 < record["width"]["importance_kept"]["mlp"] < 1
    with torch.no_grad():
        student(torch.randint(0, 100, (1, 5)))


def test_bad_width_settings_give_one_clear_line(tiny_dirs):
    tspec = ModelSpec(name=str(tiny_dirs["teacher"]))
    cases = [(WidthSpec(intermediate_size=500), r"student.width.intermediate_size=500: the model has only 96"),
             (WidthSpec(hidden_size=49), r"hidden_size=49: the model has only 48"),
             (WidthSpec(num_key_value_heads=3), r"num_key_value_heads=3: the model has only 2"),
             (WidthSpec(num_attention_heads=3), r"num_attention_heads=3: query heads are kept in whole GQA groups, 2 KV "
                                                r"group\(s\) of 2 head\(s\) here, so give a multiple of 2 up to 4"),
             (WidthSpec(num_key_value_heads=1, num_attention_heads=4), r"multiple of 1 up to 2"),
             # LlamaConfig wants hidden_size % num_attention_heads == 0 even with head_dim given; transformers checks
             # it only when the config is saved, i.e. at the first checkpoint, minutes into training
             (WidthSpec(hidden_size=42), r"student.width: the pruned sizes hidden_size=42, .* break a rule of LlamaConfig "
                                         r"\(The hidden size \(42\) is not a multiple of the number of attention heads \(4\)")]
    for width, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_student(StudentSpec(init="prune_teacher", width=width), tspec, calibrated=True)
    with pytest.raises(ConfigError, match="width needs calibration rows"):
        check_student(StudentSpec(init="prune_teacher", width=WidthSpec(hidden_size=32)), tspec)
    from transformers import GPT2Config

    with pytest.raises(ConfigError, match="width pruning is implemented for Llama-style models.*this model is gpt2"):
        target_sizes(WidthSpec(hidden_size=8), GPT2Config())


# ----------------------------------------------------------------------------------------------
# Quantization


@pytest.fixture(scope="module")
def float_student(tmp_path_factory, bpe_tok):
    """A tiny Llama whose widths take int4 groups of 32 (hidden 64, MLP 128, heads 4 x 16), tied embeddings."""
    folder = tmp_path_factory.mktemp("float") / "student"
    model = tiny_llama(bpe_tok, layers=2, hidden=64, seed=7)
    model.save_pretrained(folder)
    bpe_tok.save_pretrained(folder)
    return folder


@needs_torchao
def test_cpu_kernels_compute_the_dequantized_weights():
    from kdflow.compress.quantize import _make_modules

    Int8RowLinear, Int8RowEmbedding, Int4GroupLinear = _make_modules()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64).to(torch.bfloat16)
    q8, s8 = torch.randint(-127, 128, (48, 64), dtype=torch.int8), (torch.rand(48) / 50).to(torch.bfloat16)
    w8 = q8.float() * s8.float()[:, None]
    assert torch.allclose(Int8RowLinear(q8, s8)(x).float(), x.float() @ w8.T, atol=0.05, rtol=0.02)
    q4, s4 = torch.randint(-8, 8, (48, 64), dtype=torch.int8), (torch.rand(48, 2) / 10).to(torch.bfloat16)
    w4 = (q4.float().view(48, 2, 32) * s4.float()[..., None]).view(48, 64)
    assert torch.allclose(Int4GroupLinear(q4, s4, 32)(x).float(), x.float() @ w4.T, atol=0.05, rtol=0.02)
    ids = torch.tensor([[3, 0, 47]])
    assert torch.allclose(Int8RowEmbedding(q8, s8)(ids).float(), w8[ids], rtol=1e-2, atol=1e-3)


@needs_torchao
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_exported_students_reload_with_from_pretrained_and_generate(tmp_path, float_student, bpe_tok, tiny_data, scheme):
    from transformers import AutoModelForCausalLM

    out = tmp_path / scheme
    rc = main(["export", f"model.name={float_student}", f"output={out}", f"quantize.scheme={scheme}"])
    assert rc == 0
    record = json.loads((out / "kdflow_export.json").read_text())
    assert record["scheme"] == scheme and record["linear_layers"] == 14
    float_bytes = (float_student / "model.safetensors").stat().st_size
    assert record["bytes"] < float_bytes / 2.5  # int8 bytes (+ bf16 norms and scales) against float32
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # transformers + torchao alone
    assert type(plain.model.layers[0].mlp.up_proj.weight).__name__ == "IntxUnpackedToInt8Tensor"
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # the head stays tied, stored once
    reference = AutoModelForCausalLM.from_pretrained(float_student).eval()
    ids = torch.randint(0, len(bpe_tok), (2, 9))
    with torch.no_grad():
        q_logits, f_logits = plain(ids).logits.float(), reference(ids).logits
        fast = load_model(ModelSpec(name=str(out)))  # kdflow: PyTorch's CPU kernels
        assert type(fast.model.layers[0].mlp.up_proj).__name__ == ("Int8RowLinear" if scheme == "int8" else "Int4GroupLinear")
        assert type(fast.model.embed_tokens).__name__ == "Int8RowEmbedding"
        k_logits = fast(ids).logits.float()
    err = float((q_logits - f_logits).norm() / f_logits.norm())
    assert err < (0.05 if scheme == "int8" else 0.3)  # quantization error, int4 coarser
    assert float((k_logits - q_logits).norm() / q_logits.norm()) < 0.02  # same weights, bf16 rounding
    tok = load_tokenizer(ModelSpec(name=str(out)))
    assert fast.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id).shape[1] == 7
    # `kdflow eval` scores the export like any model, with intervals
    rc = main(["eval", f"model.name={out}", f"data.test={tiny_data['test']}", "eval.max_new_tokens=4",
               f"output={tmp_path / 'scores.json'}"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert rc == 0 and scores["metrics"]["rows"] == 8 and len(scores["per_row"]["exact_match"]) == 8
    iv = scores["intervals"]["answer_nll"]
    assert iv["low"] <= scores["metrics"]["answer_nll"] <= iv["high"]


@needs_torchao
def test_an_untied_head_and_kept_embeddings(tmp_path, bpe_tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(bpe_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "f")
    bpe_tok.save_pretrained(tmp_path / "f")
    for emb, head_kind in (("int8", "Int8RowLinear"), ("keep", "Linear")):
        assert main(["export", f"model.name={tmp_path / 'f'}", f"output={tmp_path / emb}", "quantize.scheme=int4",
                     f"quantize.embeddings={emb}"]) == 0
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / emb)
        assert (type(plain.lm_head.weight).__name__ == "IntxUnpackedToInt8Tensor") == (emb == "int8")
        fast = load_model(ModelSpec(name=str(tmp_path / emb)))
        assert type(fast.lm_head).__name__ == head_kind
        assert type(fast.model.embed_tokens).__name__ == ("Int8RowEmbedding" if emb == "int8" else "Embedding")
        assert type(fast.model.layers[0].mlp.down_proj).__name__ == "Int4GroupLinear"
        with torch.no_grad():
            fast(torch.randint(0, len(bpe_tok), (1, 5)))


def test_quantizing_without_torchao_is_one_clear_line(tmp_path, float_student, monkeypatch, capsys):
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find(name, *a))
    assert main(["export", f"model.name={float_student}", f"output={tmp_path / 'q'}", "quantize.scheme=int8"]) == 2
    assert "quantize.scheme=int8 needs torchao: pip install 'kdflow[compress]'" in capsys.readouterr().err


@needs_torchao
def test_int4_on_a_layer_its_groups_do_not_tile_is_one_clear_line(tmp_path, tiny_dirs, capsys):
    # the tiny teacher has hidden 48: groups of 32 do not tile its input width
    rc = main(["export", f"model.name={tiny_dirs['teacher']}", f"output={tmp_path / 'q'}", "quantize.scheme=int4"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert ("quantize.scheme=int4 cannot quantize model.layers.0.self_attn.q_proj: its input width 48 is not a multiple "
            "of quantize.group_size=32; use quantize.scheme=int8") in err
    assert not (tmp_path / "q").exists()
    with pytest.raises(ConfigError, match="group_size=48"):
        from kdflow.compress.quantize import check_scheme
        from kdflow.models import load_model as lm

        check_scheme(lm(ModelSpec(name=str(tiny_dirs["teacher"]))), QuantSpec(scheme="int4", group_size=48))


@needs_torchao
def test_qat_simulates_exactly_the_weights_the_export_stores(tmp_path, float_student):
    from kdflow.compress.quantize import export_quantized, finish_qat, prepare_qat

    for scheme in ("int8", "int4"):
        q = QuantSpec(scheme=scheme)
        model = load_model(ModelSpec(name=str(float_student)), dtype=torch.bfloat16)
        assert prepare_qat(model, q) == 14
        layer = model.model.layers[1].mlp.down_proj
        assert type(layer).__name__ == "FakeQuantizedLinear" and type(model.lm_head).__name__ == "Linear"
        with torch.no_grad():
            simulated = layer.weight_fake_quantizer(layer.weight).float()
        finish_qat(model)
        assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear"
        model.save_pretrained(tmp_path / f"trained-{scheme}")
        export_quantized(ModelSpec(name=str(tmp_path / f"trained-{scheme}")), q, tmp_path / f"q-{scheme}",
                         tokenizer=load_tokenizer(ModelSpec(name=str(float_student))))
        from transformers import AutoModelForCausalLM

        stored = AutoModelForCausalLM.from_pretrained(tmp_path / f"q-{scheme}").model.layers[1].mlp.down_proj.weight
        assert torch.allclose(stored.dequantize().float(), simulated, rtol=1e-2, atol=1e-4)


def qat_args(folders, tiny_data, out, *extra):
    return ["distill", "method=kd", f"teacher.name={folders}", "student.init=prune_teacher", "student.keep_layers=[0,3]",
            f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", f"output_dir={out}",
            "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=2", "train.report_to=[none]",
            "train.save_steps=0", "evaluate_before=false", "evaluate_teacher=false", "eval.max_new_tokens=4",
            "eval.batch_size=8", "teacher.check.mode='off'", *extra]


@pytest.fixture(scope="module")
def teacher64(tmp_path_factory, bpe_tok):
    folder = tmp_path_factory.mktemp("teacher64") / "teacher"
    tiny_llama(bpe_tok, layers=4, hidden=64, seed=8).save_pretrained(folder)
    bpe_tok.save_pretrained(folder)
    return folder


@needs_torchao
def test_qat_kd_runs_end_to_end_and_scores_the_quantized_student(tmp_path, teacher64, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(qat_args(teacher64, tiny_data, out, "quantize.scheme=int4", "quantize.qat=true")) == 0
    said = capsys.readouterr().out
    assert "quantization-aware training: 14 linear layers see their weights fake-quantized" in said
    export = json.loads((out / "student_int4" / "kdflow_export.json").read_text())
    assert export["scheme"] == "int4" and export["group_size"] == 32
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["quantized"]["bytes"] == export["bytes"] and metrics["train"]["steps"] == 2
    assert "student (after)" in metrics["eval"] and metrics["eval"]["student (after)"]["rows"] == 8
    report = (out / "report.md").read_text()
    assert "quantized by quantization-aware training: block linear layers int4 in groups of 32" in report
    # the float student saved beside it is a plain model (the fake quantizers are gone)
    assert "weight_fake_quantizer" not in json.dumps(list(json.loads(
        (out / "student" / "config.json").read_text())))
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(out / "student").model.layers[0].mlp.up_proj).__name__ == "Linear"


@needs_torchao
def test_bad_quantize_settings_are_refused_before_anything_loads(tmp_path, teacher64, tiny_dirs, tiny_data, capsys):
    cases = [(["quantize.qat=true"], "quantize.qat=true needs quantize.scheme=int8 or int4"),
             (["quantize.scheme=int4", "quantize.qat=true", "student.lora.enabled=true"], "does not combine with"),
             (["quantize.scheme=int4", "quantize.group_size=48"], "must be 32 or 64 or 128 or 256, got 48")]
    for extra, message in cases:
        assert main(qat_args(teacher64, tiny_data, tmp_path / "r", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0
    # int4 groups of 32 do not tile the hidden width 48 of this teacher's student
    assert main(qat_args(tiny_dirs["teacher"], tiny_data, tmp_path / "r", "quantize.scheme=int4")) == 2
    assert "cannot quantize model.layers.0.self_attn.q_proj: its input width 48" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_distill_run_prunes_by_loss_and_width_and_reports_it(tmp_path, tiny_dirs, tiny_data):
    out = tmp_path / "run"
    assert main(["distill", "method=sft", f"teacher.name={tiny_dirs['teacher']}", "student.init=prune_teacher",
                 "student.num_layers=3", "student.layer_selection=loss", "student.width.intermediate_size=64",
                 "student.width.num_key_value_heads=1", "student.calibration_rows=8", f"data.train={tiny_data['train']}",
                 f"output_dir={out}", "data.max_train_rows=8", "train.batch_size=4", "train.max_steps=1",
                 "train.report_to=[none]", "train.save_steps=0", "evaluate_before=false", "evaluate_teacher=false"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["layer_selection"] == "loss" and len(metrics["layer_importance"]) == 4
    assert metrics["width_pruned"] == {"intermediate_size": [96, 64], "num_attention_heads": [4, 2],
                                       "num_key_value_heads": [2, 1]}
    pruning = json.loads((out / "pruning.json").read_text())
    assert len(pruning["kept"]["mlp"]) == 3 and len(pruning["importance"]["heads"][0]) == 4
    report = (out / "report.md").read_text()
    assert "(by loss importance)" in report and "answer-loss increase" in report
    assert "width pruned by activation magnitude on calibration rows: intermediate_size 96 → 64" in report
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(out / "student")
    assert (saved.config.num_hidden_layers, saved.config.intermediate_size, saved.config.num_key_value_heads) == (3, 64, 1)
