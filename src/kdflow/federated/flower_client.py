"""The client side of FedMKT over Flower: each message handled from the client's state on disk.

A deployed ClientApp may run every message in a fresh process, so nothing lives in memory between
messages. Each handler rebuilds the client (frozen base model, tokenizer, public set, private
partition) from the run config and the node config, loads the adapter and optimizer the last
message left in the node's state folder, runs one step of `fedmkt.py`, and saves the new state
before replying. The steps are the in-process runner's own functions:

  handle_local   `client_local_step` (private training, public top-k + CE) -> payload, with who
                 this node is (partition, tokenizer, answer positions on the public set)
  handle_update  `client_update_step` on the server's payload (+ evaluation, + adapter for FedAvg)
  handle_fedavg  load the averaged adapter (+ evaluation)
  handle_baseline  the standalone baseline: a fresh adapter on the private rows alone, evaluated

A message's task may name the rounds it belongs to (`run`: "fedmkt", or "llm2slm" for that
baseline's rounds, whose state is kept apart under <state-dir>/baselines/llm2slm).

Handlers take and return Flower `RecordDict`s and never see a `Message`, so tests call them
directly; `flower_app.py` wraps them into the ClientApp.

A failing handler tells the server only a generic reason (`ClientFailure`: the client and the stage
it failed in, e.g. "reading its private data"): Flower sends an exception's text to the server,
which records it in metrics.json, and the full message names the client's files, rows and fields.
The details and traceback go to the client's own log (stderr of the ClientApp process).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kdflow.config import FedMKTConfig, PartyConfig
from kdflow.errors import ConfigError, KDFlowError
from kdflow.federated import payload as wire

# Keys a SuperNode's --node-config may set. Flower's simulation adds num-partitions itself.
NODE_KEYS = {
    "partition-id": "which client of `clients:` this node is (0-based); also picks its private partition",
    "num-partitions": "set by Flower's simulation; ignored",
    "state-dir": "folder for this client's adapter, optimizer and last outputs between messages",
    "model": "this node's copy of the client's model (for a pruned or config-built client: of its prune_from model)",
    "data-train": "this node's copy of data.train (public set and, unless private-data is given, the partitions)",
    "data-test": "this node's copy of data.test",
    "private-data": "this client's own private rows (a node-local file used instead of its partition of data.train)",
}


class StateError(KDFlowError):
    """A client's saved state cannot serve the request (e.g. no local step for this round)."""


class ClientFailure(KDFlowError):
    """What a failed client reports to the server: who failed and at which stage, never the details
    (paths, row numbers, field names), which stay in the client's own log."""


@contextmanager
def _stage(client: str | None, doing: str) -> Any:
    """Any error inside becomes a ClientFailure naming only the client and `doing`; the original
    message and traceback are written to the client's own log."""
    try:
        yield
    except ClientFailure:
        raise
    except Exception as e:
        who = f"client '{client}'" if client else "client"
        print(f"[kdflow] {who} failed while {doing}: {type(e).__name__}: {e}\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        raise ClientFailure(f"{who} failed while {doing} ({type(e).__name__}); the details are in the client's own "
                            "log") from None


# ----------------------------------------------------------------------------------------------
# Who this node is


@dataclass
class Node:
    partition: int
    spec: PartyConfig
    state_dir: Path
    data_train: str
    data_test: str | None
    private_data: str | None

    @property
    def name(self) -> str:
        return self.spec.name


def node_from_config(cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Node:
    unknown = sorted(k for k in node_config if k not in NODE_KEYS)
    if unknown:
        raise ConfigError(f"unknown node config key '{unknown[0]}'; valid keys: {', '.join(NODE_KEYS)}")
    if "partition-id" not in node_config:
        raise ConfigError("node config needs partition-id (e.g. flower-supernode --node-config 'partition-id=0')")
    pid = node_config["partition-id"]
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(cfg.clients):
        raise ConfigError(f"node config partition-id={pid!r}: the config has {len(cfg.clients)} clients, so it must be "
                          f"an integer in 0..{len(cfg.clients) - 1}")
    spec = cfg.clients[pid]
    if node_config.get("model"):  # a pruned or config-built client is built from its prune_from model
        if spec.model.init == "pretrained":
            spec = replace(spec, model=replace(spec.model, name=str(node_config["model"])))
        else:
            spec = replace(spec, prune_from=str(node_config["model"]))
    base = cfg.flower.state_dir or str(Path(cfg.output_dir) / "flower-clients")
    state_dir = Path(str(node_config.get("state-dir") or Path(base) / spec.name))
    return Node(pid, spec, state_dir, str(node_config.get("data-train") or cfg.data.train or ""),
                node_config.get("data-test") or cfg.data.test, node_config.get("private-data") or None)


# ----------------------------------------------------------------------------------------------
# Building the client (cached per process: a simulation actor serves many messages)

_BASES: dict[str, tuple[Any, Any]] = {}
_ROWS: dict[tuple, Any] = {}


def _base(cfg: FedMKTConfig, node: Node) -> tuple[Any, Any]:
    from kdflow.config import to_dict
    from kdflow.federated.fedmkt import load_base

    key = json.dumps([to_dict(node.spec), cfg.seed + node.partition + 1], sort_keys=True)
    if key not in _BASES:
        _BASES.clear()  # one client per process at a time: keep memory flat
        _BASES[key] = load_base(node.spec, {}, seed=cfg.seed + node.partition + 1)
    return _BASES[key]


def _partitions(cfg: FedMKTConfig, node: Node) -> tuple[Any, list[Any]]:
    from kdflow.data import partition_rows, read_rows

    if not node.data_train:
        raise ConfigError(f"client '{node.name}': no training data (set data.train or node config data-train)")
    d = cfg.data
    key = (node.data_train, d.max_train_rows, d.public_rows, len(cfg.clients), d.private_rows, d.partition,
           d.partition_field, d.dirichlet_alpha, cfg.seed)
    if key not in _ROWS:
        rows = read_rows(node.data_train, "data.train").head(d.max_train_rows)
        _ROWS[key] = partition_rows(rows, d.public_rows, len(cfg.clients), d.private_rows, d.partition,
                                    d.partition_field, d.dirichlet_alpha, cfg.seed)
    return _ROWS[key]


def split_rows(cfg: FedMKTConfig, node: Node) -> tuple[Any, Any]:
    """(public rows, this client's private rows), cut exactly as the in-process runner cuts them."""
    from kdflow.data import read_rows

    public, private = _partitions(cfg, node)
    if node.private_data:
        return public, read_rows(node.private_data, "node config private-data")
    return public, private[node.partition]


def build_client(cfg: FedMKTConfig, node: Node) -> Any:
    """The client as a `Party` with fresh LoRA weights (the state folder's adapter is loaded separately)."""
    from kdflow.data import encode_rows
    from kdflow.federated.fedmkt import make_party

    if cfg.train.num_threads > 0:
        import torch

        torch.set_num_threads(cfg.train.num_threads)
    with _stage(node.name, "loading its model"):
        base, tok = _base(cfg, node)
        party = make_party(node.spec, base, tok, cfg.seed + node.partition + 1)
    with _stage(node.name, "reading data.train (the public set and its partition)"):
        public = _partitions(cfg, node)[0]
        party.public = encode_rows(public, tok, cfg.data)
        party.public_rows = public
    with _stage(node.name, "reading its private data"):
        party.private = encode_rows(split_rows(cfg, node)[1], tok, cfg.data)
    return party


# ----------------------------------------------------------------------------------------------
# State on disk: versioned folders and an atomically replaced pointer, so a client killed while
# saving keeps its previous state.


def run_key(cfg: FedMKTConfig) -> str:
    """What a client's saved state depends on: a state folder is only continued by the same run
    (evaluation, Flower and output settings may change in between)."""
    import hashlib

    from kdflow.config import to_dict

    d = to_dict(cfg)
    for k in ("output_dir", "eval", "flower", "baselines"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ClientState:
    """`<state_dir>/CURRENT` names the folder holding the newest complete state:
    state.json, the adapter (safetensors), the optimizer (torch.save of tensors; read with
    weights_only=True) and own_outputs.npz (this client's last public outputs)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def current(self) -> Path | None:
        ptr = self.folder / "CURRENT"
        if not ptr.is_file():
            return None
        d = self.folder / ptr.read_text().strip()
        return d if (d / "state.json").is_file() else None

    def info(self) -> dict[str, Any]:
        d = self.current()
        return json.loads((d / "state.json").read_text()) if d else {"local_round": 0, "update_round": 0}

    def load(self, party: Any, cfg: FedMKTConfig) -> dict[str, Any]:
        from kdflow.federated.fedmkt import load_party_state

        d = self.current()
        if d is None:
            return {**self.info(), "run": run_key(cfg)}
        info = json.loads((d / "state.json").read_text())
        if info.get("run") != run_key(cfg):
            raise StateError(f"{self.folder} holds the state of client '{party.name}' in another run (other settings); "
                             "give this node another state-dir or delete that folder")
        load_party_state(party, d, cfg.train)
        return info

    def own_outputs(self, party: Any, cfg: FedMKTConfig) -> wire.PublicOutputs:
        d = self.current()
        if d is None or not (d / "own_outputs.npz").is_file():
            raise StateError(f"client '{party.name}' has no public outputs saved in {self.folder}")
        with np.load(d / "own_outputs.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return wire.decode(arrays, sender=f"{d}/own_outputs.npz", vocab_size=party.vocab_size, k=cfg.fedmkt.top_k,
                           positions=party.positions(), logp_format="float32")

    def save(self, party: Any, info: dict[str, Any], own: wire.PublicOutputs | None = None) -> None:
        from kdflow.federated.fedmkt import save_party_state
        from kdflow.report import write_atomic, write_json

        self.folder.mkdir(parents=True, exist_ok=True)
        old = self.current()
        new = Path(tempfile.mkdtemp(prefix="state-", dir=self.folder))
        save_party_state(party, new)
        if own is not None:
            np.savez(new / "own_outputs.npz", **wire.encode(own, party.vocab_size, "float32"))
        elif old is not None and (old / "own_outputs.npz").is_file():
            shutil.copy2(old / "own_outputs.npz", new / "own_outputs.npz")
        write_json(new / "state.json", info)
        write_atomic(self.folder / "CURRENT", new.name)
        for d in self.folder.glob("state-*"):
            if d != new:
                shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Records


def _records() -> Any:
    from flwr import app

    return app


def _task(content: Any) -> dict[str, Any]:
    if "task" not in content.config_records:
        raise KDFlowError("message without a 'task' config record")
    return dict(content.config_records["task"])


def _metrics(values: Mapping[str, float | int | None]) -> Any:
    return _records().MetricRecord({k: float(v) for k, v in values.items() if v is not None})


def _client_record(node: Node, **extra: Any) -> Any:
    return _records().ConfigRecord({"name": node.name, "partition-id": node.partition, **extra})


def _test_metrics(party: Any, cfg: FedMKTConfig, node: Node) -> dict[str, float]:
    from kdflow.data import read_rows
    from kdflow.federated.simulation import evaluate_party

    with _stage(node.name, "evaluating on its test data"):
        if not node.data_test:
            raise ConfigError(f"client '{node.name}': no test data (set data.test or node config data-test)")
        return evaluate_party(party, read_rows(node.data_test, "data.test"), cfg)


def _evaluate(party: Any, cfg: FedMKTConfig, node: Node) -> Any:
    return _metrics(_test_metrics(party, cfg, node))


# ----------------------------------------------------------------------------------------------
# Handlers


def _identity(node: Node, party: Any, public_fp: str, r: int, server: Mapping[str, Any]) -> dict[str, Any]:
    """Who this node is, for the server to check before it reads the payload; with another tokenizer
    than the server's, that tokenizer (once: unless the server lists it as known), and whether this
    node already holds the server's."""
    from kdflow.federated.tokenizers import tokenizer_record

    app = _records()
    server_fp = server.get("fingerprint")
    foreign = isinstance(server_fp, str) and server_fp != party.fingerprint
    out = {
        "client": _client_record(node, **{"round": r, "fingerprint": party.fingerprint, "vocab-size": party.vocab_size,
                                          "public": public_fp, "has-server-tokenizer": not foreign or
                                          _server_tokenizer_dir(node, server_fp).is_dir()}),
        "positions": app.ArrayRecord({"positions": app.Array(np.asarray(party.positions(), dtype=np.int64))}),
    }
    if foreign and party.fingerprint not in str(server.get("known-tokenizers", "")).split():
        with _stage(node.name, "sending its tokenizer"):
            out["tokenizer"] = tokenizer_record(party.tok)
    return out


def _server_tokenizer_dir(node: Node, fingerprint: str) -> Path:
    return node.state_dir / "peer-tokenizers" / "".join(ch for ch in fingerprint if ch.isalnum())[:64]


RUN_LABELS = ("fedmkt", "llm2slm")  # the rounds a server may ask for: FedMKT's, or the LLM2SLM baseline's


def run_label(task: Mapping[str, Any]) -> str:
    label = task.get("run", "fedmkt")
    if label not in RUN_LABELS:
        raise KDFlowError(f"the server asked for rounds of '{str(label)[:40]}', which this client does not run")
    return str(label)


def state_folder(node: Node, task: Mapping[str, Any]) -> Path:
    """FedMKT's state lives in the node's state folder; a baseline's rounds (LLM2SLM) in a folder of
    their own under it, so neither disturbs the other."""
    label = run_label(task)
    return node.state_dir if label == "fedmkt" else node.state_dir / "baselines" / label


def _open_client(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What every client message starts with: the node, the task and its round, and the client
    rebuilt from its state folder (records module, node, task, round, party, state, saved info)."""
    with _stage(None, "reading its node config and the server's request"):
        node = node_from_config(cfg, node_config)
        task = _task(content)
        r = int(task["round"])
    party = build_client(cfg, node)
    state = ClientState(state_folder(node, task))
    with _stage(node.name, "loading its saved state"):
        info = state.load(party, cfg)
    return _records(), node, task, r, party, state, info


def handle_local(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Any:
    """Steps 1-2: private training, then the public top-k + CE, sent as a chunked payload with the
    client's identity (name, partition, tokenizer fingerprint, answer positions on the public set)."""
    from kdflow.data import rows_fingerprint
    from kdflow.federated.fedmkt import client_local_step

    app, node, task, r, party, state, info = _open_client(content, cfg, node_config)
    before = _evaluate(party, cfg, node) if task.get("evaluate-before") else None
    if int(info["local_round"]) == r and int(info["update_round"]) < r:
        # The same request again (a resumed server, a re-sent message): answer with the saved outputs
        # rather than training twice.
        with _stage(node.name, "loading its saved outputs"):
            own, logs = state.own_outputs(party, cfg), []
            arrays = wire.encode(own, party.vocab_size, cfg.fedmkt.wire_logprobs)
    else:
        with _stage(node.name, "training on its private data"):
            out, logs = client_local_step(party, cfg, r)
            arrays = wire.encode(out, party.vocab_size, cfg.fedmkt.wire_logprobs)
            # Keep what the server sees (its log-probs as they travel): the update step selects against it, as in-process.
            own = wire.decode(arrays, sender=node.name, vocab_size=party.vocab_size, k=cfg.fedmkt.top_k,
                              positions=party.positions(), finite_support=cfg.fedmkt.divergence == "rkl",
                              logp_format=cfg.fedmkt.wire_logprobs)
        with _stage(node.name, "saving its state"):
            state.save(party, {**info, "local_round": r}, own)
    server = dict(content.config_records["server"]) if "server" in content.config_records else {}
    reply = app.RecordDict({
        **_identity(node, party, rows_fingerprint(_partitions(cfg, node)[0]), r, server),
        "payload": wire.to_array_record(arrays, cfg.flower.chunk_bytes),
        "metrics": _metrics({"loss.private": logs[-1]["loss"] if logs else None, "private_rows": len(party.private)}),
    })
    if before is not None:
        reply["eval-before"] = before
    return reply


def _server_peer(content: Any, party: Any, cfg: FedMKTConfig, node: Node) -> tuple[Any, list[int]]:
    """The server as this client sees it: with the same tokenizer a `Peer` (name, vocabulary,
    fingerprint); with another, a `fedmkt.remote_party` built from the server's tokenizer (received
    once, kept in the state folder). Its answer positions are this client's own tokenization of the
    public set with the server's tokenizer, and must equal the ones the server sent."""
    from kdflow.federated.fedmkt import Peer, remote_party
    from kdflow.federated.tokenizers import (load_saved_tokenizer, read_tokenizer_files, load_tokenizer_files,
                                             save_tokenizer_files)

    s = dict(content.config_records["server"])
    arr = content.array_records["server-positions"]["positions"]
    positions = wire.read_array(arr, "the server's answer positions", ("int64",), (len(party.public),)).tolist()
    peer = Peer(str(s["name"]), int(s["vocab-size"]), str(s["fingerprint"]))
    if peer.fingerprint == party.fingerprint:
        if positions != party.positions():
            raise wire.PayloadError("the server's answer positions differ from this client's for the same tokenizer: "
                                    "the parties do not share the public set or the data settings")
        return peer, positions
    folder = _server_tokenizer_dir(node, peer.fingerprint)
    tok = load_saved_tokenizer(folder, "the server", peer.fingerprint)
    if tok is None:
        if "server-tokenizer" not in content.array_records:
            raise wire.PayloadError("the server uses another tokenizer and sent none")
        files = read_tokenizer_files(content.array_records["server-tokenizer"], "the server")
        tok = load_tokenizer_files(files, "the server", peer.fingerprint)
        save_tokenizer_files(files, folder)
    server = remote_party(peer.name, tok, party.public_rows, cfg.data)
    if positions != server.positions():
        raise wire.PayloadError("the server's answer positions differ from this client's tokenization of the public "
                                "set with the server's tokenizer: the parties do not share the public set or the data "
                                "settings")
    return server, positions


def handle_update(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Any:
    """Steps 9-11 on the server's payload; then evaluation and/or the adapter when the server asks."""
    from kdflow.federated.fedmkt import client_update_step

    app, node, task, r, party, state, info = _open_client(content, cfg, node_config)
    # Round numbers only: safe to tell the server as they are.
    if int(info["update_round"]) >= r:
        raise ClientFailure(f"client '{node.name}' already took the server's knowledge of round {r}")
    if int(info["local_round"]) != r:
        raise ClientFailure(f"client '{node.name}' was asked to update in round {r}, but its last local step was round "
                            f"{info['local_round']}")
    with _stage(node.name, "loading its saved outputs"):
        own = state.own_outputs(party, cfg)
    with _stage(node.name, "reading the server's payload"):
        server, positions = _server_peer(content, party, cfg, node)
        received = wire.from_array_record(content.array_records["payload"], sender=server.name,
                                          vocab_size=server.vocab_size, k=cfg.fedmkt.top_k, positions=positions,
                                          max_bytes=cfg.flower.max_payload_bytes,
                                          finite_support=cfg.fedmkt.divergence == "rkl",
                                          logp_format=cfg.fedmkt.wire_logprobs)
    with _stage(node.name, "learning from the server"):
        from kdflow.federated.fedmkt import Bridges

        res = client_update_step(party, own, server, received, cfg, r, bridges=Bridges(cfg.data, cfg.align))
    with _stage(node.name, "saving its state"):
        state.save(party, {**info, "update_round": r})
    final = r == cfg.fedmkt.rounds and not task.get("send-adapter") and run_label(task) == "fedmkt"
    if final:
        _save_final(party, cfg, node)
    reply = app.RecordDict({
        "client": _client_record(node, round=r, **({"final": True} if final else {})),
        "metrics": _metrics({"loss.public": res["logs"][-1]["loss"] if res["logs"] else None,
                             "private_rows": len(party.private)}),
        "selected": _metrics(res["selected"]),
    })
    if task.get("send-adapter"):
        from peft import get_peft_model_state_dict

        reply["adapter"] = app.ArrayRecord({k: app.Array(v.detach().cpu().numpy())
                                            for k, v in get_peft_model_state_dict(party.model).items()})
    if task.get("evaluate"):
        reply["eval"] = _evaluate(party, cfg, node)
    return reply


def handle_fedavg(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Any:
    """Homogeneous clients: take the averaged adapter the server sends."""
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    app, node, task, r, party, state, info = _open_client(content, cfg, node_config)
    with _stage(node.name, "reading the averaged adapter"):
        mine = adapter_layout(get_peft_model_state_dict(party.model))
        avg = read_adapter(content.array_records["adapter"], mine, "the server")
        set_peft_model_state_dict(party.model, {k: torch.from_numpy(v) for k, v in avg.items()})
    with _stage(node.name, "saving its state"):
        state.save(party, {**info, "fedavg_round": r})
    final = r == cfg.fedmkt.rounds
    if final:
        _save_final(party, cfg, node)
    reply = app.RecordDict({"client": _client_record(node, round=r, **({"final": True} if final else {}))})
    if task.get("evaluate"):
        reply["eval"] = _evaluate(party, cfg, node)
    return reply


def handle_baseline(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Any:
    """The standalone baseline on this node: a fresh adapter trained on this client's private rows
    alone (the epochs FedMKT gives its private phases over all rounds, seeded as in-process), then
    evaluated; only the evaluation goes back. Kept in <state-dir>/baselines/standalone.json, so a
    resumed server does not retrain it."""
    from kdflow.federated.fedmkt import train_baseline
    from kdflow.report import write_json

    with _stage(None, "reading its node config and the server's request"):
        node = node_from_config(cfg, node_config)
        name = str(_task(content).get("baseline"))
    if name != "standalone":
        raise ClientFailure(f"client '{node.name}' runs no baseline '{name[:40]}' (only standalone)")
    saved = node.state_dir / "baselines" / "standalone.json"
    metrics = None
    if saved.is_file():
        with _stage(node.name, "reading its saved baseline"):
            got = json.loads(saved.read_text())
            metrics = got["metrics"] if got.get("run") == run_key(cfg) else None
    if metrics is None:
        party = build_client(cfg, node)
        with _stage(node.name, "training the standalone baseline on its private data"):
            train_baseline(party, party.private, cfg, "client")
        metrics = _test_metrics(party, cfg, node)
        with _stage(node.name, "saving its baseline"):
            write_json(saved, {"run": run_key(cfg), "metrics": metrics})
    return _records().RecordDict({"client": _client_record(node, baseline=name), "eval": _metrics(metrics)})


def final_dir(node: Node) -> Path:
    return node.state_dir / "final"


def _save_final(party: Any, cfg: FedMKTConfig, node: Node) -> None:
    """After the last round, the client's final model on its own node (`<state-dir>/final/`): the
    server is told only that it was written, not where (paths stay on the client's side)."""
    from kdflow.federated.fedmkt import base_location, save_final

    with _stage(node.name, "writing its final model"):
        written = save_final(party, base_location(node.spec), final_dir(node), cfg.fedmkt.save_merged)
    print(f"[kdflow] client '{node.name}': final model written to {written['adapter']}"
          + (f" and {written['merged']}" if "merged" in written else ""), file=sys.stderr, flush=True)


def adapter_layout(state: Mapping[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Parameter name -> (dtype, shape) of an adapter state dict (torch tensors) or ArrayRecord
    (declared metadata only: nothing is read)."""
    return {k: (str(v.dtype).replace("torch.", ""), tuple(int(d) for d in v.shape)) for k, v in state.items()}


def read_adapter(record: Any, expected: Mapping[str, tuple[str, tuple[int, ...]]], sender: str) -> dict[str, np.ndarray]:
    """An adapter state dict from an ArrayRecord, checked against the receiver's expected layout
    (parameter names, dtypes, shapes) before its bytes are read, with finite values."""
    names = set(record.keys())
    if names != set(expected):
        raise wire.PayloadError(f"adapter from {sender}: parameters {sorted(names ^ set(expected))[:3]} do not match")
    out = {}
    for k, (dtype, shape) in expected.items():
        a = wire.read_array(record[k], f"adapter from {sender}: '{k}'", (dtype,), shape)
        if not np.isfinite(a).all():
            raise wire.PayloadError(f"adapter from {sender}: '{k}' holds NaN or infinite values")
        out[k] = np.array(a)
    return out


def guarded(kind: str, handler: Any) -> Any:
    """`handler` whose every failure reaches the server as a ClientFailure (a generic reason)."""

    def run(content: Any, cfg: FedMKTConfig, node_config: Mapping[str, Any]) -> Any:
        with _stage(None, f"handling a '{kind}' message"):
            return handler(content, cfg, node_config)

    run.__name__ = run.__qualname__ = handler.__name__
    return run


HANDLERS = {kind: guarded(kind, fn) for kind, fn in
            {"train": handle_local, "train.update": handle_update, "train.fedavg": handle_fedavg,
             "train.baseline": handle_baseline}.items()}

