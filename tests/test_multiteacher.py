"""Several teachers (methods.md §11): each rule against a hand computation, mixed tokenizers, caches."""

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.config import DataConfig, DistillConfig, load_config
from kdflow.data import Collator, ListDataset, encode_rows, read_rows
from kdflow.losses import shifted_masks
from kdflow.methods.kd import TeacherSlot, make_distill_trainer_class
from kdflow.multiteacher import choose_per_sample, entropy_topk, row_weights
from kdflow.training import training_arguments

from conftest import tiny_llama, train_tokenizer
from test_cli import base_args


def test_row_weights_by_hand():
    cov = torch.tensor([[True, True, False, True], [True, False, False, True]])
    w = row_weights("fixed", cov, [3.0, 1.0])
    assert torch.allclose(w, torch.tensor([[0.75, 1.0, 0.0, 0.75], [0.25, 0.0, 0.0, 0.25]]))
    # min_ce: the chosen teacher only; a row it does not cover leaves the term even if another covers it
    choice = torch.tensor([1, 1, 0, 0])
    w = row_weights("min_ce", cov, choice=choice)
    assert torch.equal(w, torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
    ent = torch.tensor([[1.0, 2.0, 0.0, 0.5], [2.0, 0.1, 0.0, 0.5]])
    w = row_weights("confidence", cov, entropy=ent, temperature=0.5)
    a = math.exp(-1 / 0.5) / (math.exp(-1 / 0.5) + math.exp(-2 / 0.5))
    assert torch.allclose(w, torch.tensor([[a, 1.0, 0.0, 0.5], [1 - a, 0.0, 0.0, 0.5]]), atol=1e-6)
    # the per-sample choice is DualMinCE's argmin without the receiver test
    assert choose_per_sample(np.array([[0.5, 0.2, 0.9], [0.4, 0.3, 0.1]])).tolist() == [1, 0, 1]


def test_topk_entropy_counts_the_tail_as_one_bucket():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ids = torch.tensor([[4, 7]])
    h = entropy_topk(logp, ids, None)
    want = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
    assert abs(float(h) - want) < 1e-5
    assert abs(float(entropy_topk(logp, torch.tensor([[4, -1]]), None)) - (-(0.5 * math.log(0.5) * 2))) < 1e-5


def _trainer(tmp_path, tok, student, teachers, examples, overrides, batch=4, accum=1, name="run", weights=(3.0, 1.0)):
    cfg = load_config(DistillConfig, None, [f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                            "train.max_steps=1", "train.learning_rate=0.5", "train.max_grad_norm=0",
                                            "train.lr_scheduler=constant", "train.report_to=[none]",
                                            "train.save_steps=0", *overrides])
    args = training_arguments(cfg.train, tmp_path / name, 0, False)
    args.optim = "sgd"
    total = sum(weights)
    slots = [TeacherSlot(label=f"t{j}", prefix=f"teacher_{j + 1}_", weight=w / total, model=t)
             for j, (t, w) in enumerate(zip(teachers, weights))]
    return make_distill_trainer_class()(
        model=student, args=args, train_dataset=ListDataset(examples), data_collator=Collator(tok.pad_token_id),
        cfg=cfg, teacher=None, vocab_size=len(tok), slots=slots)


@pytest.mark.parametrize("rule", ["fixed", "min_ce", "confidence"])
def test_each_rule_equals_a_hand_computation(tmp_path, bpe_tok, tiny_data, rule):
    examples = encode_rows(read_rows(str(tiny_data["train"])).head(4), bpe_tok, DataConfig())
    for i, e in enumerate(examples):
        e["teacher_choice"] = torch.tensor(i % 2)
    teachers = [tiny_llama(bpe_tok, layers=2, hidden=48, seed=21).eval(), tiny_llama(bpe_tok, layers=3, hidden=32, seed=22).eval()]
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=23)
    T, tau_c = 2.0, 0.7
    tr = _trainer(tmp_path, bpe_tok, student, teachers, examples,
                  [f"multi_teacher.rule={rule}", f"kd.temperature={T}", "kd.kd_weight=0.6", "kd.chunk_tokens=5",
                   f"multi_teacher.confidence_temperature={tau_c}"])
    batch = Collator(bpe_tok.pad_token_id)(examples)
    kd, n = tr.loss_sums(student, batch)["kd"]

    # by hand: each teacher's forward KL per KD row, weighted as the rule says, times T^2
    _, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"], "response")
    run = lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][kd_mask].float()
    s = F.log_softmax(run(student) / T, -1)
    kls, ents = [], []
    for t in teachers:
        p = F.log_softmax(run(t).detach() / T, -1)
        kls.append((p.exp() * (p - s)).sum(-1))
        ents.append(-(p.exp() * p).sum(-1))
    rows = kd_mask.sum(-1).tolist()
    if rule == "fixed":
        w = [torch.full_like(kls[0], 0.75), torch.full_like(kls[0], 0.25)]
    elif rule == "min_ce":
        chosen = torch.tensor(sum([[i % 2] * r for i, r in enumerate(rows)], []))
        w = [(chosen == 0).float(), (chosen == 1).float()]
    else:
        e0, e1 = torch.exp(-ents[0] / tau_c), torch.exp(-ents[1] / tau_c)
        w = [e0 / (e0 + e1), e1 / (e0 + e1)]
    want = (w[0] * kls[0] + w[1] * kls[1]).sum() * T ** 2
    assert n == int(kd_mask.sum())
    assert torch.allclose(kd, want, rtol=1e-4, atol=1e-5), (float(kd), float(want))


def test_multi_teacher_split_leaves_the_update_unchanged(tmp_path, bpe_tok, tiny_data):
    examples = encode_rows(read_rows(str(tiny_data["train"])).head(4), bpe_tok, DataConfig())
    teachers = [tiny_llama(bpe_tok, layers=2, hidden=48, seed=21).eval(), tiny_llama(bpe_tok, layers=3, hidden=32, seed=22).eval()]
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=23)

    def update(batch, accum, bug=False):
        model = copy.deepcopy(student)
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
        tr = _trainer(tmp_path, bpe_tok, model, teachers, examples, ["multi_teacher.rule=confidence", "kd.kd_weight=0.7"],
                      batch, accum, name=f"r{batch}x{accum}{bug}")
        if bug:  # each micro-batch divided by its own counts: the test must see the difference
            tr.get_batch_samples = lambda it, n, device: (type(tr).get_batch_samples(tr, it, n, device)[0], None)
        tr.train()
        return {n: p.detach() - first[n] for n, p in model.named_parameters()}

    whole = update(4, 1)
    for b, a in ((2, 2), (1, 4)):
        split = update(b, a)
        for k in whole:
            assert torch.allclose(whole[k], split[k], atol=2e-6, rtol=1e-4), (b, a, k)
    buggy = update(1, 4, bug=True)
    assert any(not torch.allclose(whole[k], buggy[k], atol=1e-5, rtol=1e-3) for k in whole)


def _other_tok_teacher(tmp_path):
    tok = train_tokenizer("unigram", vocab_size=300)
    folder = tmp_path / "other"
    tiny_llama(tok, layers=2, hidden=32, seed=5).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_mixed_tokenizers_online_and_from_caches(tmp_path, tiny_dirs, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "kc"))
    other = _other_tok_teacher(tmp_path)
    teachers = f"teachers=[{{name: {tiny_dirs['teacher']}, label: same, weight: 2}}, {{name: {other}, label: other}}]"
    rule = "min_ce"
    common = ["train.max_steps=2", "evaluate_before=false", "data.max_train_rows=12", teachers,
              f"multi_teacher.rule={rule}", "train.save_steps=0"]
    out = tmp_path / "online"
    assert main(["distill", *base_args(tiny_dirs, tiny_data, out), *common]) == 0
    m = json.loads((out / "metrics.json").read_text())["teachers"]
    assert [t["label"] for t in m["teachers"]] == ["same", "other"]
    assert [t["cross_tokenizer"] for t in m["teachers"]] == [False, True]
    share = m["weight_share_in_training"]
    assert abs(sum(share.values()) - 1) < 1e-6 and all(v >= 0 for v in share.values())
    if rule == "min_ce":
        assert abs(sum(m["selected_share"].values()) - 1) < 1e-9
        assert set(m["answer_nll_per_char"]) == {"same", "other"}
    evals = json.loads((out / "metrics.json").read_text())["eval"]
    assert {"teacher same", "teacher other", "student (after)"} <= set(evals)  # each teacher's own scores
    assert "chosen for" in (out / "report.md").read_text()

    # one cache per teacher, named in its entry; training from them reads no teacher
    cached = f"teachers=[{{name: {tiny_dirs['teacher']}, label: same, cache: {tmp_path / 'c1'}}}, " \
             f"{{name: {other}, label: other, cache: {tmp_path / 'c2'}}}]"
    args = [*base_args(tiny_dirs, tiny_data, tmp_path / "cached"), *common[:-3], cached, "multi_teacher.rule=confidence",
            "train.save_steps=0", "teacher_cache.k=8", "evaluate_teacher=false", f"data.test={tiny_data['test']}"]
    assert main(["cache-teacher", *args]) == 0
    assert (tmp_path / "c1" / "manifest.json").is_file() and (tmp_path / "c2" / "manifest.json").is_file()
    assert main(["distill", *args]) == 0
    text = capsys.readouterr().out
    assert "training from its cache" in text
    mc = json.loads((tmp_path / "cached" / "metrics.json").read_text())["teachers"]
    assert abs(sum(mc["weight_share_in_training"].values()) - 1) < 1e-6


@pytest.mark.parametrize("extra,msg", [(["method=hard_token"], "method hard_token"),
                                       (["teacher_cache.dir=/x"], "its own `cache`"),
                                       (["kd.hidden_weight=1"], "hidden_weight")])
def test_teachers_settings_that_cannot_work_are_refused(tmp_path, tiny_dirs, tiny_data, capsys, extra, msg):
    out = tmp_path / "refused"
    rc = main(["distill", *base_args(tiny_dirs, tiny_data, out), f"teachers=[{{name: {tiny_dirs['teacher']}}}]", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not out.exists()


def test_the_same_teacher_twice_trains_like_one_teacher(tmp_path, tiny_dirs, tiny_data):
    """Through the CLI: the one teacher alone (`teacher`), the same teacher twice under min_ce (a tie: the first
    is chosen for every sample) and twice with fixed weights 3:1 (sum_j w_j D(p || q) = D(p || q)) move the
    student to the same weights."""
    from safetensors.torch import load_file

    t = tiny_dirs["teacher"]
    common = ["train.max_steps=2", "evaluate_before=false", "evaluate_teacher=false", "data.max_train_rows=12",
              "train.save_steps=0", "train.learning_rate=1e-2"]
    runs = {"one": [],
            "fixed": [f"teachers=[{{name: {t}, weight: 3}}, {{name: {t}, weight: 1}}]", "multi_teacher.rule=fixed"],
            "min_ce": [f"teachers=[{{name: {t}}}, {{name: {t}}}]", "multi_teacher.rule=min_ce"]}
    weights = {}
    for name, extra in runs.items():
        assert main(["distill", *base_args(tiny_dirs, tiny_data, tmp_path / name), *common, *extra]) == 0
        weights[name] = load_file(str(tmp_path / name / "student" / "model.safetensors"))
    start = load_file(str(tiny_dirs["student"] / "model.safetensors"))
    assert any(not torch.equal(weights["one"][k], start[k]) for k in start)  # it trained
    share = json.loads((tmp_path / "min_ce" / "metrics.json").read_text())["teachers"]["selected_share"]
    assert share == {"teacher1": 1.0, "teacher2": 0.0}
    # min_ce puts weight 0 on the second teacher: the very same update, bit for bit
    assert all(torch.equal(weights["min_ce"][k], v) for k, v in weights["one"].items())
    # fixed sums 0.75 D + 0.25 D: equal up to float rounding, which Adam's first step (g / (|g| + eps)) magnifies
    # on entries whose gradient is near 0; the weights themselves are checked by hand in the test above
    for k, v in weights["one"].items():
        assert torch.allclose(weights["fixed"][k], v, atol=1e-4), (k, float((weights["fixed"][k] - v).abs().max()))
