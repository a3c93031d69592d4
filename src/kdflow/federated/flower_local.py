"""A Flower deployment on one machine, secured as a real one is: flower-superlink over TLS with
SuperNode authentication and one flower-supernode per client, all on 127.0.0.1 with free ports, a CA
and certificates made on the fly and a key pair per SuperNode (only the first `clients` registered).

For trials of a deployed run before the parties set up their own machines
(`scripts/fedmkt_deploy_local.py`, `make fedmkt-deploy`) and for the tests. Real deployments use
certificates from the parties' own CA and keys the node owners make (README, "Running over Flower").
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kdflow.config import FedMKTConfig
from kdflow.federated import flower_launch as launch


def make_certificates(folder: Path) -> launch.TLS:
    """A CA and a SuperLink certificate for 127.0.0.1 signed by it, made here (cryptography), valid for a day."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signer, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signer, hashes.SHA256())

    def write(path, data):
        path.write_bytes(data)
        return path

    ca_key, key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca = cert("kdflow local CA", "kdflow local CA", ca_key, ca_key, True)
    server = cert("127.0.0.1", "kdflow local CA", key, ca_key, False,
                  [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    pem = serialization.Encoding.PEM
    return launch.TLS(write(folder / "ca.crt", ca.public_bytes(pem)), write(folder / "server.pem", server.public_bytes(pem)),
                      write(folder / "server.key", key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                                     serialization.NoEncryption())))


def make_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair as Flower reads them: ECDSA P-384 in OpenSSH format (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    private.chmod(0o600)
    return private, public


class Deployment:
    """flower-superlink and one flower-supernode per client on 127.0.0.1, free ports, a private FLWR_HOME.
    `secure`: TLS (certificates made here) and SuperNode authentication: the first `clients`
    SuperNodes' public keys are registered; `unregistered` more SuperNodes start with keys that are not."""

    def __init__(self, root: Path, clients: int, secure: bool = False, unregistered: int = 0):
        self.root, self.procs = root, launch.Processes()
        self.home = Path(tempfile.mkdtemp(prefix="flwr-home-"))
        self.env = launch.flower_env(self.home)
        self.logs = root / "logs"
        tls = self.tls = make_certificates(root / "certs") if secure else None
        try:
            self.address = launch.start_superlink(self.procs, self.env, self.logs, simulation=False, tls=tls,
                                                  node_auth=secure)
            launch.write_connection(self.home, self.address, insecure=not secure,
                                    root_certificates=str(tls.ca_cert) if tls else None)
            self.nodes = []
            for p in range(clients + unregistered):
                key = None
                if secure:
                    key, public = make_node_key(root / "certs", f"supernode-{p}")
                    if p < clients:
                        launch.register_supernode(public, self.env)
                self.nodes.append(launch.start_supernode(
                    self.procs, self.env, self.logs, self.address, f"partition-id={p % clients}", f"supernode-{p}",
                    root_certificates=tls.ca_cert if tls else None, auth_private_key=key))
        except BaseException:
            self.close()
            raise

    def submit(self, cfg: FedMKTConfig) -> int:
        from kdflow.federated.flower_app import run_config_from_config, write_app, write_run_config

        app = write_app(self.root / "app")
        return launch.submit(app, write_run_config(self.root / "run_config.toml", run_config_from_config(cfg)), self.env)

    def close(self):
        self.procs.stop_all()
        shutil.rmtree(self.home, ignore_errors=True)
