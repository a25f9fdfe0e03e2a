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
import ipaddress
import json
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

# --- certificates --------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: generated in microseconds (RSA takes tens of ms per key), and
    # accepted by kube-apiserver for TLS, client certs and ES256 SA tokens.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server \
            else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.DNSName("localhost"),
        ]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


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
    os.makedirs(directory, exist_ok=True)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelcache-local-ca")])
    ca = _cert(ca_name, ca_key, None, ca_key, ca=True)
    files: dict[str, bytes] = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM)}

    serving_key = _key()
    serving = _cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
                    serving_key, ca, ca_key, server=True)
    files["apiserver.crt"] = serving.public_bytes(serialization.Encoding.PEM)
    files["apiserver.key"] = _key_pem(serving_key)

    # O=system:masters is bound to cluster-admin by the bootstrap RBAC policy.
    admin_key = _key()
    admin = _cert(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "modelcache-admin")]),
                  admin_key, ca, ca_key)
    files["admin.crt"] = admin.public_bytes(serialization.Encoding.PEM)
    files["admin.key"] = _key_pem(admin_key)

    sa_key = _key()
    files["sa.key"] = _key_pem(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

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
