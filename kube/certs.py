"""Certificates: a self-signed CA and serving certificates, kept in a Secret and rotated.

Where it sits: the toolkit's one certificate helper. The admission webhook
(``controller/delivery/webhook.py``, whose configuration carries the CA
bundle: ``webhookconfig.py``) and the catalog API
(``controller/catalog/tls.py``) both keep their certificate with
``CertKeeper.ensure``: every replica calls it at start and then
periodically, and they converge on the one Secret (writes carry the
resourceVersion, the loser of a race re-reads). The catalog also makes a
plain self-signed certificate (``self_signed``) when it runs without a
cluster, and both serve PEM bytes through ``load_chain``.

Rotation, so no client ever meets an untrusted certificate:
* the serving certificate is re-issued by the same CA when less than a
  third of its lifetime is left (or when the host names changed); the
  bundle does not change;
* the CA is replaced when less than a third of its lifetime is left; the
  old CA stays in the bundle until it expires, so a replica still serving
  the old certificate stays trusted; whoever publishes the bundle (the
  webhook configuration's ``caBundle``) does so *before* it serves the new
  certificate.

Keys are ECDSA P-256 (generated in microseconds; the API server accepts them).
The private keys live only in the Secret and in memory, never in logs.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kube import client as kube

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, CA_BUNDLE = "ca.crt", "ca.key", "ca-bundle.crt"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"
_BACKDATE = datetime.timedelta(minutes=5)  # a peer whose clock is a little behind still trusts it


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Bundle:
    """What a replica serves and what its clients must trust (PEM)."""

    cert: bytes
    key: bytes
    ca_bundle: bytes  # the current CA first, then a retiring one

    @property
    def ca_bundle_b64(self) -> str:
        return base64.b64encode(self.ca_bundle).decode()


# -- PEM ----------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def split_pems(data: bytes) -> list[bytes]:
    """The certificates of a PEM bundle, one PEM each."""
    marker = b"-----END CERTIFICATE-----"
    return [p.strip() + b"\n" for p in (x + marker for x in data.split(marker)[:-1]) if p.strip()]


def fingerprint(cert_pem: bytes) -> str:
    """SHA-256 of the first certificate's DER (what ``openssl x509 -fingerprint`` shows)."""
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    return hashlib.sha256(der).hexdigest()


def load_chain(ctx: ssl.SSLContext, cert_pem: bytes, key_pem: bytes) -> None:
    """Load PEM bytes into ``ctx``. ``load_cert_chain`` takes only paths: hand it memory
    files where Linux has them (the controller's root filesystem is read-only), else a
    private temp dir."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create(n) for n in (TLS_CERT, TLS_KEY)]
        try:
            for fd, data in zip(fds, (cert_pem, key_pem), strict=True):
                os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="modelcache-tls-") as d:
        for name, data in ((TLS_CERT, cert_pem), (TLS_KEY, key_pem)):
            fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(os.path.join(d, TLS_CERT), os.path.join(d, TLS_KEY))


def server_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS ≥ 1.2 server context serving ``cert_pem``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    load_chain(ctx, cert_pem, key_pem)
    return ctx


# -- making certificates ---------------------------------------------------------------


def _sans(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _sign(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey,
          signer: ec.EllipticCurvePrivateKey, now: datetime.datetime,
          not_after: datetime.datetime, *, ca: bool,
          extensions: list[x509.ExtensionType]) -> bytes:
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - _BACKDATE).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True))
    for ext in extensions:
        builder = builder.add_extension(ext, critical=isinstance(ext, x509.KeyUsage))
    return _pem(builder.sign(signer, hashes.SHA256()))


def new_ca(now: datetime.datetime, lifetime: datetime.timedelta,
           name: str = "modelcache-webhook-ca") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a CA named ``name-<unix time>``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"{name}-{int(now.timestamp())}")])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)
    cert = _sign(subject, subject, key, key, now, now + lifetime, ca=True, extensions=[
        usage, x509.SubjectKeyIdentifier.from_public_key(key.public_key())])
    return cert, _pem_key(key)


def new_serving(ca_pem: bytes, ca_key_pem: bytes, hosts: list[str], now: datetime.datetime,
                lifetime: datetime.timedelta) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``hosts``, issued by the CA; never outlives it."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    cert = _sign(subject, ca.subject, key, ca_key, now,
                 min(now + lifetime, ca.not_valid_after_utc), ca=False, extensions=[
                     x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), _sans(hosts),
                     x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())])
    return cert, _pem_key(key)


def new_client(ca_pem: bytes, ca_key_pem: bytes, common_name: str, now: datetime.datetime,
               lifetime: datetime.timedelta, organization: str = "") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for a client named ``common_name`` (``O=organization``).

    Kubernetes reads the user from CN and the groups from O; issued by the CA,
    never outliving it.
    """
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)] if organization else []
    subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = _sign(subject, ca.subject, key, ca_key, now,
                 min(now + lifetime, ca.not_valid_after_utc), ca=False, extensions=[
                     x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                     x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())])
    return cert, _pem_key(key)


def new_key_pair() -> tuple[bytes, bytes]:
    """(private key PEM, public key PEM): e.g. a service-account token signing pair."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return _pem_key(key), public


def new_rsa_signer(name: str, now: datetime.datetime,
                   lifetime: datetime.timedelta) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of a self-signed RSA-2048 signing pair named ``name``:
    what distribution's token auth checks RS256 tokens against (``rootcertbundle``)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return _pem(cert), key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())


def self_signed(hosts: list[str], days: int = 365,
                name: str = "modelcache-catalog") -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) for ``hosts`` (DNS names or IP addresses), its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else name)])
    now = _now()
    # CA:TRUE on a self-signed leaf: OpenSSL accepts it as its own trust anchor
    cert = _sign(subject, subject, key, key, now, now + datetime.timedelta(days=days), ca=True,
                 extensions=[x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                             _sans(hosts)])
    return cert, _pem_key(key)


# -- when to make new ones ---------------------------------------------------------------


def due(cert: x509.Certificate, now: datetime.datetime) -> bool:
    """Less than a third of the lifetime left (or not valid yet / any more)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) / 3 or now < start


def _hosts_of(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def _unexpired(bundle: bytes, now: datetime.datetime) -> list[bytes]:
    return [p for p in split_pems(bundle)
            if x509.load_pem_x509_certificate(p).not_valid_after_utc > now]


def plan_secret(data: dict[str, bytes], hosts: list[str], now: datetime.datetime, *,
                ca_lifetime: datetime.timedelta, cert_lifetime: datetime.timedelta,
                component: str = "webhook") -> dict[str, bytes]:
    """The Secret's data as it should be: ``data`` itself when nothing is due."""
    out = dict(data)
    try:
        ca = x509.load_pem_x509_certificate(data[CA_CERT])
        serialization.load_pem_private_key(data[CA_KEY], None)
    except (KeyError, ValueError):
        ca = None
    if ca is None or due(ca, now):
        old = _unexpired(data.get(CA_BUNDLE, b""), now)
        out[CA_CERT], out[CA_KEY] = new_ca(now, ca_lifetime, f"modelcache-{component}-ca")
        # the retiring CA stays trusted until it expires: replicas still serve its certs
        out[CA_BUNDLE] = out[CA_CERT] + b"".join(p for p in old if p != out[CA_CERT])
        ca = x509.load_pem_x509_certificate(out[CA_CERT])
        cert = None
    else:
        bundle = _unexpired(data.get(CA_BUNDLE, b""), now)
        if data[CA_CERT].strip() + b"\n" not in bundle:
            bundle.insert(0, data[CA_CERT].strip() + b"\n")
        out[CA_BUNDLE] = b"".join(bundle)
        try:
            cert = x509.load_pem_x509_certificate(data[TLS_CERT])
            serialization.load_pem_private_key(data[TLS_KEY], None)
        except (KeyError, ValueError):
            cert = None
    if cert is None or due(cert, now) or cert.issuer != ca.subject \
            or _hosts_of(cert) != set(hosts):
        out[TLS_CERT], out[TLS_KEY] = new_serving(out[CA_CERT], out[CA_KEY], hosts, now,
                                                  cert_lifetime)
    return out


# -- the Secret --------------------------------------------------------------------------


class CertKeeper:
    """Ensures the Secret ``namespace/name`` holds a valid CA and serving certificate."""

    def __init__(self, client: kube.Kube, namespace: str, name: str, hosts: list[str], *,
                 ca_lifetime: datetime.timedelta = datetime.timedelta(days=730),
                 cert_lifetime: datetime.timedelta = datetime.timedelta(days=90),
                 clock: Callable[[], datetime.datetime] = _now,
                 component: str = "webhook") -> None:
        if not hosts:
            raise ValueError("the serving certificate needs at least one host name or IP")
        self.client = client
        self.namespace = namespace
        self.name = name
        self.hosts = list(hosts)
        self.ca_lifetime = ca_lifetime
        self.cert_lifetime = cert_lifetime
        self.clock = clock
        self.component = component  # whose certificate: labels, CA name, logs

    def ensure(self) -> Bundle:
        for _ in range(5):
            try:
                secret: dict[str, Any] | None = self.client.get(kube.SECRETS, self.name,
                                                                self.namespace)
            except kube.NotFound:
                secret = None
            data = {k: base64.b64decode(v) for k, v in ((secret or {}).get("data") or {}).items()}
            want = plan_secret(data, self.hosts, self.clock(), ca_lifetime=self.ca_lifetime,
                               cert_lifetime=self.cert_lifetime, component=self.component)
            if want != data:
                encoded = {k: base64.b64encode(v).decode() for k, v in want.items()}
                try:
                    if secret is None:
                        self.client.create(kube.SECRETS, {
                            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                            "metadata": {"name": self.name, "namespace": self.namespace,
                                         "labels": {"app.kubernetes.io/name": "modelcache",
                                                    "app.kubernetes.io/component":
                                                        self.component}},
                            "data": encoded}, self.namespace)
                    else:
                        # the resourceVersion makes the patch conditional: a replica that
                        # rotated first wins and this one takes its result on the next pass
                        self.client.patch(kube.SECRETS, self.name, {
                            "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
                            "data": encoded}, self.namespace)
                except kube.Conflict:
                    continue
                log.info(f"{self.component} certificate written",
                         extra={"secret": f"{self.namespace}/{self.name}",
                                "rotatedCA": data.get(CA_CERT) != want[CA_CERT]})
            return Bundle(cert=want[TLS_CERT], key=want[TLS_KEY], ca_bundle=want[CA_BUNDLE])
        raise kube.Conflict(f"secret {self.namespace}/{self.name}: kept changing under us")
