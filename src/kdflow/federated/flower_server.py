"""The server side of FedMKT over Flower: the in-process round, with the clients behind a transport.

`run_server` is `simulation.run_rounds` with each client step replaced by a request to the client's
node and a wait for its reply (`Transport.ask`; `flower_app.GridTransport` sends Flower messages,
tests plug in a local one). Per round:

  local       every connected node: `client_local_step` -> payload, with who the node is (its
              partition, tokenizer, answer positions), all validated here on receipt
  server      `server_step` on the clients that replied, in the config's client order
  update      those clients: `client_update_step` on the server's payload (+ evaluation)
  fedavg      (homogeneous, fedmkt.fedavg) the clients' adapters averaged and sent back

A client that fails, sends a malformed payload or does not reply within flower.reply_timeout is
left out of the rest of the round (logged, and recorded under `left_out` in metrics.json); the
round goes on while at least flower.min_clients clients remain. A left-out client keeps its state
on disk and rejoins the next round from there, also from a new node (a restarted SuperNode gets a
new node id; it is recognised by its partition-id).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kdflow.config import FedMKTConfig
from kdflow.errors import KDFlowError
from kdflow.federated import payload as wire


class FlowerRunError(KDFlowError):
    """Too few clients to go on, or a setting the Flower runner cannot serve."""


class Transport(Protocol):
    def nodes(self) -> list[int]:
        """Node ids connected now."""

    def ask(self, requests: dict[int, tuple[str, Any]], timeout: float, group: str) -> dict[int, Any]:
        """Send (message type, RecordDict) to each node; return node -> reply RecordDict, or a string
        saying why a node has none (its client failed, its node went offline). Nodes without a reply
        within `timeout` are absent."""


@dataclass
class Member:
    """A client as the server knows it, from its handshake."""

    node: int
    partition: int
    name: str
    vocab_size: int
    fingerprint: str
    positions: list[int]

    def peer(self) -> Any:
        from kdflow.federated.fedmkt import Peer

        return Peer(self.name, self.vocab_size, self.fingerprint)


def log(text: str) -> None:
    print(f"[kdflow] {text}", flush=True)


# ----------------------------------------------------------------------------------------------
# Pure pieces (tested with mock replies)


def read_identity(reply: Any, cfg: FedMKTConfig, node: int, public_fp: str, n_public: int) -> Member:
    """Who a node says it is (sent with its local-step payload), checked; ValueError says why not."""
    c = dict(reply.config_records["client"])
    pid = c.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(cfg.clients):
        raise ValueError(f"partition-id {pid!r} is not a client of this config (0..{len(cfg.clients) - 1})")
    name = cfg.clients[pid].name
    if c.get("name") != name:
        raise ValueError(f"partition {pid} is client '{name}' in the config but the node says '{c.get('name')}'")
    if c.get("public") != public_fp:
        raise ValueError(f"client '{name}' holds a different public set (fingerprint {c.get('public')}, expected "
                         f"{public_fp}): every party needs the same data.train and data settings")
    arr = reply.array_records["positions"]["positions"]
    if arr.stype != "numpy.ndarray" or arr.dtype != "int64" or tuple(arr.shape) != (n_public,):
        raise ValueError(f"client '{name}': answer positions must be int64 [{n_public}], got {arr.dtype}{list(arr.shape)}")
    positions = arr.numpy()
    if (positions < 0).any():
        raise ValueError(f"client '{name}': negative answer positions")
    vocab = c.get("vocab-size")
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"client '{name}': vocab-size {vocab!r}")
    return Member(node, pid, name, vocab, str(c.get("fingerprint")), positions.tolist())


def reply_problem(reply: Any, timeout: float) -> str | None:
    if reply is None:
        return f"no reply within {timeout:g} s"
    if isinstance(reply, str):
        return reply
    return None


def wait_for_nodes(transport: Transport, cfg: FedMKTConfig) -> list[int]:
    """Before round 1: until a node per client is connected, or flower.connect_timeout has passed."""
    deadline = time.time() + cfg.flower.connect_timeout
    while True:
        nodes = transport.nodes()
        if len(nodes) >= len(cfg.clients) or time.time() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) < cfg.flower.min_clients:
        raise FlowerRunError(f"only {len(nodes)} nodes connected within flower.connect_timeout="
                             f"{cfg.flower.connect_timeout:g} s; {len(cfg.clients)} clients are configured "
                             f"(flower.min_clients={cfg.flower.min_clients})")
    log(f"{len(nodes)} nodes connected for {len(cfg.clients)} clients")
    return nodes


def local_phase(replies: dict[int, Any], nodes: list[int], cfg: FedMKTConfig, public_fp: str, n_public: int,
                refused: dict[int, str], left: dict[str, str], rec: dict[str, Any],
                known: dict[int, Member] | None = None) -> dict[int, tuple[Member, wire.PublicOutputs, Any]]:
    """partition -> (member, validated payload, reply) from the local-step replies, in the config's
    client order; everything else ends in `left` (a configured client; `known` maps the nodes seen
    in earlier rounds to their clients) or `refused` (a node that is no client of this run and is
    not asked again)."""
    got: dict[int, tuple[Member, wire.PublicOutputs, Any]] = {}
    known = {} if known is None else known
    timeout = cfg.flower.reply_timeout
    for node in nodes:
        rep = replies.get(node)
        problem = reply_problem(rep, timeout)
        if problem:
            if node in known:
                left[known[node].name] = problem
                log(f"round {rec['round']}: client '{known[node].name}' left out ({problem})")
            else:
                rec["node_errors"][str(node)] = problem
                log(f"round {rec['round']}: node {node}: {problem}")
            continue
        try:
            m = read_identity(rep, cfg, node, public_fp, n_public)
        except (ValueError, KeyError, TypeError) as e:
            refused[node] = str(e)
            log(f"node {node} refused: {e}")
            continue
        known[node] = m
        if m.partition in got:
            log(f"round {rec['round']}: nodes {got[m.partition][0].node} and {node} both claim client '{m.name}'; "
                "keeping the first")
            continue
        try:
            record = rep.array_records["payload"]
            out = wire.from_array_record(record, sender=m.name, vocab_size=m.vocab_size, k=cfg.fedmkt.top_k,
                                         positions=m.positions, max_bytes=cfg.flower.max_payload_bytes)
        except (wire.PayloadError, KeyError) as e:
            left[m.name] = f"payload rejected: {e}"
            log(f"round {rec['round']}: client '{m.name}' left out ({left[m.name]})")
            continue
        got[m.partition] = (m, out, rep)
        rec["bytes_up"][m.name] = wire.record_nbytes(record)
        rec["loss"][f"{m.name}/private"] = dict(rep.metric_records["metrics"]).get("loss.private")
    errors = "; ".join(f"node {n}: {e}" for n, e in rec["node_errors"].items())
    for pid, spec in enumerate(cfg.clients):
        if pid not in got and spec.name not in left:
            left[spec.name] = "no reply" + (f" (unidentified {errors})" if errors else "")
    return dict(sorted(got.items()))


def _task(**values: Any) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord(values)


def _need(got: int, cfg: FedMKTConfig, r: int, phase: str, left_out: dict[str, str]) -> None:
    if got < cfg.flower.min_clients:
        why = "; ".join(f"{k}: {v}" for k, v in left_out.items())
        raise FlowerRunError(f"round {r} ({phase}): {got} of {len(cfg.clients)} clients remain, fewer than "
                             f"flower.min_clients={cfg.flower.min_clients} ({why})")


def run_server(transport: Transport, cfg: FedMKTConfig) -> dict[str, Any]:
    """The FedMKT rounds over `transport`; writes the run folder and returns the metrics."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from kdflow.data import encode_rows, partition_rows, read_rows, rows_fingerprint
    from kdflow.federated.fedmkt import load_base, make_party, public_outputs, server_step
    from kdflow.federated.simulation import _load_round, _save_round, evaluate_party
    from kdflow.report import write_json
    from kdflow.training import setup_run

    if not cfg.clients:
        raise FlowerRunError("fedmkt needs at least one client under `clients:`")
    if cfg.flower.min_clients > len(cfg.clients):
        raise FlowerRunError(f"flower.min_clients={cfg.flower.min_clients} exceeds the {len(cfg.clients)} clients")
    out_dir = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads)
    t_start = time.time()
    if [b for b in cfg.baselines if b != "zero_shot"]:
        log(f"baselines {cfg.baselines} are not run over Flower (they need every party's data in one place); "
            "`kdflow fedmkt` runs them from the same config")
    rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    public_rows, _ = partition_rows(rows, cfg.data.public_rows, len(cfg.clients), cfg.data.private_rows,
                                    cfg.data.partition, cfg.data.partition_field, cfg.data.dirichlet_alpha, cfg.seed)
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.eval.max_rows)
    base, tok = load_base(cfg.server, {}, seed=cfg.seed)
    server = make_party(cfg.server, base, tok, cfg.seed)
    server.public = encode_rows(public_rows, tok, cfg.data)
    ckpt = out_dir / "rounds"
    ckpt.mkdir(parents=True, exist_ok=True)
    start, server_out, history = _load_round(ckpt, [server], cfg)
    if start:
        log(f"fedmkt-flower: resuming after round {start}")
    if server_out is None:
        server_out = public_outputs(server, cfg.fedmkt.top_k, cfg.fedmkt.temperature, cfg.eval.batch_size)
    public_fp = rows_fingerprint(public_rows)
    if not history:
        history.append({"round": 0, "eval": {server.name: evaluate_party(server, test_rows, cfg)}})
    wait_for_nodes(transport, cfg)
    f, timeout = cfg.flower, cfg.flower.reply_timeout
    refused: dict[int, str] = {}  # nodes that are no client of this run
    known: dict[int, Any] = {}  # node -> the client it said it is
    for r in range(start + 1, cfg.fedmkt.rounds + 1):
        t0 = time.time()
        rec: dict[str, Any] = {"round": r, "bytes_up": {}, "bytes_down": {}, "selected": {}, "loss": {},
                               "left_out": {}, "node_errors": {}}
        left = rec["left_out"]

        # Steps 1-2 on every connected node; who is who comes with the replies.
        nodes = [n for n in transport.nodes() if n not in refused]
        first = len(history) == 1  # round 0 still lacks the clients' own evaluation
        request = RecordDict({"task": _task(round=r, **{"evaluate-before": first})})
        replies = transport.ask({n: ("train", request) for n in nodes}, timeout, f"{r}.local")
        outs = local_phase(replies, nodes, cfg, public_fp, len(server.public), refused, left, rec, known)
        if first:
            history[0]["eval"].update({m.name: dict(rep.metric_records["eval-before"])
                                       for m, _, rep in outs.values() if "eval-before" in rep.metric_records})
        _need(len(outs), cfg, r, "local", left)

        # Steps 4-7, the clients in the config's order.
        order = sorted(outs)
        server_out, info = server_step(server, server_out, [outs[p][0].peer() for p in order],
                                       [outs[p][1] for p in order], cfg, r)
        rec["selected"][server.name] = info["selected"]
        rec["loss"][f"{server.name}/public"] = info["logs"][-1]["loss"] if info["logs"] else None

        # Steps 8-11.
        evaluate = r % cfg.fedmkt.eval_every == 0 or r == cfg.fedmkt.rounds
        payload = wire.to_array_record(wire.encode(server_out, server.vocab_size), f.chunk_bytes)
        request = RecordDict({
            "task": _task(round=r, evaluate=evaluate and not cfg.fedmkt.fedavg, **{"send-adapter": cfg.fedmkt.fedavg}),
            "server": ConfigRecord({"name": server.name, "vocab-size": server.vocab_size, "fingerprint": server.fingerprint}),
            "server-positions": ArrayRecord({"positions": Array(np.asarray(server.positions(), dtype=np.int64))}),
            "payload": payload})
        requests = {outs[p][0].node: ("train.update", request) for p in order}
        replies = transport.ask(requests, timeout, f"{r}.update")
        done: dict[int, Any] = {}
        evals: dict[str, dict[str, float]] = {}
        for p in order:
            m = outs[p][0]
            rep = replies.get(m.node)
            problem = reply_problem(rep, timeout)
            if problem:
                left[m.name] = problem
                log(f"round {r}: client '{m.name}' left out of the update ({problem})")
                continue
            try:
                selected, loss = dict(rep.metric_records["selected"]), dict(rep.metric_records["metrics"]).get("loss.public")
                ev = dict(rep.metric_records["eval"]) if "eval" in rep.metric_records else None
            except (KeyError, TypeError, AttributeError) as e:
                left[m.name] = f"malformed update reply: {e!r}"
                log(f"round {r}: client '{m.name}' left out of the update ({left[m.name]})")
                continue
            done[p] = rep
            rec["bytes_down"][m.name] = wire.record_nbytes(payload)
            rec["selected"][m.name] = selected
            rec["loss"][f"{m.name}/public"] = loss
            if ev is not None:
                evals[m.name] = ev
        _need(len(done), cfg, r, "update", left)

        if cfg.fedmkt.fedavg:
            evals.update(_fedavg(transport, cfg, r, {p: (outs[p][0], rep) for p, rep in done.items()}, evaluate, left))
        if evaluate:
            rec["eval"] = {server.name: evaluate_party(server, test_rows, cfg), **evals}
        rec["clients"] = [outs[p][0].name for p in done if outs[p][0].name not in left]
        if not rec["node_errors"]:
            del rec["node_errors"]
        rec["seconds"] = time.time() - t0
        history.append(rec)
        _save_round(ckpt, r, [server], server_out, history)
        log(f"fedmkt-flower round {r}/{cfg.fedmkt.rounds}: {rec['seconds']:.0f} s, clients {rec['clients']}"
            + (f", left out {left}" if left else "")
            + f", up {sum(rec['bytes_up'].values()) / 1e6:.2f} MB, down {sum(rec['bytes_down'].values()) / 1e6:.2f} MB")
    metrics = {"transport": "flower", "rounds": history, "seconds": time.time() - t_start,
               "bytes_per_round": [{"round": h["round"], "up": sum(h["bytes_up"].values()),
                                    "down": sum(h["bytes_down"].values())} for h in history if "bytes_up" in h],
               "left_out": {str(h["round"]): h["left_out"] for h in history if h.get("left_out")}}
    write_json(out_dir / "metrics.json", metrics)
    _write_report(out_dir, cfg, metrics)
    log(f"fedmkt-flower done in {metrics['seconds']:.0f} s; run folder {out_dir}")
    return metrics


def _fedavg(transport: Transport, cfg: FedMKTConfig, r: int, done: dict[int, tuple[Member, Any]], evaluate: bool,
            left: dict[str, str]) -> dict[str, dict[str, float]]:
    """FedAvg of the adapters the clients sent with their update replies, sent back to them."""
    import torch
    from flwr.app import Array, ArrayRecord, RecordDict

    from kdflow.federated.fedmkt import average_adapters
    from kdflow.federated.flower_client import read_adapter

    first = next(iter(done.values()))[1].array_records["adapter"]
    reference = {k: torch.from_numpy(first[k].numpy()) for k in first.keys()}
    states, sizes, members = [], [], []
    for p, (m, rep) in done.items():
        try:
            states.append({k: torch.from_numpy(v) for k, v in read_adapter(rep.array_records["adapter"], reference, m.name).items()})
            sizes.append(int(dict(rep.metric_records["metrics"])["private_rows"]))
            members.append(m)
        except (wire.PayloadError, KeyError) as e:
            left[m.name] = f"adapter rejected: {e}"
    _need(len(states), cfg, r, "fedavg", left)
    avg = ArrayRecord({k: Array(v.numpy()) for k, v in average_adapters(states, sizes).items()})
    replies = transport.ask({m.node: ("train.fedavg", RecordDict({"task": _task(round=r, evaluate=evaluate), "adapter": avg}))
                             for m in members}, cfg.flower.reply_timeout, f"{r}.fedavg")
    evals = {}
    for m in members:
        rep = replies.get(m.node)
        problem = reply_problem(rep, cfg.flower.reply_timeout)
        if problem:
            left[m.name] = problem
        elif "eval" in rep.metric_records:
            evals[m.name] = dict(rep.metric_records["eval"])
    return evals


def _write_report(out: Path, cfg: FedMKTConfig, metrics: dict[str, Any]) -> None:
    from kdflow.federated.simulation import _plots, _table
    from kdflow.report import write_atomic

    names = [cfg.server.name] + [c.name for c in cfg.clients]
    last = next((h["eval"] for h in reversed(metrics["rounds"]) if "eval" in h), {})
    table = {"FedMKT (Flower)": last, "zero-shot": metrics["rounds"][0]["eval"]}
    f = cfg.fedmkt
    lines = ["# kdflow fedmkt-flower", "",
             f"- server `{cfg.server.name}`, clients " + ", ".join(f"`{c.name}`" for c in cfg.clients),
             f"- {f.rounds} rounds, top-k {f.top_k}, selection `{f.selection}`; min clients {cfg.flower.min_clients}, "
             f"reply timeout {cfg.flower.reply_timeout:g} s",
             f"- wall time {metrics['seconds']:.0f} s", "",
             "## Rouge-L on the test split", "", _table(table, names, "rougeL"), "",
             "## Answer NLL on the test split", "", _table(table, names, "answer_nll"), "",
             "## Per round", "", "| round | clients | left out | client→server bytes | server→clients bytes | seconds |",
             "|---:|---|---|---:|---:|---:|"]
    for h in metrics["rounds"][1:]:
        lines.append(f"| {h['round']} | {', '.join(h['clients'])} | "
                     + ("; ".join(f"{k}: {v}" for k, v in h["left_out"].items()) or "—")
                     + f" | {sum(h['bytes_up'].values()):,} | {sum(h['bytes_down'].values()):,} | {h['seconds']:.0f} |")
    _plots(out, metrics["rounds"], names)
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
