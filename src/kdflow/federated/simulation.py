"""`kdflow fedmkt`: FedMKT rounds run in one process, with checkpoints, evaluation, baselines, report.

Each round ends with a checkpoint folder `rounds/round-NNN/` (every party's adapter and optimizer
state, the server's latest public-set outputs, the metrics so far), written atomically; running
the same command again continues after the last complete round. Baselines run after FedMKT from
the same config and are cached under `baselines/`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdflow.config import FedMKTConfig, PartyConfig, to_dict
from kdflow.data import Rows, encode_rows, partition_rows, read_rows, rows_fingerprint
from kdflow.errors import ConfigError
from kdflow import processes
from kdflow.evaluate import evaluate_model
from kdflow.federated import payload as wire
from kdflow.federated.fedmkt import (Bridges, Party, base_location, check_config, client_local_step, client_update_step,
                                     fedavg, final_commands, load_base, load_party_state, make_party, public_outputs,
                                     save_final, save_party_state, send, server_step, train_baseline,
                                     train_phase)
from kdflow.report import atomic_folder, plot_curves, write_atomic, write_json
from kdflow.training import setup_run


# ----------------------------------------------------------------------------------------------
# Set-up


class World:
    """The parties' base models and data, built once; `fresh()` gives new parties with new adapters."""

    def __init__(self, cfg: FedMKTConfig):
        if not cfg.clients:
            raise ConfigError("fedmkt needs at least one client under `clients:`")
        names = [cfg.server.name or "server"] + [c.name for c in cfg.clients]
        if any(not n for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"every party needs a distinct name; got {names}")
        if cfg.data.train is None or cfg.data.test is None:
            raise ConfigError("fedmkt needs data.train (split into public and private parts) and data.test")
        self.cfg = cfg
        rows = read_rows(cfg.data.train, "data.train").head(cfg.data.max_train_rows)
        self.public_rows, self.private_rows = partition_rows(
            rows, cfg.data.public_rows, len(cfg.clients), cfg.data.private_rows, cfg.data.partition,
            cfg.data.partition_field, cfg.data.dirichlet_alpha, cfg.seed)
        self.test_rows = read_rows(cfg.data.test, "data.test").head(cfg.eval.max_rows)
        cache: dict[str, Any] = {}
        self.bases = {}
        for offset, spec in enumerate([cfg.server] + cfg.clients):
            self.bases[spec.name] = load_base(spec, cache, seed=cfg.seed + offset, data=cfg.data,
                                              public_rows=self.public_rows if offset == 0 else None)
        self.setting = self._setting()
        self.bridges = Bridges(cfg.data, cfg.align)
        self.final_models: dict[str, dict[str, str]] = {}

    def _setting(self) -> str:
        from kdflow.models import tokenizer_fingerprint

        if len(self.cfg.clients) == 1:
            return "one_to_one"
        fps = {tokenizer_fingerprint(self.bases[c.name][1]) for c in self.cfg.clients}
        specs = {json.dumps(to_dict(c.model), sort_keys=True) + str(c.prune_from) for c in self.cfg.clients}
        return "homogeneous" if len(fps) == 1 and len(specs) == 1 else "heterogeneous"

    def fresh(self, spec: PartyConfig, offset: int, private: Rows | None) -> Party:
        base, tok = self.bases[spec.name]
        party = make_party(spec, base, tok, self.cfg.seed + offset)
        party.public = encode_rows(self.public_rows, tok, self.cfg.data)
        party.public_rows = self.public_rows
        party.private = encode_rows(private, tok, self.cfg.data) if private is not None else []
        return party

    def server(self) -> Party:
        return self.fresh(self.cfg.server, 0, None)

    def clients(self) -> list[Party]:
        return [self.fresh(spec, i + 1, self.private_rows[i]) for i, spec in enumerate(self.cfg.clients)]


def evaluate_party(p: Party, test_rows: Rows, cfg: FedMKTConfig) -> dict[str, float]:
    res = evaluate_model(p.model, p.tok, test_rows, cfg.data, cfg.eval, progress=False, name=p.name)
    return {k: v for k, v in res.metrics.items() if k in ("answer_nll", "perplexity", "rougeL", "exact_match")}


def evaluate_parties(parties: list[Party], world: World) -> dict[str, dict[str, float]]:
    return {p.name: evaluate_party(p, world.test_rows, world.cfg) for p in parties}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def _save_round(folder: Path, r: int, parties: list[Party], server_out: wire.PublicOutputs, history: list[dict]) -> None:
    with atomic_folder(folder / f"round-{r:03d}") as tmp:
        for p in parties:
            save_party_state(p, tmp)
        np.savez(tmp / "server_outputs.npz", **wire.encode(server_out, parties[0].vocab_size))
        write_json(tmp / "state.json", {"round": r, "history": history})


def _load_round(folder: Path, parties: list[Party], cfg: FedMKTConfig) -> tuple[int, wire.PublicOutputs | None, list[dict]]:
    done = sorted(p for p in folder.glob("round-[0-9][0-9][0-9]") if (p / "state.json").is_file())
    if not done:
        return 0, None, []
    last = done[-1]
    state = json.loads((last / "state.json").read_text())
    for p in parties:
        load_party_state(p, last, cfg.train)
    with np.load(last / "server_outputs.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    server = parties[0]
    out = wire.decode(arrays, sender=f"{last}/server_outputs.npz", vocab_size=server.vocab_size, k=cfg.fedmkt.top_k,
                      positions=server.positions())
    return state["round"], out, state["history"]


# ----------------------------------------------------------------------------------------------
# FedMKT


def run_rounds(world: World, out_dir: Path, label: str = "fedmkt", train_server: bool = True,
               average_clients: bool | None = None) -> list[dict]:
    """The FedMKT loop (also LLM2SLM with train_server=False). Returns per-round records."""
    cfg = world.cfg
    server, clients = world.server(), world.clients()
    parties = [server] + clients
    ckpt = out_dir / "rounds" if label == "fedmkt" else out_dir / "baselines" / label / "rounds"
    ckpt.mkdir(parents=True, exist_ok=True)
    start, server_out, history = _load_round(ckpt, parties, cfg)
    if start:
        print(f"[kdflow] {label}: resuming after round {start}")
    if not history:
        history.append({"round": 0, "eval": evaluate_parties(parties, world)})
    if server_out is None:
        server_out = public_outputs(server, cfg.fedmkt.top_k, cfg.fedmkt.temperature, cfg.eval.batch_size)
    avg = cfg.fedmkt.fedavg if average_clients is None else average_clients
    for r in range(start + 1, cfg.fedmkt.rounds + 1):
        t0 = time.time()
        rec: dict[str, Any] = {"round": r, "bytes_up": {}, "bytes_down": {}, "selected": {}, "loss": {}}
        client_outs = []
        for c in clients:
            out, logs = client_local_step(c, cfg, r)
            out, nbytes = send(out, c, c.positions(), cfg.fedmkt.top_k, cfg.fedmkt.divergence,
                                cfg.fedmkt.wire_logprobs)  # client -> server
            rec["bytes_up"][c.name] = nbytes
            rec["loss"][f"{c.name}/private"] = logs[-1]["loss"] if logs else None
            client_outs.append(out)
        server_out, info = server_step(server, server_out, clients, client_outs, cfg, r, train_server=train_server,
                                       bridges=world.bridges)
        if train_server:
            rec["selected"][server.name] = info["selected"]
            rec["loss"][f"{server.name}/public"] = info["logs"][-1]["loss"] if info["logs"] else None
        for c, c_out in zip(clients, client_outs):
            received, nbytes = send(server_out, server, server.positions(), cfg.fedmkt.top_k, cfg.fedmkt.divergence,
                                    cfg.fedmkt.wire_logprobs)  # server -> client
            rec["bytes_down"][c.name] = nbytes
            info_c = client_update_step(c, c_out, server, received, cfg, r, bridges=world.bridges)
            rec["selected"][c.name] = info_c["selected"]
            rec["loss"][f"{c.name}/public"] = info_c["logs"][-1]["loss"] if info_c["logs"] else None
        if avg:
            fedavg(clients)
        if r % cfg.fedmkt.eval_every == 0 or r == cfg.fedmkt.rounds:
            rec["eval"] = evaluate_parties(parties, world)
        rec["seconds"] = time.time() - t0
        history.append(rec)
        processes.on_main(lambda: _save_round(ckpt, r, parties, server_out, history))
        print(f"[kdflow] {label} round {r}/{cfg.fedmkt.rounds}: {rec['seconds']:.0f} s, "
              f"up {sum(rec['bytes_up'].values()) / 1e6:.2f} MB, down {sum(rec['bytes_down'].values()) / 1e6:.2f} MB"
              + (f", server Rouge-L {rec['eval'][server.name]['rougeL']:.3f}" if "eval" in rec else ""))
    if label == "fedmkt":
        world.final_models = processes.on_main(lambda: save_finals(world, parties, out_dir))
    return history


def save_finals(world: World, parties: list[Party], out_dir: Path) -> dict[str, dict[str, str]]:
    """Every party's final model under <out_dir>/final/<name>/ (fedmkt.save_merged adds merged copies)."""
    cfg = world.cfg
    written = {}
    for p, spec in zip(parties, [cfg.server] + cfg.clients):
        base = base_location(spec, cfg.data, world.public_rows if spec is cfg.server else None)
        written[p.name] = save_final(p, base, out_dir / "final" / p.name, cfg.fedmkt.save_merged)
    print(f"[kdflow] final models: {out_dir / 'final'}/<party>/adapter" + (" and /merged" if cfg.fedmkt.save_merged else ""))
    return written


# ----------------------------------------------------------------------------------------------
# Baselines


def run_baseline(name: str, world: World, out_dir: Path) -> dict[str, dict[str, float]]:
    """Metrics per party for one baseline, cached in baselines/<name>.json."""
    cfg = world.cfg
    path = out_dir / "baselines" / f"{name}.json"
    key = {"config": to_dict(cfg), "data": rows_fingerprint(world.public_rows)}
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["metrics"]
    if name == "zero_shot":
        metrics = evaluate_parties([world.server()] + world.clients(), world)
    elif name in ("standalone", "private_public"):
        clients = world.clients()
        for c in clients:
            data = c.private + (c.public if name == "private_public" else [])
            train_baseline(c, data, cfg, "client")
        metrics = evaluate_parties(clients, world)
    elif name in ("public_only", "centralized"):
        server = world.server()
        data = list(server.public)
        if name == "centralized":
            for rows in world.private_rows:
                data += encode_rows(rows, server.tok, cfg.data)
        train_baseline(server, data, cfg, "server")
        metrics = evaluate_parties([server], world)
    elif name == "llm2slm":
        history = run_rounds(world, out_dir, label="llm2slm", train_server=False, average_clients=False)
        metrics = history[-1]["eval"]
    elif name == "fedavg":
        if world.setting not in ("homogeneous", "one_to_one"):
            raise ConfigError("baseline fedavg needs homogeneous clients (same model and tokenizer)")
        clients = world.clients()
        for r in range(1, cfg.fedmkt.rounds + 1):
            for c in clients:
                train_phase(c, c.private, cfg, cfg.fedmkt.private_epochs, False, seed=cfg.seed + 1000 * r)
            fedavg(clients)
        metrics = evaluate_parties(clients, world)
    else:
        raise ConfigError(f"unknown baseline '{name}'")
    processes.on_main(lambda: write_json(path, {"key": key, "metrics": metrics}))
    return metrics


# ----------------------------------------------------------------------------------------------
# The verb


def run_fedmkt(cfg: FedMKTConfig) -> dict[str, Any]:
    check_config(cfg)
    out = setup_run(cfg.output_dir, cfg, cfg.seed, cfg.train.num_threads)
    world = World(cfg)
    names = [cfg.server.name] + [c.name for c in cfg.clients]
    print(f"[kdflow] fedmkt ({world.setting}): server {cfg.server.name}, clients {', '.join(names[1:])}; "
          f"public {len(world.public_rows)} rows, private {[len(p) for p in world.private_rows]} rows")
    t0 = time.time()
    history = run_rounds(world, out)
    fedmkt_seconds = time.time() - t0
    table: dict[str, dict[str, dict[str, float]]] = {"FedMKT": history[-1]["eval"]}
    for b in cfg.baselines:
        if b == "zero_shot":
            table["zero-shot"] = history[0]["eval"]  # round 0 evaluates the untrained parties
            continue
        print(f"[kdflow] baseline {b}")
        table[b] = run_baseline(b, world, out)
    metrics = {"setting": world.setting, "rounds": history, "table": table, "fedmkt_seconds": fedmkt_seconds,
               "bytes_per_round": _bytes_per_round(history), "final_models": world.final_models}

    def write_outputs() -> None:
        write_json(out / "metrics.json", metrics)
        _plots(out, history, names)
        write_atomic(out / "report.md", _report(cfg, world, metrics, names))

    processes.on_main(write_outputs)
    print()
    print(_table(table, names, "rougeL"))
    print(f"\n[kdflow] run folder: {out}  (report.md, metrics.json, rounds_rougeL.png, rounds_nll.png)")
    return metrics


def _bytes_per_round(history: list[dict]) -> list[dict[str, int]]:
    return [{"round": h["round"], "up": sum(h["bytes_up"].values()), "down": sum(h["bytes_down"].values())}
            for h in history if "bytes_up" in h]


def _table(table: dict[str, dict[str, dict[str, float]]], names: list[str], key: str) -> str:
    head = "| method | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---:|" * len(names)]
    for method, per_party in table.items():
        cells = [f"{per_party[n][key]:.4f}" if n in per_party else "—" for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_lines(final_models: dict[str, dict[str, str]]) -> list[str]:
    return [f"- `{name}`: adapter `{w['adapter']}` on base `{w['base']}`" + (f", merged `{w['merged']}`" if "merged" in w else "")
            + "; evaluate with " + " or ".join(final_commands(name, w)) for name, w in final_models.items()]


def _plots(out: Path, history: list[dict], names: list[str]) -> None:
    for key, fname, label in (("rougeL", "rounds_rougeL.png", "Rouge-L"), ("answer_nll", "rounds_nll.png", "answer NLL")):
        series = {n: [(h["round"], h["eval"][n][key]) for h in history if "eval" in h and n in h["eval"]] for n in names}
        plot_curves(out / fname, series, f"FedMKT: {label} on the test split per round", xlabel="round", ylabel=label)


def _report(cfg: FedMKTConfig, world: World, metrics: dict[str, Any], names: list[str]) -> str:
    f = cfg.fedmkt
    lines = [f"# kdflow fedmkt — {world.setting}", "",
             f"- server `{cfg.server.name}` ({cfg.server.model.name or cfg.server.prune_from}), clients: "
             + ", ".join(f"`{c.name}` ({c.model.name or c.prune_from}, init {c.model.init})" for c in cfg.clients),
             f"- {f.rounds} rounds, top-k {f.top_k}, τ {f.temperature}, λ {f.ce_weight}, selection `{f.selection}`, "
             f"divergence `{f.divergence}` ({f.sparse_mode})",
             f"- public set {len(world.public_rows)} rows; private rows per client {[len(p) for p in world.private_rows]} "
             f"({cfg.data.partition}); test rows {len(world.test_rows)}",
             f"- FedMKT wall time {metrics['fedmkt_seconds']:.0f} s", "",
             "## Rouge-L on the test split (greedy)", "", _table(metrics["table"], names, "rougeL"), "",
             "## Answer NLL on the test split (nats/token, lower is better)", "", _table(metrics["table"], names, "answer_nll"), "",
             "## Communication per round", "", "| round | client→server bytes | server→clients bytes |", "|---:|---:|---:|"]
    for b in metrics["bytes_per_round"]:
        lines.append(f"| {b['round']} | {b['up']:,} | {b['down']:,} |")
    lines += ["", "## Final models", ""] + final_lines(metrics.get("final_models") or {})
    lines += ["", "## Per round", "", "![Rouge-L per round](rounds_rougeL.png)", "", "![NLL per round](rounds_nll.png)", "",
              "## Selection (share of public samples each party learned from)", ""]
    for h in metrics["rounds"]:
        if h.get("selected"):
            lines.append(f"- round {h['round']}: " + "; ".join(
                f"{who} ← " + ", ".join(f"{k} {v:.0%}" for k, v in sel.items() if v) for who, sel in h["selected"].items()))
    return "\n".join(lines) + "\n"
