"""`kdflow fedmkt-flower`: submit the FedMKT Flower app to a SuperLink and wait for it to finish.

With `flower.superlink` unset the verb starts its own SuperLink in simulation mode on a free
loopback port (Flower's simulation runtime runs the ClientApps on Ray, one virtual SuperNode per
client), submits the run, waits, and stops the SuperLink. With `flower.superlink: host:port` it
submits the run to that SuperLink, whose SuperNodes were started by the clients' owners, over TLS
and with SuperNode authentication (README, "Running over Flower"):

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \
        --enable-supernode-auth --port 9093 --disable-runtime-dependency-installation
    flwr supernode register c1_key.pub <connection>       # each client's public key, once
    flower-supernode --root-certificates ca.crt --auth-supernode-private-key c1_key \
        --superlink HOST:9093 --node-config 'partition-id=0'
    kdflow fedmkt-flower --config configs/fedmkt_flower.yaml flower.superlink=HOST:9093 flower.root_certificates=ca.crt

`--insecure` everywhere (and flower.insecure=true) is for local trials on loopback only.

Everything goes through Flower's own command line (`flower-superlink`, `flwr run`, `flwr ls`,
`flwr log`) with a private FLWR_HOME, so a user's Flower configuration is never touched. The
helpers here also serve the tests, which start real SuperNodes on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdflow.config import FedMKTConfig
from kdflow.errors import KDFlowError
from kdflow.federated.flower_server import FAILURE_FILE

CONNECTION = "kdflow"


class FlowerLaunchError(KDFlowError):
    """A Flower process did not start, or the run did not complete."""


def _bin(name: str) -> str:
    """Flower's executables from the environment kdflow runs in."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


def flower_env(home: Path) -> dict[str, str]:
    """Environment for every Flower process: a private FLWR_HOME, offline, no telemetry."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "RAY_DISABLE_USAGE_STATS": "1",
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "PYTHONUNBUFFERED": "1",
    })
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, proc: subprocess.Popen | None, timeout: float, what: str, log: Path | None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FlowerLaunchError(f"{what} exited with code {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise FlowerLaunchError(f"{what} did not open {host}:{port} within {timeout:g} s" + (f"; see {log}" if log else ""))


@dataclass
class Processes:
    """Flower processes started here, each in its own process group, stopped by their ids."""

    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(args, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGTERM to the process's group (it and the app processes it spawned), SIGKILL after `grace`."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # children left in the group
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)


@dataclass
class TLS:
    """The SuperLink's TLS files: the CA certificate every party verifies it with, its certificate and
    private key (PEM)."""

    ca_cert: Path
    cert: Path
    key: Path


def start_superlink(procs: Processes, env: dict[str, str], logs: Path, simulation: bool, host: str = "127.0.0.1",
                    port: int | None = None, timeout: float = 60.0, tls: TLS | None = None,
                    node_auth: bool = False) -> str:
    """A SuperLink (one HTTP port for the Fleet, Control and Runtime APIs): with `tls`, encrypted
    (Flower's --ssl-* flags), otherwise --insecure (local trials on loopback only); with `node_auth`,
    only SuperNodes whose public key was registered (`register_supernode`) may connect."""
    port = port or free_port(host)
    security = (["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
                if tls else ["--insecure"])
    if node_auth:
        if tls is None:
            raise FlowerLaunchError("SuperNode authentication needs TLS (Flower refuses it on an insecure SuperLink)")
        security.append("--enable-supernode-auth")
    args = [_bin("flower-superlink"), *security, "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]
    if simulation:
        args.append("--simulation")
    proc = procs.start("superlink", args, env, logs / "superlink.log")
    wait_for_port(host, port, proc, timeout, "flower-superlink", logs / "superlink.log")
    return f"{host}:{port}"


def start_supernode(procs: Processes, env: dict[str, str], logs: Path, superlink: str, node_config: str,
                    name: str, host: str = "127.0.0.1", root_certificates: Path | None = None,
                    auth_private_key: Path | None = None) -> subprocess.Popen:
    """A SuperNode: over TLS when given the CA certificate that signed the SuperLink's
    (`root_certificates`), else --insecure; authenticated with its private key (OpenSSH format,
    ECDSA on a NIST curve) when the SuperLink checks node keys."""
    security = ["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"]
    if auth_private_key:
        security += ["--auth-supernode-private-key", str(auth_private_key)]
    args = [_bin("flower-supernode"), *security, "--superlink", superlink, "--host", host,
            "--port", str(free_port(host)), "--node-config", node_config]
    return procs.start(name, args, env, logs / f"{name}.log")


def register_supernode(public_key: Path, env: dict[str, str]) -> int:
    """`flwr supernode register`: allow the SuperNode holding this public key's private key (OpenSSH
    public key, ECDSA on a NIST curve) to connect; returns its node id."""
    res = _flwr(["supernode", "register", str(public_key), CONNECTION, "--format", "json"], env)
    try:
        return int(json.loads(res.stdout[res.stdout.index("{"):])["node-id"])
    except (ValueError, KeyError, TypeError):
        raise FlowerLaunchError(f"flwr supernode register {public_key} failed (code {res.returncode}): "
                                f"{(res.stdout + res.stderr).strip()[-1000:]}") from None


def write_connection(home: Path, address: str, insecure: bool, root_certificates: str | None = None) -> None:
    import tomli_w

    conn: dict[str, Any] = {"address": address, "insecure": bool(insecure)}
    if root_certificates:
        conn["root-certificates"] = root_certificates
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def _flwr(args: list[str], env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def submit(app_dir: Path, run_config_toml: Path, env: dict[str, str], federation_config: str | None = None) -> int:
    """`flwr run`; returns the run id."""
    args = ["run", str(app_dir), CONNECTION, "--run-config", str(run_config_toml), "--format", "json"]
    if federation_config:
        args += ["--federation-config", federation_config]
    res = _flwr(args, env)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
        return int(out["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FlowerLaunchError(f"flwr run failed (code {res.returncode}): {(res.stdout + res.stderr).strip()[-2000:]}") from None


def run_status(run_id: int, env: dict[str, str]) -> str:
    res = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env)
    try:
        out = json.loads(res.stdout[res.stdout.index("{"):])
        return str(out["runs"][0]["status"])
    except (ValueError, KeyError, IndexError, TypeError):
        return "unknown"


def wait_for_run(run_id: int, env: dict[str, str], timeout: float, done_file: Path | None = None,
                 poll: float = 15.0) -> str:
    """Wait until the run is finished; returns its status, e.g. 'finished:completed'. Each status
    query starts a `flwr` process, so it runs every `poll` seconds, and sooner once `done_file`
    (written by the ServerApp at the end) is there anew."""
    deadline = time.time() + timeout
    status, last = "unknown", 0.0
    before = _signature(done_file) if done_file is not None else None
    while time.time() < deadline:
        now = _signature(done_file) if done_file is not None else None
        done = now is not None and now != before
        if done or time.time() - last >= poll:
            status, last = run_status(run_id, env), time.time()
            if status.startswith("finished"):
                return status
        time.sleep(1.0 if done else 0.5)
    raise FlowerLaunchError(f"Flower run {run_id} still '{status}' after {timeout:g} s")


def _signature(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of `path`, None when absent: a file replaced atomically gets a new one."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def run_logs(run_id: int, env: dict[str, str]) -> str:
    res = _flwr(["log", str(run_id), CONNECTION, "--show"], env)
    return res.stdout + res.stderr


def failure_text(failure_file: Path, old_signature: tuple[int, int] | None, log_file: Path) -> str:
    """Why a run failed: the reason the ServerApp left (its own error, or the clients it had to leave
    out with the generic reasons they sent), else the last error line of its log."""
    if failure_file.is_file() and _signature(failure_file) != old_signature:
        try:
            return str(json.loads(failure_file.read_text())["reason"])
        except (ValueError, KeyError, TypeError, OSError):
            pass
    try:
        lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines()
                 if "Error" in ln or "ERROR" in ln or "failed" in ln]
    except OSError:
        lines = []
    return lines[-1][-500:] if lines else "the ServerApp gave no reason"


def run_fedmkt_flower(cfg: FedMKTConfig) -> dict[str, Any]:
    """The verb: FedMKT over Flower, simulated locally or on a running SuperLink."""
    import importlib.util

    if importlib.util.find_spec("flwr") is None:
        raise FlowerLaunchError("kdflow fedmkt-flower needs Flower: pip install 'kdflow[fed]' (flwr[simulation])")
    from kdflow.federated.fedmkt import check_config
    from kdflow.federated.flower_app import run_config_from_config, write_app, write_run_config

    check_config(cfg, baselines=False)  # the pooled-data baselines are not run over Flower
    from kdflow import processes

    if processes.world() > 1:
        # Flower starts one process per client and one for the server itself; launched P times, the
        # same command would start P federations on one SuperLink.
        raise FlowerLaunchError(f"kdflow fedmkt-flower was started as {processes.world()} processes (torchrun / "
                                "accelerate launch); start it once, without a launcher: Flower runs one process per "
                                "client itself (use `kdflow fedmkt` for FedMKT on several processes)")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # The ServerApp replaces metrics.json when the run ends; the earlier one stays until then, and a
    # file still carrying its old signature afterwards is not this run's.
    old_metrics = _signature(out / "metrics.json")
    failure_file = out / FAILURE_FILE
    old_failure = _signature(failure_file)
    app_dir = write_app(out / "flower-app")
    toml = write_run_config(out / "flower-run-config.toml", run_config_from_config(cfg))
    logs = out / "flower-logs"
    procs = Processes()
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="kdflow-flwr-home-") as home:
        env = flower_env(Path(home))
        try:
            if cfg.flower.superlink is None:
                address = start_superlink(procs, env, logs, simulation=True)
                write_connection(Path(home), address, insecure=True)
                fed = f"num-supernodes={len(cfg.clients)} client-resources-num-cpus={cfg.flower.client_cpus}"
                print(f"[kdflow] fedmkt-flower: local simulation, {len(cfg.clients)} simulated SuperNodes (SuperLink {address})")
            else:
                address = cfg.flower.superlink
                write_connection(Path(home), address, cfg.flower.insecure, cfg.flower.root_certificates)
                fed = None
                print(f"[kdflow] fedmkt-flower: submitting to the SuperLink at {address}")
            run_id = submit(app_dir, toml, env, fed)
            print(f"[kdflow] Flower run {run_id} started; app {app_dir}, run config {toml}")
            # every round asks each client at most 4 times (local, update, fedavg, a retry's margin); the
            # LLM2SLM baseline repeats the rounds, the standalone baseline asks once more
            asks = 4 * cfg.fedmkt.rounds * (2 if "llm2slm" in cfg.baselines else 1) + ("standalone" in cfg.baselines)
            budget = cfg.flower.connect_timeout + asks * cfg.flower.reply_timeout + 600
            status = wait_for_run(run_id, env, budget, done_file=out / "metrics.json")
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"run-{run_id}.log").write_text(run_logs(run_id, env))
        finally:
            procs.stop_all()
    if status != "finished:completed":
        log_file = logs / f"run-{run_id}.log"
        reason = failure_text(failure_file, old_failure, log_file)
        raise FlowerLaunchError(f"Flower run {run_id} ended '{status}': {reason} (the ServerApp's log is {log_file})")
    metrics_path = out / "metrics.json"
    fresh = metrics_path.is_file() and _signature(metrics_path) != old_metrics
    metrics = json.loads(metrics_path.read_text()) if fresh else {}
    metrics["wall_seconds"] = time.time() - t0
    print(f"[kdflow] fedmkt-flower finished in {metrics['wall_seconds']:.0f} s; report {out / 'report.md'}")
    return metrics
