"""Issue 13, devices: where models run, teachers larger than one device, and the GPU check.

This machine has no GPU, so the GPU paths are checked by what can be seen without one: every verb
honours `device: cpu` even when the process's device is another (the GPU check runs with accelerate
told that the process's device is `meta`), devices and 8/4-bit loading this machine lacks are refused
in one line before any model loads, a LoRA teacher equals its merged model, and caches tell teachers
loaded differently apart.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdflow.cli import main
from kdflow.config import DistillConfig, ModelSpec, StudentSpec, TeacherSpec, load_config
from kdflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# What the GPU machine's Python lacks (issue 13), and two packages it may lack too.
MISSING_ON_GPU_MACHINE = ["flwr", "ray", "rapidfuzz", "rouge_score", "gguf", "datasets", "matplotlib", "tensorboard"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdflow: error: ")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if any model's weights load: the settings must be refused before."""
    import kdflow.models as models

    def refuse(spec, *a, **k):
        raise AssertionError(f"loaded {spec.name} before the bad setting was found")

    monkeypatch.setattr(models, "load_model", refuse)
    for module in ("kdflow.methods.kd", "kdflow.methods.minillm", "kdflow.methods.codistill", "kdflow.federated.fedmkt"):
        mod = __import__(module, fromlist=["x"])
        for name in ("load_model", "build_student"):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, refuse)


# ----------------------------------------------------------------------------------------------
# The GPU check, run here the way the GPU machine runs it


def test_gpu_check_runs_every_verb_tiny_on_the_cpu_without_the_packages_a_gpu_image_lacks(tmp_path):
    """bench/gpu_check.py --device cpu --tiny in a fresh Python where importing any of the packages
    the GPU machine lacks fails, and where the process's device (what `device: auto` means) is made
    `meta`: every verb must run and put every model on the CPU it was told to use (a model placed by
    `auto` would land on meta and fail)."""
    boot = ("import sys, runpy\n"
            f"for name in {MISSING_ON_GPU_MACHINE!r}:\n"
            "    sys.modules[name] = None  # import fails as on a machine without the package\n"
            f"sys.path.insert(0, {str(ROOT / 'src')!r})\n"
            "import torch, kdflow.models\n"
            "kdflow.models.process_device = lambda: torch.device('meta')\n"
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--tiny', '--work', {str(tmp_path / 'work')!r}]\n"
            f"runpy.run_path({str(ROOT / 'bench' / 'gpu_check.py')!r}, run_name='__main__')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script puts src/ on the path itself
    env.update(PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-c", boot], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=900)
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-3000:]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| verb")]
    verbs = [r.split("|")[1].strip() for r in rows]
    assert verbs == ["distill sft", "cache-teacher", "distill kd (cache)", "distill kd (online)", "distill seqkd", "eval",
                     "codistill", "minillm", "fedmkt (in-process)", "compare (sft vs kd)"]
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "yes", row
        placements = cells[3].split("; ")
        assert placements and all(p.split(": ", 1)[1].startswith("cpu, float32") for p in placements), row
        assert float(cells[5]) > 0, row  # tokens/s
    logs = "".join(p.read_text() for p in (tmp_path / "work" / "logs").iterdir())
    assert "rouge-score is not installed: Rouge-L is reported as nan" in logs
    assert "Traceback" not in logs
    metrics = json.loads((tmp_path / "work" / "runs" / "kd" / "metrics.json").read_text())
    assert metrics["eval"]["student (after)"]["rougeL"] != metrics["eval"]["student (after)"]["rougeL"]  # nan


# ----------------------------------------------------------------------------------------------
# Devices


def test_device_settings_resolve_and_refuse_what_the_machine_lacks(monkeypatch):
    from kdflow.models import place, run_device
    from kdflow.training import training_arguments

    with pytest.raises(ConfigError, match=r"'teacher.device': 'gpu' is not a device"):
        load_config(DistillConfig, None, ["teacher.device=gpu"])
    assert run_device(ModelSpec(device="cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"teacher.device=cuda, but this machine has no CUDA GPU"):
        run_device(ModelSpec(device="cuda"), "teacher")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run_device(ModelSpec(device="cuda:1")) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"model.device=cuda:2, but this machine has 2 CUDA GPU\(s\) \(cuda:0 to cuda:1\)"):
        run_device(ModelSpec(device="cuda:2"))
    monkeypatch.undo()
    # auto is the process's device; an explicit cpu wins over it
    import kdflow.models as models

    monkeypatch.setattr(models, "process_device", lambda: torch.device("meta"))
    assert run_device(ModelSpec()) == torch.device("meta")
    model = torch.nn.Linear(2, 2)
    assert next(place(model, ModelSpec(device="cpu"), "teacher").parameters()).device.type == "cpu"
    assert models.PLACEMENTS["teacher"] == "cpu, float32"
    from kdflow.config import TrainConfig

    assert training_arguments(TrainConfig(report_to=["none"]), "unused", 0, False, device=torch.device("cpu")).use_cpu


def test_a_trained_model_takes_auto_or_cpu(tmp_path, tiny_dirs, tiny_data, capsys, no_model_loads):
    rc = main(["distill", f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
               f"data.train={tiny_data['train']}", f"output_dir={tmp_path}", "student.device=cuda:1"])
    assert rc == 2
    assert "student.device=cuda:1: a trained model runs on the process's device (auto) or on the cpu" in \
        one_line_error(capsys)


VERBS_WITH_A_DEVICE = [
    ("distill", "teacher.device=cuda", "teacher.device=cuda"),
    ("cache-teacher", "teacher.device=cuda:1", "teacher.device=cuda:1"),
    ("minillm", "teacher.device=mps", "teacher.device=mps, but MPS is not available"),
    ("eval", "model.device=cuda", "model.device=cuda"),
    ("codistill", "peers[0].model.device=cuda", "peers[0].model.device=cuda: a trained model runs on"),
    ("fedmkt", "server.model.device=cuda:0", "server.model.device=cuda:0: a party's model trains on"),
]


@pytest.mark.parametrize("verb,setting,message", VERBS_WITH_A_DEVICE)
def test_every_verb_refuses_a_device_this_machine_lacks_before_loading(tmp_path, tiny_dirs, tiny_data, capsys,
                                                                        no_model_loads, verb, setting, message):
    """Each verb reads its models' device settings (and says which one cannot be honoured) before
    any weights load."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    common = [f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", setting]
    peers = [{"name": n, "model": {"name": str(tiny_dirs["student"])}} for n in ("a", "b")]
    args = {"eval": [f"model.name={tiny_dirs['student']}"],
            "cache-teacher": [f"teacher.name={tiny_dirs['teacher']}", f"teacher_cache.dir={tmp_path / 'c'}"],
            "codistill": [f"peers={json.dumps(peers)}", f"output_dir={tmp_path / 'run'}"],
            "fedmkt": [f"server.model.name={tiny_dirs['teacher']}", f"output_dir={tmp_path / 'run'}",
                       f"clients={json.dumps([{'name': 'c', 'model': peers[0]['model']}])}"],
            }.get(verb, [f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
                         f"output_dir={tmp_path / 'run'}"])
    assert main([verb, *args, *common]) == 2
    assert message in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------
# Large teachers: 8/4-bit, device_map, LoRA, pruning, identity


def test_load_in_is_refused_without_cuda_or_bitsandbytes_in_one_line(tmp_path, tiny_dirs, tiny_data, capsys,
                                                                        monkeypatch, no_model_loads):
    from kdflow.teachers import check_teacher_settings

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["distill", f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
               f"data.train={tiny_data['train']}", f"output_dir={tmp_path}", "teacher.load_in=4bit"])
    assert rc == 2
    assert ("teacher.load_in=4bit needs a CUDA GPU (bitsandbytes), but this machine has no CUDA GPU; set "
            "teacher.load_in=none") in one_line_error(capsys)
    with pytest.raises(ConfigError, match="teacher.load_in=8bit needs a CUDA GPU .* but teacher.device=cpu"):
        check_teacher_settings(TeacherSpec(name="x", device="cpu", load_in="8bit"))
    # with a GPU but without the package
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find(name, *a))
    with pytest.raises(ConfigError, match="teacher.load_in=4bit needs the bitsandbytes package: pip install bitsandbytes"):
        check_teacher_settings(TeacherSpec(name="x", device_map="auto", load_in="4bit"))


def test_prune_teacher_is_refused_for_a_spread_or_quantised_teacher(tmp_path, tiny_dirs, tiny_data, capsys,
                                                                     no_model_loads):
    from kdflow.models import build_student, check_student

    rc = main(["distill", f"teacher.name={tiny_dirs['teacher']}", "student.init=prune_teacher", "student.keep_every=2",
               f"data.train={tiny_data['train']}", f"output_dir={tmp_path}", "teacher.device_map=auto"])
    assert rc == 2
    assert ("student.init=prune_teacher copies the teacher's layers, which a teacher loaded with teacher.device_map or "
            "teacher.load_in does not hold as plain weights on one device") in one_line_error(capsys)
    with pytest.raises(ConfigError, match=r"peers\[0\].model.init=prune_teacher copies"):
        check_student(StudentSpec(init="prune_teacher", keep_every=2), TeacherSpec(name="t", load_in="8bit"),
                      "peers[0].model")
    quantised = torch.nn.Module()  # what build_student is handed when a caller skipped the check
    quantised.is_quantized = True
    with pytest.raises(ConfigError, match="prune_teacher copies"):
        build_student(StudentSpec(init="prune_teacher", keep_every=2), quantised, TeacherSpec(name="t"))


def test_a_lora_teacher_gives_the_logits_of_its_merged_model(tmp_path, tiny_dirs):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from kdflow.teachers import load_teacher

    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"])
    torch.manual_seed(3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))  # B != 0: the adapter changes the model
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 17, 42, 9, 77, 3]])
    with torch.no_grad():
        with_adapter = peft_model(input_ids=ids).logits  # W x + (alpha/r) B A x, unmerged
        plain = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"])(input_ids=ids).logits
        teacher = load_teacher(TeacherSpec(name=str(tiny_dirs["teacher"]), lora_adapter=str(tmp_path / "adapter"),
                                           device="cpu"))
        got = teacher(input_ids=ids).logits
    assert not isinstance(teacher, PeftModel)  # merged: a plain model every code path handles
    assert not any(p.requires_grad for p in teacher.parameters())
    assert (with_adapter - plain).abs().max() > 1e-3
    torch.testing.assert_close(got, with_adapter, rtol=1e-5, atol=1e-5)


def test_device_map_auto_loads_the_same_teacher(tiny_dirs):
    from kdflow.models import describe_placement, load_model
    from kdflow.teachers import load_teacher

    ids = torch.tensor([[5, 17, 42, 9]])
    teacher = load_teacher(TeacherSpec(name=str(tiny_dirs["teacher"]), device_map="auto"))
    plain = load_model(ModelSpec(name=str(tiny_dirs["teacher"])))
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert describe_placement(teacher).endswith("float32")


def test_the_cache_identity_tells_teachers_loaded_differently_apart(tmp_path, tiny_dirs, bpe_tok):
    from kdflow.models import model_identity
    from kdflow.teacher_cache import TeacherCache, build_cache, manifest_key
    from kdflow.errors import DataError
    from kdflow.teachers import teacher_identity

    name = str(tiny_dirs["teacher"])
    plain = teacher_identity(TeacherSpec(name=name, device="cpu"))
    assert plain == model_identity(TeacherSpec(name=name))  # float32, no adapter: caches built before stay valid
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"one")
    with_lora = teacher_identity(TeacherSpec(name=name, lora_adapter=str(tmp_path / "a")))
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"two")
    others = {teacher_identity(TeacherSpec(name=name, load_in="4bit")),
              teacher_identity(TeacherSpec(name=name, load_in="8bit")),
              teacher_identity(TeacherSpec(name=name, dtype="bfloat16")),
              with_lora, teacher_identity(TeacherSpec(name=name, lora_adapter=str(tmp_path / "a")))}
    assert len(others | {plain}) == 6
    assert "load_in=4bit" in teacher_identity(TeacherSpec(name=name, load_in="4bit"))

    def key(teacher):
        return manifest_key(teacher=teacher, teacher_tokenizer="t", student_tokenizer="t", data="d", data_settings={},
                            k=2, temperature=1.0, token_scope="response", logp_dtype="float16", store_tail=True)

    example = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "prompt_len": 1, "row_index": 0}
    compute = lambda b: [{"ids": torch.zeros(2, 2, dtype=torch.long), "logp": torch.zeros(2, 2),  # noqa: E731
                          "tail_logp": torch.zeros(2)}]
    build_cache(tmp_path / "cache", key(plain), [example], 0, compute, vocab_size=10, progress=False)
    with pytest.raises(DataError, match="teacher"):
        TeacherCache(tmp_path / "cache", key(teacher_identity(TeacherSpec(name=name, load_in="4bit"))), 10)


def test_without_rouge_score_rouge_l_is_nan_and_said_once(monkeypatch, capsys):
    import math

    import kdflow.evaluate as ev

    monkeypatch.setattr(ev, "_SCORER", None)
    monkeypatch.setattr(ev, "rouge_available", lambda: False)
    assert all(math.isnan(x) for x in ev.rouge_l_scores(["a b"], [["a b"]]))
    ev.rouge_l_scores(["a"], [["b"]])
    assert capsys.readouterr().out.count("rouge-score is not installed") == 1


def test_where_models_run_is_not_part_of_a_runs_identity_but_how_they_load_is():
    """A run started on one GPU resumes on another (or on the CPU); a 4-bit teacher is another run."""
    from kdflow.runfolder import run_settings

    base = load_config(DistillConfig, None, ["teacher.name=t"])
    moved = load_config(DistillConfig, None, ["teacher.name=t", "teacher.device=cuda:1", "student.device=cpu"])
    spread = load_config(DistillConfig, None, ["teacher.name=t", "teacher.device_map=auto"])
    assert run_settings(base) == run_settings(moved) == run_settings(spread)
    assert run_settings(base) != run_settings(load_config(DistillConfig, None, ["teacher.name=t", "teacher.load_in=4bit"]))


def test_a_student_pruned_from_a_bf16_teacher_copies_the_stored_weights_exactly(tiny_dirs):
    """On a GPU the teacher runs in bf16 (dtype auto); the float32 student pruned from it must start
    from the teacher's stored weights, not from their bf16 rounding."""
    from kdflow.models import build_student, load_model

    spec = TeacherSpec(name=str(tiny_dirs["teacher"]), dtype="bfloat16")
    working = load_model(spec)
    assert working.dtype == torch.bfloat16
    student = build_student(StudentSpec(init="prune_teacher", keep_layers=[0, 3]), working, spec)
    stored = load_model(ModelSpec(name=str(tiny_dirs["teacher"])))
    assert student.dtype == torch.float32
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, stored.model.layers[3].mlp.up_proj.weight,
                               rtol=0, atol=0)
    torch.testing.assert_close(student.model.embed_tokens.weight, stored.model.embed_tokens.weight, rtol=0, atol=0)


def test_bf16_on_a_cpu_without_native_bf16_trains_in_float32_and_says_so(monkeypatch, capsys, tmp_path):
    """bf16 autocast on a CPU without native bf16 (oneDNN emulates it, ~30x slower) becomes float32,
    with one line naming the setting; where the CPU has it, or the setting is off, nothing changes."""
    from kdflow import models
    from kdflow.config import TrainConfig
    from kdflow.loop import Loop
    from kdflow.training import training_arguments

    monkeypatch.setattr(models, "_BF16_SAID", set())
    monkeypatch.setattr(models, "cpu_bf16_fast", lambda: False)
    assert models.use_bf16(True, "train.bf16", "cpu") is False
    assert models.use_bf16(True, "train.bf16", "cpu") is False
    out = capsys.readouterr().out
    assert out.count("NOTE: train.bf16=true") == 1 and "float32 instead" in out
    assert models.use_bf16(False, "train.bf16", "cpu") is False
    assert models.use_bf16(True, "x.bf16", "cuda") is True  # accelerators are not second-guessed
    assert Loop(True, "minillm.bf16").accelerator.mixed_precision == "no"
    assert "minillm.bf16=true" in capsys.readouterr().out
    assert training_arguments(TrainConfig(bf16=True), tmp_path, 0, False, device="cpu").bf16 is False
    monkeypatch.setattr(models, "cpu_bf16_fast", lambda: True)
    assert models.use_bf16(True, "train.bf16", "cpu") is True
    assert Loop(True).accelerator.mixed_precision == "bf16"
    assert training_arguments(TrainConfig(bf16=True), tmp_path, 0, False, device="cpu").bf16 is True
    Loop(False)  # leave accelerate's shared state as the other tests expect it
