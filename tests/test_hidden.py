"""Hidden-state distillation (methods.md §10): the term, its projection, layer maps, split invariance."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.config import DataConfig, DistillConfig, load_config
from kdflow.data import Collator, ListDataset, encode_rows, read_rows
from kdflow.errors import ConfigError
from kdflow.hidden import layer_map, parse_pairs, uniform_map
from kdflow.losses import shifted_masks
from kdflow.methods.kd import PROJECTION_FILE, make_distill_trainer_class
from kdflow.training import training_arguments

from conftest import tiny_llama
from test_cli import base_args


def _trainer(tmp_path, tok, teacher, student, examples, overrides, batch=4, accum=1, name="run"):
    cfg = load_config(DistillConfig, None, [f"train.batch_size={batch}", f"train.grad_accum={accum}",
                                            "train.max_steps=1", "train.learning_rate=0.5", "train.max_grad_norm=0",
                                            "train.lr_scheduler=constant", "train.report_to=[none]",
                                            "train.save_steps=0", *overrides])
    args = training_arguments(cfg.train, tmp_path / name, 0, False)
    args.optim = "sgd"
    pairs = layer_map(cfg.kd.hidden_layers, student.config, teacher.config.num_hidden_layers, cfg.kd.hidden_embeddings)
    return make_distill_trainer_class()(
        model=student, args=args, train_dataset=ListDataset(examples), data_collator=Collator(tok.pad_token_id),
        cfg=cfg, teacher=teacher, vocab_size=len(tok), hidden_pairs=pairs, teacher_width=teacher.config.hidden_size)


def _examples(tok, tiny_data, n=4):
    return encode_rows(read_rows(str(tiny_data["train"])).head(n), tok, DataConfig())


@pytest.mark.parametrize("kind,scope", [("mse", "response"), ("cosine", "all")])
def test_hidden_term_equals_a_direct_computation(tmp_path, bpe_tok, tiny_data, kind, scope):
    examples = _examples(bpe_tok, tiny_data)
    teacher = tiny_llama(bpe_tok, layers=4, hidden=48, seed=11).eval()
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=12)
    tr = _trainer(tmp_path, bpe_tok, teacher, student, examples,
                  ["kd.hidden_weight=0.5", f"kd.hidden_loss={kind}", f"kd.token_scope={scope}", "kd.chunk_tokens=3"])
    assert tr.hidden_pairs == [(1, 2), (2, 4)] and tr.projection is not None
    batch = Collator(bpe_tok.pad_token_id)(examples)
    got, n = tr.loss_sums(student, batch)["hidden"]

    # direct: both forwards, every pair's states at the KD positions, the projection, the distance
    _, kd_mask = shifted_masks(batch["labels"], batch["attention_mask"], scope)
    hs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    ht = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states
    per_pair = []
    for j, (a, b) in enumerate(tr.hidden_pairs):
        s = hs[a][:, :-1][kd_mask] @ tr.projection.maps[j].weight.T
        t = ht[b][:, :-1][kd_mask]
        if kind == "mse":
            d = ((F.layer_norm(s, (48,)) - F.layer_norm(t, (48,))) ** 2).mean(-1)
        else:
            d = 1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))
        per_pair.append(d)
    want = torch.stack(per_pair).mean(0).sum()
    assert n == int(kd_mask.sum()) > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (float(got), float(want))
    assert float(got.detach()) > 0
    # the chunked (recomputed in backward) term gives the direct computation's gradients too
    grads = []
    for value in (got, want):
        student.zero_grad()
        tr.projection.zero_grad()
        value.backward(retain_graph=True)
        grads.append([p.grad.clone() for p in (*tr.projection.parameters(), student.model.layers[0].mlp.up_proj.weight)])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(*grads))


def test_projection_is_trained_and_kept_out_of_the_student(tmp_path, bpe_tok, tiny_data):
    examples = _examples(bpe_tok, tiny_data)
    teacher = tiny_llama(bpe_tok, layers=4, hidden=48, seed=11).eval()
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=12)
    tr = _trainer(tmp_path, bpe_tok, teacher, student, examples, ["kd.hidden_weight=1.0", "train.save_steps=1"])
    before = [m.weight.detach().clone() for m in tr.projection.maps]
    batch = Collator(bpe_tok.pad_token_id)(examples)
    sums = tr.loss_sums(student, batch)
    sums["hidden"][0].backward()
    assert all(m.weight.grad is not None and float(m.weight.grad.abs().sum()) > 0 for m in tr.projection.maps)
    student.zero_grad()
    for m in tr.projection.maps:
        m.weight.grad = None
    tr.train()
    assert all(not torch.equal(a, m.weight) for a, m in zip(before, tr.projection.maps))  # the optimizer moved it
    assert not any("maps" in k for k in student.state_dict())  # not part of the model, so never in its folder
    assert (tmp_path / "run" / "checkpoint-1" / PROJECTION_FILE).is_file()  # but a resume finds it


def test_equal_widths_need_no_projection(tmp_path, bpe_tok, tiny_data):
    examples = _examples(bpe_tok, tiny_data)
    teacher = tiny_llama(bpe_tok, layers=4, hidden=32, seed=11).eval()
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=12)
    tr = _trainer(tmp_path, bpe_tok, teacher, student, examples, ["kd.hidden_weight=1.0"])
    assert tr.projection is None


def test_layer_maps(tmp_path, bpe_tok):
    from transformers import AutoModelForCausalLM

    from kdflow.models import prune_layers

    assert uniform_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_map(10, 30) == [(i, 3 * i) for i in range(1, 11)]
    assert uniform_map(3, 4) == [(1, 1), (2, 3), (3, 4)]
    teacher = tiny_llama(bpe_tok, layers=5, hidden=32, seed=3)
    pruned = prune_layers(teacher, [0, 2, 3])
    pruned.save_pretrained(tmp_path / "st")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "st")
    # each kept block to the block it came from, also after a reload (the config records them)
    assert layer_map("auto", reloaded.config, 5) == [(1, 1), (2, 3), (3, 4)]
    assert layer_map("auto", reloaded.config, 5, embeddings=True) == [(0, 0), (1, 1), (2, 3), (3, 4)]
    assert layer_map("uniform", reloaded.config, 5) == uniform_map(3, 5)
    assert layer_map("auto", tiny_llama(bpe_tok, layers=3).config, 5) == uniform_map(3, 5)
    assert layer_map("1:2,3:5", reloaded.config, 5) == [(1, 2), (3, 5)]
    with pytest.raises(ConfigError, match="outside"):
        layer_map("4:2", reloaded.config, 5)
    with pytest.raises(ConfigError, match="pruned from"):
        layer_map("auto", reloaded.config, 3)
    with pytest.raises(ConfigError, match="no layer pair"):
        parse_pairs("1-2")


def test_split_leaves_the_update_unchanged(tmp_path, bpe_tok, tiny_data):
    examples = _examples(bpe_tok, tiny_data)
    assert len({len(e["input_ids"]) for e in examples}) > 1
    teacher = tiny_llama(bpe_tok, layers=4, hidden=48, seed=11).eval()
    student = tiny_llama(bpe_tok, layers=2, hidden=32, seed=12)
    over = ["kd.hidden_weight=2.0", "kd.kd_weight=0.5", "kd.temperature=2.0"]

    def update(batch, accum, bug=False):
        model = copy.deepcopy(student)
        first = {n: p.detach().clone() for n, p in model.named_parameters()}
        tr = _trainer(tmp_path, bpe_tok, teacher, model, examples, over, batch, accum, name=f"r{batch}x{accum}{bug}")
        if bug:
            tr.get_batch_samples = lambda it, n, device: (type(tr).get_batch_samples(tr, it, n, device)[0], None)
        proj = [m.weight.detach().clone() for m in tr.projection.maps]
        tr.train()
        out = {n: p.detach() - first[n] for n, p in model.named_parameters()}
        out.update({f"proj{j}": m.weight.detach() - proj[j] for j, m in enumerate(tr.projection.maps)})
        return out

    whole = update(4, 1)
    for b, a in ((2, 2), (1, 4)):
        split = update(b, a)
        for k in whole:
            assert torch.allclose(whole[k], split[k], atol=2e-6, rtol=1e-4), (b, a, k)
    buggy = update(1, 4, bug=True)
    assert any(not torch.allclose(whole[k], buggy[k], atol=1e-5, rtol=1e-3) for k in whole)


def test_a_distill_run_with_the_hidden_term(tmp_path, tiny_dirs, tiny_data, capsys):
    out = tmp_path / "run"
    rc = main(["distill", *base_args(tiny_dirs, tiny_data, out), "train.max_steps=2", "kd.hidden_weight=1.0",
               "evaluate_before=false", "data.max_train_rows=8", "student.init=prune_teacher", "student.keep_layers=[0, 2]",
               "student.name=null"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hidden"]["pairs"] == [[1, 1], [2, 3]] and metrics["hidden"]["projection"] is False
    hist = json.loads((out / "log_history.json").read_text())
    assert any("hidden" in h for h in hist)
    assert "hidden-state term" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra,msg", [(["teacher_cache.dir=/nonexistent/cache"], "teacher_cache.hidden=all"),
                                       (["method=sft"], "method sft"),
                                       (["method=gkd"], "not implemented for on-policy answers"),
                                       (["kd.hidden_layers=1:x"], "no layer pair"),
                                       (["kd.hidden_layers=2:6"], "quote it")])
def test_hidden_settings_that_cannot_work_are_refused(tmp_path, tiny_dirs, tiny_data, capsys, extra, msg):
    out = tmp_path / "refused"
    rc = main(["distill", *base_args(tiny_dirs, tiny_data, out), "kd.hidden_weight=1.0", *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert not out.exists()


def test_hidden_states_from_the_teacher_cache(tmp_path, tiny_dirs, tiny_data, capsys):
    from transformers import AutoModelForCausalLM

    from kdflow.teacher_cache import TeacherCache

    cache = tmp_path / "cache"
    args = [*base_args(tiny_dirs, tiny_data, tmp_path / "run"), "train.max_steps=2", "kd.hidden_weight=1.0",
            "evaluate_before=false", "evaluate_teacher=false", "data.max_train_rows=8", f"teacher_cache.dir={cache}",
            "teacher_cache.hidden=all", "train.save_steps=0"]
    assert main(["cache-teacher", *args]) == 0
    assert "bytes per position on top of the top-k" in capsys.readouterr().out
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["key"]["hidden_layers"] == [1, 2, 3, 4]
    # what the cache holds is the teacher's states at the KD positions (float16)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_dirs["teacher"]).eval()
    from kdflow.config import ModelSpec
    from kdflow.models import load_tokenizer

    tok = load_tokenizer(ModelSpec(name=str(tiny_dirs["teacher"])))
    examples = encode_rows(read_rows(str(tiny_data["train"])).head(8), tok, DataConfig())
    stored = next(iter(TeacherCache(cache, manifest["key"]).load().items()))
    e = examples[stored[0]]
    ids = torch.tensor([e["input_ids"]])
    with torch.no_grad():
        hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    _, kd_mask = shifted_masks(torch.tensor([e["labels"]]), torch.ones_like(ids))
    want = torch.stack([hs[i][:, :-1][kd_mask] for i in (1, 2, 3, 4)], 1)
    assert torch.allclose(stored[1]["hidden"].float(), want, atol=2e-2, rtol=1e-2)
    assert main(["distill", *args]) == 0
    assert any("hidden" in h for h in json.loads((tmp_path / "run" / "log_history.json").read_text()))
    # a cache without the layers the map needs is refused in one line
    small = [*args[:-3], f"teacher_cache.dir={tmp_path / 'c2'}", "teacher_cache.hidden=4", "train.save_steps=0"]
    assert main(["cache-teacher", *small]) == 0
    capsys.readouterr()
    assert main(["distill", *small, f"output_dir={tmp_path / 'r2'}"]) == 2
    assert "the layer map needs" in capsys.readouterr().err
