"""Bad input and faults give one clear line, never a traceback or a silent result (issue 14,
items 14-16). CI runs as root, so unwritable and full disks are simulated by raising the OSError
from the write call, not with chmod."""

import errno
import json
import os
import shutil
import stat

import pytest

from kdflow.cli import main
from kdflow.data import read_rows
from kdflow.errors import DataError

from conftest import write_jsonl


def sft(tiny_dirs, tiny_data, out, *extra):
    return ["distill", "method=sft", "teacher.name=null", f"student.name={tiny_dirs['student']}",
            f"data.train={tiny_data['train']}", f"output_dir={out}", "data.max_train_rows=8", "train.batch_size=4",
            "train.report_to=[none]", "evaluate_before=false", "evaluate_teacher=false", "train.max_steps=1", *extra]


def one_line_error(capsys) -> str:
    """The error line of the last command (progress bars of earlier ones may precede it in stderr)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kdflow: error: ")]
    assert "Traceback" not in err and len(lines) == 1 and err.rstrip("\n").endswith(lines[0]), err
    return lines[0]


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fail the test if a model's weights load: settings and data must be checked before."""
    import kdflow.methods.kd as kd
    import kdflow.models as models

    def refuse(spec, *a, **k):
        raise AssertionError(f"loaded {spec.name} before the bad input was found")

    monkeypatch.setattr(kd, "load_model", refuse)
    monkeypatch.setattr(models, "load_model", refuse)  # the teacher: kdflow.teachers.load_teacher
    monkeypatch.setattr(kd, "build_student", lambda *a, **k: refuse(a[0]))


# ----------------------------------------------------------------------------------------------
# Data files


@pytest.mark.parametrize("suffix,body,line", [
    (".jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n', 2),
    (".csv", b"prompt,response\na,b\ncaf\xe9,b\n", 3),
    (".json", b'[{"prompt": "a", "response": "b"},\n {"prompt": "caf\xe9", "response": "b"}]', 2),
])
def test_non_utf8_data_names_the_file_and_line(tmp_path, suffix, body, line):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(body)
    with pytest.raises(DataError, match=rf"latin1\{suffix}:{line}: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        read_rows(str(path), "data.train")


def test_corrupt_parquet_and_empty_files(tmp_path):
    bad = tmp_path / "rows.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(DataError, match=r"rows.parquet: not a readable parquet file"):
        read_rows(str(bad))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"data.test .*empty.jsonl has no rows"):
        read_rows(str(empty), "data.test")


def test_bad_data_stops_the_run_before_any_model_loads(tmp_path, tiny_dirs, tiny_data, capsys, no_model_loads):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe\n')
    args = [a for a in sft(tiny_dirs, tiny_data, tmp_path / "run") if not a.startswith("data.train=")]
    assert main([*args, f"data.train={bad}"]) == 2
    assert f"{bad}:2: not UTF-8 text" in one_line_error(capsys)
    empty_val = write_jsonl(tmp_path / "val.jsonl", [])
    assert main([*sft(tiny_dirs, tiny_data, tmp_path / "run"), f"data.validation={empty_val}", "train.eval_steps=1"]) == 2
    assert f"data.validation {empty_val} has no rows" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_an_empty_test_split_is_refused_not_scored_as_perplexity_one(tmp_path, tiny_dirs, capsys):
    empty = write_jsonl(tmp_path / "test.jsonl", [])
    assert main(["eval", f"model.name={tiny_dirs['student']}", f"data.test={empty}"]) == 2
    assert "has no rows" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------
# Settings checked before models load


@pytest.mark.parametrize("overrides,message", [
    ({"no_such_field": 1}, "student.config_overrides: LlamaConfig has no field 'no_such_field'"),
    ({"hidden_size": "wide"}, "student.config_overrides.hidden_size: expected int like 32, got 'wide'"),
    ({"num_hidden_layers": -1}, "student.config_overrides.num_hidden_layers must be >= 1, got -1"),
])
def test_broken_config_overrides_are_one_line_before_any_model_loads(tmp_path, tiny_dirs, tiny_data, capsys,
                                                                     no_model_loads, overrides, message):
    over = json.dumps(overrides)
    assert main([*sft(tiny_dirs, tiny_data, tmp_path / "run"), "student.init=config",
                 f"student.config_overrides={over}"]) == 2
    assert message in one_line_error(capsys)


def test_heads_that_do_not_fit_are_found_by_a_tiny_forward(tmp_path, tiny_dirs, tiny_data, capsys):
    assert main([*sft(tiny_dirs, tiny_data, tmp_path / "run"), "student.init=config",
                 "student.config_overrides={num_key_value_heads: 3}"]) == 2
    assert "do not give a working model" in one_line_error(capsys)


def test_eval_with_a_missing_adapter(tmp_path, tiny_dirs, tiny_data, capsys):
    assert main(["eval", f"model.name={tiny_dirs['student']}", f"data.test={tiny_data['test']}",
                 f"lora_adapter={tmp_path / 'nothing'}"]) == 2
    assert "no adapter_config.json there" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------
# Damaged models and checkpoints


def test_damaged_model_files_name_the_folder(tmp_path, tiny_dirs, tiny_data, capsys, monkeypatch):
    broken = tmp_path / "student"
    shutil.copytree(tiny_dirs["student"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = [a for a in sft(tiny_dirs, tiny_data, tmp_path / "run") if not a.startswith("student.name=")]
    assert main([*args, f"student.name={broken}"]) == 2
    assert f"model folder {broken} cannot be loaded (SafetensorError" in one_line_error(capsys)
    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
    assert main([*args, f"student.name={gguf}"]) == 2
    assert f"{gguf} cannot be read (" in one_line_error(capsys)


def test_a_damaged_checkpoint_is_named_instead_of_crashing_the_resume(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    args = [*sft(tiny_dirs, tiny_data, out), "train.max_steps=2", "train.save_steps=1"]
    assert main(args) == 0
    shutil.rmtree(out / "checkpoint-2")
    weights = out / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert main(args) == 2
    assert f"checkpoint {out / 'checkpoint-1'} is damaged: model.safetensors is truncated" in one_line_error(capsys)


# ----------------------------------------------------------------------------------------------
# Output folders: a file, unwritable, full


def test_output_dir_that_is_a_file(tmp_path, tiny_dirs, tiny_data, capsys):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    assert main(sft(tiny_dirs, tiny_data, taken)) == 2
    assert f"output_dir {taken} is a file, not a folder" in one_line_error(capsys)


@pytest.mark.parametrize("code,advice", [(errno.EACCES, "no permission"), (errno.ENOSPC, "the disk is full")])
def test_unwritable_or_full_output_dir_is_one_line_naming_the_file(tmp_path, tiny_dirs, tiny_data, capsys, monkeypatch,
                                                                   code, advice):
    import kdflow.report as report

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code), kwargs.get("dir", "?"))

    monkeypatch.setattr(report.tempfile, "mkstemp", fail)
    out = tmp_path / "run"
    assert main(sft(tiny_dirs, tiny_data, out)) == 2
    assert f"{out / 'config.yaml'}: {os.strerror(code)} ({advice}" in one_line_error(capsys)


def test_a_library_writer_failing_on_a_full_disk_becomes_enospc(tmp_path, monkeypatch):
    """torch.save and safetensors report a full disk as RuntimeError / SafetensorError."""
    import kdflow.report as report

    with pytest.raises(RuntimeError):  # a disk with room: the error is not disguised
        with report.atomic_folder(tmp_path / "ckpt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    monkeypatch.setattr(report.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(100, 100, 0))
    with pytest.raises(OSError) as info:
        with report.atomic_folder(tmp_path / "ckpt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "ckpt")
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


# ----------------------------------------------------------------------------------------------
# Item 16: outputs get ordinary permissions


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_respect_the_umask(tmp_path, umask):
    from kdflow.report import atomic_folder, write_atomic

    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "metrics.json", "{}")
        with atomic_folder(tmp_path / "checkpoint-1") as tmp:
            (tmp / "x").write_text("1")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "checkpoint-1").stat().st_mode) == 0o777 & ~umask
