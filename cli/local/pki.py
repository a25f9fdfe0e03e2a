"""The local control plane's credentials: a throwaway PKI and admin kubeconfigs.

Where it sits: under ``cluster.py`` (``start()`` calls ``make_pki`` and
``write_kubeconfig``); tests use both directly (``tests/kubeenv.py``). One
CA signs the API server's serving certificate (127.0.0.1, localhost) and an
admin client certificate (``O=system:masters``); the service-account
signing key pair sits beside them. Everything lives two days, in files
readable only by the owner, and is removed with the cluster's directory.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
from dataclasses import dataclass

from kube import certs

LIFETIME = datetime.timedelta(days=2)

# --- certificates (kube.certs makes them) ----------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files under ``dir`` for one API server."""

    dir: str

    @property
    def ca(self) -> str:
        return os.path.join(self.dir, "ca.crt")

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)


def make_pki(directory: str) -> Pki:
    # ECDSA P-256 throughout (kube.certs): generated in microseconds, and
    # accepted by kube-apiserver for TLS, client certs and ES256 SA tokens
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca, ca_key = certs.new_ca(now, LIFETIME, name="modelcache-local-ca")
    files: dict[str, bytes] = {"ca.crt": ca}
    files["apiserver.crt"], files["apiserver.key"] = certs.new_serving(
        # 10.96.0.1: the "kubernetes" Service (cluster.py's service range), which
        # pods reach on the two-node e2e (tests/e2e/deployed.py)
        ca, ca_key, ["127.0.0.1", "localhost", "10.96.0.1"], now, LIFETIME)
    # O=system:masters is bound to cluster-admin by the bootstrap RBAC policy.
    files["admin.crt"], files["admin.key"] = certs.new_client(
        ca, ca_key, "modelcache-admin", now, LIFETIME, organization="system:masters")
    files["sa.key"], files["sa.pub"] = certs.new_key_pair()
    for name, data in files.items():
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return Pki(directory)


# --- kubeconfig ----------------------------------------------------------------


def b64(path: str) -> str:
    """A file's bytes as base64 (kubeconfig ``*-data`` fields)."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode()


def write_kubeconfig(path: str, server: str, ca_file: str, user: dict[str, str],
                     name: str = "modelcache-local") -> str:
    """A one-context kubeconfig, certificates inlined. JSON is valid kubeconfig YAML."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {
            "server": server, "certificate-authority-data": b64(ca_file)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name}}],
        "current-context": name,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(config, f, indent=1)
    return path
