"""method gkd (issue 15, item 1): on-policy distillation (methods.md §9).

lmbda = 0 with fkl is `method: kd` (fkl, kd_weight 1, tau 1) on the same batches, same update;
lmbda = 1 trains on the student's own samples only (no dataset token, no CE target, no EOS target
on an answer cut at max_new_tokens); jsd at beta 0 / 1 is refused pointing to fkl / rkl; a teacher
with another tokenizer is aligned on the sampled text; a resumed run equals an uninterrupted one.
"""

import copy
import json

import pytest
import torch

from kdflow.cli import main
from kdflow.config import DistillConfig, load_config
from kdflow.data import Collator, DataConfig, ListDataset, encode_rows, left_pad, read_rows
from kdflow.errors import ConfigError
from kdflow.methods.gkd import SOURCES, _seed, batch_prompts, choose_source, make_gkd_trainer_class
from kdflow.methods.kd import make_distill_trainer_class
from kdflow.rollout import student_sample, top_p_filter
from kdflow.training import training_arguments

from conftest import tiny_llama, train_tokenizer

STEP = ["train.max_steps=1", "train.learning_rate=0.5", "train.max_grad_norm=0", "train.lr_scheduler=constant",
        "train.report_to=[none]", "train.save_steps=0", "train.batch_size=4", "kd.kd_weight=1.0",
        "kd.temperature=1.0", "kd.divergence=fkl"]


def trainer_for(tmp_path, tok, teacher, student, examples, overrides, name):
    cfg = load_config(DistillConfig, None, STEP + overrides)
    args = training_arguments(cfg.train, tmp_path / name, 0, False)
    args.optim = "sgd"
    common = dict(model=student, args=args, train_dataset=ListDataset(examples), data_collator=Collator(tok.pad_token_id),
                  cfg=cfg, teacher=teacher, vocab_size=len(tok))
    if cfg.method == "gkd":
        return make_gkd_trainer_class()(**common, tokenizer=tok, rows=None)
    return make_distill_trainer_class()(**common)


def one_update(tmp_path, tok, teacher, student, examples, overrides, name):
    model = copy.deepcopy(student)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_for(tmp_path, tok, teacher, model, examples, overrides, name).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def setting(bpe_tok, tiny_data):
    rows = read_rows(str(tiny_data["train"])).head(4)
    examples = encode_rows(rows, bpe_tok, DataConfig())
    teacher = tiny_llama(bpe_tok, layers=3, hidden=48, seed=11).eval()
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=12)
    return examples, teacher, student


def test_lambda_0_fkl_is_kd_with_fkl_weight_1_tau_1(tmp_path, bpe_tok, setting):
    examples, teacher, student = setting
    kd = one_update(tmp_path, bpe_tok, teacher, student, examples, ["method=kd"], "kd")
    gkd = one_update(tmp_path, bpe_tok, teacher, student, examples, ["method=gkd", "gkd.lmbda=0"], "gkd0")
    for n in kd:
        assert torch.equal(kd[n], gkd[n]), n
    assert any(kd[n].abs().max() > 0 for n in kd)
    # and the comparison can fail: on the student's own answers the update differs
    on = one_update(tmp_path, bpe_tok, teacher, student, examples, ["method=gkd", "gkd.lmbda=1"], "gkd1")
    assert any(not torch.allclose(kd[n], on[n], atol=1e-6) for n in kd)


def test_lambda_1_trains_on_student_samples_only(tmp_path, bpe_tok, setting):
    examples, teacher, student = setting
    trainer = trainer_for(tmp_path, bpe_tok, teacher, copy.deepcopy(student), examples,
                          ["method=gkd", "gkd.lmbda=1", "gkd.max_new_tokens=3", "gkd.temperature=1.3",
                           "train.batch_size=2", "train.grad_accum=2"], "run")
    data = Collator(bpe_tok.pad_token_id)(examples[:2]), Collator(bpe_tok.pad_token_id)(examples[2:])
    batches, counts = trainer.get_batch_samples(iter(data), 2, torch.device("cpu"))
    assert len(batches) == 2 and counts["ce"] == 0  # no CE on answers nobody wrote as the reference
    eos = bpe_tok.eos_token_id
    n_answer = 0
    for micro, (orig, new) in enumerate(zip(data, batches)):
        assert new["kdflow_source"] == "student"
        prompts = batch_prompts(orig)
        assert batch_prompts(new) == prompts  # same prompts, answers replaced
        # reference: the student samples these prompts with the same per-row seeds
        ids, mask = left_pad(prompts, bpe_tok.pad_token_id)
        gens = [torch.Generator().manual_seed(_seed(0, 0, micro, r, SOURCES.index("student")))
                for r in orig["row_index"].tolist()]
        ref = student_sample(student, ids, mask, max_new_tokens=3, eos_id=eos, pad_id=bpe_tok.pad_token_id,
                             vocab_size=len(bpe_tok), temperature=1.3, generator=gens)
        for b in range(len(prompts)):
            want = ref.response_ids[b][ref.response_mask[b]].tolist()
            got = new["labels"][b][new["labels"][b] != -100].tolist()
            assert got == want
            dataset = orig["labels"][b][orig["labels"][b] != -100].tolist()
            assert got != dataset
            if eos not in want:  # cut at max_new_tokens: no EOS target
                assert len(want) == 3 and eos not in got
            n_answer += len(got)
    assert counts["kd"] == n_answer
    # the loss of such a batch is the divergence alone
    sums = trainer.loss_sums(trainer.model, batches[0])
    assert sums["ce"][1] == 0 and float(sums["ce"][0].detach()) == 0.0 and sums["kd"][1] > 0


def test_sources_follow_lambda_and_seq_kd():
    picks = [choose_source(0, step, m, 0.5, False) for step in range(100) for m in range(2)]
    assert 70 < picks.count("student") < 130 and set(picks) == {"student", "data"}
    assert {choose_source(0, s, 0, 1.0, True) for s in range(50)} == {"student"}
    assert {choose_source(0, s, 0, 0.0, True) for s in range(50)} == {"teacher"}
    assert {choose_source(0, s, 0, 0.0, False) for s in range(50)} == {"data"}


def test_top_p_keeps_the_smallest_nucleus():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_p_filter(lp, 0.7).exp()
    assert torch.allclose(kept, torch.tensor([[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0]]))
    assert torch.allclose(top_p_filter(lp, 0.4).exp(), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert torch.equal(top_p_filter(lp, 1.0), lp)


@pytest.mark.parametrize("method", ["gkd", "kd"])
@pytest.mark.parametrize("beta,points_to", [(0.0, "kd.divergence=fkl"), (1.0, "kd.divergence=rkl")])
def test_jsd_at_beta_0_or_1_is_refused_with_a_pointer(method, beta, points_to):
    with pytest.raises(ConfigError) as e:
        load_config(DistillConfig, None, [f"method={method}", "kd.divergence=jsd", f"kd.jsd_beta={beta}"])
    assert points_to in str(e.value) and "\n" not in str(e.value)
    load_config(DistillConfig, None, [f"method={method}", "kd.divergence=jsd", "kd.jsd_beta=0.5"])  # inside: fine


def gkd_args(teacher, student, data, out, *extra):
    return ["distill", "method=gkd", f"teacher.name={teacher}", f"student.name={student}", "student.init=pretrained",
            f"data.train={data['train']}", f"output_dir={out}", "data.max_train_rows=8", "train.batch_size=4",
            "train.report_to=[none]", "evaluate_before=false", "evaluate_teacher=false", "teacher.check.mode='off'",
            "kd.kd_weight=1.0", "kd.temperature=1.0", "gkd.max_new_tokens=4", *extra]


def test_cross_tokenizer_gkd_aligns_the_sampled_text(tmp_path, tiny_dirs, tiny_data, capsys):
    wp = train_tokenizer("wordpiece", vocab_size=300)
    teacher = tiny_llama(wp, layers=2, hidden=32, seed=5)
    tdir = tmp_path / "wp_teacher"
    teacher.save_pretrained(tdir)
    wp.save_pretrained(tdir)
    out = tmp_path / "run"
    assert main(gkd_args(tdir, tiny_dirs["student"], tiny_data, out, "gkd.lmbda=1", "train.max_steps=2",
                         "train.save_steps=0", "student.lora.enabled=true")) == 0
    m = json.loads((out / "metrics.json").read_text())
    st = m["gkd"]["this_run"]
    assert st["student"] == 2 and st["data"] == 0 and st["sampled_answers"] == 8
    assert m["cross_tokenizer"] is not None
    log = json.loads((out / "log_history.json").read_text())
    terms = [h for h in log if "kd" in h]
    assert terms and all(h["kd"] > 0 and h["ce"] == 0 for h in terms)
    # seq_kd across tokenizers is refused with one line, before training
    capsys.readouterr()
    assert main(gkd_args(tdir, tiny_dirs["student"], tiny_data, tmp_path / "r2", "gkd.seq_kd=true")) == 2
    assert "gkd.seq_kd" in capsys.readouterr().err


def test_a_resumed_gkd_run_equals_an_uninterrupted_one(tmp_path, tiny_dirs, tiny_data, capsys):
    from safetensors.torch import load_file

    args = ("gkd.lmbda=0.5", "gkd.seq_kd=true", "train.max_steps=4", "train.save_steps=1", "train.save_total_limit=10")
    ref = tmp_path / "uninterrupted"
    assert main(gkd_args(tiny_dirs["teacher"], tiny_dirs["student"], tiny_data, ref, *args)) == 0
    st = json.loads((ref / "metrics.json").read_text())["gkd"]["this_run"]
    assert st["student"] > 0 and st["teacher"] > 0  # both sampled sources ran
    out = tmp_path / "interrupted"
    assert main(gkd_args(tiny_dirs["teacher"], tiny_dirs["student"], tiny_data, out, *args)) == 0
    import shutil

    for name in ("checkpoint-3", "checkpoint-4", "student", "metrics.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    capsys.readouterr()
    assert main(gkd_args(tiny_dirs["teacher"], tiny_dirs["student"], tiny_data, out, *args)) == 0
    assert "resuming from" in capsys.readouterr().out
    a = load_file(ref / "student" / "model.safetensors")
    b = load_file(out / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_gkd_warns_when_the_students_answers_stop_ending(tmp_path, tiny_dirs, tiny_data, capsys, monkeypatch):
    """A tiny random student never samples EOS within 4 tokens: the run says so once, and records the step."""
    from kdflow.diagnostics import UnendedWatch
    from kdflow.methods import gkd

    monkeypatch.setattr(gkd, "UnendedWatch", lambda: UnendedWatch(window=4, share=0.5, after=0.0))
    out = tmp_path / "run"
    assert main(gkd_args(tiny_dirs["teacher"], tiny_dirs["student"], tiny_data, out, "gkd.lmbda=1", "train.max_steps=2",
                         "train.save_steps=0", "kd.divergence=rkl")) == 0
    text = capsys.readouterr().out
    assert text.count("without EOS") == 1 and "gkd.lmbda below 1" in text and "kd.kd_weight=0.9" in text
    st = json.loads((out / "metrics.json").read_text())["gkd"]["this_run"]
    assert st["cut_answers"] >= 4 and st["unended_warning_step"] == 0
