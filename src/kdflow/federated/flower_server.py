"""The server side of FedMKT over Flower: the in-process round, with the clients behind a transport.

`run_server` is `simulation.run_rounds` with each client step replaced by a request to the client's
node and a wait for its reply (`Transport.ask`; `flower_app.GridTransport` sends Flower messages,
tests plug in a local one). Per round:

  local       every connected node: `client_local_step` -> payload, with who the node is (its
              partition, tokenizer, answer positions), all validated here on receipt
  server      `server_step` on the clients that replied, in the config's client order
  update      those clients: `client_update_step` on the server's payload (+ evaluation)
  fedavg      (homogeneous, fedmkt.fedavg) the clients' adapters averaged and sent back

Every reply goes through one check per phase (`check_local`, `check_update`, `check_fedavg`, run by
`checked`), against the server's own facts (`Facts`: its vocabulary, tokenizer and tokenization of
the public set), never the sender's claims; its size is checked before anything in it is read. A
client that fails, sends a malformed or inconsistent reply, speaks for another client, or does not
reply within flower.reply_timeout is left out of the rest of the round (`leave_out`: logged, and
recorded under `left_out` in metrics.json); the round goes on while at least flower.min_clients
clients remain. A left-out client keeps its state on disk and rejoins the next round from there,
also from a new node (a restarted SuperNode gets a new node id; it is recognised by its
partition-id, unless the node that held that client claims it too).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
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
class Facts:
    """What the server knows itself, against which every reply is checked (never the sender's claims):
    a client's ids must fit the vocabulary of its tokenizer and its answer positions must be that
    tokenizer's tokenization of the public set — the server's own, or (a client with another
    tokenizer) the one the server computed itself with the client's tokenizer (`party`, a
    `fedmkt.remote_party`). `tokenizers` holds the clients' tokenizers received so far."""

    server: str
    public_fp: str
    vocab_size: int
    fingerprint: str
    positions: list[int]
    party: Any = None
    tokenizers: "TokenizerBook | None" = None


class TokenizerBook:
    """The server's copies of its clients' tokenizers (received once each, by fingerprint), with the
    facts every reply from a client using one of them is checked against."""

    def __init__(self, cfg: FedMKTConfig, public_rows: Any):
        self.cfg, self.public_rows = cfg, public_rows
        self.facts: dict[str, Facts] = {}
        self.received: dict[str, int] = {}  # client name -> bytes of the tokenizer it sent

    def known(self) -> list[str]:
        return sorted(self.facts)

    def facts_for(self, reply: Any, m: "Member", server: Facts) -> Facts:
        from kdflow.federated.fedmkt import remote_party
        from kdflow.federated.tokenizers import read_tokenizer
        from kdflow.models import tokenizer_fingerprint

        fp = dict(reply.config_records["client"]).get("fingerprint")
        if not isinstance(fp, str):
            raise BadReply(f"client '{m.name}' sent no tokenizer fingerprint")
        if fp not in self.facts:
            if "tokenizer" not in reply.array_records:
                raise BadReply(f"client '{m.name}' uses another tokenizer than the server (fingerprint {fp[:40]}) "
                               "but sent none")
            record = reply.array_records["tokenizer"]
            tok = read_tokenizer(record, f"client '{m.name}'", fp)
            party = remote_party(m.name, tok, self.public_rows, self.cfg.data)
            self.facts[tokenizer_fingerprint(tok)] = Facts(server.server, server.public_fp, len(tok), fp,
                                                           party.positions(), party, self)
            self.received[m.name] = wire.record_nbytes(record)
            log(f"client '{m.name}': tokenizer received ({len(tok)} tokens, {self.received[m.name]} bytes)")
        return self.facts[fp]


@dataclass
class Member:
    """A client as the server knows it: the node it answers from and the slot (partition) it holds."""

    node: int
    partition: int
    name: str
    facts: Facts

    def peer(self) -> Any:
        from dataclasses import replace

        from kdflow.federated.fedmkt import Peer

        if self.facts.party is not None:  # another tokenizer: the server's copy of it, under this client's name
            return replace(self.facts.party, name=self.name)
        return Peer(self.name, self.facts.vocab_size, self.facts.fingerprint)


class BadReply(Exception):
    """A reply the server cannot use; its client is left out of the round with this reason."""


def log(text: str) -> None:
    print(f"[kdflow] {text}", flush=True)


# ----------------------------------------------------------------------------------------------
# Pure pieces (tested with mock and forged replies). Every reply goes through `checked`, and every
# problem ends in `leave_out` (a client) or `refused` (a node that is no client of this run).

REASON_CHARS = 300  # a client's own failure text is kept to this length in logs and metrics.json
EVAL_KEYS = ("answer_nll", "perplexity", "rougeL", "exact_match")


def reply_problem(reply: Any, timeout: float) -> str | None:
    if reply is None:
        return f"no reply within {timeout:g} s"
    if isinstance(reply, str):
        return reply[:REASON_CHARS]
    return None


def identify(reply: Any, cfg: FedMKTConfig) -> tuple[int, str]:
    """(partition, name) a reply says it comes from; BadReply unless it is a client of this config."""
    c = dict(reply.config_records["client"])
    pid = c.get("partition-id")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < len(cfg.clients):
        raise BadReply(f"partition-id {pid!r} is not a client of this config (0..{len(cfg.clients) - 1})")
    name = cfg.clients[pid].name
    if c.get("name") != name:
        raise BadReply(f"partition {pid} is client '{name}' in the config but the node says '{str(c.get('name'))[:60]}'")
    return pid, name


def _same_client(reply: Any, m: Member) -> None:
    """A reply to a request sent to `m`'s node must speak for `m`: no claiming another client's slot."""
    c = dict(reply.config_records["client"])
    if c.get("partition-id") != m.partition or c.get("name") != m.name:
        raise BadReply(f"the reply from client '{m.name}' (partition {m.partition}) says it is "
                       f"'{str(c.get('name'))[:60]}' (partition {c.get('partition-id')!r})")


def _size(reply: Any, cfg: FedMKTConfig) -> None:
    size = wire.record_bytes(reply)
    if size > cfg.flower.max_payload_bytes:
        raise BadReply(f"the reply carries {size} bytes, over flower.max_payload_bytes={cfg.flower.max_payload_bytes}")


def _number(record: Any, key: str, lo: float = -math.inf, hi: float = math.inf, integer: bool = False,
            required: bool = True) -> float | None:
    v = dict(record).get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi \
            or (integer and v != int(v)):
        kind = "an integer" if integer else "a finite number"
        raise BadReply(f"'{key}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}"[:REASON_CHARS])
    return int(v) if integer else float(v)


def _eval_record(reply: Any, key: str) -> dict[str, float] | None:
    """An evaluation record (`eval`, `eval-before`), if any: the report's metrics, finite and in range."""
    if key not in reply.metric_records:
        return None
    record = reply.metric_records[key]
    unknown = sorted(k for k in record.keys() if k not in EVAL_KEYS)
    if unknown:
        raise BadReply(f"'{key}' has unexpected metrics {unknown[:3]}"[:REASON_CHARS])
    out = {k: _number(record, k, 0.0, 1.0 if k in ("rougeL", "exact_match") else math.inf, required=k != "perplexity")
           for k in EVAL_KEYS}
    return {k: v for k, v in out.items() if v is not None}


def check_local(reply: Any, m: Member, cfg: FedMKTConfig) -> dict[str, Any]:
    """A local-step reply from client `m`: its public set and tokenizer must be the server's, its
    payload must fit the server's vocabulary and answer positions."""
    f = m.facts
    _size(reply, cfg)
    c = dict(reply.config_records["client"])
    if c.get("public") != f.public_fp:
        raise BadReply(f"client '{m.name}' holds a different public set (fingerprint {str(c.get('public'))[:40]}, "
                       f"expected {f.public_fp}): every party needs the same data.train and data settings")
    if c.get("fingerprint") != f.fingerprint and f.tokenizers is not None:
        f = m.facts = f.tokenizers.facts_for(reply, m, f)
    if c.get("fingerprint") != f.fingerprint or c.get("vocab-size") != f.vocab_size:
        raise BadReply(f"client '{m.name}' uses another tokenizer than the server ({c.get('vocab-size')!r} tokens, "
                       f"fingerprint {str(c.get('fingerprint'))[:40]}) than the one the server checks it against "
                       f"({f.vocab_size} tokens, fingerprint {f.fingerprint[:40]})")
    positions = wire.read_array(reply.array_records["positions"]["positions"], f"answer positions from '{m.name}'",
                                ("int64",), (len(f.positions),))
    if positions.tolist() != f.positions:
        n = int(np.argmax(positions != np.asarray(f.positions)))
        raise BadReply(f"client '{m.name}' counts {int(positions[n])} answer positions in public sample {n} where the "
                       f"server's tokenization has {f.positions[n]}: the parties do not share the public set or the "
                       "data settings")
    out = wire.from_array_record(reply.array_records["payload"], sender=m.name, vocab_size=f.vocab_size,
                                 k=cfg.fedmkt.top_k, positions=f.positions, max_bytes=cfg.flower.max_payload_bytes,
                                 finite_support=cfg.fedmkt.divergence == "rkl", logp_format=cfg.fedmkt.wire_logprobs)
    metrics = reply.metric_records["metrics"]
    return {"payload": out, "loss": _number(metrics, "loss.private", 0.0, required=False),
            "eval-before": _eval_record(reply, "eval-before"),
            "needs-server-tokenizer": f.party is not None and c.get("has-server-tokenizer") is not True}


def check_update(reply: Any, m: Member, cfg: FedMKTConfig) -> dict[str, Any]:
    """An update reply from client `m`: who it is, its selection shares and loss, evaluation, and for
    FedAvg its adapter and private row count (the adapter's layout is compared across clients later)."""
    _size(reply, cfg)
    _same_client(reply, m)
    metrics = reply.metric_records["metrics"]
    sel = reply.metric_records["selected"]
    unknown = sorted(k for k in sel.keys() if k not in ("skipped", "own", m.facts.server))
    if unknown:
        raise BadReply(f"'selected' names {unknown[:3]}, expected skipped, own, {m.facts.server}")
    out = {"loss": _number(metrics, "loss.public", 0.0, required=False),
           "final": dict(reply.config_records["client"]).get("final") is True,
           "selected": {k: _number(sel, k, 0.0, 1.0) for k in sel.keys()}, "eval": _eval_record(reply, "eval")}
    if cfg.fedmkt.fedavg:
        from kdflow.federated.flower_client import adapter_layout

        # FedAvg weighs each adapter by its client's private rows: a count below 1 (or not a count)
        # would make the weights meaningless or sum to 0.
        out["private_rows"] = _number(metrics, "private_rows", 1, integer=True)
        out["adapter"] = reply.array_records["adapter"]
        out["layout"] = adapter_layout(out["adapter"])
    return out


def check_fedavg(reply: Any, m: Member, cfg: FedMKTConfig) -> dict[str, Any]:
    _size(reply, cfg)
    _same_client(reply, m)
    return {"eval": _eval_record(reply, "eval"), "final": dict(reply.config_records["client"]).get("final") is True}


def checked(check: Any, reply: Any, m: Member, cfg: FedMKTConfig) -> dict[str, Any]:
    """`check(reply, m, cfg)` with any failure to read the reply (a missing record, a wrong type, a
    malformed payload) turned into BadReply: nothing a client sends can stop the server."""
    try:
        return check(reply, m, cfg)
    except BadReply:
        raise
    except wire.PayloadError as e:
        raise BadReply(f"payload rejected: {e}"[:REASON_CHARS]) from None
    except KeyError as e:
        raise BadReply(f"malformed reply: no {e} record") from None
    except (TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise BadReply(f"malformed reply: {type(e).__name__}: {e}"[:REASON_CHARS]) from None


def leave_out(left: dict[str, str], name: str, reason: str, r: int, phase: str) -> None:
    left[name] = reason
    log(f"round {r}: client '{name}' left out of the {phase} phase ({reason})")


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


def local_phase(replies: dict[int, Any], nodes: list[int], cfg: FedMKTConfig, facts: Facts,
                refused: dict[int, str], left: dict[str, str], rec: dict[str, Any],
                known: dict[int, Member] | None = None) -> dict[int, tuple[Member, dict[str, Any]]]:
    """partition -> (member, checked reply) from the local-step replies, in the config's client order;
    everything else ends in `left` (a configured client) or `refused` (a node that is no client of
    this run, or claims a slot another node holds; it is not asked again).

    `known` maps nodes to the clients they were accepted as (across rounds). A node keeps its client:
    a reply claiming another one is refused. When two nodes claim one client, the node that held it
    before keeps it (a restarted SuperNode, with a new node id, takes it over only from a holder that
    did not claim it this round); otherwise the lowest node id does.
    """
    known = {} if known is None else known
    r, timeout = rec["round"], cfg.flower.reply_timeout
    claims: dict[int, list[int]] = {}
    for node in nodes:
        rep = replies.get(node)
        problem = reply_problem(rep, timeout)
        if problem:
            if node in known:
                leave_out(left, known[node].name, problem, r, "local")
            else:
                rec["node_errors"][str(node)] = problem
                log(f"round {r}: node {node}: {problem}")
            continue
        try:
            pid, name = identify(rep, cfg)
        except (BadReply, KeyError, TypeError, ValueError, AttributeError) as e:
            refused[node] = str(e)[:REASON_CHARS]
            log(f"node {node} refused: {refused[node]}")
            continue
        if node in known and known[node].partition != pid:
            refused[node] = f"node {node} answered as client '{known[node].name}' before and now claims '{name}'"
            leave_out(left, known[node].name, refused[node], r, "local")
            continue
        claims.setdefault(pid, []).append(node)
    got: dict[int, tuple[Member, dict[str, Any]]] = {}
    for pid, claimants in sorted(claims.items()):
        name = cfg.clients[pid].name
        holders = [n for n in claimants if n in known]
        node = holders[0] if holders else claimants[0]
        for other in claimants:
            if other != node:
                refused[other] = f"claims client '{name}', which node {node} holds"
                log(f"round {r}: node {other} refused: {refused[other]}")
        m = Member(node, pid, name, facts)
        known[node] = m
        try:
            content = checked(check_local, replies[node], m, cfg)
        except BadReply as e:
            leave_out(left, name, str(e), r, "local")
            continue
        got[pid] = (m, content)
        left.pop(name, None)  # its earlier node failed this round, but its new node answered
        rec["bytes_up"][name] = wire.record_nbytes(replies[node].array_records["payload"])
        if "tokenizer" in replies[node].array_records:
            rec.setdefault("bytes_tokenizer_up", {})[name] = wire.record_nbytes(replies[node].array_records["tokenizer"])
        rec["loss"][f"{name}/private"] = content["loss"]
    errors = "; ".join(f"node {n}: {e}" for n, e in rec["node_errors"].items())
    for pid, spec in enumerate(cfg.clients):
        if pid not in got and spec.name not in left:
            left[spec.name] = "no reply" + (f" (unidentified {errors})" if errors else "")
    return dict(sorted(got.items()))


def update_phase(replies: dict[int, Any], members: list[Member], cfg: FedMKTConfig, left: dict[str, str],
                 r: int) -> dict[int, tuple[Member, dict[str, Any]]]:
    """partition -> (member, checked reply) for the update replies; the others are left out."""
    done = {}
    for m in members:
        rep = replies.get(m.node)
        problem = reply_problem(rep, cfg.flower.reply_timeout)
        try:
            if problem:
                raise BadReply(problem)
            done[m.partition] = (m, checked(check_update, rep, m, cfg))
        except BadReply as e:
            leave_out(left, m.name, str(e), r, "update")
    return done


def majority_layout(done: dict[int, tuple[Member, dict[str, Any]]]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The adapter layout (names, dtypes, shapes) most clients sent; ties go to the lower partition.
    Homogeneous clients (checked at config time) all send one layout, so a client whose adapter
    differs is the odd one out, and cannot make the others' adapters be refused by replying first."""
    layouts = [content["layout"] for _, content in done.values()]
    return max(layouts, key=lambda lay: (sum(lay == other for other in layouts), -layouts.index(lay)))


def _task(**values: Any) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord(values)


def _need(got: int, cfg: FedMKTConfig, r: int, phase: str, left_out: dict[str, str]) -> None:
    if got < cfg.flower.min_clients:
        why = "; ".join(f"{k}: {v}" for k, v in left_out.items())
        raise FlowerRunError(f"round {r} ({phase}): {got} of {len(cfg.clients)} clients remain, fewer than "
                             f"flower.min_clients={cfg.flower.min_clients} ({why})")


@dataclass
class Session:
    """What every set of rounds of one Flower run shares (FedMKT, then the LLM2SLM baseline): the
    transport, the server's own facts and base model, and which node holds which client."""

    transport: Transport
    cfg: FedMKTConfig
    out_dir: Path
    base: Any
    tok: Any
    public_rows: Any
    test_rows: Any
    facts: Facts
    book: TokenizerBook
    bridges: Any
    refused: dict[int, str]  # nodes that are no client of this run
    known: dict[int, Member]  # node -> the client it was accepted as
    server_tokenizer: Any = None  # its files as a record, built when a client with another tokenizer first needs them

    def fresh_server(self) -> Any:
        """The server with a new adapter, as `World.server()` makes it in-process."""
        from kdflow.data import encode_rows
        from kdflow.federated.fedmkt import make_party

        server = make_party(self.cfg.server, self.base, self.tok, self.cfg.seed)
        server.public = encode_rows(self.public_rows, self.tok, self.cfg.data)
        server.public_rows = self.public_rows
        return server


def run_server(transport: Transport, cfg: FedMKTConfig) -> dict[str, Any]:
    """The FedMKT rounds over `transport`, then the baselines that need no pooled private data;
    writes the run folder and returns the metrics."""
    from kdflow.data import partition_rows, read_rows, rows_fingerprint
    from kdflow.federated.fedmkt import Bridges, base_location, check_config, load_base, save_final
    from kdflow.report import write_json
    from kdflow.training import setup_run

    if not cfg.clients:
        raise FlowerRunError("fedmkt needs at least one client under `clients:`")
    check_config(cfg, baselines=False)
    if cfg.flower.min_clients > len(cfg.clients):
        raise FlowerRunError(f"flower.min_clients={cfg.flower.min_clients} exceeds the {len(cfg.clients)} clients")
    out_dir = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads)
    t_start = time.time()
    skipped = [b for b in cfg.baselines if b in POOLED_BASELINES]
    if skipped:
        log(f"baselines {skipped} are not run over Flower (they need the parties' private data in one place, or "
            "fedavg: set fedmkt.fedavg for the protocol); `kdflow fedmkt` runs them from the same config")
    rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
    public_rows, _ = partition_rows(rows, cfg.data.public_rows, len(cfg.clients), cfg.data.private_rows,
                                    cfg.data.partition, cfg.data.partition_field, cfg.data.dirichlet_alpha, cfg.seed)
    test_rows = read_rows(cfg.data.test, "data.test").head(cfg.eval.max_rows)
    base, tok = load_base(cfg.server, {}, seed=cfg.seed, data=cfg.data, public_rows=public_rows)
    book = TokenizerBook(cfg, public_rows)
    run = Session(transport, cfg, out_dir, base, tok, public_rows, test_rows, None, book, Bridges(cfg.data, cfg.align),
                  {}, {})
    server = run.fresh_server()
    run.facts = Facts(server.name, rows_fingerprint(public_rows), server.vocab_size, server.fingerprint,
                      server.positions(), tokenizers=book)
    wait_for_nodes(transport, cfg)
    t_rounds = time.time()
    history, final_clients = run_rounds(run, server, out_dir / "rounds", "fedmkt")
    fedmkt_seconds = time.time() - t_rounds

    finals: dict[str, Any] = {server.name: save_final(server, base_location(cfg.server, cfg.data, public_rows),
                                                      out_dir / "final" / server.name, cfg.fedmkt.save_merged)}
    for name in final_clients:
        finals[name] = {"node": f"on client '{name}'s own node, in <state-dir>/final/ (node config state-dir; default "
                                f"{Path(cfg.flower.state_dir or Path(cfg.output_dir) / 'flower-clients') / name}/final)"}
    last = next((h["eval"] for h in reversed(history) if "eval" in h), {})
    table: dict[str, dict[str, dict[str, float]]] = {"FedMKT (Flower)": last}
    baselines: dict[str, Any] = {}
    for b in cfg.baselines:
        if b == "zero_shot":
            table["zero-shot"] = history[0]["eval"]
        elif b not in POOLED_BASELINES:
            log(f"baseline {b} over Flower")
            t0 = time.time()
            table[b], info = run_baseline(run, b)
            baselines[b] = {**info, "seconds": time.time() - t0}
    metrics = {"transport": "flower", "rounds": history, "seconds": time.time() - t_start,
               "fedmkt_seconds": fedmkt_seconds, "final_models": finals, "table": table, "baselines": baselines,
               "baselines_not_run": skipped,
               "refused_nodes": {str(n): why for n, why in run.refused.items()},
               "bytes_per_round": [{"round": h["round"], "up": sum(h["bytes_up"].values()),
                                    "down": sum(h["bytes_down"].values())} for h in history if "bytes_up" in h],
               "left_out": {str(h["round"]): h["left_out"] for h in history if h.get("left_out")}}
    write_json(out_dir / "metrics.json", metrics)
    _write_report(out_dir, cfg, metrics)
    log(f"fedmkt-flower done in {metrics['seconds']:.0f} s; run folder {out_dir}")
    return metrics


# Baselines that need the parties' private data in one place (or, fedavg, a protocol of its own).
POOLED_BASELINES = ("centralized", "private_public", "fedavg")


def run_rounds(run: Session, server: Any, ckpt: Path, label: str, train_server: bool = True,
               average: bool | None = None) -> tuple[list[dict], list[str]]:
    """FedMKT's rounds over the transport (label "fedmkt"), or LLM2SLM's (train_server=False, no
    FedAvg: the server only teaches), resumed from `ckpt`. Returns the per-round history and the
    clients that wrote their final model. A baseline's messages carry its label: the clients keep its
    state apart from FedMKT's and write no final model."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from kdflow.federated.fedmkt import public_outputs, server_step
    from kdflow.federated.simulation import _load_round, _save_round, evaluate_party
    from kdflow.federated.tokenizers import tokenizer_record

    cfg, transport, facts, book = run.cfg, run.transport, run.facts, run.book
    avg = cfg.fedmkt.fedavg if average is None else average
    checks = cfg if avg == cfg.fedmkt.fedavg else replace(cfg, fedmkt=replace(cfg.fedmkt, fedavg=avg))
    suffix = "" if label == "fedmkt" else f".{label}"
    ckpt.mkdir(parents=True, exist_ok=True)
    start, server_out, history = _load_round(ckpt, [server], cfg)
    if start:
        log(f"fedmkt-flower {label}: resuming after round {start}")
    if server_out is None:
        server_out = public_outputs(server, cfg.fedmkt.top_k, cfg.fedmkt.temperature, cfg.eval.batch_size)
    server_record = {"name": server.name, "vocab-size": server.vocab_size, "fingerprint": server.fingerprint}
    if not history:
        # FedMKT's round 0 is the zero-shot evaluation (the clients add theirs with their first reply);
        # a baseline reports its last round only.
        history.append({"round": 0, "eval": {server.name: evaluate_party(server, run.test_rows, cfg)}
                        if label == "fedmkt" else {}})
    f, timeout = cfg.flower, cfg.flower.reply_timeout
    final_clients: list[str] = []  # clients that said they wrote their final model (after the last round)
    refused, known = run.refused, run.known
    for r in range(start + 1, cfg.fedmkt.rounds + 1):
        t0 = time.time()
        rec: dict[str, Any] = {"round": r, "bytes_up": {}, "bytes_down": {}, "selected": {}, "loss": {},
                               "left_out": {}, "node_errors": {}}
        left = rec["left_out"]

        # Steps 1-2 on every connected node; who is who comes with the replies.
        nodes = [n for n in transport.nodes() if n not in refused]
        rec["nodes"] = len(nodes)
        first = label == "fedmkt" and len(history) == 1  # round 0 still lacks the clients' own evaluation
        request = RecordDict({"task": _task(round=r, run=label, **{"evaluate-before": first}),
                              "server": ConfigRecord({**server_record, "known-tokenizers": " ".join(book.known())})})
        replies = transport.ask({n: ("train", request) for n in nodes}, timeout, f"{r}.local{suffix}")
        outs = local_phase(replies, nodes, cfg, facts, refused, left, rec, known)
        if first:
            history[0]["eval"].update({m.name: c["eval-before"] for m, c in outs.values() if c["eval-before"] is not None})
        _need(len(outs), cfg, r, "local", left)

        # Steps 4-7, the clients in the config's order.
        order = sorted(outs)
        server_out, info = server_step(server, server_out, [outs[p][0].peer() for p in order],
                                       [outs[p][1]["payload"] for p in order], cfg, r, train_server=train_server,
                                       bridges=run.bridges)
        if train_server:
            rec["selected"][server.name] = info["selected"]
            rec["loss"][f"{server.name}/public"] = info["logs"][-1]["loss"] if info["logs"] else None

        # Steps 8-11.
        evaluate = r % cfg.fedmkt.eval_every == 0 or r == cfg.fedmkt.rounds
        payload = wire.to_array_record(wire.encode(server_out, server.vocab_size, cfg.fedmkt.wire_logprobs), f.chunk_bytes)
        parts = {
            "task": _task(round=r, run=label, evaluate=evaluate and not avg, **{"send-adapter": avg}),
            "server": ConfigRecord(server_record),
            "server-positions": ArrayRecord({"positions": Array(np.asarray(server.positions(), dtype=np.int64))}),
            "payload": payload}
        requests = {}
        for p in order:
            m, content = outs[p]
            if content["needs-server-tokenizer"]:  # once per client: it keeps the server's tokenizer
                if run.server_tokenizer is None:
                    run.server_tokenizer = tokenizer_record(server.tok)
                requests[m.node] = ("train.update", RecordDict({**parts, "server-tokenizer": run.server_tokenizer}))
                rec.setdefault("bytes_tokenizer_down", {})[m.name] = wire.record_nbytes(run.server_tokenizer)
            else:
                requests[m.node] = ("train.update", RecordDict(parts))
        replies = transport.ask(requests, timeout, f"{r}.update{suffix}")
        done = update_phase(replies, [outs[p][0] for p in order], checks, left, r)
        evals: dict[str, dict[str, float]] = {}
        for m, c in done.values():
            rec["bytes_down"][m.name] = wire.record_nbytes(payload)
            rec["selected"][m.name] = c["selected"]
            rec["loss"][f"{m.name}/public"] = c["loss"]
            if c["final"]:
                final_clients.append(m.name)
            if c["eval"] is not None:
                evals[m.name] = c["eval"]
        _need(len(done), cfg, r, "update", left)

        if avg:
            evals.update(_fedavg(transport, cfg, r, done, evaluate, left, final_clients))
        if evaluate:
            rec["eval"] = {server.name: evaluate_party(server, run.test_rows, cfg), **evals}
        rec["clients"] = [m.name for m, _ in done.values() if m.name not in left]
        if not rec["node_errors"]:
            del rec["node_errors"]
        rec["seconds"] = time.time() - t0
        history.append(rec)
        _save_round(ckpt, r, [server], server_out, history)
        log(f"fedmkt-flower {label} round {r}/{cfg.fedmkt.rounds}: {rec['seconds']:.0f} s, clients {rec['clients']}"
            + (f", left out {left}" if left else "")
            + f", up {sum(rec['bytes_up'].values()) / 1e6:.2f} MB, down {sum(rec['bytes_down'].values()) / 1e6:.2f} MB")
    return history, final_clients


def run_baseline(run: Session, name: str) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """(metrics per party, what else the report shows) of one baseline that needs no pooled private
    data, as `simulation.run_baseline` computes it in-process: `public_only` on the server alone,
    `standalone` on each client's node (its own private rows), `llm2slm` as rounds in which the server
    only teaches. Cached in <output_dir>/baselines/<name>.json (llm2slm also resumes from its rounds)."""
    import json

    from kdflow.config import to_dict
    from kdflow.data import rows_fingerprint
    from kdflow.federated.fedmkt import train_baseline
    from kdflow.federated.simulation import evaluate_party
    from kdflow.report import write_json

    cfg = run.cfg
    path = run.out_dir / "baselines" / f"{name}.json"
    key = {"config": to_dict(replace(cfg, flower=type(cfg.flower)(), output_dir="")),
           "data": rows_fingerprint(run.public_rows)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["metrics"], saved.get("info", {})
    info: dict[str, Any] = {}
    if name == "public_only":
        server = run.fresh_server()
        train_baseline(server, list(server.public), cfg, "server")
        metrics = {server.name: evaluate_party(server, run.test_rows, cfg)}
    elif name == "standalone":
        metrics, info["left_out"] = standalone(run)
    elif name == "llm2slm":
        history, _ = run_rounds(run, run.fresh_server(), run.out_dir / "baselines" / "llm2slm" / "rounds", "llm2slm",
                                train_server=False, average=False)
        metrics = history[-1]["eval"]
        info["left_out"] = {str(h["round"]): h["left_out"] for h in history if h.get("left_out")}
    else:
        raise FlowerRunError(f"baseline '{name}' cannot run over Flower")
    write_json(path, {"key": key, "metrics": metrics, "info": info})
    return metrics, info


def standalone(run: Session) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Each client trains a fresh adapter on its own private rows alone (the epochs FedMKT gives its
    private phases over all rounds) on its own node, and reports its evaluation: (client -> metrics,
    client -> why it has none)."""
    cfg, timeout = run.cfg, run.cfg.flower.reply_timeout
    nodes = [n for n in run.transport.nodes() if n not in run.refused]
    from flwr.app import RecordDict

    request = RecordDict({"task": _task(baseline="standalone", round=0)})
    replies = run.transport.ask({n: ("train.baseline", request) for n in nodes}, timeout, "0.standalone")
    got: dict[str, dict[str, float]] = {}
    why: dict[str, str] = {}
    for node in nodes:
        rep = replies.get(node)
        problem = reply_problem(rep, timeout)
        who = run.known[node].name if node in run.known else f"node {node}"
        try:
            if problem:
                raise BadReply(problem)
            pid, name = checked(lambda rep_, m_, cfg_: (_size(rep_, cfg_), identify(rep_, cfg_))[1], rep, None, cfg)
            if node in run.known and run.known[node].partition != pid:
                raise BadReply(f"node {node} answered as client '{run.known[node].name}' before and now claims '{name}'")
            if name in got:
                raise BadReply(f"client '{name}' already answered from another node")
            ev = checked(lambda rep_, m_, cfg_: _eval_record(rep_, "eval"), rep, None, cfg)
            if ev is None:
                raise BadReply("the reply carries no evaluation")
            got[name] = ev
        except BadReply as e:
            why[who] = str(e)[:REASON_CHARS]
            log(f"baseline standalone: {who}: {why[who]}")
    for spec in cfg.clients:
        if spec.name not in got and spec.name not in why:
            why[spec.name] = "no reply"
    return {c.name: got[c.name] for c in cfg.clients if c.name in got}, why


FAILURE_FILE = "flower-failure.json"


def failure_reason(err: BaseException, cfg: FedMKTConfig) -> str:
    """What a failed run tells its launcher: the server's own error, or (too few clients) the clients
    left out with the generic reasons they sent, each named. The clients' details stay in their logs."""
    if isinstance(err, FlowerRunError):
        return str(err)
    return f"the server '{cfg.server.name}' failed: {type(err).__name__}: {err}"


def serve(transport: Transport, cfg: FedMKTConfig) -> dict[str, Any]:
    """`run_server`; a run that fails leaves its reason in <output_dir>/flower-failure.json, which
    `kdflow fedmkt-flower` prints (Flower itself only reports 'finished:failed')."""
    from kdflow.report import write_json

    try:
        return run_server(transport, cfg)
    except Exception as e:
        reason = failure_reason(e, cfg)
        log(f"fedmkt-flower failed: {reason}")
        try:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            write_json(Path(cfg.output_dir) / FAILURE_FILE, {"reason": reason})
        except OSError as w:
            log(f"could not write {FAILURE_FILE}: {w}")
        raise


def _fedavg(transport: Transport, cfg: FedMKTConfig, r: int, done: dict[int, tuple[Member, dict[str, Any]]],
            evaluate: bool, left: dict[str, str], final_clients: list[str]) -> dict[str, dict[str, float]]:
    """FedAvg of the adapters the clients sent with their update replies, sent back to them."""
    import torch
    from flwr.app import Array, ArrayRecord, RecordDict

    from kdflow.federated.fedmkt import average_adapters
    from kdflow.federated.flower_client import read_adapter

    layout = majority_layout(done)
    states, sizes, members = [], [], []
    for m, c in done.values():
        try:
            if c["layout"] != layout:
                raise BadReply("its adapter's parameters, dtypes or shapes differ from the other clients'")
            arrays = checked(lambda rep, m_, cfg_: read_adapter(rep, layout, m_.name), c["adapter"], m, cfg)
        except BadReply as e:
            leave_out(left, m.name, f"adapter rejected: {e}", r, "fedavg")
            continue
        states.append({k: torch.from_numpy(v) for k, v in arrays.items()})
        sizes.append(c["private_rows"])
        members.append(m)
    _need(len(states), cfg, r, "fedavg", left)
    avg = ArrayRecord({k: Array(v.numpy()) for k, v in average_adapters(states, sizes).items()})
    replies = transport.ask({m.node: ("train.fedavg", RecordDict({"task": _task(round=r, evaluate=evaluate), "adapter": avg}))
                             for m in members}, cfg.flower.reply_timeout, f"{r}.fedavg")
    evals = {}
    for m in members:
        rep = replies.get(m.node)
        problem = reply_problem(rep, cfg.flower.reply_timeout)
        try:
            if problem:
                raise BadReply(problem)
            got = checked(check_fedavg, rep, m, cfg)
        except BadReply as e:
            leave_out(left, m.name, str(e), r, "fedavg")
            continue
        ev = got["eval"]
        if got["final"]:
            final_clients.append(m.name)
        if ev is not None:
            evals[m.name] = ev
    return evals


def _write_report(out: Path, cfg: FedMKTConfig, metrics: dict[str, Any]) -> None:
    from kdflow.federated.simulation import _plots, _table, final_lines
    from kdflow.report import write_atomic

    names = [cfg.server.name] + [c.name for c in cfg.clients]
    table = metrics["table"]
    f = cfg.fedmkt
    lines = ["# kdflow fedmkt-flower", "",
             f"- server `{cfg.server.name}`, clients " + ", ".join(f"`{c.name}`" for c in cfg.clients),
             f"- {f.rounds} rounds, top-k {f.top_k}, selection `{f.selection}`, wire log-probs `{f.wire_logprobs}`; "
             f"min clients {cfg.flower.min_clients}, reply timeout {cfg.flower.reply_timeout:g} s",
             f"- wall time {metrics['seconds']:.0f} s (FedMKT rounds {metrics['fedmkt_seconds']:.0f} s"
             + "".join(f", {b} {v['seconds']:.0f} s" for b, v in metrics["baselines"].items()) + ")", ""]
    if metrics["baselines_not_run"]:
        lines += [f"Left to `kdflow fedmkt` (the same config runs them there): {', '.join(metrics['baselines_not_run'])} "
                  "— they need the parties' private data in one place (fedavg: the fedmkt.fedavg protocol setting).", ""]
    for b, v in metrics["baselines"].items():
        if v.get("left_out"):
            lines += [f"Baseline {b}: without " + "; ".join(f"{k} ({w})" for k, w in v["left_out"].items()), ""]
    lines += ["## Rouge-L on the test split", "", _table(table, names, "rougeL"), "",
              "## Answer NLL on the test split", "", _table(table, names, "answer_nll"), "",
              "## Per round", "", "| round | clients | left out | client→server bytes | server→clients bytes | seconds |",
              "|---:|---|---|---:|---:|---:|"]
    for h in metrics["rounds"][1:]:
        lines.append(f"| {h['round']} | {', '.join(h['clients'])} | "
                     + ("; ".join(f"{k}: {v}" for k, v in h["left_out"].items()) or "—")
                     + f" | {sum(h['bytes_up'].values()):,} | {sum(h['bytes_down'].values()):,} | {h['seconds']:.0f} |")
    lines += ["", "## Final models", ""]
    for name, w in metrics.get("final_models", {}).items():
        lines.append(f"- `{name}`: {w['node']}" if "node" in w else final_lines({name: w})[0])
    _plots(out, metrics["rounds"], names)
    write_atomic(out / "report.md", "\n".join(lines) + "\n")
