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

What leaves the cluster is what an import needs and no more: model names,
manifest digests and the manifests' own content. Registry host, repository
paths, tags, publish Jobs and error texts of the DMCR stay inside; a blob
digest is served only as part of a model the caller may read, so the DMCR's
other content (namespaced Models) cannot be fetched by guessing digests.
Everything here is read-only: other methods get 405.
"""

from __future__ import annotations

import json
import logging
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from controller.catalog import tls
from controller.catalog.auth import Authorizer, Denied
from controller.catalog.ratelimit import RateLimiter
from controller.models import publishjob as jobs
from kube.httpreply import reply
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import parse_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

API_PREFIX = "/catalog/v1/models"
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_OCI = re.compile(r"^/v2/(?P<name>[^/]+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")
METADATA_FIELDS = ("architecture", "parameterCount", "paramSize", "precision", "quantization",
                   "contextLength", "files")
CHUNK = 1 << 20
MANIFEST_CACHE = 256


def entry(obj: dict[str, Any]) -> dict[str, Any] | None:
    """A ClusterModel as the catalog shows it; None unless it serves an artifact now.

    "Ready" is the Ready condition, not the phase: a model being republished
    keeps serving its previous artifact, and so does the catalog.
    """
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or [])
    art = status.get("artifact") or {}
    digest = str(art.get("digest") or "")
    if not ready or not _DIGEST.match(digest):
        return None
    resolved = status.get("resolved") or {}
    return {"name": str(meta.get("name")), "digest": digest,
            "sizeBytes": int(art.get("sizeBytes") or 0),
            "format": resolved.get("format"), "family": resolved.get("family"),
            "revision": (status.get("source") or {}).get("resolvedRevision") or None,
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
        # (model, manifest digest) -> (bytes, media type, blob digests it references);
        # manifests are immutable by digest, so the cache never needs invalidation
        self._manifests: OrderedDict[tuple[str, str], tuple[bytes, str, frozenset[str]]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self._client: RegistryClient | None = None

    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self.registry()
        return self._client

    def served(self, name: str) -> dict[str, Any] | None:
        obj = self.get_model(name)
        return entry(dict(obj, kind="ClusterModel")) if obj is not None else None

    def listing(self) -> list[dict[str, Any]]:
        out = [e for e in (entry(o) for o in self.list_models()) if e is not None]
        return sorted(out, key=lambda e: e["name"])

    def manifest(self, name: str, digest: str) -> tuple[bytes, str, frozenset[str]]:
        """A manifest of model ``name``'s repository, verified; ``NotFoundError`` if absent."""
        with self._lock:
            hit = self._manifests.get((name, digest))
            if hit is not None:
                self._manifests.move_to_end((name, digest))
                return hit
        client = self.client()
        repo = jobs.repository({"kind": "ClusterModel", "metadata": {"name": name}})
        raw, _, media_type = client.get_manifest(Reference(client.host, repo, digest=digest))
        m, _ = parse_manifest(raw, digest)  # a ModelPack, or we do not serve it
        blobs = {str(m["config"]["digest"])}
        blobs.update(str(d.get("digest")) for d in m["layers"] if isinstance(d, dict))
        value = (raw, media_type or str(m.get("mediaType") or mt.OCI_MANIFEST), frozenset(blobs))
        with self._lock:
            self._manifests[(name, digest)] = value
            while len(self._manifests) > MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return value

    def blob_allowed(self, name: str, digest: str) -> bool:
        """Whether a manifest of ``name`` references ``digest`` (the current one loaded if
        nothing cached says so: a restarted server serves a resumed import)."""
        with self._lock:
            if any(n == name and digest in blobs
                   for (n, _), (_, _, blobs) in self._manifests.items()):
                return True
        current = self.served(name)
        if current is None:
            return False
        try:
            _, _, blobs = self.manifest(name, current["digest"])
        except NotFoundError:
            return False
        return digest in blobs


class Handler(BaseHTTPRequestHandler):
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

    # -- replies ---------------------------------------------------------------

    def _json(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        reply(self, code, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(),
              headers=headers)

    def _error(self, code: int, oci_code: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        self._json(code, {"errors": [{"code": oci_code, "message": message}]}, headers)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response(code, message)

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
                self._oci(name, kind, ref)
            else:
                self._error(404, "NOT_FOUND", "no such endpoint")
        except Denied as e:
            headers = {"WWW-Authenticate": 'Bearer realm="modelcache-catalog"'} \
                if e.status == 401 else {}
            code = {401: "UNAUTHORIZED", 403: "DENIED"}.get(e.status, "UNAVAILABLE")
            self._error(e.status, code, str(e), headers)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, TimeoutError):
            self.close_connection = True
            return
        self._done(user)

    # -- OCI -------------------------------------------------------------------

    def _oci(self, name: str, kind: str, ref: str) -> None:
        cat = self.catalog
        if not _NAME.match(name) or cat.served(name) is None:
            self._error(404, "NAME_UNKNOWN", f"no Ready model {name[:100]!r}")
            return
        if not _DIGEST.match(ref):
            self._error(404, "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN",
                        "only sha256 digests are served")
            return
        try:
            if kind == "manifests":
                raw, media_type, _ = cat.manifest(name, ref)
                self.send_response(200)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Docker-Content-Digest", ref)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)
                return
            if not cat.blob_allowed(name, ref):
                self._error(404, "BLOB_UNKNOWN", "no such blob in this model")
                return
            self._blob(name, ref)
        except NotFoundError:
            self._error(404, "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN",
                        f"{kind[:-1]} not found")
        except ModelPackError as e:
            # the DMCR's own words stay inside: they name hosts and repositories
            log.warning("catalog upstream error", extra={"model": name, "ref": ref,
                                                         "error": str(e)[:300]})
            self._error(502, "UNAVAILABLE", "the registry behind the catalog failed")

    def _blob(self, name: str, digest: str) -> None:
        repo = jobs.repository({"kind": "ClusterModel", "metadata": {"name": name}})
        headers = {}
        if self.headers.get("Range"):
            headers["Range"] = self.headers["Range"]
        resp = self.catalog.client().request(self.command, f"/v2/{repo}/blobs/{digest}",
                                             headers=headers, stream=True,
                                             ok=(200, 206, 416), what=digest)
        try:
            self.send_response(resp.status_code)
            for h in ("Content-Length", "Content-Range"):
                if resp.headers.get(h):
                    self.send_header(h, resp.headers[h])
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Docker-Content-Digest", digest)
            self.end_headers()
            if self.command == "HEAD" or resp.status_code == 416:
                return
            fp = getattr(resp.raw, "_fp", None)
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            if fp is not None and not resp.headers.get("Content-Encoding"):
                while n := fp.readinto(view):
                    self.wfile.write(view[:n])
            else:
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    self.wfile.write(chunk)
        finally:
            resp.close()


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
    handler = type("BoundHandler", (Handler,), {"catalog": catalog})
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
    fields = {"sha256": tls.fingerprint(keeper.material.cert)}
    if isinstance(keeper.source, tls.SharedSecret):
        log.info("catalog serves the replicas' shared certificate", extra={
            **fields, "secret": f"{config.namespace}/{config.ca_secret}"})
    elif isinstance(keeper.source, tls.InMemory) or (
            isinstance(keeper.source, tls.Files) and keeper.source.made):
        log.warning("catalog serves a self-signed certificate of its own", extra={
            **fields, "certFile": config.cert_file or ""})
    return server
