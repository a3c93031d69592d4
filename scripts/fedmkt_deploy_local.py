"""A FedMKT run over a real Flower deployment on this machine, secured as a deployment across
organisations is: flower-superlink with TLS and SuperNode authentication, one flower-supernode per
client with its own registered key, then `kdflow fedmkt-flower ... flower.superlink=...` as a user
types it. Prints the wall time and the bytes each client sent and received per round.

    python scripts/fedmkt_deploy_local.py --config configs/fedmkt.yaml [key=value ...]

(`make fedmkt-deploy` runs it on the heterogeneous demo config once its client bases exist.) The
certificates and keys are made on the fly under <output_dir>-deploy/certs; the Flower processes'
logs go to <output_dir>-deploy/logs. Everything is stopped at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kdflow.config import FedMKTConfig, load_config
from kdflow.federated.flower_local import Deployment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="kdflow key=value settings")
    args = ap.parse_args(argv)
    cfg = load_config(FedMKTConfig, args.config, args.overrides)  # bad settings stop here, before any process starts
    out = Path(cfg.output_dir)
    root = out.parent / f"{out.name}-deploy"
    t0 = time.time()
    dep = Deployment(root, len(cfg.clients), secure=True)
    print(f"[deploy] SuperLink {dep.address} (TLS, SuperNode authentication), {len(cfg.clients)} SuperNodes "
          f"registered, started in {time.time() - t0:.0f} s; logs in {root / 'logs'}", flush=True)
    try:
        t1 = time.time()
        cmd = [str(Path(sys.executable).parent / "kdflow"), "fedmkt-flower", "--config", args.config, *args.overrides,
               f"flower.superlink={dep.address}", f"flower.root_certificates={dep.tls.ca_cert}"]
        code = subprocess.call(cmd)
        wall = time.time() - t1
    finally:
        dep.close()
    if code != 0:
        print(f"[deploy] kdflow fedmkt-flower exited with {code}", flush=True)
        return code
    m = json.loads((out / "metrics.json").read_text())
    print(f"[deploy] wall time {wall:.0f} s from submission to completion (FedMKT rounds {m['fedmkt_seconds']:.0f} s"
          + "".join(f", {b} {v['seconds']:.0f} s" for b, v in m["baselines"].items()) + ")")
    for h in m["rounds"][1:]:
        print(f"[deploy] round {h['round']}: {h['seconds']:.0f} s; bytes up " + json.dumps(h["bytes_up"])
              + ", down " + json.dumps(h["bytes_down"])
              + (f", tokenizers up {json.dumps(h['bytes_tokenizer_up'])}" if "bytes_tokenizer_up" in h else "")
              + (f", down {json.dumps(h['bytes_tokenizer_down'])}" if "bytes_tokenizer_down" in h else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
