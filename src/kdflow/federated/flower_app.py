"""FedMKT over Flower: the ServerApp and ClientApp, and the one converter from kdflow's YAML to
Flower's flat run config.

Both apps rebuild the same typed `FedMKTConfig` from the run config, so a run is configured
exactly like `kdflow fedmkt`; the round itself is `flower_server.run_server` and the handlers of
`flower_client.py`, which call the step functions of `fedmkt.py`. Each client's identity comes
from its SuperNode's node config: `partition-id` (which entry of `clients:`, and which private
partition), optionally `state-dir`, `model`, `data-train`, `data-test`, `private-data`.

Message types: `query` (handshake), `train` (local step), `train.update` (learn from the server),
`train.fedavg` (take the averaged adapter), `train.baseline` (the standalone baseline). Only arrays and scalars travel: top-k payloads, answer
positions, metrics, and adapters for FedAvg. Nothing is pickled.

The app folder `flwr run` needs (`pyproject.toml` with `[tool.flwr.app]`) is `APP_PYPROJECT`,
written by `write_app` (and committed as `flower/pyproject.toml`).
"""

from __future__ import annotations

import shlex
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from kdflow.config import FedMKTConfig, dump_yaml, load_config, load_config_text
from kdflow.errors import ConfigError
from kdflow.federated.flower_client import HANDLERS
from kdflow.federated.flower_server import serve

RUN_CONFIG_KEYS = {
    "kdflow.config": "the resolved kdflow FedMKT config as YAML text, or the path of a YAML file every node can read",
    "kdflow.overrides": "space-separated key=value kdflow settings applied on top (e.g. 'fedmkt.rounds=5')",
}

APP_PYPROJECT = '''\
# The Flower app for FedMKT (kdflow). Written by `kdflow fedmkt-flower` into its run folder; run it
# yourself with `flwr run <this folder> <superlink connection> --run-config <run_config.toml>`,
# the run config being what `kdflow.federated.flower_app.run_config_from_yaml` converts a kdflow
# YAML into. kdflow (with the `fed` extra) must be installed where the SuperLink and every
# SuperNode run; start them with runtime dependency installation disabled.
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "kdflow-fedmkt"
version = "1.0.0"
description = "FedMKT (federated mutual knowledge transfer) from kdflow, over Flower"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "kdflow"

[tool.flwr.app.components]
serverapp = "kdflow.federated.flower_app:server_app"
clientapp = "kdflow.federated.flower_app:client_app"

[tool.flwr.app.config]
"kdflow.config" = ""
"kdflow.overrides" = ""
'''


# ----------------------------------------------------------------------------------------------
# kdflow YAML <-> Flower run config


def _absolute(path: str | None) -> str | None:
    """A local path made absolute (the ServerApp and ClientApps run in other working directories);
    Hub ids, hf: specs and bundled: names are left as they are."""
    if not path or ":" in path:
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() or path.startswith((".", "/", "~")) else path


def absolute_paths(cfg: FedMKTConfig) -> FedMKTConfig:
    def party(p: Any) -> Any:
        return replace(p, model=replace(p.model, name=_absolute(p.model.name)), prune_from=_absolute(p.prune_from))

    data = replace(cfg.data, train=_absolute(cfg.data.train), validation=_absolute(cfg.data.validation),
                   test=_absolute(cfg.data.test))
    flower = replace(cfg.flower, state_dir=str(Path(cfg.flower.state_dir).resolve()) if cfg.flower.state_dir else None,
                     root_certificates=_absolute(cfg.flower.root_certificates))
    return replace(cfg, output_dir=str(Path(cfg.output_dir).resolve()), data=data, flower=flower,
                   server=party(cfg.server), clients=[party(c) for c in cfg.clients])


def run_config_from_config(cfg: FedMKTConfig) -> dict[str, str]:
    """The flat Flower run config of a kdflow FedMKT config (local paths made absolute)."""
    return {"kdflow.config": dump_yaml(absolute_paths(cfg)), "kdflow.overrides": ""}


def run_config_from_yaml(path: str, overrides: list[str] | None = None) -> dict[str, str]:
    """kdflow YAML (+ key=value overrides) -> Flower run config; the config is validated here first."""
    return run_config_from_config(load_config(FedMKTConfig, path, overrides))


def config_from_run_config(run_config: Mapping[str, Any]) -> FedMKTConfig:
    """The typed config both apps run with; one clear error for a missing, unknown or bad key."""
    unknown = sorted(k for k in run_config if k not in RUN_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"unknown run config key '{unknown[0]}'; valid keys: {', '.join(RUN_CONFIG_KEYS)}")
    text = run_config.get("kdflow.config")
    if not isinstance(text, str) or not text.strip():
        raise ConfigError("run config 'kdflow.config' is empty: pass the kdflow YAML (text or path), e.g. the file "
                          "`kdflow fedmkt-flower` writes, with `flwr run ... --run-config run_config.toml`")
    overrides = run_config.get("kdflow.overrides", "")
    if not isinstance(overrides, str):
        raise ConfigError(f"run config 'kdflow.overrides' must be a string of key=value pairs, got {overrides!r}")
    if "\n" not in text and text.strip().endswith((".yaml", ".yml")):
        return load_config(FedMKTConfig, text.strip(), shlex.split(overrides))
    return load_config_text(FedMKTConfig, text, shlex.split(overrides), where="run config 'kdflow.config'")


def write_run_config(path: Path, run_config: Mapping[str, Any]) -> Path:
    """The run config as a TOML file for `flwr run --run-config`."""
    import tomli_w

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config), multiline_strings=True))
    return path


def write_app(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


# ----------------------------------------------------------------------------------------------
# The server's transport: Flower messages through the Grid


class GridTransport:
    def __init__(self, grid: Grid):
        self.grid = grid

    def nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def ask(self, requests: dict[int, tuple[str, Any]], timeout: float, group: str) -> dict[int, Any]:
        if not requests:
            return {}
        # A request outlives its round by little: a node that wakes up later must not act on it.
        ttl = max(float(timeout), 1.0) + 60.0
        messages = [Message(content, dst_node_id=node, message_type=kind, group_id=group, ttl=ttl)
                    for node, (kind, content) in requests.items()]
        t0 = time.time()
        out: dict[int, Any] = {}
        for reply in self.grid.send_and_receive(messages, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                out[node] = f"failed: {reply.error.reason} (Flower error code {reply.error.code})"
            else:
                out[node] = reply.content
        elapsed = time.time() - t0
        if elapsed < timeout - 1:  # Flower stopped waiting early (the SuperLink saw the node go offline)
            for node in requests:
                out.setdefault(node, f"no reply; Flower stopped waiting after {elapsed:.0f} s (node offline or message expired)")
        return out


# ----------------------------------------------------------------------------------------------
# The apps

client_app = ClientApp()
server_app = ServerApp()


def _client(kind: str, msg: Message, context: Context) -> Message:
    cfg = config_from_run_config(context.run_config)
    return Message(HANDLERS[kind](msg.content, cfg, context.node_config), reply_to=msg)


@client_app.query()
def query(msg: Message, context: Context) -> Message:
    return _client("query", msg, context)


@client_app.train()
def local(msg: Message, context: Context) -> Message:
    return _client("train", msg, context)


@client_app.train("update")
def update(msg: Message, context: Context) -> Message:
    return _client("train.update", msg, context)


@client_app.train("fedavg")
def average(msg: Message, context: Context) -> Message:
    return _client("train.fedavg", msg, context)


@client_app.train("baseline")
def baseline(msg: Message, context: Context) -> Message:
    return _client("train.baseline", msg, context)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    serve(GridTransport(grid), config_from_run_config(context.run_config))
