"""The catalog API's HTTP side: model listing and a read-only OCI proxy to the DMCR.

Served by the manager when ``--distribution-mode PublicCatalog`` (HTTPS).
Routes, all but ``/healthz`` behind a bearer token (``auth``) and a
per-client rate limit (``ratelimit``):

* ``GET /catalog/v1/models`` (SAR verb ``list``): the Ready ClusterModels,
  as ``{"models": [{name, digest, sizeBytes, format, family, revision,
  metadata}]}``;
* ``GET /catalog/v1/models/<name>`` (verb ``get``, name ``<name>``): one;
* ``GET /v2/``: the OCI API check (a valid token is enough);
* ``GET|HEAD /v2/<name>/manifests/<digest>`` (verb ``get``): a manifest
  of that model's own repository, by digest only;
* ``GET|HEAD /v2/<name>/blobs/<digest>`` (verb ``get``): a blob that a
  manifest of that model references, streamed from the DMCR with ``Range``
  passed through (206 and ``Content-Range`` back).

The routing, authentication, listing and TLS wiring are here; the two OCI
routes' work (verified manifests, the blobs they allow, streaming) is in
``oci.py``.

What leaves the cluster is what an import needs and no more: model names,
manifest digests and the manifests' own content. Registry host, repository
paths, tags, publish Jobs and error texts of the DMCR stay inside; a blob
digest is served only as part of a model the caller may read, so the DMCR's
other content (namespaced Models) cannot be fetched by guessing digests.
Everything here is read-only: other methods get 405.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from api import model
from api.model import ModelView
from controller.catalog import oci, tls
from controller.catalog.auth import Authorizer, Denied
from controller.catalog.ratelimit import RateLimiter
from kube import certs
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

API_PREFIX = "/catalog/v1/models"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_OCI = re.compile(r"^/v2/(?P<name>[^/]+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
# an entry's ``metadata``: the resolved fields but those it names itself (format,
# family) and the tensor count, which the catalog has never shown
METADATA_FIELDS = tuple(k for k in model.RESOLVED_FIELDS
                        if k not in ("format", "family", "tensors"))


def entry(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A ClusterModel as the catalog shows it; None unless it serves an artifact now.

    "Ready" is the Ready condition, not the phase (``ModelView.serving``): a
    model being republished keeps serving its previous artifact, and so does
    the catalog.
    """
    view = ModelView.of(obj)
    if not view.serving:
        return None
    resolved = view.resolved
    return {"name": view.name, "digest": view.digest, "sizeBytes": view.size,
            "format": resolved.get("format"), "family": resolved.get("family"),
            "revision": view.resolved_revision or None,
            "metadata": {k: resolved[k] for k in METADATA_FIELDS if resolved.get(k) is not None}}


@dataclass
class Catalog:
    """What the handlers serve from: the ClusterModel cache and the DMCR."""

    get_model: Callable[[str], dict[str, Any] | None]
    list_models: Callable[[], list[dict[str, Any]]]
    registry: Callable[[], RegistryClient]
    authorizer: Authorizer
    limiter: RateLimiter | None = None

    def __post_init__(self) -> None:
        self.manifests = oci.Manifests(self.registry, self._current)

    def served(self, name: str) -> dict[str, Any] | None:
        obj = self.get_model(name)
        return entry(dict(obj, kind="ClusterModel")) if obj is not None else None

    def _current(self, name: str) -> str | None:
        found = self.served(name)
        return found["digest"] if found is not None else None

    def listing(self) -> list[dict[str, Any]]:
        out = [e for e in (entry(o) for o in self.list_models()) if e is not None]
        return sorted(out, key=lambda e: e["name"])


class Handler(oci.OCIHandler):
    protocol_version = "HTTP/1.1"
    server_version = "modelcache-catalog"
    sys_version = ""
    timeout = 120  # a client that stalls this long loses its connection and thread
    # headers and body leave in separate writes: with Nagle and delayed ACKs each small
    # answer would wait ~40 ms for the client's ACK
    disable_nagle_algorithm = True
    catalog: Catalog  # set on the subclass create_server makes

    def log_message(self, fmt: str, *args: Any) -> None:
        pass  # one structured line per request in _done instead

    def _done(self, user: str = "") -> None:
        log.info("catalog request", extra={"method": self.command,
                                           "path": urlsplit(self.path).path[:200],
                                           "status": getattr(self, "status", 0), "user": user,
                                           "client": self.client_address[0]})

    # -- methods ---------------------------------------------------------------

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def _read_only(self) -> None:
        self._error(405, "UNSUPPORTED", "the catalog is read-only", {"Allow": "GET, HEAD"})
        self.close_connection = True
        self._done()

    do_POST = do_PUT = do_PATCH = do_DELETE = _read_only

    def _serve(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._json(200, {"status": "ok"})
            return
        cat = self.catalog
        if cat.limiter is not None:
            wait = cat.limiter.allow(self.client_address[0])
            if wait > 0:
                self._error(429, "TOOMANYREQUESTS", "rate limited",
                            {"Retry-After": str(max(1, int(wait + 0.999)))})
                self._done()
                return
        auth = self.headers.get("Authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        user = ""
        try:
            if path in ("/v2", "/v2/"):
                user = cat.authorizer.authenticate(token).user
                self._json(200, {}, {"Docker-Distribution-API-Version": "registry/2.0"})
            elif path == API_PREFIX:
                user = cat.authorizer.check(token, "list").user
                self._json(200, {"models": cat.listing()})
            elif path.startswith(API_PREFIX + "/"):
                name = unquote(path[len(API_PREFIX) + 1:])
                user = cat.authorizer.check(token, "get", name).user
                found = cat.served(name) if _NAME.match(name) else None
                if found is None:
                    self._error(404, "NAME_UNKNOWN", f"no Ready model {name[:100]!r}")
                else:
                    self._json(200, found)
            elif (m := _OCI.match(path)) is not None:
                name, kind, ref = unquote(m["name"]), m["kind"], unquote(m["ref"])
                user = cat.authorizer.check(token, "get", name).user
                if not _NAME.match(name) or cat.served(name) is None:
                    self._error(404, "NAME_UNKNOWN", f"no Ready model {name[:100]!r}")
                else:
                    self._oci(name, kind, ref)
            else:
                self._error(404, "NOT_FOUND", "no such endpoint")
        except Denied as e:
            headers = {"WWW-Authenticate": 'Bearer realm="modelcache-catalog"'} \
                if e.status == 401 else {}
            if e.status == 503:  # the API server could not decide: nothing is served
                headers["Retry-After"] = "1"
            code = {401: "UNAUTHORIZED", 403: "DENIED"}.get(e.status, "UNAVAILABLE")
            self._error(e.status, code, str(e), headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True
            return
        self._done(user)

class CatalogServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    tls_keeper: tls.Keeper | None = None

    @property
    def cert_pem(self) -> bytes | None:
        """What importing clusters put in their ``caBundle``, when this side knows it: the
        shared Secret's CA bundle, or a self-signed certificate made here."""
        return self.tls_keeper.material.ca if self.tls_keeper is not None else None

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        if self.tls_keeper is not None:
            # the context of this moment: a renewed certificate is served from the next
            # connection on. No handshake in accept(): a slow client must not stall the
            # accepting thread; OpenSSL does it on the handler thread's first read
            sock = self.tls_keeper.context.wrap_socket(sock, server_side=True,
                                                       do_handshake_on_connect=False)
        return sock, addr

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self.tls_keeper is not None:
            self.tls_keeper.start()
        super().serve_forever(poll_interval)

    def server_close(self) -> None:
        if self.tls_keeper is not None:
            self.tls_keeper.stop()
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, ssl.SSLError | ConnectionError | TimeoutError):
            # a client that does not trust us, or hung up: its business, not a traceback
            log.debug("catalog connection dropped", extra={"client": client_address[0],
                                                           "error": str(exc)[:200]})
            return
        log.warning("catalog handler error", exc_info=True,
                    extra={"client": client_address[0]})


def create_server(address: tuple[str, int], catalog: Catalog,
                  keeper: tls.Keeper | None) -> CatalogServer:
    """Bind ``address`` (port 0: any); HTTPS with ``keeper``'s current certificate when
    given (always, in a cluster)."""
    handler = type("BoundHandler", (Handler,), {"catalog": catalog,
                                                 "manifests": catalog.manifests})
    server = CatalogServer(address, handler)
    server.tls_keeper = keeper
    return server


@dataclass(frozen=True)
class Config:
    """The manager's catalog flags (``--distribution-mode PublicCatalog``).

    The certificate, first that applies (tls.py): ``cert_file``/``key_file``;
    ``tls_secret`` served as-is; the shared self-signed ``ca_secret``; else one
    made in memory by this process.
    """

    listen: tuple[str, int] = ("0.0.0.0", 8443)
    cert_file: str | None = None  # PEM; generated (self-signed) and written here if missing
    key_file: str | None = None
    hosts: tuple[str, ...] = ()  # SANs of a self-signed certificate
    auth_ttl: float = 10.0  # seconds a TokenReview/SAR decision is reused
    rate: float = 50.0  # requests per second per client address
    burst: int = 200
    audiences: tuple[str, ...] = ()  # TokenReview audiences; default: the API server's
    namespace: str = ""  # of the Secrets below (the controller's)
    tls_secret: str | None = None  # a kubernetes.io/tls Secret kept by someone else
    ca_secret: str | None = None  # the replicas' shared self-signed CA + certificate
    service: str = "modelcache-controller"  # its DNS names are SANs of the shared certificate
    tls_interval: float = 30.0  # seconds between looks at the certificate's source

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("catalog TLS: give both the certificate and the key file")
        if self.cert_file and self.tls_secret:
            raise ValueError("catalog TLS: certificate files or a Secret, not both")
        if (self.tls_secret or self.ca_secret) and not self.namespace:
            raise ValueError("catalog TLS: a Secret needs the controller's namespace")

    def shared_hosts(self) -> list[str]:
        """SANs of the shared certificate: the same on every replica (a replica that saw
        other names would re-issue it back and forth), so no pod name."""
        svc, ns = self.service, self.namespace
        names = [f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local", f"{svc}.{ns}", svc]
        return list(dict.fromkeys([*self.hosts, *names]))


def _tls(config: Config, client: Any) -> tls.Keeper:
    import socket

    source: tls.Source
    if config.cert_file and config.key_file:
        source = tls.Files(config.cert_file, config.key_file,
                           list(config.hosts) or [socket.gethostname(), "localhost", "127.0.0.1"])
    elif config.tls_secret:
        source = tls.UserSecret(client, config.namespace, config.tls_secret)
    elif config.ca_secret:
        source = tls.SharedSecret(client, config.namespace, config.ca_secret,
                                  config.shared_hosts())
    else:
        source = tls.InMemory(list(config.hosts) or [socket.gethostname(), "localhost",
                                                     "127.0.0.1"])
    return tls.Keeper(source, config.tls_interval)


def build(config: Config, client: Any, cluster_models: Any,
          registry: Callable[[], RegistryClient]) -> CatalogServer:
    """The catalog server over the manager's ClusterModel informer and DMCR client.

    ``server.cert_pem`` is what importing clusters put in their ``caBundle``
    when this side made the certificate (the shared Secret's CA bundle, or a
    self-signed certificate), else None.
    """
    keeper = _tls(config, client)
    catalog = Catalog(get_model=lambda name: cluster_models.get(("", name)),
                      list_models=cluster_models.items, registry=registry,
                      authorizer=Authorizer(client, ttl=config.auth_ttl,
                                            audiences=config.audiences),
                      limiter=RateLimiter(config.rate, config.burst))
    server = create_server(config.listen, catalog, keeper)
    fields = {"sha256": certs.fingerprint(keeper.material.cert)}
    if isinstance(keeper.source, tls.SharedSecret):
        log.info("catalog serves the replicas' shared certificate", extra={
            **fields, "secret": f"{config.namespace}/{config.ca_secret}"})
    elif isinstance(keeper.source, tls.InMemory) or (
            isinstance(keeper.source, tls.Files) and keeper.source.made):
        log.warning("catalog serves a self-signed certificate of its own", extra={
            **fields, "certFile": config.cert_file or ""})
    return server
