"""Co-distillation (`kdflow codistill`): gradient isolation, step-level normalisation, N = 3,
resume, the CLI, and the co-trained-vs-alone comparison, on tiny models."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from kdflow.cli import main
from kdflow.config import CoDistillConfig, DataConfig, PeerSpec, load_config
from kdflow.data import encode_rows, read_rows
from kdflow.losses import DenseTeacher
from kdflow.methods import codistill as cd

from conftest import DATA, tiny_llama, write_jsonl

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models run ~10x faster on one thread than on two contended ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_peers(tok, examples, sizes=((2, 32, 1), (1, 48, 2), (2, 48, 3))):
    return [cd.Peer(PeerSpec(name=f"p{k}"), seed, tok, tiny_llama(tok, layers=layers, hidden=hidden, seed=seed), examples, 0, 1e-3)
            for k, (layers, hidden, seed) in enumerate(sizes)]


def make_cfg(*overrides):
    return load_config(CoDistillConfig, None, ["kd.kd_weight=0.6", "kd.temperature=2.0", *overrides])


@pytest.fixture(scope="module")
def examples(bpe_tok, tiny_data):
    ex = encode_rows(read_rows(str(tiny_data["train"])).head(8), bpe_tok, DataConfig())
    assert len({len(e["input_ids"]) for e in ex[:4]}) > 1  # unequal lengths: where normalisation matters
    return ex


def per_peer_losses(peers, rows, cfg):
    counts = cd.step_counts(peers, [rows], cfg.kd.token_scope)
    return [loss for loss, _ in cd.micro_batch_losses(peers, rows, counts, cfg, cfg.kd.kd_weight, CPU)]


def grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_no_gradient_flows_from_one_peer_into_another(bpe_tok, examples, variant):
    peers = make_peers(bpe_tok, examples)
    cfg = make_cfg(f"kd.variant={variant}", "kd.divergence=jsd")
    losses = per_peer_losses(peers, [0, 1, 2, 3], cfg)
    params = [list(p.model.parameters()) for p in peers]
    assert not {id(x) for x in params[0]} & {id(x) for x in params[1]}  # no shared tensors at all
    for i, loss_i in enumerate(losses):
        for j in range(len(peers)):
            if j != i:  # dL_i / dθ_j is exactly zero: peer j is a teacher for i, not a path for gradients
                assert all(g is None or not g.any() for g in grads(loss_i, params[j])), (i, j)
    # so one backward of the total gives each peer exactly the gradient of its own loss
    total = sum(losses)
    for i, loss_i in enumerate(losses):
        for a, b in zip(grads(total, params[i]), grads(loss_i, params[i])):
            assert torch.equal(a, b)
    # ... yet peer i's gradient does depend on peer j's (detached) outputs
    before = grads(losses[0], params[0])
    with torch.no_grad():
        for w in peers[1].model.parameters():
            w.add_(0.5 * torch.randn_like(w))
    after = grads(per_peer_losses(peers, [0, 1, 2, 3], cfg)[0], params[0])
    assert any(not torch.allclose(a, b) for a, b in zip(before, after))


def test_the_isolation_check_can_fail(bpe_tok, examples, monkeypatch):
    """A target that is not detached leaks gradient into the sender; the test above would see it."""

    class LeakyTeacher(DenseTeacher):
        def logits(self, index):
            return self.head(self.hidden[index]).float()

    monkeypatch.setattr(cd, "peer_targets", lambda s, r, out, *_: LeakyTeacher(out.hidden[out.kd_rows], out.head))
    peers = make_peers(bpe_tok, examples)[:2]
    loss_0 = per_peer_losses(peers, [0, 1, 2, 3], make_cfg())[0]
    assert any(g is not None and g.any() for g in grads(loss_0, list(peers[1].model.parameters())))


def step_grads(peers, micro_batches, cfg, per_microbatch_bug=False):
    for p in peers:
        p.model.zero_grad(set_to_none=True)
    if per_microbatch_bug:  # each micro-batch normalised by its own token counts
        for mb in micro_batches:
            cd.accumulate_step(peers, [mb], cfg, cfg.kd.kd_weight, CPU)
    else:
        cd.accumulate_step(peers, micro_batches, cfg, cfg.kd.kd_weight, CPU)
    return [[w.grad.clone() for w in p.model.parameters()] for p in peers]


@pytest.mark.parametrize("variant,scope,div", [("soft", "response", "fkl"), ("soft", "all", "jsd"), ("hard", "response", "fkl")])
def test_microbatch_split_leaves_every_peer_gradient_unchanged(bpe_tok, examples, variant, scope, div):
    peers = make_peers(bpe_tok, examples)  # N = 3 of different sizes
    cfg = make_cfg(f"kd.variant={variant}", f"kd.token_scope={scope}", f"kd.divergence={div}")
    whole = step_grads(peers, [[0, 1, 2, 3]], cfg)
    for split in ([[0, 1], [2, 3]], [[0], [1], [2], [3]]):
        got = step_grads(peers, split, cfg)
        for gp, wp in zip(got, whole):
            for a, b in zip(gp, wp):
                assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), split
    buggy = step_grads(peers, [[0], [1], [2], [3]], cfg, per_microbatch_bug=True)
    assert any(not torch.allclose(a, b, atol=1e-5, rtol=1e-3) for gp, wp in zip(buggy, whole) for a, b in zip(gp, wp))


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_loss_matches_the_formula(bpe_tok, examples, variant):
    """soft: L_i = α τ² mean_j KL(p_j ‖ p_i) + (1 − α) CE; hard: α mean_j CE(argmax p_j, p_i) + (1 − α) CE.
    The reference is computed here from the models' full logits."""
    import torch.nn.functional as F

    peers = make_peers(bpe_tok, examples)
    cfg = make_cfg("kd.divergence=fkl", f"kd.variant={variant}")
    rows = [0, 1, 2]
    got = [float(x.detach()) for x in per_peer_losses(peers, rows, cfg)]
    batch = cd._batches(peers, rows)[0]
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        logits = [p.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask].float()
                  for p in peers]
    a, t = 0.6, 2.0
    for i in range(3):
        ce = F.cross_entropy(logits[i], batch["labels"][:, 1:][mask])
        if variant == "soft":
            kds = [t * t * F.kl_div(F.log_softmax(logits[i] / t, -1), F.log_softmax(logits[j] / t, -1), log_target=True,
                                    reduction="batchmean") for j in range(3) if j != i]
        else:
            kds = [F.cross_entropy(logits[i], logits[j].argmax(-1)) for j in range(3) if j != i]
        assert got[i] == pytest.approx(float(a * sum(kds) / 2 + (1 - a) * ce), rel=1e-5)


def peer_args(tiny_dirs, tiny_data, out):
    peers = (f"[{{name: full, model: {{name: {tiny_dirs['student']}}}}}, "
             f"{{name: lora, model: {{name: {tiny_dirs['student']}, lora: {{enabled: true, r: 4, target_modules: [q_proj, v_proj]}}}}, "
             f"learning_rate: 0.002}}, "
             f"{{name: pruned, model: {{init: prune_teacher, keep_layers: [0, 3]}}, base: {{name: {tiny_dirs['teacher']}}}}}]")
    return [f"peers={peers}", f"base.name={tiny_dirs['teacher']}", f"data.train={tiny_data['train']}",
            f"data.validation={tiny_data['validation']}", f"data.test={tiny_data['test']}", f"output_dir={out}",
            "train.batch_size=4", "train.report_to=[none]", "train.logging_steps=1", "eval.max_new_tokens=4",
            "eval.batch_size=8", "train.learning_rate=0.001"]


def test_three_peers_through_the_real_cli(tmp_path, tiny_dirs, tiny_data):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "kdflow", "codistill", *peer_args(tiny_dirs, tiny_data, out),
                           "train.max_steps=2", "train.eval_steps=2", "train.num_threads=1", "baseline_alone=true",
                           "train.report_to=[tensorboard]"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.yaml", "metrics.json", "report.md", "loss_curve.png", "log_history.json", "runs"):
        assert (out / name).exists(), name
    assert (out / "peers" / "checkpoint-2" / "loop_state.json").is_file()  # one checkpoint holds every peer
    for peer in ("full", "lora", "pruned"):
        assert (out / f"loss_{peer}.png").is_file()
        assert (out / "peers" / peer / "model" / "config.json").is_file()
        assert (out / "alone" / peer / "checkpoint-2" / "loop_state.json").is_file()
        assert (out / "alone" / peer / "model" / "config.json").is_file()
        for row in ("before", "alone", "co-trained"):
            assert f"| {peer} ({row}) |" in proc.stdout
    assert (out / "peers" / "lora" / "adapter" / "adapter_config.json").is_file()
    # the LoRA peer's weights in the checkpoint (peers in order: full, lora, pruned) are its adapter only
    from safetensors.torch import load_file

    lora = load_file(str(out / "peers" / "checkpoint-2" / "model_1.safetensors"))
    assert lora and all("lora_" in k for k in lora)
    assert not any("lora_" in k for k in load_file(str(out / "peers" / "checkpoint-2" / "model.safetensors")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["codistill"]["steps"] == 2 and len(metrics["eval"]) == 9
    for m in metrics["eval"].values():
        assert {"answer_nll", "perplexity", "rougeL", "exact_match"} <= set(m)
    hist = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in hist["codistill"]["lora"] if "loss" in h] == [1, 2]
    assert any("eval_loss" in h for h in hist["codistill"]["pruned"])
    assert all("kd" in h for h in hist["codistill"]["full"] if "loss" in h)
    assert all("kd" not in h for h in hist["alone"]["full"])
    assert "| pruned (co-trained) |" in (out / "report.md").read_text()


def final_weights(out, peer):
    from safetensors.torch import load_file

    return load_file(str(out / "peers" / peer / "model" / "model.safetensors"))


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_dirs, tiny_data, capsys):
    common = ["train.max_steps=3", "train.save_steps=1", "evaluate_before=false", "eval.max_rows=2"]
    ref = tmp_path / "uninterrupted"
    assert main(["codistill", *peer_args(tiny_dirs, tiny_data, ref), *common]) == 0
    out = tmp_path / "interrupted"
    assert main(["codistill", *peer_args(tiny_dirs, tiny_data, out), *common]) == 0
    assert sorted(p.name for p in (out / "peers").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    # an interruption while the newest checkpoint was being written leaves it unfinished
    os.replace(out / "peers" / "checkpoint-3", out / "peers" / "checkpoint-3.partial")
    (out / "peers" / "checkpoint-3.partial" / "loop_state.json").unlink()
    for peer in ("full", "lora", "pruned"):
        shutil.rmtree(out / "peers" / peer / "model")
    capsys.readouterr()
    assert main(["codistill", *peer_args(tiny_dirs, tiny_data, out), *common]) == 0
    assert "resuming full, lora, pruned from checkpoint-2" in capsys.readouterr().out
    for peer in ("full", "lora", "pruned"):  # LoRA dropout too: the RNG state is restored
        a, b = final_weights(ref, peer), final_weights(out, peer)
        assert all(torch.equal(a[k], b[k]) for k in a), peer
    # other settings in the same folder are refused rather than mixed
    assert main(["codistill", *peer_args(tiny_dirs, tiny_data, out), *common, "kd.kd_weight=0.3"]) == 2
    assert "holds checkpoints of a run with other settings (kd.kd_weight differ)" in capsys.readouterr().err


def test_bad_peer_settings_are_clear_errors(tmp_path, tiny_dirs, tiny_data, capsys):
    args = peer_args(tiny_dirs, tiny_data, tmp_path / "bad")
    assert main(["codistill", *args, "peers=[{name: one, model: {name: x}}]"]) == 2
    assert "needs at least 2 peers" in capsys.readouterr().err
    assert main(["codistill", *args, "peers[1].name=full"]) == 2
    assert "peer names must be unique; repeated: full" in capsys.readouterr().err
    assert main(["codistill", *args, "peers[2].learning_rate=-1"]) == 2
    assert "'peers[2].learning_rate' must be > 0" in capsys.readouterr().err
    assert main(["codistill", *args, "kd.hidden_weight=1.0"]) == 2  # shared kd.* key, not wired between peers
    assert "codistill does not implement the hidden-state term" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Peers with different tokenizers (kdflow.align carries each distribution across)


@pytest.fixture(scope="module")
def other_toks():
    from conftest import train_tokenizer

    return {"wordpiece": train_tokenizer("wordpiece"), "unigram": train_tokenizer("unigram")}


def bridged_peers(rows, toks, cfg, groups=None):
    """One tiny peer per tokenizer, each with bridges from every peer of another group."""
    from kdflow.data import row_turns

    peers = []
    for k, tok in enumerate(toks):
        ex = encode_rows(rows, tok, cfg.data)
        peers.append(cd.Peer(PeerSpec(name=f"p{k}"), k, tok, tiny_llama(tok, layers=2, hidden=32 + 16 * k, seed=k + 1), ex,
                             k if groups is None else groups[k], 1e-3))
    turns = [row_turns(r, w, cfg.data) for r, w in zip(rows.items, rows.locations)]
    for p in peers:
        p.bridges = {q.name: cd.make_bridge(q, p, turns, cfg) for q in peers if q.group != p.group}
    return peers


@pytest.mark.parametrize("variant", ["soft", "hard"])
def test_a_bridge_between_identical_tokenizers_gives_the_dense_loss(bpe_tok, tiny_data, variant):
    """Forced through the alignment with k = the whole vocabulary, a peer's distribution arrives
    unchanged: every position pairs with itself, every id maps to itself, nothing is cut."""
    rows = read_rows(str(tiny_data["train"])).head(6)
    cfg = make_cfg(f"kd.variant={variant}", "kd.divergence=jsd", f"align.top_k={len(bpe_tok)}", "align.vocab_map_cache=false")
    dense = bridged_peers(rows, [bpe_tok, bpe_tok], cfg, groups=[0, 0])
    bridged = bridged_peers(rows, [bpe_tok, bpe_tok], cfg, groups=[0, 1])
    for p, q in zip(dense, bridged):
        q.model.load_state_dict(p.model.state_dict())
    assert bridged[0].bridges["p1"].valid == [cd._answer_len(e) for e in bridged[0].examples]  # all rows paired
    rows_ = [0, 1, 2, 3, 4, 5]
    for a, b in zip(per_peer_losses(dense, rows_, cfg), per_peer_losses(bridged, rows_, cfg)):
        assert float(a.detach()) == pytest.approx(float(b.detach()), rel=1e-5)
    g_dense = grads(per_peer_losses(dense, rows_, cfg)[0], list(dense[0].model.parameters()))
    g_bridged = grads(per_peer_losses(bridged, rows_, cfg)[0], list(bridged[0].model.parameters()))
    assert all(torch.allclose(x, y, atol=1e-6, rtol=1e-4) for x, y in zip(g_dense, g_bridged))


def test_different_tokenizers_no_cross_gradient_and_microbatch_invariance(bpe_tok, other_toks, tiny_data):
    rows = read_rows(str(tiny_data["train"])).head(4)
    cfg = make_cfg("kd.divergence=fkl", "align.vocab_map_cache=false", "align.top_k=16")
    peers = bridged_peers(rows, [bpe_tok, other_toks["wordpiece"], other_toks["unigram"]], cfg)
    # the alignment leaves some positions out: counts differ per pair, the case step-level counting must get right
    counts = cd.step_counts(peers, [[0, 1, 2, 3]], "response")[0]
    assert counts["kd:p1"] != counts["kd:p2"] and counts["kd:p1"] < counts["ce"]
    losses = per_peer_losses(peers, [0, 1, 2, 3], cfg)
    params = [list(p.model.parameters()) for p in peers]
    for i, loss_i in enumerate(losses):
        assert float(loss_i.detach()) > 0
        for j in range(3):
            if j != i:
                assert all(g is None or not g.any() for g in grads(loss_i, params[j])), (i, j)
    whole = step_grads(peers, [[0, 1, 2, 3]], cfg)
    split = step_grads(peers, [[0], [1, 2], [3]], cfg)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for gp, wp in zip(split, whole) for a, b in zip(gp, wp))


def test_peers_with_three_tokenizers_through_the_cli(tmp_path, bpe_tok, other_toks, tiny_data, capsys):
    peers = []
    for name, tok, seed in (("bpe", bpe_tok, 1), ("wordpiece", other_toks["wordpiece"], 2), ("unigram", other_toks["unigram"], 3)):
        tiny_llama(tok, layers=2, hidden=32, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        peers.append(f"{{name: {name}, model: {{name: {tmp_path / name}}}}}")
    out = tmp_path / "run"
    args = ["codistill", f"peers=[{', '.join(peers)}]", f"data.train={tiny_data['train']}", f"data.test={tiny_data['test']}",
            f"output_dir={out}", "train.max_steps=2", "train.batch_size=4", "train.report_to=[none]", "eval.max_new_tokens=4",
            "train.learning_rate=0.001", "align.vocab_map_cache=false", "evaluate_before=false"]
    assert main(args + ["kd.token_scope=all"]) == 2
    assert "tokenize the data differently and only the answer text is shared" in capsys.readouterr().err
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "[kdflow] wordpiece -> bpe: other tokenizer;" in text and "[kdflow] bpe -> unigram: other tokenizer;" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["eval"]) == {"bpe (co-trained)", "wordpiece (co-trained)", "unigram (co-trained)"}
    hist = json.loads((out / "log_history.json").read_text())["codistill"]
    assert all(h["kd"] > 0 for peer in hist.values() for h in peer if "kd" in h)


def test_co_trained_peers_beat_the_same_peers_trained_alone_on_held_out_loss(tmp_path, bpe_tok):
    """Small data, many epochs: each peer alone overfits; the other peer's soft targets regularise it.

    Same initial weights, batches, seeds and steps for both arms; held-out = 64 validation rows.
    """
    rows = (DATA / "train.jsonl").read_text().splitlines()[:16]
    held_out = (DATA / "validation.jsonl").read_text().splitlines()[:64]
    train = write_jsonl(tmp_path / "train.jsonl", [json.loads(r) for r in rows])
    test = write_jsonl(tmp_path / "test.jsonl", [json.loads(r) for r in held_out])
    peers = []
    for name, layers, hidden, seed in (("small", 2, 32, 1), ("wide", 2, 48, 2)):
        tiny_llama(bpe_tok, layers=layers, hidden=hidden, seed=seed).save_pretrained(tmp_path / name)
        bpe_tok.save_pretrained(tmp_path / name)
        peers.append(f"{{name: {name}, model: {{name: {tmp_path / name}}}}}")
    out = tmp_path / "run"
    assert main(["codistill", f"peers=[{', '.join(peers)}]", f"data.train={train}", f"data.test={test}",
                 f"output_dir={out}", "train.max_steps=60", "train.batch_size=8", "train.learning_rate=0.01",
                 "kd.kd_weight=0.5", "kd.temperature=1.0", "baseline_alone=true", "eval.greedy=false",
                 "eval.max_rows=64", "train.report_to=[none]", "train.save_steps=0", "train.logging_steps=20"]) == 0
    ev = json.loads((out / "metrics.json").read_text())["eval"]
    for name in ("small", "wide"):
        before, alone, co = (ev[f"{name} ({k})"]["answer_nll"] for k in ("before", "alone", "co-trained"))
        print(f"{name}: before {before:.4f}  alone {alone:.4f}  co-trained {co:.4f}")
        assert co < before and alone < before  # both arms learned
        assert co < alone, name
