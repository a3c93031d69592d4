"""Every verb in 2 CPU processes (torchrun, gloo) against the same commands in 1 process.

One launch (`distributed_worker.py`) runs cache-teacher, eval, distill (kd from that cache, kd with the
hidden-state term and its projection (teacher online), and
seqkd), codistill and minillm in 2 processes; this process runs the same commands with the same
global batch (batch_size doubled). Checked: each optimizer's gradient at the first step equals the
1-process gradient, to TOL (the processes sum their halves in another order); both processes hold
the same gradient; eval, the teacher cache and seqkd's generations are exactly the 1-process ones;
MiniLLM samples the same tokens; each run folder holds what the 1-process folder holds (plus the
second process's RNG state), each table is printed once; and a 2-process run killed with SIGKILL
while writing a checkpoint resumes to the weights of the uninterrupted 2-process run, bit for bit.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdflow.cli import main

from distributed_worker import capture_first_steps

HERE = Path(__file__).resolve().parent
TOL = dict(atol=1e-6, rtol=1e-4)  # gradients: 2 processes add their halves in another order

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


def launch(plan: list[dict], work: Path, name: str, new_session: bool = False) -> subprocess.Popen:
    path = work / f"{name}.json"
    path.write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", KDFLOW_TEST_PROCESSES="2")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(HERE / "distributed_worker.py"), str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work,
                            start_new_session=new_session)


def finish(proc: subprocess.Popen, timeout: int = 420) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-4000:]
    return out, err


def commands(tiny_dirs, tiny_data, w: Path, world: int) -> dict[str, list[str]]:
    """Each verb's arguments for a run on `world` processes: batch sizes per process, global batch fixed."""
    t, s = tiny_dirs["teacher"], tiny_dirs["student"]
    tag = f"p{world}"
    b = str(4 // world)
    data = [f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}"]
    ev = ["eval.max_rows=4", "eval.batch_size=3", "eval.max_new_tokens=3"]
    peers = (f"peers=[{{name: full, model: {{name: {s}}}}}, {{name: lora, model: {{init: prune_teacher, "
             f"keep_layers: [0, 3], lora: {{enabled: true, r: 4, dropout: 0.0}}}}}}]")
    return {
        "cache-teacher": ["cache-teacher", f"teacher.name={t}", f"student.name={s}", *data,
                          f"teacher_cache.dir={w / ('cache_' + tag)}", "teacher_cache.shard_size=16",
                          "teacher_cache.batch_size=4"],
        "eval": ["eval", f"model.name={t}", f"data.test={tiny_data['test']}", "eval.batch_size=3",
                 "eval.max_new_tokens=4", "eval.sample_seeds=[1, 2]", f"output={w / ('eval_' + tag + '.json')}"],
        # both read the cache the 2 processes built
        "distill": ["distill", "method=kd", f"teacher.name={t}", f"student.name={s}", *data,
                    f"data.validation={tiny_data['validation']}", f"teacher_cache.dir={w / 'cache_p2'}",
                    f"output_dir={w / ('distill_' + tag)}", "train.max_steps=2", f"train.batch_size={b}",
                    "train.grad_accum=2", "train.max_grad_norm=0", "train.save_steps=1", "train.eval_steps=2",
                    "train.report_to=[none]", *ev],
        # kd with the hidden-state term, the teacher online: the tiny student is narrower than the teacher, so a
        # projection trains beside it, outside DDP (its gradient must still be the 1-process one)
        "hidden": ["distill", "method=kd", f"teacher.name={t}", f"student.name={s}", *data, "kd.hidden_weight=1.0",
                   f"output_dir={w / ('hidden_' + tag)}", "train.max_steps=1", f"train.batch_size={b}",
                   "train.grad_accum=2", "train.max_grad_norm=0", "train.save_steps=1", "train.report_to=[none]",
                   "evaluate_teacher=false", "evaluate_before=false", "eval.max_rows=2", "eval.max_new_tokens=2"],
        "seqkd": ["distill", "method=seqkd", f"teacher.name={t}", f"student.name={s}", *data,
                  f"output_dir={w / ('seqkd_' + tag)}", "train.max_steps=1", f"train.batch_size={b}",
                  "seqkd.batch_size=4", "seqkd.max_new_tokens=4", "train.report_to=[none]", "evaluate_teacher=false",
                  "evaluate_before=false", *ev],
        "codistill": ["codistill", peers, f"base.name={t}", *data, f"output_dir={w / ('codistill_' + tag)}",
                      "train.max_steps=4", "train.save_steps=1", f"train.batch_size={b}", "train.grad_accum=2",
                      "train.max_grad_norm=0", "train.learning_rate=1e-3", "train.report_to=[none]",
                      "evaluate_before=false", *ev],
        "minillm": ["minillm", f"teacher.name={t}", f"student.name={s}", *data, f"output_dir={w / ('minillm_' + tag)}",
                    f"minillm.rollout_batch_size={b}", f"minillm.batch_size={b}", "minillm.inner_epochs=1",
                    "minillm.max_new_tokens=6", "minillm.max_steps=2", "minillm.max_grad_norm=0",
                    "minillm.learning_rate=1e-3", "evaluate_teacher=false", "evaluate_before=false", *ev],
    }


GRADS = ("distill", "hidden", "codistill", "minillm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_dirs, tiny_data):
    w = tmp_path_factory.mktemp("distributed")
    two = commands(tiny_dirs, tiny_data, w, 2)
    order = ["cache-teacher", "eval", "distill", "hidden", "seqkd", "codistill", "minillm"]
    proc = launch([{"argv": two[v], "grads": str(w / f"grads_{v}_p2") if v in GRADS else None} for v in order], w, "two")
    # meanwhile, nothing: two processes already use both cores. Then the 1-process runs here.
    out, err = finish(proc)
    one = commands(tiny_dirs, tiny_data, w, 1)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for v in order:
            done = capture_first_steps(w / f"grads_{v}_p1") if v in GRADS else None
            assert main(one[v]) == 0, v
            if done is not None:
                done()
    finally:
        torch.set_num_threads(n)
    return {"dir": w, "stdout": out, "stderr": err, "two": two}


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != ".kdflow.lock"}


def test_every_verb_runs_in_two_processes_and_writes_each_output_once(runs):
    w, out = runs["dir"], runs["stdout"]
    assert "kdflow: error" not in runs["stderr"]
    for verb in ("distill", "hidden", "seqkd", "codistill", "minillm"):
        one, two = w / f"{verb}_p1", w / f"{verb}_p2"
        assert out.count(f"[kdflow] run folder: {two}") == 1, verb  # the main process alone prints
        metrics = json.loads((two / "metrics.json").read_text())
        recorded = metrics["train"]["codistill"] if verb == "codistill" else metrics["train"]
        assert recorded["processes"] == 2, verb
        # the same files as the 1-process run, but one RNG state per process in each checkpoint
        rng = re.compile(r"(rng_state(_\d)?\.pth|random_states_\d\.pkl)$")
        assert {f for f in files(two) if not rng.search(f)} == {f for f in files(one) if not rng.search(f)}, verb
        ckpts = {str(Path(f).parent) for f in files(two) if rng.search(f)}
        assert ckpts and all({Path(f).name for f in files(two) if f.startswith(c + "/") and rng.search(f)}
                             in ({"rng_state_0.pth", "rng_state_1.pth"}, {"random_states_0.pkl", "random_states_1.pkl"})
                             for c in ckpts), verb
        assert not [p for p in two.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    assert (w / "hidden_p2" / "checkpoint-1" / "hidden_projection.safetensors").is_file()  # written once, by the main process
    assert out.count("| student (after) |") == 4  # distill, hidden, seqkd, minillm: one table each
    assert out.count("[kdflow] metrics written to") == 1  # eval
    assert sorted(p.name for p in (w / "codistill_p2" / "peers").iterdir()) == [
        "checkpoint-3", "checkpoint-4", "full", "lora"]


def test_one_optimizer_step_has_the_one_process_gradient(runs):
    from safetensors.torch import load_file

    w = runs["dir"]
    for verb in GRADS:
        ref = load_file(str(w / f"grads_{verb}_p1" / "rank0.safetensors"))
        r0 = load_file(str(w / f"grads_{verb}_p2" / "rank0.safetensors"))
        r1 = load_file(str(w / f"grads_{verb}_p2" / "rank1.safetensors"))
        assert ref.keys() == r0.keys() == r1.keys() and len(ref) > 2, verb
        assert all(torch.equal(r0[k], r1[k]) for k in r0), verb  # both processes apply the same step
        for k in ref:
            assert torch.allclose(r0[k], ref[k], **TOL), (verb, k, (r0[k] - ref[k]).abs().max())
        assert any(ref[k].abs().max() > 1e-4 for k in ref), verb  # a gradient, not zeros
    # the hidden-state run's optimizer has the projection's group beside the student's
    hid = load_file(str(w / "grads_hidden_p1" / "rank0.safetensors"))
    assert "2" in {k.split(".")[1] for k in hid}  # groups 0 and 1: the student's (decay, no decay); 2: the projection
    # codistill: two peers, two optimizers; the LoRA peer's are its adapter's only
    assert {k.split(".")[0] for k in ref} == {"0"}  # minillm: one optimizer
    assert {k.split(".")[0] for k in load_file(str(w / "grads_codistill_p1" / "rank0.safetensors"))} == {"0", "1"}


def test_split_work_equals_the_one_process_result(runs):
    from safetensors.torch import load_file

    w = runs["dir"]
    # eval: the same rows, metrics, per-row scores and examples
    a, b = (json.loads((w / f"eval_p{n}.json").read_text()) for n in (1, 2))
    a["metrics"].pop("seconds"), b["metrics"].pop("seconds")
    assert a == b and a["metrics"]["rows"] == 8 and a["metrics"]["sampled_length"] > 0
    # the teacher cache: the same shards byte for byte, one manifest listing them
    m1, m2 = (json.loads((w / f"cache_p{n}" / "manifest.json").read_text()) for n in (1, 2))
    assert m1["key"] == m2["key"] and m1["shards"] == m2["shards"] and len(m2["shards"]) == 4 and m2["complete"]
    for s in m2["shards"]:
        assert (w / "cache_p1" / s["file"]).read_bytes() == (w / "cache_p2" / s["file"]).read_bytes()
    # seqkd: the teacher's answers, generated half by each process, in order
    g1, g2 = ((w / f"seqkd_p{n}" / "seqkd_generations.jsonl").read_text() for n in (1, 2))
    assert g1 == g2 and len(g2.splitlines()) == 64
    # MiniLLM: the first rollout drew the same tokens (same lengths, same rewards)
    h1, h2 = (json.loads((w / f"minillm_p{n}" / "log_history.json").read_text())[0] for n in (1, 2))
    assert h1["rollout_response_length"] == h2["rollout_response_length"]
    assert h1["rollout_reward"] == pytest.approx(h2["rollout_reward"], rel=1e-4, abs=1e-6)
    # distill from the cache the 2 processes built, in 1 and in 2 processes: the same weights after 2 steps
    s1, s2 = (load_file(str(w / f"distill_p{n}" / "student" / "model.safetensors")) for n in (1, 2))
    assert all(torch.allclose(s1[k], s2[k], atol=1e-5) for k in s1)


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(runs):
    from safetensors.torch import load_file

    w = runs["dir"]
    argv = [a.replace(str(w / "codistill_p2"), str(w / "killed")) for a in runs["two"]["codistill"]]
    pids = [w / f"kill.saving.rank{r}" for r in (0, 1)]
    proc = launch([{"argv": argv, "grads": None, "hang_at": "checkpoint-3"}], w, "kill", new_session=True)
    deadline = time.time() + 300
    while not all(p.exists() for p in pids) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    ready = all(p.exists() for p in pids)
    # kill -9 the whole job, mid-save: the launcher's group, and each process (torchrun gives each its own)
    for pgid in [proc.pid] + [int(p.read_text()) for p in pids if p.exists()]:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, err = proc.communicate(timeout=60)
    assert ready, err[-3000:]
    peers = w / "killed" / "peers"
    assert (peers / "checkpoint-3.partial").is_dir() and not (peers / "checkpoint-3").exists()
    out, _ = finish(launch([{"argv": argv, "grads": None}], w, "resume"))
    assert "resuming full, lora from checkpoint-2" in out
    assert "no longer running; its run was interrupted" in out  # the dead run's lock was taken over
    assert not (peers / "checkpoint-3.partial").exists()
    for peer in ("full", "lora"):
        a = load_file(str(w / "codistill_p2" / "peers" / peer / "model" / "model.safetensors"))
        b = load_file(str(peers / peer / "model" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), peer
