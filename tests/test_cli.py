"""`kdflow` driven the way a user drives it, on tiny models and data."""

import json
import os
import subprocess
import sys

import pytest

from kdflow.cli import main

from conftest import write_jsonl


def base_args(tiny_dirs, tiny_data, out):
    return [f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
            f"data.train={tiny_data['train']}", f"data.validation={tiny_data['validation']}",
            f"data.test={tiny_data['test']}", f"output_dir={out}", "train.batch_size=4",
            "train.report_to=[none]", "train.logging_steps=1", "eval.max_new_tokens=6", "eval.batch_size=4"]


def test_two_step_kd_run_through_the_real_cli(tmp_path, tiny_dirs, tiny_data):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "kdflow", "distill", *base_args(tiny_dirs, tiny_data, out),
                           "train.max_steps=2", "kd.divergence=jsd", "eval.sample_seeds=[1, 2]"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| teacher |" in proc.stdout and "| student (after) |" in proc.stdout
    for name in ("config.yaml", "metrics.json", "report.md", "loss_curve.png", "student/config.json", "log_history.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 2
    after = metrics["eval"]["student (after)"]
    for key in ("answer_nll", "perplexity", "rougeL", "exact_match", "sampled_rougeL", "sampled_distinct_2"):
        assert key in after
    assert set(metrics["eval"]) == {"teacher", "student (before)", "student (after)"}
    hist = json.loads((out / "log_history.json").read_text())
    assert any("kd" in h and "ce" in h for h in hist)
    assert "kd.divergence" not in (out / "config.yaml").read_text()  # resolved config is nested YAML
    assert "divergence: jsd" in (out / "config.yaml").read_text()
    report = (out / "report.md").read_text()
    assert "student (after) − student (before): exact_match" in report and "answer_nll" in report


@pytest.mark.parametrize("method", ["sft", "hard_token", "seqkd"])
def test_other_methods_run(tmp_path, tiny_dirs, tiny_data, method, capsys):
    out = tmp_path / method
    rc = main(["distill", *base_args(tiny_dirs, tiny_data, out), f"method={method}", "train.max_steps=2",
               "evaluate_before=false", "seqkd.max_new_tokens=5", "data.max_train_rows=8"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["train"]["steps"] == 2
    if method == "seqkd":
        gens = (out / "seqkd_generations.jsonl").read_text().splitlines()
        assert len(gens) == 8
        truncated = sum(json.loads(g)["truncated"] for g in gens)
        assert metrics["seqkd"] == {"answers": 8, "truncated": truncated, "max_new_tokens": 5}
        manifest = json.loads((out / "seqkd_generations.manifest.json").read_text())
        assert manifest["generation"]["max_new_tokens"] == 5
        # a second run with other generation settings refuses the cache instead of reusing it
        rc = main(["distill", *base_args(tiny_dirs, tiny_data, out), "method=seqkd", "train.max_steps=2",
                   "seqkd.max_new_tokens=7", "data.max_train_rows=8", "train.resume=never"])
        assert rc == 2
        assert "generated with other settings (generation differ)" in capsys.readouterr().err


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "resume"
    args = base_args(tiny_dirs, tiny_data, out) + ["train.save_steps=1", "evaluate_before=false", "evaluate_teacher=false"]
    assert main(["distill", *args, "train.max_steps=2"]) == 0
    assert (out / "checkpoint-2").is_dir()
    capsys.readouterr()
    assert main(["distill", *args, "train.max_steps=3"]) == 2  # max_steps changed: refuse to mix runs
    assert "holds checkpoints of a run with other settings (train.max_steps differ)" in capsys.readouterr().err
    # same settings after an interruption: picks up the checkpoint instead of starting over
    import shutil

    shutil.rmtree(out / "student")
    (out / "metrics.json").unlink()
    assert main(["distill", *args, "train.max_steps=2"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 2


def test_bad_data_stops_with_one_line_naming_file_and_row(tmp_path, tiny_dirs, tiny_data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "response": "fine"}, {"prompt": "ok", "answer": "x"}])
    args = base_args(tiny_dirs, tiny_data, tmp_path / "bad_run")
    args = [a for a in args if not a.startswith("data.train=")] + [f"data.train={bad}"]
    proc = subprocess.run([sys.executable, "-m", "kdflow", "distill", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert f"{bad}:2: missing field 'response' (row has: prompt, answer)" in proc.stderr


def test_help_lists_every_setting(capsys):
    from kdflow.config import DistillConfig, describe

    assert main(["distill", "--help"]) == 0
    text = capsys.readouterr().out
    for key, tp, _, _ in describe(DistillConfig):
        if tp != "section":
            assert f"  {key}  (" in text, key
    assert main(["nonsense"]) == 2
    assert main(["distill", "--bogus"]) == 2


def test_eval_verb(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "eval.json"
    rc = main(["eval", f"model.name={tiny_dirs['student']}", f"data.test={tiny_data['test']}", f"output={out}",
               "eval.max_new_tokens=4", "eval.max_rows=5"])
    assert rc == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["rows"] == 5 and m["answer_nll"] > 0 and 0 <= m["rougeL"] <= 1


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, most of all when other jobs load the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_generation_uses_only_the_eval_settings(bpe_tok, one_thread):
    """A checkpoint's generation_config extras (repetition_penalty, ...) do not change evaluation: greedy
    generation equals a plain argmax loop over the model's logits."""
    import torch

    from kdflow.evaluate import generate

    from conftest import tiny_llama

    model = tiny_llama(bpe_tok, seed=3).eval()
    prompts = [bpe_tok("Define the noun cat.").input_ids, bpe_tok("hello").input_ids]
    eos = bpe_tok.eos_token_id
    reference = []
    with torch.no_grad():
        for p in prompts:
            ids, answer = list(p), []
            for _ in range(8):
                nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                if nxt == eos:
                    break
                answer.append(nxt)
                ids.append(nxt)
            reference.append(answer)
    assert any(len(set(a)) < len(a) for a in reference)  # repeats tokens: a repetition penalty would matter
    model.generation_config.repetition_penalty = 50.0
    model.generation_config.no_repeat_ngram_size = 1
    assert generate(model, bpe_tok, prompts, 8) == reference
    assert model.generation_config.repetition_penalty == 50.0  # the model's own config is left as it was


def test_bf16_run_reports_what_eval_of_the_saved_student_reports(tmp_path, tiny_dirs, tiny_data, one_thread,
                                                                monkeypatch):
    """train.bf16: the report's "student (after)" is the saved student scored like `kdflow eval` scores it
    (float32 weights, no autocast), not the Trainer's autocast-wrapped model."""
    from kdflow import models

    monkeypatch.setattr(models, "cpu_bf16_fast", lambda: True)  # autocast even on a CPU that emulates bf16
    out = tmp_path / "bf16"
    settings = ["eval.max_new_tokens=4", "eval.max_rows=4", "eval.batch_size=4"]
    assert main(["distill", *base_args(tiny_dirs, tiny_data, out), "method=sft", "train.max_steps=1", "train.bf16=true",
                 "evaluate_before=false", "evaluate_teacher=false", "data.max_train_rows=4", *settings]) == 0
    report = json.loads((out / "metrics.json").read_text())["eval"]["student (after)"]
    assert main(["eval", f"model.name={out / 'student'}", f"data.test={tiny_data['test']}",
                 f"output={tmp_path / 'eval.json'}", *settings]) == 0
    alone = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    # the same weights scored the same way on the same batches: equal to the last bit (autocast differs
    # in the 7th digit here, the tiny model's logits being small)
    assert report["answer_nll"] == alone["answer_nll"] and report["rougeL"] == alone["rougeL"]


def test_seqkd_answers_cut_at_the_limit_get_no_eos_target(tmp_path, tiny_dirs, tiny_data, bpe_tok, monkeypatch):
    """A teacher answer that reached seqkd.max_new_tokens without EOS is marked in the cache and trained
    on without an end: its labels stop at its last token. An answer that ended keeps its EOS."""
    from kdflow.config import DistillConfig, load_config
    from kdflow.data import encode_rows, read_rows
    from kdflow.errors import DataError
    from kdflow.methods import kd

    cfg = load_config(DistillConfig, None, ["method=seqkd", "seqkd.max_new_tokens=6", f"teacher.name={tiny_dirs['teacher']}"])
    rows = read_rows(str(tiny_data["train"])).head(4)
    words = bpe_tok("the act of making something and a thing", add_special_tokens=False).input_ids
    assert len(words) >= 6
    # generate() returns answers with EOS removed: 6 tokens = the limit, never ended; 3 = ended early
    fake = lambda model, tok, prompts, n, *a, **k: [words[:6] if i % 2 else words[:3] for i in range(len(prompts))]  # noqa: E731
    monkeypatch.setattr(kd, "generate", fake)
    answers, cut = kd.seqkd_rows(cfg, rows, None, bpe_tok, tmp_path)
    assert cut == [False, True, False, True]
    lines = [json.loads(x) for x in (tmp_path / "seqkd_generations.jsonl").read_text().splitlines()]
    assert [x["truncated"] for x in lines] == cut
    examples = encode_rows(answers, bpe_tok, cfg.data, {i for i, c in enumerate(cut) if c})
    for e, c, x in zip(examples, cut, lines):
        labels = [t for t in e["labels"] if t != -100]
        assert (labels[-1] == bpe_tok.eos_token_id) == (not c)
        if c:
            assert labels == bpe_tok(x["response"], add_special_tokens=False).input_ids
    # the cache is reused with its marks, without generating again
    monkeypatch.setattr(kd, "generate", lambda *a, **k: pytest.fail("generated again"))
    assert kd.seqkd_rows(cfg, rows, None, bpe_tok, tmp_path)[1] == cut
    # a cache from before the marks existed is refused with a way out, not silently trained with EOS
    manifest = tmp_path / "seqkd_generations.manifest.json"
    old = json.loads(manifest.read_text())
    del old["format"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(DataError, match="did not record which answers were cut"):
        kd.seqkd_rows(cfg, rows, None, bpe_tok, tmp_path)
