"""FedMKT: selection rules, per-sample CE, payloads (no private data, validation), partitions, a 2-round run."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdflow.cli import main
from kdflow.config import DataConfig, FedMKTConfig, LoraSpec, PartyConfig, StudentSpec, load_config
from kdflow.data import encode_rows, partition_rows, read_rows
from kdflow.federated import payload as wire
from kdflow.federated.fedmkt import client_local_step, make_party, public_outputs, select_targets
from kdflow.federated.selection import OWN, SKIP, dualmince, no_selection, reference_rule, weighted

from conftest import DATA, tiny_llama


# ----------------------------------------------------------------------------------------------
# Selection


def test_dualmince_on_hand_built_cases():
    receiver = np.array([1.0, 2.0, 0.5, 3.0, 0.7])
    senders = np.array([[0.8, 2.5, 0.6, 3.0, 0.9],
                        [0.9, 1.5, 0.4, 3.5, 0.7]])
    # sample 0: sender 0 (0.8 < 1.0); 1: sender 1; 2: sender 1 (0.4 < 0.5); 3: best 3.0 does not beat 3.0;
    # 4: best 0.7 ties the receiver -> not selected (strict)
    assert dualmince(receiver, senders).tolist() == [0, 1, 1, SKIP, SKIP]
    assert reference_rule(receiver, senders).tolist() == [0, 1, 1, OWN, OWN]
    assert no_selection(receiver, senders).tolist() == [0, 1, 1, 0, 1]
    # float32 comparison: a difference below bf16 resolution still counts
    assert dualmince(np.array([1.0]), np.array([[1.0 - 1e-4]])).tolist() == [0]
    with pytest.raises(ValueError, match="finite"):
        dualmince(np.array([np.nan]), np.array([[1.0]]))
    with pytest.raises(ValueError, match="3 samples"):
        dualmince(np.array([1.0, 2.0]), np.ones((2, 3)))


def test_weighted_selection_mixes_by_cross_entropy():
    w, sw = weighted(np.array([1.0, 0.1]), np.array([[0.5, 2.0], [1.5, 2.0]]))
    assert np.allclose(w.sum(0), 1.0) and w[0, 0] > w[1, 0] and np.isclose(w[0, 1], w[1, 1])
    assert sw[0] > 0.5 > sw[1]  # the mixture beats the receiver on sample 0 only


# ----------------------------------------------------------------------------------------------
# Parties on tiny models


@pytest.fixture(scope="module")
def parties(bpe_tok):
    rows = read_rows(str(DATA / "train.jsonl")).head(40)
    public, private = partition_rows(rows, 8, 2, private_rows=6, seed=0)
    spec = PartyConfig(name="c", model=StudentSpec(lora=LoraSpec(enabled=True, r=4)))
    out = []
    for i, name in enumerate(("server", "c1", "c2")):
        p = make_party(PartyConfig(name=name, model=spec.model, learning_rate=1e-3),
                       tiny_llama(bpe_tok, layers=2, hidden=32, seed=10 + i), bpe_tok, seed=i)
        p.public = encode_rows(public, bpe_tok, DataConfig())
        p.private = encode_rows(private[i - 1], bpe_tok, DataConfig()) if i else []
        out.append(p)
    return out, public, private


def test_per_sample_ce_is_the_mean_over_answer_tokens(parties):
    (server, *_), _, _ = parties
    out = public_outputs(server, k=5, temperature=1.0, batch_size=3)
    for n, e in enumerate(server.public):
        with torch.no_grad():
            logits = server.model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
        labels = torch.tensor(e["labels"][1:])
        mask = labels != -100
        ref = F.cross_entropy(logits[mask], labels[mask]).item()
        assert abs(out.ce[n] - ref) < 1e-4
        ids, lp, tail = out.sample(n)
        assert ids.shape == (int(mask.sum()), 5)
        full = F.log_softmax(logits[mask], -1)
        assert np.allclose(lp, full.topk(5).values.numpy(), atol=1e-5)
        assert np.allclose(np.logaddexp(np.logaddexp.reduce(lp, axis=1), tail), 0.0, atol=1e-5)


def test_client_payload_carries_no_private_data(parties, bpe_tok):
    (_, c1, _), public, private = parties
    cfg = load_config(FedMKTConfig, None, ["fedmkt.top_k=5", "train.batch_size=4", "eval.batch_size=4"])
    out, _ = client_local_step(c1, cfg, 1)
    arrays = wire.encode(out, c1.vocab_size)
    assert set(arrays) == set(wire.FIELDS)
    # every shape is fixed by the public set alone
    assert arrays["offsets"].tolist() == np.concatenate([[0], np.cumsum(c1.positions())]).tolist()
    assert arrays["ce"].shape == (len(public),)
    # no private text, no private token sequence, no weights
    blob = b"".join(a.tobytes() for a in arrays.values())
    for row in private[0].items:
        assert row["response"].encode() not in blob
    private_ids = {tuple(e["input_ids"][e["prompt_len"]:]) for e in c1.private}
    sent_ids = arrays["ids"].astype(np.int64)
    for seq in private_ids:
        assert not any(np.array_equal(sent_ids[i:i + len(seq), 0], seq) for i in range(len(sent_ids) - len(seq) + 1))
    adapter_shapes = {tuple(p.shape) for p in c1.model.parameters() if p.requires_grad}
    assert not any(tuple(a.shape) in adapter_shapes for a in arrays.values())
    # a client with other private data sends a payload of exactly the same shapes
    c1_private = c1.private
    c1.private = c1.private[:2]
    out2, _ = client_local_step(c1, cfg, 2)
    c1.private = c1_private
    assert {k: v.shape for k, v in wire.encode(out2, c1.vocab_size).items()} == {k: v.shape for k, v in arrays.items()}


@pytest.mark.parametrize("corrupt,match", [
    (lambda a: a.__setitem__("logp", np.where(np.arange(a["logp"].size).reshape(a["logp"].shape) == 3, np.float16(np.nan), a["logp"])), "finite or -inf"),
    (lambda a: a["ids"].__setitem__((0, 0), 65000), "outside the vocabulary"),
    (lambda a: a.__setitem__("ce", a["ce"][:-1]), "'ce' has shape"),
    (lambda a: a.__setitem__("ids", a["ids"].astype(np.int64)), "'ids' must be uint16 or int32"),
    (lambda a: a.__setitem__("extra", np.zeros(3)), "unexpected"),
    (lambda a: a.__setitem__("offsets", a["offsets"] + 1), "offsets do not match"),
    (lambda a: a.__setitem__("ce", -a["ce"]), "cross-entropies must be finite and >= 0"),
    # a position with no probability at all (reverse KL against it is infinite), or twice the mass
    (lambda a: (a["logp"].__setitem__(2, -np.inf), a["tail_logp"].__setitem__(2, -np.inf)), "position 2 sum to 0, not 1"),
    (lambda a: a["logp"].__setitem__((0, slice(None)), 0.0), r"position 0 sum to 4\.\d+, not 1"),
    (lambda a: a["ids"].__setitem__((1, 1), a["ids"][1, 0]), "position 1 lists a token id twice"),
])
def test_malformed_payloads_are_rejected(parties, corrupt, match):
    (server, *_), _, _ = parties
    arrays = wire.encode(public_outputs(server, 4, 1.0), server.vocab_size)
    corrupt(arrays)
    with pytest.raises(wire.PayloadError, match=match):
        wire.decode(arrays, sender="c9", vocab_size=server.vocab_size, k=4, positions=server.positions())


def test_reverse_kl_refuses_a_payload_with_zero_probabilities(parties):
    """A top-k id (or the tail) with probability 0 makes KL(q || p) infinite: refused when the
    divergence is rkl, accepted by the others (the mass still sums to 1)."""
    (server, *_), _, _ = parties
    arrays = wire.encode(public_outputs(server, 4, 1.0), server.vocab_size)
    lp = arrays["logp"].astype(np.float32)
    lp[3, 0] = np.logaddexp(lp[3, 0], lp[3, 3])  # move the 4th id's mass to the 1st: same total
    lp[3, 3] = -np.inf
    arrays["logp"] = lp.astype(np.float16)
    kw = dict(sender="c9", vocab_size=server.vocab_size, k=4, positions=server.positions())
    wire.decode(arrays, **kw)
    with pytest.raises(wire.PayloadError, match="position 3 gives a token or its tail probability 0.*rkl"):
        wire.decode(arrays, **kw, finite_support=True)


def test_oversize_payload_is_rejected(parties):
    (server, *_), _, _ = parties
    arrays = wire.encode(public_outputs(server, 4, 1.0), server.vocab_size)
    with pytest.raises(wire.PayloadError, match="over the limit of 100"):
        wire.decode(arrays, sender="c9", vocab_size=server.vocab_size, k=4, positions=server.positions(), max_bytes=100)


def test_selected_targets_are_the_chosen_senders_distributions(parties):
    (server, c1, c2), _, _ = parties
    outs = [public_outputs(p, 4, 1.0) for p in (server, c1, c2)]
    outs[1].ce[:] = 0.0  # c1 beats everyone everywhere
    examples, share = select_targets(server, outs[0], [c1, c2], outs[1:], "dualmince", 4)
    assert share["c1"] == 1.0
    for n, e in enumerate(examples):
        ids, lp, _ = outs[1].sample(n)
        assert torch.equal(e["teacher_ids"], torch.from_numpy(ids)) and bool(e["teacher_valid"].all())
    outs[1].ce[:] = 99.0
    outs[2].ce[:] = 99.0
    examples, share = select_targets(server, outs[0], [c1, c2], outs[1:], "dualmince", 4)
    assert share["skipped"] == 1.0 and not any(bool(e["teacher_valid"].any()) for e in examples)
    examples, share = select_targets(server, outs[0], [c1, c2], outs[1:], "reference", 4)
    ids, _, _ = outs[0].sample(0)
    assert share["own"] == 1.0 and torch.equal(examples[0]["teacher_ids"], torch.from_numpy(ids))


def test_a_client_with_another_tokenizer_is_carried_into_the_servers_vocabulary(parties, unigram_dir):
    from kdflow.config import AlignConfig, ModelSpec
    from kdflow.federated.fedmkt import Bridges
    from kdflow.models import load_model, load_tokenizer

    (server, _, _), public, _ = parties
    tok = load_tokenizer(ModelSpec(name=str(unigram_dir)))
    client = make_party(PartyConfig(name="uni", model=StudentSpec(lora=LoraSpec(enabled=True, r=4))),
                        load_model(ModelSpec(name=str(unigram_dir))), tok, seed=5)
    client.public = encode_rows(public, tok, DataConfig())
    server.public_rows = client.public_rows = public
    s_out, c_out = public_outputs(server, 6, 1.0), public_outputs(client, 6, 1.0)
    c_out.ce[:] = 0.0  # the client wins every sample
    examples, share = select_targets(server, s_out, [client], [c_out], "dualmince", 6, Bridges(DataConfig(), AlignConfig()))
    assert share["uni"] == 1.0
    valid_rows = total_rows = 0
    for e, n_pos in zip(examples, server.positions()):
        ids, lp, tail, valid = e["teacher_ids"], e["teacher_logp"], e["teacher_tail_logp"], e["teacher_valid"]
        assert ids.shape[0] == n_pos  # one row per server answer position
        assert int(ids.max()) < server.vocab_size
        mass = torch.logsumexp(torch.cat([lp[valid], tail[valid, None]], -1), -1)
        assert torch.allclose(mass, torch.zeros_like(mass), atol=1e-3)  # projection keeps probability mass
        valid_rows += int(valid.sum())
        total_rows += n_pos
    assert valid_rows / total_rows > 0.5  # tiny 400/500-token vocabularies share fewer word boundaries than real ones


def test_a_remote_sender_with_another_tokenizer_is_refused_clearly(parties):
    """Over Flower a sender is known by name, vocabulary size and tokenizer fingerprint only."""
    from kdflow.config import ConfigError
    from kdflow.federated.fedmkt import Peer, transfer

    (server, c1, _), _, _ = parties
    out = public_outputs(c1, 4, 1.0)
    same = transfer(out, Peer("c1", c1.vocab_size, c1.fingerprint), server, 0)
    assert torch.equal(same["ids"], torch.from_numpy(out.sample(0)[0]))
    with pytest.raises(ConfigError, match="'far' and 'server' use different tokenizers.*kdflow fedmkt"):
        transfer(out, Peer("far", c1.vocab_size, "another-tokenizer"), server, 0)


def test_partitions():
    rows = read_rows(str(DATA / "train.jsonl")).head(200)
    public, private = partition_rows(rows, 50, 3, seed=1)
    idx = lambda r: {l for l in r.locations}
    assert len(public) == 50 and sum(len(p) for p in private) == 150
    assert not (idx(public) & idx(private[0])) and not (idx(private[0]) & idx(private[1]))
    lines = [int(l.rsplit(":", 1)[1]) for l in public.locations]
    assert lines == sorted(lines)  # the public set keeps the file's order
    _, skewed = partition_rows(rows, 50, 2, scheme="dirichlet", field="pos", alpha=0.1, seed=1)
    share = lambda part, pos: sum(r["pos"] == pos for r in part.items) / max(len(part), 1)
    assert max(abs(share(skewed[0], p) - share(skewed[1], p)) for p in ("noun", "verb", "adjective")) > 0.2


# ----------------------------------------------------------------------------------------------
# The verb


def test_two_round_run_with_two_tiny_clients_and_resume(tmp_path, tiny_dirs, unigram_dir, capsys):
    out = tmp_path / "fed"
    args = ["fedmkt", f"output_dir={out}", f"server.model.name={tiny_dirs['teacher']}",
            f"clients=[{{name: c1, model: {{name: {tiny_dirs['student']}}}}}, "
            f"{{name: c2, model: {{name: {unigram_dir}, lora: {{enabled: true, r: 4}}}}}}]",
            f"data.train={DATA / 'train.jsonl'}", f"data.test={DATA / 'test.jsonl'}", "data.public_rows=12",
            "data.private_rows=8", "fedmkt.rounds=2", "fedmkt.top_k=8", "eval.max_rows=3", "eval.max_new_tokens=3",
            "train.batch_size=4", "baselines=[zero_shot, standalone]"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["round"] for h in m["rounds"]] == [0, 1, 2]
    assert m["setting"] == "heterogeneous"  # c2 has its own tokenizer
    assert m["rounds"][1]["selected"]["server"]["c2"] + m["rounds"][1]["selected"]["server"]["c1"] + \
        m["rounds"][1]["selected"]["server"]["skipped"] == pytest.approx(1.0)
    for b in m["bytes_per_round"]:
        assert b["up"] > 0 and b["down"] > 0
    assert set(m["table"]) == {"FedMKT", "zero-shot", "standalone"}
    assert set(m["table"]["FedMKT"]) == {"server", "c1", "c2"}
    assert (out / "rounds" / "round-002" / "server.adapter.safetensors").is_file()
    assert (out / "report.md").is_file() and (out / "rounds_rougeL.png").is_file()
    # the server moved: FedMKT's server differs from the zero-shot server
    assert m["table"]["FedMKT"]["server"]["answer_nll"] != m["table"]["zero-shot"]["server"]["answer_nll"]
    capsys.readouterr()
    assert main(args) == 0  # a second run resumes after the last round and retrains nothing
    assert "resuming after round 2" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# KD weighting (methods.md §0), selection across tokenizers (§8), settings refused up front


def _kd_party(bpe_tok, public, name="server"):
    """A party without LoRA dropout, so that its training forward is the plain forward."""
    p = make_party(PartyConfig(name=name, model=StudentSpec(lora=LoraSpec(enabled=True, r=4, dropout=0.0)),
                               learning_rate=1e-3), tiny_llama(bpe_tok, layers=2, hidden=32, seed=10), bpe_tok, seed=0)
    p.public = encode_rows(public, bpe_tok, DataConfig())
    return p


def test_kd_term_keeps_unselected_samples_in_its_denominator(parties, bpe_tok):
    """One sample of 8 selected: the KD term is that sample's divergence summed over its positions,
    divided by the answer positions of all 8 samples (not by the selected sample's own), by hand."""
    from kdflow.federated.fedmkt import train_phase

    (_, c1, _), public, _ = parties
    server = _kd_party(bpe_tok, public)
    s_out, c_out = public_outputs(server, 4, 1.0), public_outputs(c1, 4, 1.0)
    c_out.ce[:] = 99.0
    c_out.ce[2] = 0.0  # c1 beats the server on sample 2 only
    a, b = c_out.offsets[2:4]  # a peaked target there, so that the divergence is far from 0
    c_out.logp[a:b], c_out.tail_logp[a:b] = np.log([0.7, 0.1, 0.05, 0.05]), np.log(0.1)
    examples, share = select_targets(server, s_out, [c1], [c_out], "dualmince", 4)
    assert share["c1"] == pytest.approx(1 / 8) and share["skipped"] == pytest.approx(7 / 8)
    # the hand computation: forward KL over the 4 ids + the tail bucket, at the selected rows
    e = server.public[2]
    with torch.no_grad():
        logits = server.model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float()
    mask = torch.tensor(e["labels"][1:]) != -100
    q = F.log_softmax(logits[mask], -1).double()
    ids, lp, tail = (torch.from_numpy(x).double() for x in c_out.sample(2))
    ids = ids.long()
    q_k = q.gather(-1, ids)
    q_rest = torch.log1p(-q_k.exp().sum(-1))
    kd_sum = ((lp.exp() * (lp - q_k)).sum(-1) + tail.exp() * (tail - q_rest)).sum().item()
    total = sum(server.positions())
    assert int(mask.sum()) < total / 4  # the two denominators differ by far
    cfg = load_config(FedMKTConfig, None, ["train.batch_size=8", "train.grad_accum=1", "fedmkt.top_k=4"])
    logs = train_phase(server, examples, cfg, epochs=1, with_kd=True, seed=0)
    assert logs[0]["kd"] == pytest.approx(kd_sum / total, rel=1e-6)


@pytest.mark.parametrize("rule", ["dualmince", "reference", "none", "weighted"])
def test_every_selection_rule_counts_every_position_in_the_kd_denominator(parties, rule):
    """Server and client side, every rule: with one tokenizer every answer position stays in the KD
    term's denominator however many samples were selected."""
    (server, c1, c2), _, _ = parties
    outs = [public_outputs(p, 4, 1.0) for p in (server, c1, c2)]
    outs[1].ce[::2] = 0.0  # c1 beats the server on half the samples
    outs[1].ce[1::2] = 99.0
    outs[2].ce[:] = 99.0
    for receiver, r_out, senders, s_outs in ((server, outs[0], [c1, c2], outs[1:]), (c1, outs[1], [server], outs[:1])):
        examples, _ = select_targets(receiver, r_out, senders, s_outs, rule, 4)
        assert sum(int(e["teacher_counted"].sum()) for e in examples) == sum(receiver.positions())
        in_term = sum(int(e["teacher_valid"].sum()) for e in examples)
        assert in_term == (sum(receiver.positions()) if rule != "dualmince" else
                           sum(n for i, n in enumerate(receiver.positions()) if examples[i]["teacher_valid"].any()))


def test_across_tokenizers_a_skipped_sample_keeps_its_aligned_positions_only(parties, unigram_dir):
    """Unaligned positions leave the KD denominator; a sample left out by selection keeps exactly
    the positions the alignment would have covered."""
    from kdflow.config import AlignConfig, ModelSpec
    from kdflow.federated.fedmkt import Bridges
    from kdflow.models import load_model, load_tokenizer

    (server, _, _), public, _ = parties
    tok = load_tokenizer(ModelSpec(name=str(unigram_dir)))
    client = make_party(PartyConfig(name="uni", model=StudentSpec(lora=LoraSpec(enabled=True, r=4))),
                        load_model(ModelSpec(name=str(unigram_dir))), tok, seed=5)
    client.public = encode_rows(public, tok, DataConfig())
    server.public_rows = client.public_rows = public
    bridges = Bridges(DataConfig(), AlignConfig())
    s_out, c_out = public_outputs(server, 6, 1.0), public_outputs(client, 6, 1.0)
    c_out.ce[:] = 0.0
    chosen, _ = select_targets(server, s_out, [client], [c_out], "dualmince", 6, bridges)
    c_out.ce[:] = 99.0
    skipped, share = select_targets(server, s_out, [client], [c_out], "dualmince", 6, bridges)
    assert share["skipped"] == 1.0
    aligned = [e["teacher_valid"] for e in chosen]
    assert sum(int(v.sum()) for v in aligned) < sum(server.positions())  # some positions are unaligned
    for e, v in zip(skipped, aligned):
        assert torch.equal(e["teacher_counted"], v) and not bool(e["teacher_valid"].any())


def test_dualmince_across_tokenizers_compares_answer_nll_per_character(parties, unigram_dir):
    """The same answer is a different number of tokens for each tokenizer: selection compares the
    answer's NLL per character (sum over its tokens / its characters), never per-token means; within
    one tokenizer it keeps the per-token mean."""
    from kdflow.config import AlignConfig, ModelSpec
    from kdflow.data import reference_answers
    from kdflow.federated.fedmkt import Bridges, selection_scores
    from kdflow.models import load_model, load_tokenizer

    (server, c1, _), public, _ = parties
    tok = load_tokenizer(ModelSpec(name=str(unigram_dir)))
    client = make_party(PartyConfig(name="uni", model=StudentSpec(lora=LoraSpec(enabled=True, r=4))),
                        load_model(ModelSpec(name=str(unigram_dir))), tok, seed=5)
    client.public = encode_rows(public, tok, DataConfig())
    server.public_rows = client.public_rows = public
    bridges = Bridges(DataConfig(), AlignConfig())
    s_out, c_out = public_outputs(server, 6, 1.0), public_outputs(client, 6, 1.0)
    n_s, n_c = np.array(server.positions()), np.array(client.positions())
    chars = np.array([len(a) for a in reference_answers(public, DataConfig())])
    assert (n_c > 1.05 * n_s).any() and (n_c < 0.95 * n_s).any()  # the tokenizations differ both ways
    s_out.ce[:] = 1.0
    for factor in (1.05, 0.95):  # the client's answer NLL is 5% above / below the server's, per sample
        c_out.ce[:] = (factor * n_s / n_c).astype(np.float32)
        recv, send = selection_scores(server, s_out, [client], [c_out], bridges)
        assert np.allclose(recv, n_s / chars, rtol=1e-5) and np.allclose(send[0], factor * n_s / chars, rtol=1e-5)
        _, share = select_targets(server, s_out, [client], [c_out], "dualmince", 6, bridges)
        assert share == pytest.approx({"skipped": float(factor > 1), "own": 0.0, "uni": float(factor < 1)})
    # one tokenizer: the per-token means as sent
    c1_out = public_outputs(c1, 4, 1.0)
    recv, send = selection_scores(server, s_out, [c1], [c1_out])
    assert np.array_equal(recv, s_out.ce) and np.array_equal(send[0], c1_out.ce)


def test_answer_characters_of_a_truncated_answer(parties, unigram_dir, bpe_tok):
    """An answer cut at data.max_length covers only the characters of its kept tokens."""
    from kdflow.data import Encoder, reference_answers, row_turns
    from kdflow.federated.fedmkt import answer_chars

    (server, _, _), public, _ = parties
    dc = DataConfig(max_length=40, min_response_tokens=1)
    party = _kd_party(bpe_tok, public)
    party.public, party.public_rows = encode_rows(public, bpe_tok, dc), public
    chars = answer_chars(party, dc)
    enc, cut = Encoder(bpe_tok, dc), 0
    for n, (ex, answer) in enumerate(zip(party.public, reference_answers(public, dc))):
        kept = ex["input_ids"][ex["prompt_len"]:]
        if len(kept) < len(enc.response_ids(row_turns(public.items[n], public.locations[n], dc))):
            cut += 1
            assert 0 < chars[n] < len(answer) and bpe_tok.decode(kept) == answer[:int(chars[n])]
        else:
            assert chars[n] == len(answer)
    assert cut > 0


@pytest.mark.parametrize("settings,match", [
    (["fedmkt.fedavg=true"], r"fedmkt.fedavg=true averages .* clients 'c1' and 'c2' differ in model.name: .*set fedmkt.fedavg=false"),
    (["fedmkt.fedavg=true", "clients=[{name: c1, model: {name: /nowhere/a}}, {name: c2, model: {name: /nowhere/a, lora: {enabled: true, r: 4}}}]"],
     r"differ in model.lora.r: 8 vs 4"),
    (["baselines=[zero_shot, fedavg]"], r"baseline fedavg averages .* differ in model.name.*remove fedavg from baselines"),
])
def test_fedavg_of_different_client_models_is_refused_before_any_model_loads(tmp_path, capsys, settings, match):
    out = tmp_path / "run"
    args = [f"output_dir={out}", "server.model.name=/nowhere/server",
            "clients=[{name: c1, model: {name: /nowhere/a}}, {name: c2, model: {name: /nowhere/b}}]",
            f"data.train={DATA / 'train.jsonl'}", f"data.test={DATA / 'test.jsonl'}", *settings]
    assert main(["fedmkt", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("kdflow: error: ")
    assert __import__("re").search(match, err), err
    assert not out.exists()  # refused before the run folder (or any model: the paths do not exist)
    if "fedmkt.fedavg=true" in settings:
        assert main(["fedmkt-flower", *args]) == 2
        assert "fedmkt.fedavg=true averages" in capsys.readouterr().err and not out.exists()


def test_the_server_is_adapted_on_the_public_set_only(tmp_path, tiny_dirs, monkeypatch, capsys):
    """server.adapt fine-tunes the server's base on the public rows before round 1 (issue 12, methods.md
    §8): the adapted copy is keyed by exactly those rows — the private rows never reach it — it is
    what the zero-shot server row scores, and a client asking for adaptation is refused up front."""
    from kdflow.data import rows_fingerprint

    monkeypatch.setenv("KDFLOW_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "fed"
    args = ["fedmkt", f"output_dir={out}", f"server.model.name={tiny_dirs['teacher']}",
            "server.adapt={method: sft, steps: 2, batch_size: 4}",
            f"clients=[{{name: c1, model: {{name: {tiny_dirs['student']}}}}}]",
            f"data.train={DATA / 'train.jsonl'}", f"data.test={DATA / 'test.jsonl'}", "data.public_rows=12",
            "data.private_rows=8", "fedmkt.rounds=1", "fedmkt.top_k=8", "eval.max_rows=3", "eval.max_new_tokens=3",
            "train.batch_size=4", "baselines=[zero_shot]"]
    assert main(args) == 0
    folders = list((tmp_path / "cache" / "adapted_teachers").glob("*/kdflow_adapted.json"))
    assert len(folders) == 1
    record = json.loads(folders[0].read_text())
    cfg = load_config(FedMKTConfig, None, args[1:])
    rows = read_rows(cfg.data.train).head(cfg.data.max_train_rows)
    public, private = partition_rows(rows, 12, 1, 8, "equal", None, 1.0, cfg.seed)
    assert record["key"]["rows"] == rows_fingerprint(public)
    assert record["key"]["rows"] not in (rows_fingerprint(rows), rows_fingerprint(private[0]))
    assert "base model adapted on the 12 public rows" in capsys.readouterr().out

    bad = [a if not a.startswith("clients=") else
           f"clients=[{{name: c1, model: {{name: {tiny_dirs['student']}}}, adapt: {{method: sft}}}}]" for a in args]
    assert main([*bad[:1], f"output_dir={tmp_path / 'other'}", *bad[2:]]) == 2
    err = capsys.readouterr().err
    assert "clients[0].adapt.method=sft: only the server is adapted" in err and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------------------------
# Final models


def _logits(model, tok):
    ids = tok("the opposite of hot is", return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def test_final_models_load_in_peft_kdflow_eval_and_as_a_distill_teacher(tmp_path, tiny_dirs, tiny_data, capsys):
    """After the rounds every party's model is written as folders others load: the server's adapter
    (on its base folder), a pruned client's adapter with its in-memory base saved beside it, and
    merged copies (fedmkt.save_merged). `kdflow eval` of the server's adapter reproduces the run's
    own final evaluation; the adapter teaches in `kdflow distill`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "fed"
    assert main(["fedmkt", f"output_dir={out}", f"server.model.name={tiny_dirs['teacher']}",
                 f"clients=[{{name: c1, prune_from: {tiny_dirs['teacher']}, model: {{init: prune_teacher, "
                 "keep_layers: [0, 3], lora: {enabled: true}}}]",
                 f"data.train={DATA / 'train.jsonl'}", f"data.test={DATA / 'test.jsonl'}", "data.public_rows=8",
                 "data.private_rows=8", "fedmkt.rounds=1", "fedmkt.top_k=8", "eval.max_rows=3", "eval.max_new_tokens=3",
                 "train.batch_size=4", "baselines=[]", "fedmkt.save_merged=true"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    finals = m["final_models"]
    assert set(finals) == {"server", "c1"}
    assert finals["server"]["base"] == str(tiny_dirs["teacher"]) and finals["c1"]["base"] == str(out / "final/c1/base")
    assert "## Final models" in (out / "report.md").read_text() and finals["c1"]["adapter"] in (out / "report.md").read_text()
    tok = AutoTokenizer.from_pretrained(tiny_dirs["teacher"])
    for name, w in finals.items():
        cfg = json.loads((out / "final" / name / "adapter" / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == w["base"]
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w["base"]), w["adapter"]).eval()
        merged = AutoModelForCausalLM.from_pretrained(w["merged"]).eval()
        base = AutoModelForCausalLM.from_pretrained(w["base"]).eval()
        a, b = _logits(peft, tok), _logits(merged, tok)
        assert (a - b).abs().max() < 1e-4 and (a - _logits(base, tok)).abs().max() > 1e-6  # the adapter is in there
    assert len(AutoModelForCausalLM.from_pretrained(finals["c1"]["base"]).model.layers) == 2
    # kdflow eval of the saved adapter gives the run's own final numbers for the server
    capsys.readouterr()
    ev = tmp_path / "eval.json"
    assert main(["eval", f"model.name={finals['server']['base']}", f"lora_adapter={finals['server']['adapter']}",
                 f"data.test={DATA / 'test.jsonl'}", "eval.max_rows=3", "eval.max_new_tokens=3", f"output={ev}"]) == 0
    got = json.loads(ev.read_text())["metrics"]
    assert got["answer_nll"] == pytest.approx(m["rounds"][-1]["eval"]["server"]["answer_nll"], abs=1e-5)
    # and the server's final adapter teaches a student
    assert main(["distill", f"teacher.name={finals['server']['base']}", f"teacher.lora_adapter={finals['server']['adapter']}",
                 f"student.name={tiny_dirs['student']}", f"data.train={tiny_data['train']}", f"output_dir={tmp_path / 'kd'}",
                 "train.max_steps=1", "train.batch_size=4", "train.report_to=[none]", "train.save_steps=0",
                 "evaluate_before=false", "data.max_train_rows=8", f"data.test={tiny_data['test']}", "eval.max_rows=2",
                 "eval.max_new_tokens=2"]) == 0
    assert json.loads((tmp_path / "kd" / "metrics.json").read_text())["train"]["steps"] == 1
