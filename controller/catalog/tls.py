"""The catalog API's serving certificate: where it comes from, and keeping it current.

Where it sits: ``server.build`` picks a source from the manager's flags and
wraps it in a ``Keeper``; the ``CatalogServer`` wraps every accepted
connection with the Keeper's current ``SSLContext``, and the Keeper re-reads
its source every ``interval`` seconds, so a changed certificate is served
from the next connection on, without a restart.

Sources, by the manager's flags:

* ``SharedSecret`` (the default in a cluster, ``--catalog-ca-secret``): one
  self-signed CA and serving certificate in a Secret of the controller's
  namespace (``modelcache-catalog-tls``), kept by ``kube.certs.CertKeeper``
  (as the webhook's is): whichever replica gets there first creates it (a
  replica that loses the race gets 409 and reads the winner's), writes carry
  the resourceVersion, the serving certificate is re-issued by the same CA
  when a third of its lifetime is left. Every replica serves the same
  certificate, so importers behind the Service trust one CA (the Secret's
  ``ca-bundle.crt``). The CA lives ten years, so its rotation, the one
  change importers must follow by hand, is rare.
* ``UserSecret`` (``--catalog-tls-secret``): a ``kubernetes.io/tls`` Secret
  kept by someone else (cert-manager, the administrator), served as-is.
* ``Files`` (``--catalog-tls-cert``/``--catalog-tls-key``, out of cluster):
  PEM files, self-signed and written there when absent.
* ``InMemory``: a self-signed certificate made once by this process (tests,
  a one-replica trial); it differs per process.

Making, checking and loading certificates is ``kube.certs``'s (the webhook
uses the same helper); this module only picks the source and keeps the
served context current. Private keys stay in the Secret, the files and
memory, never in logs.
"""

from __future__ import annotations

import base64
import datetime
import logging
import os
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from kube import certs
from kube import client as kube

log = logging.getLogger(__name__)

CA_LIFETIME = datetime.timedelta(days=3650)
CERT_LIFETIME = datetime.timedelta(days=90)


class TLSConfigError(Exception):
    """The configured certificate cannot be served (missing Secret, keys, or a bad pair)."""


@dataclass(frozen=True)
class Material:
    """What a catalog serves (PEM), and what importers must trust (``ca``; None when the
    certificate comes from elsewhere and its issuer is not known here)."""

    cert: bytes
    key: bytes
    ca: bytes | None = None


class Source(Protocol):
    def load(self) -> Material: ...


# -- sources ------------------------------------------------------------------------


class InMemory:
    """A self-signed certificate made once, here: every process has its own."""

    def __init__(self, hosts: list[str]) -> None:
        cert, key = certs.self_signed(hosts)
        self.material = Material(cert, key, ca=cert)

    def load(self) -> Material:
        return self.material


class Files:
    """PEM files, read again at every check; self-signed and written when absent."""

    def __init__(self, cert_file: str, key_file: str, hosts: list[str]) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.made: bytes | None = None  # the self-signed certificate written here
        if not os.path.exists(cert_file):
            cert, key = certs.self_signed(hosts)
            for path, data, mode in ((key_file, key, 0o600), (cert_file, cert, 0o644)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            self.made = cert

    def load(self) -> Material:
        try:
            with open(self.cert_file, "rb") as c, open(self.key_file, "rb") as k:
                cert, key = c.read(), k.read()
        except OSError as e:
            raise TLSConfigError(f"catalog certificate files: {e}") from e
        return Material(cert, key, ca=cert if cert == self.made else None)


class UserSecret:
    """A ``kubernetes.io/tls`` Secret kept by someone else: ``tls.crt``, ``tls.key`` and,
    when present, ``ca.crt`` (what importers trust), served as they are."""

    def __init__(self, client: Any, namespace: str, name: str) -> None:
        self.client, self.namespace, self.name = client, namespace, name

    def load(self) -> Material:
        what = f"catalog TLS Secret {self.namespace}/{self.name}"
        try:
            secret = self.client.get(kube.SECRETS, self.name, self.namespace)
        except kube.NotFound as e:
            raise TLSConfigError(f"{what} not found") from e
        data = secret.get("data") or {}
        missing = [k for k in ("tls.crt", "tls.key") if not data.get(k)]
        if missing:
            raise TLSConfigError(f"{what} has no {' or '.join(missing)}")
        ca = base64.b64decode(data["ca.crt"]) if data.get("ca.crt") else None
        return Material(base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]),
                        ca=ca)


class SharedSecret:
    """One self-signed CA and serving certificate for every replica, in a Secret they
    all keep (``certs.CertKeeper``: create-if-absent, conditional writes, rotation)."""

    def __init__(self, client: Any, namespace: str, name: str, hosts: list[str], *,
                 ca_lifetime: datetime.timedelta = CA_LIFETIME,
                 cert_lifetime: datetime.timedelta = CERT_LIFETIME) -> None:
        self.keeper = certs.CertKeeper(client, namespace, name, hosts,
                                       ca_lifetime=ca_lifetime, cert_lifetime=cert_lifetime,
                                       component="catalog")

    def load(self) -> Material:
        bundle = self.keeper.ensure()
        return Material(bundle.cert, bundle.key, ca=bundle.ca_bundle)


# -- keeping the context current ------------------------------------------------------


class Keeper:
    """The ``SSLContext`` to serve now, from ``source``, checked every ``interval`` s.

    The first load happens here and raises (a missing Secret is a configuration
    error the manager should not start with); later failures are logged and the
    current certificate keeps serving.
    """

    def __init__(self, source: Source, interval: float = 30.0) -> None:
        self.source = source
        self.interval = interval
        self.material = source.load()
        self.context = self._context(self.material)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _context(m: Material) -> ssl.SSLContext:
        try:
            return certs.server_context(m.cert, m.key)
        except (ssl.SSLError, ValueError) as e:  # a key that does not match, not PEM
            raise TLSConfigError(f"catalog certificate cannot be served: {e}") from e

    def check(self) -> bool:
        """Load the source again; True when a new certificate is served from now on."""
        m = self.source.load()
        if (m.cert, m.key) == (self.material.cert, self.material.key):
            if m.ca != self.material.ca:
                self.material = m
            return False
        ctx = self._context(m)
        # the context first: a connection accepted meanwhile gets the old or the new
        # pair, never a mix
        self.context, self.material = ctx, m
        log.info("catalog serving a new certificate",
                 extra={"sha256": certs.fingerprint(m.cert)})
        return True

    def start(self) -> None:
        if self._thread is None and self.interval > 0:
            self._thread = threading.Thread(target=self._run, daemon=True, name="catalog-tls")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception as e:  # the API server away, a broken edit: keep serving
                log.warning("catalog certificate check failed", extra={"error": str(e)[:300]})
