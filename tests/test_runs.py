"""Run folders (issue 14, item 9): one run per folder. A refused run leaves the folder as it was,
checkpoints carry their run's settings digest, resume=never moves an earlier run aside, a lock
keeps a second run out, a moved folder resumes, and fedmkt-flower keeps metrics.json until its
replacement exists."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from kdflow.cli import main


def sft_args(tiny_dirs, tiny_data, out, *extra):
    """The cheapest real `distill` run: SFT of the tiny student, one or two steps, no evaluation."""
    return ["distill", "method=sft", "teacher.name=null", f"student.name={tiny_dirs['student']}",
            f"data.train={tiny_data['train']}", f"output_dir={out}", "data.max_train_rows=8", "train.batch_size=4",
            "train.report_to=[none]", "train.save_steps=1", "evaluate_before=false", "evaluate_teacher=false", *extra]


def stamp_of(ckpt):
    return json.loads((ckpt / "kdflow-run.json").read_text())["settings_sha256"]


def test_a_refused_run_leaves_the_folder_and_cannot_adopt_the_earlier_checkpoint(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_dirs, tiny_data, out, "train.max_steps=1")) == 0
    config_a = (out / "config.yaml").read_text()
    # Another experiment in the same folder, refused for a missing file: the folder is not touched.
    other = ("train.learning_rate=0.001", "train.max_steps=1")
    assert main(sft_args(tiny_dirs, tiny_data, out, *other, "train.resume=never",
                         f"data.validation={tmp_path / 'missing.jsonl'}")) == 2
    assert (out / "config.yaml").read_text() == config_a
    # Rerun without the mistake, resume=auto: the checkpoint is the other run's, so it is refused
    # (before, the run "resumed" the finished checkpoint and reported its weights as its own).
    capsys.readouterr()
    assert main(sft_args(tiny_dirs, tiny_data, out, *other)) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of a run with other settings (train.learning_rate differ) such as checkpoint-1" in err
    assert err.count("\n") == 1


def test_resume_never_moves_the_earlier_run_aside_and_a_stale_lock_is_taken_over(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_dirs, tiny_data, out, "train.max_steps=1")) == 0
    first = stamp_of(out / "checkpoint-1")
    # a lock left by a run that died (no process holds it): taken over, and said so
    (out / ".kdflow.lock").write_text(json.dumps({"pid": 2**22 + 17, "host": "h", "started": "then"}))
    capsys.readouterr()
    assert main(sft_args(tiny_dirs, tiny_data, out, "train.max_steps=1", "train.learning_rate=0.001",
                         "train.resume=never")) == 0
    said = capsys.readouterr().out
    assert f"taking over the lock of process {2**22 + 17}" in said
    previous = list(out.glob("previous-*"))
    assert len(previous) == 1 and f"moved to {previous[0]}" in said
    # the earlier run, whole, beside the new one: its checkpoint, config and results
    assert stamp_of(previous[0] / "checkpoint-1") == first
    assert "learning_rate: 5.0e-05" in (previous[0] / "config.yaml").read_text()
    assert (previous[0] / "metrics.json").is_file() and (previous[0] / "student").is_dir()
    assert stamp_of(out / "checkpoint-1") != first
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_moved_run_folder_resumes(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    args = ("train.max_steps=2",)
    assert main(sft_args(tiny_dirs, tiny_data, out, *args)) == 0
    shutil.rmtree(out / "checkpoint-2")  # as if interrupted after step 1
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    os.replace(out, moved)
    capsys.readouterr()
    assert main(sft_args(tiny_dirs, tiny_data, moved, *args)) == 0
    assert f"resuming from {moved / 'checkpoint-1'}" in capsys.readouterr().out
    assert json.loads((moved / "metrics.json").read_text())["train"]["steps"] == 2


def test_a_second_run_in_a_locked_folder_is_refused(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / '.kdflow.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'{\"pid\": %d, \"host\": \"here\", \"started\": \"now\"}' % os.getpid())\n"
         "print('locked', flush=True)\n"
         "time.sleep(60)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(sft_args(tiny_dirs, tiny_data, out, "train.max_steps=1")) == 2
        err = capsys.readouterr().err
        assert f"is in use by another kdflow run (process {holder.pid} on here" in err
        assert not (out / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_fedmkt_flower_keeps_metrics_json_until_its_replacement_exists(tmp_path, monkeypatch):
    pytest.importorskip("flwr")  # the `fed` extra
    from kdflow.config import FedMKTConfig, load_config
    from kdflow.errors import KDFlowError
    from kdflow.federated import flower_launch as launch

    out = tmp_path / "fed"
    out.mkdir()
    (out / "metrics.json").write_text('{"from": "the earlier run"}')
    cfg = load_config(FedMKTConfig, None, [f"output_dir={out}", "clients=[{name: c1}]"])
    monkeypatch.setattr(launch, "start_superlink", lambda *a, **k: "127.0.0.1:1")
    monkeypatch.setattr(launch, "write_connection", lambda *a, **k: None)
    monkeypatch.setattr(launch, "submit", lambda *a, **k: 7)
    monkeypatch.setattr(launch, "run_logs", lambda *a, **k: "")
    outcome = {"status": "finished:failed", "write": False}

    def run(run_id, env, timeout, done_file=None, poll=15.0):
        assert (out / "metrics.json").read_text() == '{"from": "the earlier run"}'  # still there while it runs
        if outcome["write"]:
            time.sleep(0.01)
            (out / "metrics.json.new").write_text('{"from": "this run"}')
            os.replace(out / "metrics.json.new", out / "metrics.json")
        return outcome["status"]

    monkeypatch.setattr(launch, "wait_for_run", run)
    with pytest.raises(KDFlowError, match="ended 'finished:failed'"):
        launch.run_fedmkt_flower(cfg)
    assert json.loads((out / "metrics.json").read_text()) == {"from": "the earlier run"}
    # completed without writing metrics: the earlier run's are not reported as this one's
    outcome["status"] = "finished:completed"
    assert "from" not in launch.run_fedmkt_flower(cfg)
    outcome["write"] = True
    assert launch.run_fedmkt_flower(cfg)["from"] == "this run"
