"""The DMCR's serving certificate: issued by the controller's own CA, rotated, trusted by
every client of the registry inside the cluster.

Where it sits: the manager (``app.Manager``) runs one ``RegistryTLS`` when
``--registry-tls-secret`` is set (the chart and ``daemonset/`` set it). Each
pass (``sync``), in this order:

1. ``kube.certs.CertKeeper`` keeps the CA and the serving certificate in the
   Secret (``modelcache-dmcr-tls``) for the DMCR Service's names and the
   controller Service's (``hosts``); every replica runs it and they converge
   on the one Secret (conditional writes, the loser of a race re-reads). The
   DMCR's two registry containers mount it (``http.tls`` in
   ``dmcr-config.yaml``).
2. The CA bundle (public: the current CA, then a retiring one) goes to the
   ConfigMap ``modelcache-registry-ca`` (key ``ca.crt``), which the node
   DaemonSet and the upload gateway mount, and to a file of this process
   (``ca_file``) that the manager's own registry client reads and that is
   copied into each publish and materializer Job's Secret as ``ca.crt``.
   The bundle is published *before* a new certificate is served: a CA
   rotation keeps the old CA in it until it expires.
3. distribution reads its certificate only at start, so the dmcr
   Deployment's pod template carries the certificate's SHA-256
   (``ANN_FINGERPRINT``): a renewed certificate changes it and the
   Deployment rolls. Every replica computes the same value from the same
   Secret, so a second patch is a no-op.

Private keys stay in the Secret and in memory, never in logs or in the
ConfigMap.
"""

from __future__ import annotations

import datetime
import logging
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from api import names as contract
from kube import certs
from kube import client as kube

log = logging.getLogger(__name__)

ANN_FINGERPRINT = contract.ANN_TLS_FINGERPRINT
CA_KEY = "ca.crt"  # the ConfigMap's key, the Job Secret's file
CA_LIFETIME = datetime.timedelta(days=3650)
CERT_LIFETIME = datetime.timedelta(days=90)


def service_hosts(services: tuple[str, ...], namespace: str) -> list[str]:
    """Every name a Service is reached by from a pod: short, namespaced, .svc, full."""
    out: list[str] = []
    for svc in services:
        out += [f"{svc}.{namespace}.svc", f"{svc}.{namespace}.svc.cluster.local",
                f"{svc}.{namespace}", svc]
    return out


@dataclass(frozen=True)
class Config:
    namespace: str
    secret: str = "modelcache-dmcr-tls"
    ca_configmap: str = "modelcache-registry-ca"
    deployment: str | None = "dmcr"  # None: nothing to roll (a registry kept elsewhere)
    services: tuple[str, ...] = ("dmcr", "modelcache-controller")
    extra_hosts: tuple[str, ...] = ()
    ca_file: str = field(default_factory=lambda: os.path.join(
        tempfile.gettempdir(), "modelcache-registry-ca.crt"))
    interval: float = 300.0
    ca_lifetime: datetime.timedelta = CA_LIFETIME
    cert_lifetime: datetime.timedelta = CERT_LIFETIME

    def hosts(self) -> list[str]:
        return service_hosts(self.services, self.namespace) + list(self.extra_hosts)


class RegistryTLS:
    """Keeps the DMCR's certificate, publishes its CA, rolls the DMCR on renewal."""

    def __init__(self, client: kube.Kube, cfg: Config, **keeper: Any) -> None:
        self.client = client
        self.cfg = cfg
        self.keeper = certs.CertKeeper(client, cfg.namespace, cfg.secret, cfg.hosts(),
                                       ca_lifetime=cfg.ca_lifetime,
                                       cert_lifetime=cfg.cert_lifetime,
                                       component="dmcr", **keeper)
        self._stop = threading.Event()
        # called with each pass's bundle: the token realm serves the same certificate
        self.listeners: list[Callable[[certs.Bundle], None]] = []

    def sync(self) -> certs.Bundle:
        """One pass: the Secret, the CA (ConfigMap and file), then the Deployment's roll."""
        bundle = self.keeper.ensure()
        self.ensure_ca_configmap(bundle.ca_bundle)
        self.write_ca_file(bundle.ca_bundle)
        if self.cfg.deployment:
            self.ensure_rolled(certs.fingerprint(bundle.cert))
        for listener in self.listeners:
            listener(bundle)
        return bundle

    def ensure_ca_configmap(self, ca_bundle: bytes) -> None:
        name, ns = self.cfg.ca_configmap, self.cfg.namespace
        data = {CA_KEY: ca_bundle.decode()}
        try:
            current = self.client.get(kube.CONFIGMAPS, name, ns)
        except kube.NotFound:
            try:
                self.client.create(kube.CONFIGMAPS, {
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": name, "namespace": ns,
                                 "labels": {"app.kubernetes.io/name": "modelcache",
                                            "app.kubernetes.io/component": "dmcr"}},
                    "data": data}, ns)
                return
            except kube.Conflict:
                current = self.client.get(kube.CONFIGMAPS, name, ns)
        if (current.get("data") or {}).get(CA_KEY) != data[CA_KEY]:
            self.client.patch(kube.CONFIGMAPS, name, {"data": data}, ns)
            log.info("registry CA bundle published",
                     extra={"configmap": f"{ns}/{name}"})

    def write_ca_file(self, ca_bundle: bytes) -> None:
        """The bundle as a file (temp file, rename: a reader never sees half of it)."""
        path = self.cfg.ca_file
        try:
            with open(path, "rb") as f:
                if f.read() == ca_bundle:
                    return
        except FileNotFoundError:
            pass
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".registry-ca-")
        with os.fdopen(fd, "wb") as f:
            f.write(ca_bundle)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    def ensure_rolled(self, fp: str) -> None:
        """The dmcr Deployment's pod template names ``fp``; a changed value rolls it."""
        name, ns = str(self.cfg.deployment), self.cfg.namespace
        try:
            dep = self.client.get(kube.DEPLOYMENTS, name, ns)
        except kube.NotFound:
            return  # not installed (yet): it starts with whatever the Secret holds then
        ann = (((dep.get("spec") or {}).get("template") or {}).get("metadata") or {}) \
            .get("annotations") or {}
        if ann.get(ANN_FINGERPRINT) == fp:
            return
        self.client.patch(kube.DEPLOYMENTS, name, {"spec": {"template": {"metadata": {
            "annotations": {ANN_FINGERPRINT: fp}}}}}, ns)
        log.info("dmcr rolled for a renewed certificate",
                 extra={"deployment": f"{ns}/{name}", "sha256": fp})

    def start(self) -> None:
        """A first pass now (a failure stops the manager's start, as the webhook's), then
        one every ``interval`` seconds."""
        self.sync()
        threading.Thread(target=self._keep, daemon=True, name="dmcr-tls").start()

    def stop(self) -> None:
        self._stop.set()

    def _keep(self) -> None:
        while not self._stop.wait(self.cfg.interval):
            try:
                self.sync()
            except Exception as e:  # the next pass retries; the current certificate serves
                log.warning("dmcr certificate check failed", extra={"error": str(e)[:300]})


def read_ca(path: str | None) -> bytes | None:
    """The CA bundle a Job is given (``ca.crt`` of its Secret); None without one."""
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


__all__ = ["ANN_FINGERPRINT", "CA_KEY", "Config", "RegistryTLS", "read_ca", "service_hosts"]
