"""`kdflow compare` on tiny models: plan validation, a 2-variant x 2-seed run that resumes after an
interruption, the leaderboard's paired intervals; the teacher adaptation it shares."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

import pytest

from kdflow.cli import main
from kdflow.config import CompareConfig, load_config
from kdflow.errors import ConfigError


def compare_args(tiny_dirs, tiny_data, out, adapt_dir):
    return [f"teacher.name={tiny_dirs['teacher']}", "student.init=prune_teacher", "student.num_layers=2",
            f"data.train={tiny_data['train']}", f"data.validation={tiny_data['validation']}",
            f"data.test={tiny_data['test']}", f"output_dir={out}", "train.batch_size=4", "train.max_steps=2",
            "train.report_to=[none]", "train.save_steps=0", "eval.max_new_tokens=4", "eval.batch_size=8",
            "eval.bootstrap_resamples=200", "teacher.adapt.method=lora", "teacher.adapt.steps=2",
            "teacher.adapt.learning_rate=1e-3", "teacher.adapt.lora.target_modules=[q_proj,v_proj]",
            f"teacher.adapt.dir={adapt_dir}", "teacher.check.max_rows=4", "kd.temperature=1.0", "seeds=[0,1]",
            "variants=[{name: sft, method: sft}, {name: kd, method: kd, overrides: ['kd.kd_weight=1.0']}]"]


def test_plan_is_validated_before_anything_runs(tmp_path):
    bad = [["variants=[]"], ["variants=[{name: kd, method: kd}]"],  # the baseline 'sft' is missing
           ["variants=[{name: sft, method: sft}, {name: sft, method: kd}]"],
           ["variants=[{name: sft, method: sft}, {name: kd, method: kd, overrides: ['kd.divergnce=rkl']}]"],
           ["variants=[{name: sft, method: sft}, {name: kd, method: kd, overrides: ['seed=3']}]"],
           ["variants=[{name: sft, method: kd}, {name: m, method: minillm}]"],
           ["variants=[{name: sft, method: sft}]", "metrics=[exact_matc]"],
           ["variants=[{name: sft, method: sft, start: baseline}]"],  # the baseline cannot continue itself
           ["variants=[{name: sft, method: kd}, {name: g, method: gkd, start: baseline}]"],  # needs an sft baseline
           ["variants=[{name: sft, method: sft}, {name: g, method: gkd, start: basline}]"]]
    from kdflow.compare import plan

    for overrides in bad:
        with pytest.raises(ConfigError):  # on loading (a misspelt choice) or on planning
            plan(load_config(CompareConfig, None, [f"output_dir={tmp_path}", *overrides]))
    cfg = load_config(CompareConfig, None, [f"output_dir={tmp_path}", "seeds=[0,1]", "variants=[{name: sft, method: sft}, "
                                            "{name: m, method: minillm}, {name: rkl, method: kd, overrides: "
                                            "['kd.divergence=rkl']}]"])
    plans = plan(cfg)
    assert [(p.variant.name, p.seed) for p in plans] == [("sft", 0), ("rkl", 0), ("m", 0), ("sft", 1), ("rkl", 1), ("m", 1)]
    assert plans[1].cfg.kd.divergence == "rkl" and plans[1].cfg.seed == 0
    assert plans[2].cfg.student.name == str(tmp_path / "sft" / "seed-0" / "student")  # minillm starts from its sft


def test_variant_can_continue_from_the_baseline_student(tmp_path):
    """start: baseline (SFT then distill, as in the GKD paper): the variant runs after the same seed's
    baseline and loads its saved student instead of pruning the teacher again; the other shared
    student settings (dtype, LoRA) stay, and its own overrides (fewer steps) apply."""
    from kdflow.compare import leaderboard_markdown, plan

    cfg = load_config(CompareConfig, None, [
        f"output_dir={tmp_path}", "seeds=[0,1]", "student.init=prune_teacher", "student.num_layers=4",
        "student.dtype=bfloat16", "student.lora.enabled=true", "train.max_steps=40",
        "variants=[{name: g, method: gkd, start: baseline, overrides: ['train.max_steps=10', 'kd.divergence=rkl']}, "
        "{name: sft, method: sft}, {name: more, method: sft, start: baseline, overrides: ['train.max_steps=10']}, "
        "{name: kd, method: kd}]"])
    plans = plan(cfg)
    assert [(p.variant.name, p.seed) for p in plans] == [("sft", 0), ("kd", 0), ("g", 0), ("more", 0),
                                                          ("sft", 1), ("kd", 1), ("g", 1), ("more", 1)]
    by = {(p.variant.name, p.seed): p.cfg for p in plans}
    for name in ("g", "more"):
        for seed in (0, 1):
            st = by[(name, seed)].student
            assert (st.init, st.name) == ("pretrained", str(tmp_path / "sft" / f"seed-{seed}" / "student"))
            assert st.num_layers is None and st.dtype == "bfloat16" and st.lora.enabled
            assert by[(name, seed)].train.max_steps == 10
    assert by[("g", 0)].kd.divergence == "rkl" and by[("g", 0)].method == "gkd"
    for name in ("sft", "kd"):
        st = by[(name, 0)].student
        assert (st.init, st.num_layers, st.name) == ("prune_teacher", 4, None) and by[(name, 0)].train.max_steps == 40

    board = {"baseline": "sft", "seeds": [0, 1], "bootstrap": {"resamples": 10, "seed": 0}, "teacher": None,
             "teacher_check": None, "variants": {
                 n: {"method": m, "overrides": [], "seeds_done": 2, "metrics": {}, "start": s, "steps": k}
                 for n, m, s, k in [("sft", "sft", "student", 40), ("g", "gkd", "baseline", 10),
                                    ("kd", "kd", "student", 40)]}}
    rows = {line.split(" (")[0].lstrip("| "): line for line in leaderboard_markdown(board, cfg).splitlines()
            if line.startswith("| ")}
    assert "after the sft student's 40 steps" in rows["g"]
    assert "after the" not in rows["kd"] and "after the" not in rows["sft"]


def test_chart_says_when_variants_have_fewer_seeds(tmp_path):
    from kdflow.compare import plot_labels

    cfg = load_config(CompareConfig, None, [f"output_dir={tmp_path}", "seeds=[0,1,2]"])
    full = {"variants": {"sft": {"seeds_done": 3}, "kd": {"seeds_done": 3}}}
    assert plot_labels(full, cfg) == (["sft", "kd"], "kdflow compare: 3 seed(s), 95% row-bootstrap intervals")
    part = {"variants": {"sft": {"seeds_done": 3}, "gkd": {"seeds_done": 1}}}
    labels, title = plot_labels(part, cfg)
    assert labels == ["sft (3 seeds)", "gkd (1 seed)"] and "per variant" in title and "3 seed(s)" not in title


def test_compare_two_variants_two_seeds_resumes(tmp_path, tiny_dirs, tiny_data, monkeypatch, capsys):
    import kdflow.methods.kd as kd

    out, adapt_dir = tmp_path / "cmp", tmp_path / "adapted"
    args = compare_args(tiny_dirs, tiny_data, out, adapt_dir)
    real, calls = kd.run_distill, []

    def interrupted(cfg):
        calls.append((cfg.method, cfg.seed))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg)

    monkeypatch.setattr(kd, "run_distill", interrupted)
    assert main(["compare", *args]) == 130  # interrupted during the third run
    assert calls == [("sft", 0), ("kd", 0), ("sft", 1)]
    adapted = list(adapt_dir.iterdir())
    assert len(adapted) == 1 and (adapted[0] / "kdflow_adapted.json").is_file() and (adapted[0] / "adapter").is_dir()
    cache = [p for p in (out / "shared").iterdir() if p.name.startswith("teacher-cache-")]
    assert len(cache) == 1 and json.loads((cache[0] / "manifest.json").read_text())["complete"]

    calls.clear()
    monkeypatch.setattr(kd, "run_distill", lambda cfg: (calls.append((cfg.method, cfg.seed)), real(cfg))[1])
    assert main(["compare", *args]) == 0
    assert calls == [("sft", 1), ("kd", 1)]  # finished runs are not rerun
    captured = capsys.readouterr().out
    assert "reusing" in captured  # the adapted teacher is made once
    board = json.loads((out / "leaderboard.json").read_text())
    assert set(board["variants"]) == {"sft", "kd"}
    kd_em = board["variants"]["kd"]["metrics"]["exact_match"]
    assert len(kd_em["per_seed"]) == 2 and "vs_baseline" in kd_em
    nll = board["variants"]["kd"]["metrics"]["answer_nll"]
    # the paired interval brackets its own estimate, which is the difference of the seed means
    d = nll["vs_baseline"]
    assert d["low"] <= d["estimate"] <= d["high"]
    sft_nll = board["variants"]["sft"]["metrics"]["answer_nll"]
    assert d["estimate"] == pytest.approx(nll["mean"] - sft_nll["mean"], abs=1e-6)  # token-weighted, as the run reports
    assert "vs_baseline" in board["variants"]["kd"]["metrics"]["ece"]
    assert (out / "leaderboard.png").stat().st_size > 1000
    text = (out / "leaderboard.md").read_text()
    assert "| kd (kd, kd.kd_weight=1.0; 2 seeds)" in text and "| teacher |" in text
    for variant in ("sft", "kd"):
        for seed in (0, 1):
            run = out / variant / f"seed-{seed}"
            assert (run / "metrics.json").is_file() and (run / "student" / "config.json").is_file()
    kd_run = json.loads((out / "kd" / "seed-0" / "metrics.json").read_text())
    assert kd_run["teacher"] == str(adapted[0]) and kd_run["teacher_check"]["rows"] == 4
    assert kd_run["stall"] is None  # the stall watch ran and found none
    assert kd_run["student_layers"] == [0, 3] and len(kd_run["layer_importance"]) == 4  # chosen by importance
    # a third call has nothing left to run
    calls.clear()
    assert main(["compare", *args]) == 0 and calls == []
    # a run saved before a setting existed counts as having its default; a changed setting reruns
    import yaml
    saved = out / "sft" / "seed-0" / "config.yaml"
    tree = yaml.safe_load(saved.read_text())
    assert tree["kd"].pop("chunk_tokens") is not None
    saved.write_text(yaml.safe_dump(tree))
    assert main(["compare", *args]) == 0 and calls == []
    tree["train"]["learning_rate"] = 0.5
    saved.write_text(yaml.safe_dump(tree))
    assert main(["compare", *args]) == 0 and calls == [("sft", 0)]


def test_teacher_check_warns_or_stops_before_training(tmp_path, tiny_dirs, tiny_data, capsys):
    """A random tiny teacher cannot answer the task: warn by default (and record it), stop with
    teacher.check.mode=error before any step is trained."""
    from conftest import write_jsonl  # noqa: F401  (fixtures module on the path)

    args = [f"teacher.name={tiny_dirs['teacher']}", f"student.name={tiny_dirs['student']}",
            f"data.train={tiny_data['train']}", f"data.validation={tiny_data['validation']}",
            f"data.test={tiny_data['test']}", "train.batch_size=4", "train.max_steps=1", "train.report_to=[none]",
            "eval.max_new_tokens=3", "eval.batch_size=8", "evaluate_before=false", "evaluate_teacher=false",
            "teacher.check.max_rows=4"]
    assert main(["distill", *args, f"output_dir={tmp_path / 'warn'}"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the teacher looks unable to answer this task" in out and "teacher.adapt" in out
    metrics = json.loads((tmp_path / "warn" / "metrics.json").read_text())
    assert metrics["teacher_check"]["below_thresholds"] and metrics["teacher_check"]["rows"] == 4
    assert main(["distill", *args, f"output_dir={tmp_path / 'err'}", "teacher.check.mode=error"]) == 2
    err = capsys.readouterr().err
    assert "teacher.check.max_answer_nll" in err and "teacher.adapt" in err
    assert not (tmp_path / "err" / "student").exists()  # nothing was trained
    # sft never consults the teacher's answers
    assert main(["distill", *args, f"output_dir={tmp_path / 'sft'}", "method=sft", "teacher.check.mode=error"]) == 0


def test_hidden_and_several_teacher_variants_in_compare(tmp_path, tiny_dirs, tiny_data):
    """The hidden-state variant trains from a shared cache that also holds the teacher's hidden states (its
    own, not the logit-only one); several teachers run with their own teachers online; both reach the board."""
    out = tmp_path / "cmp"
    two = f"teachers=[{{name: {tiny_dirs['teacher']}, label: a}}, {{name: {tiny_dirs['student']}, label: b}}]"
    cached = (f"teachers=[{{name: {tiny_dirs['teacher']}, label: a, cache: {tmp_path / 'ca'}}}, "
              f"{{name: {tiny_dirs['student']}, label: b, cache: {tmp_path / 'cb'}}}]")
    args = [f"teacher.name={tiny_dirs['teacher']}", "student.init=prune_teacher", "student.keep_layers=[0, 2]",
            f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}", f"output_dir={out}",
            "train.batch_size=4", "train.max_steps=2", "train.report_to=[none]", "train.save_steps=0",
            "eval.max_new_tokens=3", "eval.batch_size=8", "eval.bootstrap_resamples=100", "data.max_train_rows=8",
            "seeds=[0]", "metrics=[exact_match, answer_nll]",
            "variants=[{name: sft, method: sft}, {name: hid, method: kd, overrides: ['kd.hidden_weight=1.0']}, "
            f"{{name: mt, method: kd, overrides: ['{two}', 'multi_teacher.rule=min_ce']}}, "
            f"{{name: mtc, method: kd, overrides: ['{cached}', 'multi_teacher.rule=confidence']}}]"]
    assert main(["compare", *args]) == 0
    caches = [p for p in (out / "shared").iterdir() if p.name.startswith("teacher-cache-")]
    assert len(caches) == 1
    assert json.loads((caches[0] / "manifest.json").read_text())["key"]["hidden_layers"] == [1, 2, 3, 4]
    hid_cfg = yaml.safe_load((out / "hid" / "seed-0" / "config.yaml").read_text())
    assert hid_cfg["teacher_cache"]["dir"] == str(caches[0]) and hid_cfg["teacher_cache"]["hidden"] == "all"
    board = json.loads((out / "leaderboard.json").read_text())
    assert {"sft", "hid", "mt", "mtc"} <= set(board["variants"])
    assert json.loads((out / "hid" / "seed-0" / "metrics.json").read_text())["hidden"]["pairs"] == [[1, 1], [2, 3]]
    mt = json.loads((out / "mt" / "seed-0" / "metrics.json").read_text())["teachers"]
    assert set(mt["selected_share"]) == {"a", "b"}
    # the cached pair: compare built each entry's cache before the runs, and the run trained from them
    for c in ("ca", "cb"):
        assert json.loads((tmp_path / c / "manifest.json").read_text())["complete"]
    mtc = json.loads((out / "mtc" / "seed-0" / "metrics.json").read_text())["teachers"]
    assert [e["cache"] for e in mtc["teachers"]] == [str(tmp_path / "ca"), str(tmp_path / "cb")]


def test_kept_of_teacher_follows_the_headline_metric(tmp_path):
    """On a task scored by Rouge-L (answers are sentences, exact match near 0) the "kept of teacher"
    column divides Rouge-L, the first score in `metrics`; on exact-match tasks it stays exact match."""
    from kdflow.compare import headline_metric, leaderboard, leaderboard_markdown, plan

    rows = 4
    per_row = {"sft": [0.1, 0.2, 0.3, 0.2], "kd": [0.2, 0.2, 0.3, 0.3]}
    for metrics, head in ((["rougeL", "answer_nll", "exact_match"], "rougeL"), (["answer_nll", "exact_match", "rougeL"], "exact_match")):
        cfg = load_config(CompareConfig, None, [f"output_dir={tmp_path / head}", "seeds=[0]", f"metrics=[{', '.join(metrics)}]",
                                                "variants=[{name: sft, method: sft}, {name: kd, method: kd}]"])
        assert headline_metric(cfg) == head
        for p in plan(cfg):
            (p.folder / "eval").mkdir(parents=True)
            r = per_row[p.variant.name]
            em = [0.0, 0.0, 1.0, 0.0] if p.variant.name == "kd" else [0.0, 0.0, 0.0, 0.0]
            (p.folder / "metrics.json").write_text(json.dumps({"train": {"seconds": 10.0, "steps": 2}}))
            (p.folder / "eval" / "student_after.json").write_text(json.dumps({
                "metrics": {"rougeL": sum(r) / rows, "exact_match": sum(em) / rows, "answer_nll": 2.0},
                "per_row": {"rougeL": r, "exact_match": em}}))
        teacher = {"metrics": {"rougeL": 0.4, "exact_match": 0.5, "answer_nll": 1.0}, "per_row": {}}
        board = leaderboard(cfg, plan(cfg), teacher, None)
        kd = board["variants"]["kd"]["teacher_kept"]
        assert kd["metric"] == head
        want = (0.25 / 0.4) if head == "rougeL" else (0.25 / 0.5)
        assert kd["fraction"] == pytest.approx(want)
        assert board["variants"]["sft"]["teacher_kept"]["fraction"] == pytest.approx(0.2 / 0.4 if head == "rougeL" else 0.0)
        text = leaderboard_markdown(board, cfg)
        assert (f"kept of teacher {'rougeL' if head == 'rougeL' else 'EM'} |") in text
        kd_line = next(line for line in text.splitlines() if line.startswith("| kd ("))
        assert f"| {want:.0%} |" in kd_line and "1 seed)" in kd_line


def test_continued_variant_trains_the_baselines_saved_student(tmp_path, tiny_dirs, tiny_data):
    """End to end: a start: baseline variant loads the same seed's saved sft student. With a learning
    rate of 1e-9 its one step leaves that student's weights in place, which a fresh pruned student
    (the shared `student` section) would not match."""
    from safetensors.torch import load_file

    out = tmp_path / "cmp"
    args = compare_args(tiny_dirs, tiny_data, out, tmp_path / "adapted") + [
        "seeds=[0]", "teacher.adapt.method=none", "train.learning_rate=1e-2",
        "variants=[{name: sft, method: sft}, {name: more, method: sft, start: baseline, "
        "overrides: ['train.max_steps=1', 'train.learning_rate=1e-9']}]"]
    assert main(["compare", *args]) == 0
    base = load_file(str(out / "sft" / "seed-0" / "student" / "model.safetensors"))
    cont = load_file(str(out / "more" / "seed-0" / "student" / "model.safetensors"))
    assert base.keys() == cont.keys()
    teacher = load_file(str(Path(tiny_dirs["teacher"]) / "model.safetensors"))
    emb = "model.embed_tokens.weight"  # pruning copies it from the teacher; ten sft steps at 1e-2 move it
    assert (base[emb] - teacher[emb]).abs().max() > 1e-3
    for k in base:
        torch.testing.assert_close(cont[k], base[k], atol=1e-6, rtol=0)
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["variants"]["more"]["start"] == "baseline" and board["variants"]["more"]["steps"] == 1
    assert "after the sft student's 2 steps" in (out / "leaderboard.md").read_text()
