"""The webhook's TLS: a self-signed CA and serving certificate kept in a Secret,
and the MutatingWebhookConfiguration kept in step with them.

Where it sits: the manager's ``Delivery`` (webhook.py) calls ``CertKeeper.ensure``
at start and then periodically; every replica does, and they converge on
the one Secret (writes carry the resourceVersion, the loser of a race
re-reads). The API server trusts the webhook through the configuration's
``caBundle``.

Rotation, so no request ever meets an untrusted certificate:
* the serving certificate is re-issued by the same CA when less than a
  third of its lifetime is left (or when the host names changed); the
  bundle does not change;
* the CA is replaced when less than a third of its lifetime is left; the
  old CA stays in the bundle until it expires, so a replica still serving
  the old certificate stays trusted; the replica that rotates writes the
  webhook configuration's new bundle *before* it serves the new
  certificate.

Keys are ECDSA P-256 (generated in microseconds; the API server accepts them).
The private keys live only in the Secret and in memory, never in logs.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from api import names as c
from kube import client as kube

log = logging.getLogger(__name__)

MWC = kube.Resource("admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations",
                    False, "MutatingWebhookConfiguration")
CA_CERT, CA_KEY, CA_BUNDLE = "ca.crt", "ca.key", "ca-bundle.crt"
TLS_CERT, TLS_KEY = "tls.crt", "tls.key"
WEBHOOK_PATH = "/mutate"
TIMEOUT_SECONDS = 5  # the API server waits at most this long per call (limit: 30, asked: ≤ 10)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass(frozen=True)
class Bundle:
    """What a replica serves and what the API server must trust (PEM)."""

    cert: bytes
    key: bytes
    ca_bundle: bytes  # the current CA first, then a retiring one

    @property
    def ca_bundle_b64(self) -> str:
        return base64.b64encode(self.ca_bundle).decode()


# -- certificates -------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def new_ca(now: datetime.datetime, lifetime: datetime.timedelta,
           name: str = "modelcache-webhook-ca") -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                            f"{name}-{int(now.timestamp())}")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return _pem(cert), _pem_key(key)


def new_serving(ca_pem: bytes, ca_key_pem: bytes, hosts: list[str], now: datetime.datetime,
                lifetime: datetime.timedelta) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    not_after = min(now + lifetime, ca.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return _pem(cert), _pem_key(key)


def _due(cert: x509.Certificate, now: datetime.datetime) -> bool:
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


def _split_pems(data: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    return [p.strip() + b"\n" for p in (x + marker for x in data.split(marker)[:-1]) if p.strip()]


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
    if ca is None or _due(ca, now):
        old = [p for p in _split_pems(data.get(CA_BUNDLE, b""))
               if x509.load_pem_x509_certificate(p).not_valid_after_utc > now]
        out[CA_CERT], out[CA_KEY] = new_ca(now, ca_lifetime, f"modelcache-{component}-ca")
        # the retiring CA stays trusted until it expires: replicas still serve its certs
        out[CA_BUNDLE] = out[CA_CERT] + b"".join(p for p in old if p != out[CA_CERT])
        ca = x509.load_pem_x509_certificate(out[CA_CERT])
        cert = None
    else:
        bundle = [p for p in _split_pems(data.get(CA_BUNDLE, b""))
                  if x509.load_pem_x509_certificate(p).not_valid_after_utc > now]
        if data[CA_CERT].strip() + b"\n" not in bundle:
            bundle.insert(0, data[CA_CERT].strip() + b"\n")
        out[CA_BUNDLE] = b"".join(bundle)
        try:
            cert = x509.load_pem_x509_certificate(data[TLS_CERT])
            serialization.load_pem_private_key(data[TLS_KEY], None)
        except (KeyError, ValueError):
            cert = None
    if cert is None or _due(cert, now) or cert.issuer != ca.subject \
            or _hosts_of(cert) != set(hosts):
        out[TLS_CERT], out[TLS_KEY] = new_serving(out[CA_CERT], out[CA_KEY], hosts, now,
                                                  cert_lifetime)
    return out


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


# -- the MutatingWebhookConfiguration --------------------------------------------------


def _has_any(var: str, *keys: str) -> str:
    inner = " || ".join(f"'{k}' in {var}.metadata.annotations" for k in keys)
    return f"has({var}.metadata.annotations) && ({inner})"


def webhooks(client_config: dict[str, Any], *,
             exclude_namespaces: tuple[str, ...] = ("kube-system",)) -> list[dict[str, Any]]:
    """The two webhooks. ``matchConditions`` (CEL on the annotations) keep every object that
    does not ask for models away from the webhook, so ``failurePolicy: Fail`` refuses only
    annotated objects while the controller is down; everything else never calls it."""
    common: dict[str, Any] = {
        "admissionReviewVersions": ["v1"], "sideEffects": "None", "failurePolicy": "Fail",
        "timeoutSeconds": TIMEOUT_SECONDS, "matchPolicy": "Equivalent",
        # a webhook added after ours (a sidecar injector) may add containers: run again
        "reinvocationPolicy": "IfNeeded",
        "namespaceSelector": {"matchExpressions": [{
            "key": "kubernetes.io/metadata.name", "operator": "NotIn",
            "values": list(exclude_namespaces)}]},
        "objectSelector": {},
        "clientConfig": client_config,
    }
    asks = (c.ANN_MODELS, c.ANN_CLUSTER_MODELS)
    return [
        {**common, "name": "workloads.modelcache.io",
         "rules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"],
                    "resources": ["deployments", "statefulsets", "daemonsets"],
                    "scope": "Namespaced"},
                   {"apiGroups": ["batch"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["jobs", "cronjobs"],
                    "scope": "Namespaced"}],
         "matchConditions": [{
             "name": "asks-for-models-or-was-injected",
             # UPDATE: the annotation may just have been removed (strip what we added)
             "expression": f"({_has_any('object', *asks, c.ANN_INJECTED)}) || "
                           f"(oldObject != null && {_has_any('oldObject', *asks)})"}]},
        {**common, "name": "pods.modelcache.io",
         "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                    "resources": ["pods"], "scope": "Namespaced"}],
         "matchConditions": [{
             "name": "asks-for-models",
             "expression": _has_any("object", *asks)},
             {"name": "not-from-an-injected-template",
              "expression": f"!(has(object.metadata.ownerReferences) && "
                            f"{_has_any('object', c.ANN_INJECTED)})"}]},
    ]


def service_client_config(namespace: str, service: str, port: int, ca_b64: str) -> dict[str, Any]:
    return {"service": {"namespace": namespace, "name": service, "port": port,
                        "path": WEBHOOK_PATH}, "caBundle": ca_b64}


def url_client_config(url: str, ca_b64: str) -> dict[str, Any]:
    """``url`` as given, or with ``WEBHOOK_PATH`` when it names only the server."""
    if urlsplit(url).path in ("", "/"):
        url = url.rstrip("/") + WEBHOOK_PATH
    return {"url": url, "caBundle": ca_b64}


def _covers(live: Any, want: Any) -> bool:
    """Whether ``live`` has every field of ``want`` (the server adds defaults of its own)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(_covers(live.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(
            _covers(a, b) for a, b in zip(live, want, strict=True))
    return bool(live == want)


def ensure_webhook_config(client: kube.Kube, name: str, hooks: list[dict[str, Any]]) -> bool:
    """Create or update the MutatingWebhookConfiguration ``name``; True if it was written."""
    body = {"apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "modelcache",
                                                  "app.kubernetes.io/component": "webhook"}},
            "webhooks": hooks}
    try:
        live = client.get(MWC, name)
    except kube.NotFound:
        try:
            client.create(MWC, body)
            log.info("webhook configuration created", extra={"configuration": name})
            return True
        except kube.Conflict:
            live = client.get(MWC, name)
    if _covers(live.get("webhooks"), hooks):
        return False
    # a merge patch replaces the list whole: webhooks someone else added under our name go
    client.patch(MWC, name, {"webhooks": hooks})
    log.info("webhook configuration updated", extra={"configuration": name})
    return True
