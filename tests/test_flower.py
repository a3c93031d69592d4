"""FedMKT over Flower: wire format in array records, run config, client state, faults, and real runs
(a Ray simulation, and a deployment of flower-superlink + flower-supernode processes on 127.0.0.1)
whose results must equal the in-process runner's."""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

flwr = pytest.importorskip("flwr")  # the `fed` extra; `make install` installs it

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from kdflow.cli import main  # noqa: E402
from kdflow.config import FedMKTConfig, load_config  # noqa: E402
from kdflow.errors import ConfigError  # noqa: E402
from kdflow.federated import flower_launch as launch  # noqa: E402
from kdflow.federated import payload as wire  # noqa: E402
from kdflow.federated.flower_local import Deployment  # noqa: E402
from kdflow.federated.flower_app import (APP_PYPROJECT, RUN_CONFIG_KEYS, config_from_run_config,  # noqa: E402
                                         run_config_from_yaml, write_app, write_run_config)
from kdflow.federated.flower_client import HANDLERS, ClientState, node_from_config  # noqa: E402
from kdflow.federated.flower_server import (Facts, FlowerRunError, Member, TokenizerBook, local_phase,  # noqa: E402
                                           run_server)

from conftest import DATA, ROOT  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Payloads in Flower array records


def synthetic_outputs(n: int = 7, k: int = 5, vocab: int = 300, seed: int = 0) -> tuple[wire.PublicOutputs, list[int]]:
    rng = np.random.default_rng(seed)
    positions = rng.integers(1, 9, size=n).tolist()
    rows = sum(positions)
    logits = rng.normal(size=(rows, vocab)).astype(np.float32)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1)[:, :k]
    top = np.take_along_axis(logp, ids, axis=1)
    tail = np.log1p(-np.exp(np.logaddexp.reduce(top, axis=1)))
    out = wire.PublicOutputs(ids.astype(np.int64), top, tail.astype(np.float32),
                             np.concatenate([[0], np.cumsum(positions)]).astype(np.int64),
                             rng.uniform(0.5, 3, size=n).astype(np.float32))
    return out, positions


def test_array_record_round_trip_in_chunks():
    out, positions = synthetic_outputs()
    arrays = wire.encode(out, 300)
    assert arrays["ids"].dtype == np.uint16 and wire.encode(out, 70000)["ids"].dtype == np.int32
    whole = wire.to_array_record(arrays)
    assert sorted(whole.keys()) == sorted(f"{f}.0" for f in wire.FIELDS)
    chunked = wire.to_array_record(arrays, chunk_bytes=64)
    ids_chunks = [key for key in chunked.keys() if key.startswith("ids.")]
    assert len(ids_chunks) == -(-arrays["ids"].shape[0] // (64 // (5 * 2)))  # rows of 10 bytes, 6 per chunk
    assert all(chunked[key].numpy().nbytes <= 64 for key in chunked.keys() if not key.startswith("offsets"))
    assert wire.record_nbytes(chunked) == wire.nbytes(arrays)
    for record in (whole, chunked):
        got = wire.from_array_record(record, sender="c1", vocab_size=300, k=5, positions=positions)
        ref = wire.decode(arrays, sender="c1", vocab_size=300, k=5, positions=positions)
        for f in wire.FIELDS:
            assert np.array_equal(getattr(got, f), getattr(ref, f))


def realistic_outputs(n: int = 40, k: int = 128, vocab: int = 49152, seed: int = 0):
    """Top-k of peaked next-token distributions over a SmolLM2-sized vocabulary, like a real model's."""
    rng = np.random.default_rng(seed)
    positions = rng.integers(3, 12, size=n).tolist()
    rows = sum(positions)
    logits = rng.standard_t(3, size=(rows, vocab)).astype(np.float32) * 2.5
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    ids = np.argsort(-logp, axis=1)[:, :k]
    top = np.take_along_axis(logp, ids, axis=1)
    tail = np.log1p(-np.minimum(np.exp(np.logaddexp.reduce(top.astype(np.float64), axis=1)), 1 - 1e-12))
    return wire.PublicOutputs(ids.astype(np.int64), top, tail.astype(np.float32),
                              np.concatenate([[0], np.cumsum(positions)]).astype(np.int64),
                              rng.uniform(0.5, 3, size=n).astype(np.float32)), positions


def test_uint8_log_prob_codes_round_trip_within_a_level_and_are_8x_smaller_than_the_reference():
    out, positions = realistic_outputs()
    out.logp[0, -3:] = -np.inf  # probability 0 survives as its own code
    out.logp[0, :-3] -= np.log(np.exp(out.logp[0, :-3].astype(np.float64)).sum() + np.exp(out.tail_logp[0]))
    arrays = wire.encode(out, 49152, "uint8")
    assert arrays["logp"].dtype == np.uint8 and set(arrays) == set(wire.fields("uint8"))
    record = wire.to_array_record(arrays, chunk_bytes=2048)
    back = wire.from_array_record(record, sender="c1", vocab_size=49152, k=128, positions=positions, logp_format="uint8")
    assert np.array_equal(back.ids, out.ids) and np.isneginf(back.logp[0, -3:]).all()
    finite = np.isfinite(out.logp)
    err = np.abs(back.logp[finite] - out.logp[finite])
    # half a level, plus the shift that makes each position sum to 1 again (at most another half)
    level = np.broadcast_to(arrays["logp_scale"][:, None], out.logp.shape)[finite]
    assert (err <= level + 1e-4).all() and np.median(err / level) < 0.5
    print(f"uint8 codes: level {np.median(arrays['logp_scale']):.3f} nats (median), |error| median {np.median(err):.3f}, "
          f"max {err.max():.3f} nats")
    mass = np.logaddexp(np.logaddexp.reduce(back.logp, axis=1), back.tail_logp)
    assert np.abs(mass).max() < 1e-4
    # bytes per position at k = 128: 396 against float16's 516; against the reference nested lists
    per_pos16 = wire.nbytes(wire.encode(out, 49152)) / sum(positions)
    per_pos8 = wire.nbytes(arrays) / sum(positions)
    ref = wire.reference_format_bytes(out)
    print(f"k=128: float16 {per_pos16:.0f} B/position ({ref / wire.nbytes(wire.encode(out, 49152)):.1f}x smaller than "
          f"the reference), uint8 {per_pos8:.0f} B/position ({ref / wire.nbytes(arrays):.1f}x)")
    assert per_pos8 < 400 and ref / wire.nbytes(arrays) >= 8
    # the receiver reads the format it is configured for, not what a sender chose
    with pytest.raises(wire.PayloadError, match="unexpected array 'logp_top"):
        wire.from_array_record(record, sender="c1", vocab_size=49152, k=128, positions=positions)
    with pytest.raises(wire.PayloadError, match="missing"):
        wire.from_array_record(wire.to_array_record(wire.encode(out, 49152)), sender="c1", vocab_size=49152, k=128,
                               positions=positions, logp_format="uint8")
    bad = dict(arrays, logp_scale=-arrays["logp_scale"])
    with pytest.raises(wire.PayloadError, match="scales >= 0"):
        wire.decode(bad, sender="c1", vocab_size=49152, k=128, positions=positions, logp_format="uint8")


def _set(record, key, a):
    record[key] = Array(a)


@pytest.mark.parametrize("corrupt,match", [
    (lambda r: _set(r, "logp.1", np.full_like(r["logp.1"].numpy(), np.nan)), "finite or -inf"),
    (lambda r: _set(r, "ids.0", np.full_like(r["ids.0"].numpy(), 299 + 1)), "outside the vocabulary of 300"),
    (lambda r: _set(r, "tail_logp.0", r["tail_logp.0"].numpy()[:-1]), "'tail_logp' has shape"),
    (lambda r: _set(r, "ids.1", r["ids.1"].numpy()[:, :3]), "chunks disagree on shape"),
    (lambda r: _set(r, "logp.0", r["logp.0"].numpy().astype(np.float32)), "'logp' must be float16"),
    (lambda r: r.__delitem__("ids.1"), r"'ids' chunks \[0, 2"),
    (lambda r: _set(r, "weights.0", np.zeros(3, np.float32)), "unexpected array 'weights.0'"),
    (lambda r: r.__setitem__("ce.0", Array(dtype="float32", shape=(7,), stype="pickle", data=b"\x80\x04.")),
     "not a NumPy array"),
    (lambda r: r.__setitem__("ce.0", Array(dtype="float32", shape=(7,), stype="numpy.ndarray", data=b"\x00" * 8000)),
     "carries 8000 bytes"),
    (lambda r: r.__setitem__("ce.0", Array(dtype="float32", shape=(7,), stype="numpy.ndarray", data=b"not npy")),
     "not a readable NumPy array"),
])
def test_malformed_array_records_are_rejected(corrupt, match):
    out, positions = synthetic_outputs()
    record = wire.to_array_record(wire.encode(out, 300), chunk_bytes=64)
    corrupt(record)
    with pytest.raises(wire.PayloadError, match=match):
        wire.from_array_record(record, sender="c9", vocab_size=300, k=5, positions=positions)


def test_oversize_payload_is_rejected_before_its_bytes_are_read():
    out, positions = synthetic_outputs()
    record = wire.to_array_record(wire.encode(out, 300))
    with pytest.raises(wire.PayloadError, match="over the limit"):
        wire.from_array_record(record, sender="c9", vocab_size=300, k=5, positions=positions, max_bytes=100)
    # a declared shape of 10^12 rows with a few bytes behind it: refused from the metadata alone
    record["logp.0"] = Array(dtype="float16", shape=(10**12, 5), stype="numpy.ndarray", data=b"\x00" * 16)
    with pytest.raises(wire.PayloadError, match="declares more than"):
        wire.from_array_record(record, sender="c9", vocab_size=300, k=5, positions=positions)


def forged_reply(pid: int, name: str, out: wire.PublicOutputs, positions: list[int], vocab: int = 300, **client) -> RecordDict:
    """A local-step reply as a client would send it (the server's facts: vocabulary 300, tokenizer
    fingerprint 'f', public set 'P'); keyword arguments override the client record."""
    return RecordDict({"client": ConfigRecord({"name": name, "partition-id": pid, "fingerprint": "f", "vocab-size": vocab,
                                               "public": "P", **client}),
                       "positions": ArrayRecord({"positions": Array(np.asarray(positions, dtype=np.int64))}),
                       "payload": wire.to_array_record(wire.encode(out, vocab)),
                       "metrics": MetricRecord({"loss.private": 1.5, "private_rows": 8})})


def test_server_leaves_out_a_client_whose_payload_is_malformed():
    """The server's local phase on mock replies: a NaN payload and a stranger node are left out, the
    good client is kept, and nothing raises."""
    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}]", "fedmkt.top_k=5"])
    out, positions = synthetic_outputs()

    def reply(pid, name, corrupt=False):
        rep = forged_reply(pid, name, out, positions)
        if corrupt:
            rep["payload"]["logp.0"] = Array(np.full_like(rep["payload"]["logp.0"].numpy(), np.nan))
        return rep

    replies = {1: reply(0, "c1"), 2: reply(1, "c2", corrupt=True), 3: reply(5, "c6"), 4: "ClientAppException: boom"}
    refused, left, known = {}, {}, {}
    rec = {"round": 1, "bytes_up": {}, "loss": {}, "node_errors": {}}
    facts = Facts("server", "P", 300, "f", positions)
    got = local_phase(replies, [1, 2, 3, 4, 5], cfg, facts, refused, left, rec, known)
    assert list(got) == [0] and got[0][0].name == "c1"
    assert "finite" in left["c2"] and "payload rejected" in left["c2"]
    assert "partition-id 5" in refused[3]
    assert "boom" in rec["node_errors"]["4"] and "no reply" in rec["node_errors"]["5"]
    assert rec["bytes_up"] == {"c1": wire.nbytes(wire.encode(out, 300))}
    # next round: c1's node (seen before) fails, and is reported as c1
    left, rec = {}, {"round": 2, "bytes_up": {}, "loss": {}, "node_errors": {}}
    assert local_phase({1: "failed: out of memory"}, [1], cfg, facts, refused, left, rec, known) == {}
    assert left["c1"] == "failed: out of memory" and not rec["node_errors"]


def _shift_positions(out, positions):
    """The same rows with one extra answer position in sample 0 and one fewer in sample 1."""
    moved = [positions[0] + 1, positions[1] - 1, *positions[2:]]
    return wire.PublicOutputs(out.ids, out.logp, out.tail_logp,
                              np.concatenate([[0], np.cumsum(moved)]).astype(np.int64), out.ce), moved


def _with(out, **arrays):
    return wire.PublicOutputs(**{f: arrays.get(f, getattr(out, f)) for f in wire.FIELDS})


def _zero_prob_id(out):
    """Position 0's last id gets probability 0, its mass moved to the first id: still sums to 1."""
    lp = out.logp.copy()
    lp[0, 0], lp[0, -1] = np.logaddexp(lp[0, 0], lp[0, -1]), -np.inf
    return _with(out, logp=lp)


def _forge(case: str, out, positions) -> RecordDict:
    if case == "vocabulary claim":  # ids past the server's vocabulary, "allowed" by a claimed 70000
        ids = out.ids.copy()
        ids[0, 0] = 65000
        return forged_reply(1, "c2", _with(out, ids=ids), positions, vocab=70000)
    if case == "other tokenizer":
        return forged_reply(1, "c2", out, positions, fingerprint="g")
    if case == "broken tokenizer":
        rep = forged_reply(1, "c2", out, positions, fingerprint="g")
        rep["tokenizer"] = ArrayRecord({"tokenizer.json": Array(np.frombuffer(b"{oops", dtype=np.uint8).copy())})
        return rep
    if case == "shifted positions":
        return forged_reply(1, "c2", *_shift_positions(out, positions))
    if case == "zero mass":
        lp, tail = out.logp.copy(), out.tail_logp.copy()
        lp[4], tail[4] = -np.inf, -np.inf
        return forged_reply(1, "c2", _with(out, logp=lp, tail_logp=tail), positions)
    if case == "zero probability under rkl":
        return forged_reply(1, "c2", _zero_prob_id(out), positions)
    rep = forged_reply(1, "c2", out, positions)
    if case == "no metrics":
        del rep["metrics"]
    elif case == "infinite loss":
        rep["metrics"] = MetricRecord({"loss.private": float("inf"), "private_rows": 8})
    elif case == "NaN evaluation":
        rep["eval-before"] = MetricRecord({"answer_nll": float("nan"), "rougeL": 0.1, "exact_match": 0.0})
    elif case == "oversize":  # a small declared shape with a megabyte behind it
        good = rep["positions"]["positions"]
        rep["positions"]["positions"] = Array(dtype="int64", shape=tuple(good.shape), stype="numpy.ndarray",
                                              data=good.data + b"\x00" * 2**20)
    return rep


@pytest.mark.parametrize("case,match", [
    ("vocabulary claim", r"uses another tokenizer than the server \(70000 tokens"),
    ("other tokenizer", r"uses another tokenizer than the server \(fingerprint g\) but sent none"),
    ("broken tokenizer", r"payload rejected: tokenizer from client 'c2': 'tokenizer.json' is not valid UTF-8 JSON"),
    ("shifted positions", r"counts \d+ answer positions in public sample 0 where the server's tokenization has \d+"),
    ("no metrics", r"malformed reply: no 'metrics' record"),
    ("zero mass", r"payload rejected: .*position 4 sum to 0, not 1"),
    ("zero probability under rkl", r"position 0 gives a token or its tail probability 0.*rkl"),
    ("infinite loss", r"'loss.private' must be a finite number"),
    ("NaN evaluation", r"'answer_nll' must be a finite number"),
    ("oversize", r"carries \d+ bytes, over flower.max_payload_bytes=100000"),
])
def test_a_forged_local_reply_is_left_out_and_the_round_goes_on(case, match):
    """Checked against the server's own facts (its vocabulary, tokenizer, tokenization of the public
    set), never the sender's claims; whatever the reply holds, the server does not stop."""
    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}]", "fedmkt.top_k=5", "fedmkt.divergence=rkl",
                                           "flower.max_payload_bytes=100000"])
    out, positions = synthetic_outputs()
    replies = {1: forged_reply(0, "c1", out, positions), 2: _forge(case, out, positions)}
    refused, left, rec = {}, {}, {"round": 1, "bytes_up": {}, "loss": {}, "node_errors": {}}
    facts = Facts("server", "P", 300, "f", positions, tokenizers=TokenizerBook(cfg, None))
    got = local_phase(replies, [1, 2], cfg, facts, refused, left, rec, {})
    assert list(got) == [0] and set(rec["bytes_up"]) == {"c1"}
    assert set(left) == {"c2"} and re.search(match, left["c2"]), left["c2"]


def test_a_node_cannot_take_another_clients_slot():
    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}]", "fedmkt.top_k=5"])
    out, positions = synthetic_outputs()
    facts, refused, known = Facts("server", "P", 300, "f", positions), {}, {}

    def phase(r, replies):
        left, rec = {}, {"round": r, "bytes_up": {}, "loss": {}, "node_errors": {}}
        got = local_phase(replies, sorted(replies), cfg, facts, refused, left, rec, known)
        return {p: m.node for p, (m, _) in got.items()}, left

    c1, c2 = forged_reply(0, "c1", out, positions), forged_reply(1, "c2", out, positions)
    assert phase(1, {5: c1, 6: c2}) == ({0: 5, 1: 6}, {})
    # round 2: a newcomer with a lower node id claims c1, and c2's node claims c1 too
    got, left = phase(2, {2: c1, 5: c1, 6: c1})
    assert got == {0: 5}
    assert refused[2] == "claims client 'c1', which node 5 holds"
    assert "node 6 answered as client 'c2' before and now claims 'c1'" in left["c2"] and 6 in refused
    # round 3: c1's node failed (a restarted SuperNode has a new id): the new node takes c1 over
    assert phase(3, {5: "failed: killed", 9: c1}) == ({0: 9}, {"c2": "no reply"})


@pytest.mark.parametrize("case,match", [
    ("speaks for another client", r"the reply from client 'c1' \(partition 0\) says it is 'c2' \(partition 1\)"),
    ("no selection record", r"no 'selected' record"),
    ("selection of a stranger", r"'selected' names \['c9'\]"),
    ("evaluation without Rouge-L", r"'rougeL' must be a finite number"),
    ("no adapter under fedavg", r"no 'adapter' record"),
    ("negative private rows under fedavg", r"'private_rows' must be an integer in \[1, inf\], got -8"),
    ("fractional private rows under fedavg", r"'private_rows' must be an integer"),
])
def test_a_forged_update_reply_is_left_out(case, match):
    from kdflow.federated.flower_server import update_phase

    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}]", "fedmkt.fedavg=true"])
    facts = Facts("server", "P", 300, "f", [1, 2])
    members = [Member(5, 0, "c1", facts), Member(6, 1, "c2", facts)]

    def reply(pid, name):
        return RecordDict({"client": ConfigRecord({"name": name, "partition-id": pid, "round": 1}),
                           "metrics": MetricRecord({"loss.public": 2.0, "private_rows": 8.0}),
                           "selected": MetricRecord({"skipped": 0.5, "own": 0.0, "server": 0.5}),
                           "eval": MetricRecord({"answer_nll": 2.0, "perplexity": 7.4, "rougeL": 0.2, "exact_match": 0.0}),
                           "adapter": ArrayRecord({"a": Array(np.zeros((2, 3), np.float32))})})

    bad = reply(0, "c1")
    if case == "speaks for another client":
        bad["client"] = ConfigRecord({"name": "c2", "partition-id": 1, "round": 1})
    elif case == "no selection record":
        del bad["selected"]
    elif case == "selection of a stranger":
        bad["selected"] = MetricRecord({"skipped": 0.5, "c9": 0.5})
    elif case == "evaluation without Rouge-L":
        bad["eval"] = MetricRecord({"answer_nll": 2.0, "exact_match": 0.0})
    elif case == "no adapter under fedavg":
        del bad["adapter"]
    else:
        bad["metrics"] = MetricRecord({"loss.public": 2.0, "private_rows": -8.0 if "negative" in case else 2.5})
    left = {}
    done = update_phase({5: bad, 6: reply(1, "c2")}, members, cfg, left, 1)
    assert list(done) == [1] and done[1][1]["private_rows"] == 8 and done[1][1]["eval"]["rougeL"] == 0.2
    assert set(left) == {"c1"} and re.search(match, left["c1"]), left["c1"]


# ----------------------------------------------------------------------------------------------
# Run config and node config


def test_run_config_carries_the_kdflow_config_both_ways(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc = run_config_from_yaml("configs/fedmkt_flower.yaml", ["fedmkt.rounds=5"])
    assert set(rc) == set(RUN_CONFIG_KEYS) and all(isinstance(v, (str, int, float, bool)) for v in rc.values())
    cfg = config_from_run_config(rc)
    ref = load_config(FedMKTConfig, "configs/fedmkt_flower.yaml", ["fedmkt.rounds=5"])
    assert cfg.fedmkt == ref.fedmkt and cfg.clients[1].model.keep_layers == ref.clients[1].model.keep_layers
    assert cfg.data.train == str(ROOT / "data/wordnet_define/train.jsonl")  # paths made absolute for other processes
    assert Path(cfg.output_dir).is_absolute()
    # through Flower's own TOML file form, and with overrides on top
    toml = write_run_config(tmp_path / "rc.toml", {**rc, "kdflow.overrides": "fedmkt.top_k=32 flower.min_clients=2"})
    from flwr.common.config import parse_config_args

    back = config_from_run_config(parse_config_args([str(toml)]))
    assert back.fedmkt.top_k == 32 and back.flower.min_clients == 2 and back.fedmkt.rounds == 5
    with pytest.raises(ConfigError, match="unknown run config key 'rounds'"):
        config_from_run_config({**rc, "rounds": 3})
    with pytest.raises(ConfigError, match="'kdflow.config' is empty"):
        config_from_run_config({"kdflow.config": "", "kdflow.overrides": ""})
    with pytest.raises(ConfigError, match="unknown setting 'fedmkt.top_kk'"):
        config_from_run_config({**rc, "kdflow.overrides": "fedmkt.top_kk=3"})


def test_app_folder_is_a_valid_flower_app(tmp_path):
    from flwr.cli.config_utils import load_and_validate

    assert (ROOT / "flower" / "pyproject.toml").read_text() == APP_PYPROJECT  # the committed copy is the one written
    config, _ = load_and_validate(write_app(tmp_path / "app") / "pyproject.toml")
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == "kdflow.federated.flower_app:client_app"
    assert set(config["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG_KEYS)


def test_node_config_errors_name_the_key():
    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}]"])
    assert node_from_config(cfg, {"partition-id": 1, "num-partitions": 2}).name == "c2"
    node = node_from_config(cfg, {"partition-id": 0, "model": "/models/c1", "state-dir": "/tmp/s", "private-data": "p.jsonl"})
    assert (node.spec.model.name, str(node.state_dir), node.private_data) == ("/models/c1", "/tmp/s", "p.jsonl")
    assert node_from_config(cfg, {"partition-id": 0}).state_dir == Path(cfg.output_dir) / "flower-clients" / "c1"
    with pytest.raises(ConfigError, match="partition-id=2.*0..1"):
        node_from_config(cfg, {"partition-id": 2})
    with pytest.raises(ConfigError, match="unknown node config key 'partition'.*valid keys: partition-id"):
        node_from_config(cfg, {"partition": 0})
    with pytest.raises(ConfigError, match="needs partition-id"):
        node_from_config(cfg, {})


def _tokenizer_record(tok, **change):
    from kdflow.federated.tokenizers import tokenizer_files

    files = tokenizer_files(tok)
    for name, data in change.items():
        name = name.replace("__", ".")
        if data is None:
            files.pop(name, None)
        else:
            files[name] = data
    return ArrayRecord({n: Array(np.frombuffer(d, dtype=np.uint8).copy()) for n, d in files.items()})


@pytest.mark.parametrize("change,fingerprint,match", [
    ({}, "wrong", "do not match the fingerprint"),
    ({"tokenizer__json": None}, None, "no tokenizer.json"),
    ({"tokenizer__json": b"{not json"}, None, "is not valid UTF-8 JSON"),
    ({"tokenizer_config__json": json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}).encode()}, None,
     "names code to load"),
    ({"modeling_evil__py": b"import os"}, None, "is not one of"),
])
def test_a_tokenizer_on_the_wire_is_checked_before_use(bpe_tok, change, fingerprint, match):
    from kdflow.federated.tokenizers import read_tokenizer
    from kdflow.models import tokenizer_fingerprint

    good = read_tokenizer(_tokenizer_record(bpe_tok), "client 'c2'", tokenizer_fingerprint(bpe_tok))
    assert good(["the opposite of hot"])["input_ids"] == bpe_tok(["the opposite of hot"])["input_ids"]
    with pytest.raises(wire.PayloadError, match=match):
        read_tokenizer(_tokenizer_record(bpe_tok, **change), "client 'c2'", fingerprint)
    with pytest.raises(wire.PayloadError, match="over the limit"):
        read_tokenizer(_tokenizer_record(bpe_tok), "client 'c2'", max_bytes=100)


# ----------------------------------------------------------------------------------------------
# Runs on tiny models


def fed_cfg(tiny_dirs, out: Path, clients: int = 2, rounds: int = 2, *extra: str) -> FedMKTConfig:
    specs = ", ".join(f"{{name: c{i + 1}, model: {{name: {tiny_dirs['student']}, lora: {{enabled: true, r: {8 if i % 2 == 0 else 4}}}}}}}"
                      for i in range(clients))
    return load_config(FedMKTConfig, None, [
        f"output_dir={out}", f"server.model.name={tiny_dirs['teacher']}", f"clients=[{specs}]",
        f"data.train={DATA / 'train.jsonl'}", f"data.test={DATA / 'test.jsonl'}", "data.public_rows=12",
        "data.private_rows=8", f"fedmkt.rounds={rounds}", "fedmkt.top_k=8", "eval.max_rows=2", "eval.max_new_tokens=2",
        "train.batch_size=4", "baselines=[]", "flower.reply_timeout=300", "flower.connect_timeout=120",
        # one torch thread per process: tiny models gain nothing from more, and on a shared 2-core
        # machine several processes spinning 2 threads each run 5-10x slower
        "train.num_threads=1", *extra])


@pytest.fixture(scope="module", autouse=True)
def restore_torch_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class LocalTransport:
    """Delivers each request straight to the client handler (a fresh client built from disk, as a
    deployed ClientApp is); `silent` maps a round to the partitions that do not answer in it."""

    def __init__(self, cfg: FedMKTConfig, clients: int, silent: dict[int, set[int]] | None = None,
                 restart: dict[int, set[int]] | None = None):
        self.cfg, self.silent, self.restart = cfg, silent or {}, restart or {}
        self.node_of = {p: 100 + p for p in range(clients)}

    def nodes(self) -> list[int]:
        return sorted(self.node_of.values())

    def ask(self, requests, timeout, group):
        r = int(group.split(".")[0])
        out = {}
        for node, (kind, content) in requests.items():
            pid = next(p for p, n in self.node_of.items() if n == node)
            if pid in self.silent.get(r, set()):
                continue
            try:
                out[node] = HANDLERS[kind](content, self.cfg, {"partition-id": pid})
            except Exception as e:  # what Flower turns into an error reply
                out[node] = f"{type(e).__name__}: {e}"
        if group.endswith(".update"):  # SuperNodes restarted before the next round get new node ids
            for pid in self.restart.get(r + 1, set()):
                self.node_of[pid] += 1000
        return out


def adapters(folder: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / f"{name}.adapter.safetensors"))


def client_state_dir(out: Path, name: str) -> Path:
    return ClientState(out / "flower-clients" / name).current()


def assert_same_adapters(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() <= atol, key


def assert_same_finals(ref_out: Path, out: Path, clients, server: str = "server"):
    """The final adapters: the server's in its run folder, each client's on its node (state folder),
    equal to the in-process runner's final/<name>/adapter."""
    from safetensors.torch import load_file

    def final(folder: Path) -> dict:
        assert json.loads((folder / "adapter_config.json").read_text())["peft_type"] == "LORA"
        return load_file(str(folder / "adapter_model.safetensors"))

    assert_same_adapters(final(ref_out / "final" / server / "adapter"), final(out / "final" / server / "adapter"))
    for c in clients:
        assert_same_adapters(final(ref_out / "final" / c / "adapter"), final(out / "flower-clients" / c / "final" / "adapter"))


def assert_same_evals(ha: dict, hb: dict, atol: float = 1e-6):
    assert ha.keys() == hb.keys()
    for who in ha:
        for metric in ("answer_nll", "rougeL", "exact_match"):
            assert abs(ha[who][metric] - hb[who][metric]) <= atol, (who, metric)


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory):
    """The in-process runner: 2 clients, 2 rounds."""
    from kdflow.federated.simulation import World, run_rounds
    from kdflow.training import setup_run

    out = tmp_path_factory.mktemp("inproc")
    cfg = fed_cfg(tiny_dirs, out)
    setup_run(cfg.output_dir, cfg, cfg.seed)
    history = run_rounds(World(cfg), out)
    return out, history


def test_flower_server_and_clients_equal_the_in_process_runner(reference, tiny_dirs, tmp_path):
    ref_out, ref_hist = reference
    out = tmp_path / "flower"
    cfg = fed_cfg(tiny_dirs, out)
    metrics = run_server(LocalTransport(cfg, 2), cfg)
    assert [h["round"] for h in metrics["rounds"]] == [0, 1, 2]
    for ha, hb in zip(ref_hist, metrics["rounds"]):
        assert_same_evals(ha["eval"], hb["eval"])
        assert ha.get("bytes_up") == hb.get("bytes_up") and ha.get("selected") == hb.get("selected")
    assert_same_adapters(adapters(ref_out / "rounds/round-002", "server"), adapters(out / "rounds/round-002", "server"))
    for c in ("c1", "c2"):
        assert_same_adapters(adapters(ref_out / "rounds/round-002", c), adapters(client_state_dir(out, c), c))
    state = json.loads((client_state_dir(out, "c1") / "state.json").read_text())
    assert state["local_round"] == 2 and state["update_round"] == 2
    assert (out / "report.md").is_file() and not metrics["left_out"]
    assert_same_finals(ref_out, out, ("c1", "c2"))
    assert set(metrics["final_models"]) == {"server", "c1", "c2"} and "own node" in metrics["final_models"]["c1"]["node"]
    assert "## Final models" in (out / "report.md").read_text()


def test_fedavg_over_flower_equals_in_process(tiny_dirs, tmp_path):
    """Homogeneous clients with fedmkt.fedavg: adapters travel up with the update replies, the
    average comes back in a third message; same adapters and metrics as in-process."""
    from kdflow.federated.simulation import World, run_rounds
    from kdflow.training import setup_run

    student = tiny_dirs["student"]
    same = f"clients=[{{name: c1, model: {{name: {student}}}}}, {{name: c2, model: {{name: {student}}}}}]"
    ref = fed_cfg(tiny_dirs, tmp_path / "inproc", 2, 1, "fedmkt.fedavg=true", same)
    setup_run(ref.output_dir, ref, ref.seed)
    ref_hist = run_rounds(World(ref), Path(ref.output_dir))
    cfg = replace(ref, output_dir=str(tmp_path / "flower"))
    metrics = run_server(LocalTransport(cfg, 2), cfg)
    for ha, hb in zip(ref_hist, metrics["rounds"]):
        assert_same_evals(ha["eval"], hb["eval"])
    a1, a2 = (adapters(client_state_dir(Path(cfg.output_dir), c), c) for c in ("c1", "c2"))
    assert_same_adapters(a1, a2)  # both hold the average
    assert_same_adapters(adapters(Path(ref.output_dir) / "rounds/round-001", "c1"), a1)
    assert_same_finals(Path(ref.output_dir), Path(cfg.output_dir), ("c1", "c2"))


def hetero_cfg(tiny_dirs, unigram_dir, out: Path, rounds: int = 2, *extra: str) -> FedMKTConfig:
    """3 clients, two tokenizers: c1 shares the server's BPE tokenizer, c2 and c3 bring a Unigram one."""
    clients = (f"clients=[{{name: c1, model: {{name: {tiny_dirs['student']}, lora: {{enabled: true, r: 8}}}}}}, "
               f"{{name: c2, model: {{name: {unigram_dir}, lora: {{enabled: true, r: 4}}}}}}, "
               f"{{name: c3, model: {{name: {unigram_dir}, lora: {{enabled: true, r: 8}}}}}}]")
    return fed_cfg(tiny_dirs, out, 3, rounds, clients, *extra)


@pytest.fixture(scope="module")
def hetero_reference(tiny_dirs, unigram_dir, tmp_path_factory):
    """The in-process runner on the heterogeneous config: 2 rounds."""
    from kdflow.federated.simulation import World, run_rounds
    from kdflow.training import setup_run

    out = tmp_path_factory.mktemp("hetero_inproc")
    cfg = hetero_cfg(tiny_dirs, unigram_dir, out)
    setup_run(cfg.output_dir, cfg, cfg.seed)
    world = World(cfg)
    assert world.setting == "heterogeneous"
    return out, run_rounds(world, out)


def assert_same_run(ref_out: Path, ref_hist: list, out: Path, hist: list, clients, rounds: int):
    """Same evaluations, bytes, selection shares and losses per round; same adapters and final models."""
    assert [h["round"] for h in hist] == list(range(rounds + 1))
    for ha, hb in zip(ref_hist, hist):
        assert_same_evals(ha["eval"], hb["eval"])
        assert ha.get("bytes_up") == hb.get("bytes_up") and ha.get("bytes_down") == hb.get("bytes_down")
        assert ha.get("selected") == hb.get("selected")
        assert hb.get("loss", {}) == pytest.approx(ha.get("loss", {}), abs=1e-6)
    last = f"rounds/round-{rounds:03d}"
    assert_same_adapters(adapters(ref_out / last, "server"), adapters(out / last, "server"))
    for c in clients:
        assert_same_adapters(adapters(ref_out / last, c), adapters(client_state_dir(out, c), c))
    assert_same_finals(ref_out, out, clients)


def test_clients_with_their_own_tokenizers_over_flower_equal_the_in_process_runner(hetero_reference, tiny_dirs,
                                                                                   unigram_dir, tmp_path):
    """c2 and c3 use another tokenizer than the server: each sends its tokenizer files once, the server
    sends its own once to each of them, both sides build the MinED maps and pair positions as
    in-process, and the run equals `kdflow fedmkt` on the same config."""
    ref_out, ref_hist = hetero_reference
    out = tmp_path / "flower"
    cfg = hetero_cfg(tiny_dirs, unigram_dir, out)
    metrics = run_server(LocalTransport(cfg, 3), cfg)
    assert not metrics["left_out"]
    assert_same_run(ref_out, ref_hist, out, metrics["rounds"], ("c1", "c2", "c3"), 2)
    r1, r2 = metrics["rounds"][1], metrics["rounds"][2]
    # tokenizers travel in round 1 only: both unigram clients send theirs (neither knew the other
    # would), the server sends its own to each; c1 shares the server's and sends nothing
    assert set(r1["bytes_tokenizer_up"]) == {"c2", "c3"} and set(r1["bytes_tokenizer_down"]) == {"c2", "c3"}
    assert "bytes_tokenizer_up" not in r2 and "bytes_tokenizer_down" not in r2
    assert r1["selected"]["server"]["c2"] + r1["selected"]["server"]["c3"] > 0  # the server learned across tokenizers
    assert (client_state_dir(out, "c2").parent / "peer-tokenizers").is_dir()


def test_uint8_wire_over_flower_equals_in_process(reference, tiny_dirs, tmp_path):
    """fedmkt.wire_logprobs=uint8: the in-process runner and the Flower server read the same codes;
    printed: how far the parties' final held-out NLL moves from the float16 run (`reference`)."""
    from kdflow.federated.simulation import World, run_rounds
    from kdflow.training import setup_run

    ref = fed_cfg(tiny_dirs, tmp_path / "inproc", 2, 2, "fedmkt.wire_logprobs=uint8")
    setup_run(ref.output_dir, ref, ref.seed)
    ref_hist = run_rounds(World(ref), Path(ref.output_dir))
    cfg = replace(ref, output_dir=str(tmp_path / "flower"))
    metrics = run_server(LocalTransport(cfg, 2), cfg)
    assert_same_run(Path(ref.output_dir), ref_hist, Path(cfg.output_dir), metrics["rounds"], ("c1", "c2"), 2)
    fp16 = reference[1][-1]["eval"]
    print("answer NLL after 2 rounds, float16 -> uint8 wire: " + ", ".join(
        f"{p} {fp16[p]['answer_nll']:.4f} -> {ref_hist[-1]['eval'][p]['answer_nll']:.4f}" for p in fp16))


def test_baselines_over_flower_equal_in_process(tiny_dirs, unigram_dir, tmp_path):
    """Zero-shot, standalone (on each client's node), public-only (on the server) and LLM2SLM (rounds
    in which the server only teaches, their client state apart from FedMKT's) over Flower give the
    in-process runner's numbers on the heterogeneous config; centralized needs pooled private data
    and is left to `kdflow fedmkt`, which the report says."""
    from kdflow.federated.simulation import run_fedmkt

    extra = ("baselines=[zero_shot, standalone, public_only, llm2slm, centralized]",)
    ref = hetero_cfg(tiny_dirs, unigram_dir, tmp_path / "inproc", 1, *extra)
    ref_metrics = run_fedmkt(ref)
    cfg = hetero_cfg(tiny_dirs, unigram_dir, tmp_path / "flower", 1, *extra)
    metrics = run_server(LocalTransport(cfg, 3), cfg)
    assert set(metrics["table"]) == {"FedMKT (Flower)", "zero-shot", "standalone", "public_only", "llm2slm"}
    assert metrics["baselines_not_run"] == ["centralized"]
    for b in ("zero-shot", "standalone", "public_only", "llm2slm"):
        assert_same_evals(ref_metrics["table"][b], metrics["table"][b])
    assert_same_evals(ref_metrics["table"]["FedMKT"], metrics["table"]["FedMKT (Flower)"])
    assert set(metrics["table"]["standalone"]) == {"c1", "c2", "c3"} and set(metrics["table"]["public_only"]) == {"server"}
    # LLM2SLM's clients kept their state apart, and wrote no final model over FedMKT's
    for c in ("c1", "c2", "c3"):
        assert (client_state_dir(Path(cfg.output_dir), c).parent / "baselines" / "llm2slm" / "CURRENT").is_file()
    assert set(metrics["final_models"]) == {"server", "c1", "c2", "c3"}
    report = (Path(cfg.output_dir) / "report.md").read_text()
    assert "| standalone |" in report and "| llm2slm |" in report and "Left to `kdflow fedmkt` (the same config runs them there): centralized" in report
    # cached: asked again, the server reads the saved result instead of asking the clients
    from kdflow.federated import flower_server as fs

    class Mute(LocalTransport):
        def ask(self, requests, timeout, group):
            raise AssertionError(f"asked the clients again ({group})")

    from kdflow.data import partition_rows, read_rows

    d = cfg.data
    public = partition_rows(read_rows(d.train, "data.train"), d.public_rows, 3, d.private_rows, d.partition,
                            d.partition_field, d.dirichlet_alpha, cfg.seed)[0]
    run = fs.Session(Mute(cfg, 3), cfg, Path(cfg.output_dir), None, None, public, None, None, None, None, {}, {})
    assert fs.run_baseline(run, "standalone")[0] == metrics["table"]["standalone"]


def test_standalone_replies_are_checked_and_a_bad_one_is_left_out():
    """The standalone baseline's replies: an evaluation out of range, a node speaking for another
    client, and a failed client are each left out with a reason; the good client is kept."""
    from kdflow.federated import flower_server as fs

    cfg = load_config(FedMKTConfig, None, ["clients=[{name: c1}, {name: c2}, {name: c3}]"])
    good = {"answer_nll": 1.2, "perplexity": 3.3, "rougeL": 0.4, "exact_match": 0.1}

    def reply(pid, name, **ev):
        return RecordDict({"client": ConfigRecord({"name": name, "partition-id": pid, "baseline": "standalone"}),
                           "eval": MetricRecord({**good, **ev})})

    class Forged:
        def nodes(self):
            return [1, 2, 3, 4]

        def ask(self, requests, timeout, group):
            assert group == "0.standalone" and all(k == "train.baseline" for k, _ in requests.values())
            return {1: reply(0, "c1"), 2: reply(1, "c2", rougeL=7.0), 3: "failed: out of memory", 4: reply(0, "c1")}

    facts = Facts("server", "P", 300, "f", [1])
    run = fs.Session(Forged(), cfg, Path("."), None, None, None, None, facts, None, None, {}, {3: Member(3, 2, "c3", facts)})
    got, why = fs.standalone(run)
    assert got == {"c1": pytest.approx(good)}
    assert "rougeL" in why["node 2"] and "out of memory" in why["c3"] and "already answered" in why["node 4"]


@pytest.fixture(scope="module")
def faulty(tiny_dirs, tmp_path_factory):
    """3 clients, 3 rounds: c3 is silent in round 2 (its node died) and back in round 3 on a new node."""
    out = tmp_path_factory.mktemp("faulty")
    cfg = fed_cfg(tiny_dirs, out, 3, 3, "flower.min_clients=2")
    transport = LocalTransport(cfg, 3, silent={2: {2}}, restart={3: {2}})
    snapshots = {}
    local, update = HANDLERS["train"], HANDLERS["train.update"]

    def c3_state():
        d = client_state_dir(out, "c3")
        return adapters(d, "c3"), json.loads((d / "state.json").read_text())

    def spy_local(content, cfg_, node_config):
        if node_config["partition-id"] == 2 and int(dict(content.config_records["task"])["round"]) == 3:
            snapshots["before_round_3"] = c3_state()
        return local(content, cfg_, node_config)

    def spy_update(content, cfg_, node_config):
        reply = update(content, cfg_, node_config)
        if node_config["partition-id"] == 2 and int(dict(content.config_records["task"])["round"]) == 1:
            snapshots["after_round_1"] = c3_state()
        return reply

    HANDLERS["train"], HANDLERS["train.update"] = spy_local, spy_update
    try:
        metrics = run_server(transport, cfg)
    finally:
        HANDLERS["train"], HANDLERS["train.update"] = local, update
    return out, metrics, snapshots


def test_a_silent_client_is_left_out_and_continues_from_its_saved_state(faulty):
    out, metrics, snapshots = faulty
    rounds = {h["round"]: h for h in metrics["rounds"]}
    assert rounds[1]["clients"] == ["c1", "c2", "c3"]
    assert rounds[2]["clients"] == ["c1", "c2"] and "no reply" in rounds[2]["left_out"]["c3"]
    assert rounds[3]["clients"] == ["c1", "c2", "c3"] and not rounds[3]["left_out"]
    assert set(rounds[2]["selected"]["server"]) == {"skipped", "own", "c1", "c2"}  # the server learned from 2 clients
    assert metrics["left_out"] == {"2": {"c3": rounds[2]["left_out"]["c3"]}}
    # c3 came back (on a new node id) holding exactly what it saved after round 1, and went on from there
    (a1, s1), (a3, s3) = snapshots["after_round_1"], snapshots["before_round_3"]
    assert s1 == s3 and s3["local_round"] == 1 and s3["update_round"] == 1
    assert_same_adapters(a1, a3)
    final = json.loads((client_state_dir(out, "c3") / "state.json").read_text())
    assert final["local_round"] == 3 and final["update_round"] == 3


class TamperingTransport(LocalTransport):
    """LocalTransport whose replies pass through `tamper(kind, partition, reply)` on the way back."""

    def __init__(self, cfg, clients, tamper):
        super().__init__(cfg, clients)
        self.tamper = tamper

    def ask(self, requests, timeout, group):
        kinds = {node: kind for node, (kind, _) in requests.items()}
        out = super().ask(requests, timeout, group)
        pid_of = {n: p for p, n in self.node_of.items()}
        return {node: self.tamper(kinds[node], pid_of[node], rep) if not isinstance(rep, str) else rep
                for node, rep in out.items()}


def test_a_round_goes_on_without_the_clients_whose_fedavg_replies_are_forged(tiny_dirs, tmp_path):
    """FedAvg over 4 homogeneous clients: c1 (the first reply) sends no adapter, c2 claims -8 private
    rows (the weights would sum to 0), c3's evaluation lacks Rouge-L (the report needs it). Each is
    left out with its reason; the round ends with c4, and the report is written."""
    student = tiny_dirs["student"]
    same = "clients=[" + ", ".join(f"{{name: c{i}, model: {{name: {student}}}}}" for i in range(1, 5)) + "]"
    cfg = fed_cfg(tiny_dirs, tmp_path / "forged", 4, 1, "fedmkt.fedavg=true", same)

    def tamper(kind, pid, rep):
        if kind == "train.update" and pid == 0:
            del rep["adapter"]
        elif kind == "train.update" and pid == 1:
            rep["metrics"] = MetricRecord({**dict(rep["metrics"]), "private_rows": -8.0})
        elif kind == "train.fedavg" and pid == 2:
            rep["eval"] = MetricRecord({k: v for k, v in dict(rep["eval"]).items() if k != "rougeL"})
        return rep

    metrics = run_server(TamperingTransport(cfg, 4, tamper), cfg)
    r1 = metrics["rounds"][1]
    assert r1["clients"] == ["c4"] and set(r1["eval"]) == {"server", "c4"}
    assert "no 'adapter' record" in r1["left_out"]["c1"]
    assert "'private_rows' must be an integer in [1, inf], got -8" in r1["left_out"]["c2"]
    assert "'rougeL' must be a finite number" in r1["left_out"]["c3"]
    assert (Path(cfg.output_dir) / "report.md").is_file()


def test_a_client_with_a_broken_private_file_tells_the_server_no_details(tiny_dirs, tmp_path, capsys):
    """The client's error names its file, line and fields; the server (and metrics.json) gets only
    which client failed and where; the details stay in the client's own log."""
    from kdflow.federated.flower_client import ClientFailure

    cfg = fed_cfg(tiny_dirs, tmp_path / "leak", 2, 1)
    secret = tmp_path / "alice-medical-records"
    secret.mkdir()
    private = secret / "private.jsonl"
    private.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n"
                       + json.dumps({"prompt": "diagnosis?", "patient_ssn": "078-05-1120"}) + "\n")
    request = RecordDict({"task": ConfigRecord({"round": 1, "evaluate-before": False})})
    with pytest.raises(ClientFailure) as failure:
        HANDLERS["train"](request, cfg, {"partition-id": 0, "private-data": str(private)})
    reason = str(failure.value)
    assert reason.startswith("client 'c1' failed while reading its private data")
    for detail in ("alice-medical-records", "private.jsonl", ":2", "patient_ssn", "response", "diagnosis"):
        assert detail not in reason
    log = capsys.readouterr().err
    assert f"{private}:2" in log and "patient_ssn" in log  # the client's own log keeps the details
    # what Flower delivers to the server, and what the server records
    flower_reason = f"failed: {type(failure.value)}:<'{reason}'> (Flower error code 2)"
    left, rec = {}, {"round": 1, "bytes_up": {}, "loss": {}, "node_errors": {}}
    local_phase({7: flower_reason}, [7], cfg, None, {}, left, rec, {7: Member(7, 0, "c1", None)})
    assert "reading its private data" in left["c1"]
    assert "alice-medical-records" not in json.dumps([left, rec]) and "patient_ssn" not in json.dumps([left, rec])


def test_too_few_clients_stop_the_run_with_a_clear_error(tiny_dirs, tmp_path):
    cfg = fed_cfg(tiny_dirs, tmp_path / "few", 2, 1, "flower.min_clients=2")
    with pytest.raises(FlowerRunError, match=r"round 1 \(local\): 1 of 2 clients remain.*min_clients=2.*c2: no reply"):
        run_server(LocalTransport(cfg, 2, silent={1: {1}}), cfg)


class NodeConfigTransport(LocalTransport):
    """LocalTransport whose nodes get extra node config (partition -> dict)."""

    def __init__(self, cfg, clients, node_config):
        super().__init__(cfg, clients)
        self.node_config = node_config

    def ask(self, requests, timeout, group):
        handlers = dict(HANDLERS)
        try:
            for kind, fn in handlers.items():
                HANDLERS[kind] = (lambda fn: lambda content, cfg, nc: fn(
                    content, cfg, {**nc, **self.node_config.get(nc["partition-id"], {})}))(fn)
            return super().ask(requests, timeout, group)
        finally:
            HANDLERS.update(handlers)


def test_a_failed_flower_run_prints_the_servers_reason_naming_the_client(tiny_dirs, tmp_path, monkeypatch, capsys):
    """c2's private file is broken and min_clients=2: the ServerApp stops, leaving its reason (c2 and
    the generic stage it failed in, not its file or row) for `kdflow fedmkt-flower`, which prints it
    and exits non-zero instead of only "ended 'finished:failed'"."""
    from kdflow.federated.flower_server import FAILURE_FILE, serve

    out = tmp_path / "failing"
    secret = tmp_path / "bobs-ledger.jsonl"
    secret.write_text(json.dumps({"prompt": "a", "salary": 1}) + "\n")
    cfg = fed_cfg(tiny_dirs, out, 2, 1, "flower.min_clients=2")
    yaml_path = tmp_path / "failing.yaml"
    from kdflow.config import dump_yaml

    yaml_path.write_text(dump_yaml(cfg))

    def fake_submit(app_dir, toml, env, fed=None):  # the ServerApp runs here, its clients in-process
        with pytest.raises(FlowerRunError):
            serve(NodeConfigTransport(cfg, 2, {1: {"private-data": str(secret)}}), cfg)
        return 7

    monkeypatch.setattr(launch, "start_superlink", lambda *a, **k: "127.0.0.1:1")
    monkeypatch.setattr(launch, "submit", fake_submit)
    monkeypatch.setattr(launch, "wait_for_run", lambda *a, **k: "finished:failed")
    monkeypatch.setattr(launch, "run_logs", lambda *a, **k: "ServerApp log\n")
    assert main(["fedmkt-flower", "--config", str(yaml_path)]) == 2
    err = capsys.readouterr().err
    line = next(ln for ln in err.splitlines() if ln.startswith("kdflow: error:"))
    assert "Flower run 7 ended 'finished:failed': round 1 (local): 1 of 2 clients remain" in line
    assert "client 'c2' failed while reading its private data" in line
    assert "bobs-ledger" not in line and "salary" not in line
    assert json.loads((out / FAILURE_FILE).read_text())["reason"] in line


# ----------------------------------------------------------------------------------------------
# Real Flower runs


def test_simulation_with_two_tokenizers_one_round_equals_in_process(hetero_reference, tiny_dirs, unigram_dir, tmp_path):
    """`kdflow fedmkt-flower` without a SuperLink: Flower's simulation runtime (Ray), the 3-client
    config with two tokenizers, 1 round, equal to round 1 of the in-process runner."""
    ref_out, ref_hist = hetero_reference
    out = tmp_path / "sim"
    cfg = hetero_cfg(tiny_dirs, unigram_dir, out, 1)
    yaml_path = tmp_path / "sim.yaml"
    from kdflow.config import dump_yaml

    yaml_path.write_text(dump_yaml(cfg))
    assert main(["fedmkt-flower", "--config", str(yaml_path)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [h["round"] for h in m["rounds"]] == [0, 1] and m["rounds"][1]["clients"] == ["c1", "c2", "c3"]
    for r in (0, 1):
        assert_same_evals(ref_hist[r]["eval"], m["rounds"][r]["eval"])
    assert m["rounds"][1]["bytes_up"] == ref_hist[1]["bytes_up"] and m["rounds"][1]["selected"] == ref_hist[1]["selected"]
    assert_same_adapters(adapters(ref_out / "rounds/round-001", "server"), adapters(out / "rounds/round-001", "server"))
    for c in ("c1", "c2", "c3"):
        assert_same_adapters(adapters(ref_out / "rounds/round-001", c), adapters(client_state_dir(out, c), c))


def test_secure_deployment_with_two_tokenizers_equals_in_process_and_refuses_an_unregistered_supernode(
        hetero_reference, tiny_dirs, unigram_dir, tmp_path):
    """flower-superlink over TLS with SuperNode authentication (certificates and keys made here), three
    registered SuperNodes for c1 (the server's tokenizer), c2 and c3 (their own), and a fourth whose
    key is not registered: Flower refuses it, the run completes with the three and equals the
    in-process runner (adapters, final models, per-round metrics)."""
    ref_out, ref_hist = hetero_reference
    out = tmp_path / "deploy"
    cfg = hetero_cfg(tiny_dirs, unigram_dir, out, 2, "flower.chunk_bytes=4096")  # payloads of ~12 kB go in chunks
    dep = Deployment(tmp_path, 3, secure=True, unregistered=1)
    try:
        t0 = time.time()
        run_id = dep.submit(cfg)
        status = launch.wait_for_run(run_id, dep.env, 900, done_file=out / "metrics.json")
        seconds = time.time() - t0
        log = launch.run_logs(run_id, dep.env)
    finally:
        dep.close()
    assert status == "finished:completed", log[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    print(f"secure deployment: {seconds:.0f} s wall from flwr run to completion; rounds "
          + ", ".join(f"{h['seconds']:.0f} s" for h in m["rounds"][1:]) + "; bytes per round "
          + str(m["bytes_per_round"]))
    assert all(h["clients"] == ["c1", "c2", "c3"] for h in m["rounds"][1:]) and not m["left_out"]
    assert not any(h.get("node_errors") for h in m["rounds"][1:])  # the unregistered node never took part
    assert_same_run(ref_out, ref_hist, out, m["rounds"], ("c1", "c2", "c3"), 2)
    # the unregistered SuperNode (it claims c1's partition) never reached the ServerApp: had it
    # connected, the server would have asked it too and refused it for claiming c1's slot
    assert [h["nodes"] for h in m["rounds"][1:]] == [3, 3] and not m["refused_nodes"]
    intruder = (dep.logs / "supernode-3.log").read_text()
    print("unregistered SuperNode's log:", [ln for ln in intruder.splitlines() if ln.strip()][-3:])
    assert all("--insecure" not in p.args for _, p in dep.procs.procs)
    # the processes are gone
    assert all(p.poll() is not None for _, p in dep.procs.procs)


def test_deployment_one_of_three_supernodes_killed_mid_run(faulty, tiny_dirs, tmp_path):
    """c3's SuperNode is killed (SIGKILL) once round 1 is saved; round 2 goes on with c1 and c2, and
    matches the local run in which c3 was silent in round 2."""
    import os
    import signal

    ref_out, ref_metrics, _ = faulty
    out = tmp_path / "kill"
    # a long timeout: Flower itself stops waiting for a node its SuperLink sees go offline
    cfg = fed_cfg(tiny_dirs, out, 3, 2, "flower.min_clients=2", "flower.reply_timeout=600")
    dep = Deployment(tmp_path, 3)
    try:
        run_id = dep.submit(cfg)
        deadline, checked = time.time() + 600, time.time()
        while not (out / "rounds" / "round-001" / "state.json").is_file():
            assert time.time() < deadline, "round 1 did not finish in 600 s"
            if time.time() - checked > 20:
                status, checked = launch.run_status(run_id, dep.env), time.time()
                assert not status.startswith("finished"), launch.run_logs(run_id, dep.env)[-3000:]
            time.sleep(0.5)
        os.killpg(dep.nodes[2].pid, signal.SIGKILL)  # c3's SuperNode and everything it started
        status = launch.wait_for_run(run_id, dep.env, 900, done_file=out / "metrics.json")
        log = launch.run_logs(run_id, dep.env)
    finally:
        dep.close()
    assert status == "finished:completed", log[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["rounds"][1]["clients"] == ["c1", "c2", "c3"]
    assert m["rounds"][2]["clients"] == ["c1", "c2"] and "no reply" in m["rounds"][2]["left_out"]["c3"]
    print(f"round 2 without the killed c3: {m['rounds'][2]['seconds']:.0f} s; c3: {m['rounds'][2]['left_out']['c3']}")
    for r in (1, 2):
        assert_same_adapters(adapters(ref_out / f"rounds/round-00{r}", "server"), adapters(out / f"rounds/round-00{r}", "server"))
        assert m["rounds"][r]["loss"] == pytest.approx(ref_metrics["rounds"][r]["loss"], abs=1e-6)
