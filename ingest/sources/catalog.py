"""Another cluster's catalog, as a source: its URIs, its client, its errors.

Pipeline position: the client the ``ModelCatalogSource`` reconciler lists a
catalog with (``controller.catalog.sources``), the client a catalog import
copies blobs with (``ingest.publish.catalog_import``, the publish Job's entry
for ``catalog+…`` URIs), and ``CatalogSource``, a catalog model as files for
the re-packing path (the CLI's ``modelcache pack catalog+…``). The remote
side is ``controller.catalog.server``: a model listing and read-only OCI
endpoints (``/v2/<model>/manifests|blobs/<digest>``) behind a bearer token.

The catalog's failures are source errors (``base``) that are also registry
errors: the client is a ``RegistryClient``, whose retries and verified blob
I/O act on ``RegistryError``s, and the import waits out exactly the ones in
``WAITABLE``. Neither path maps them to anything else.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any
from urllib.parse import urlsplit

import requests

from ingest.sources import base, httpio, netpolicy
from modelpack import digest as dg
from modelpack.errors import RegistryError
from modelpack.oci.reference import Reference
from modelpack.oci.registry import MAX_BODY, RegistryClient, error_text, preload, read_capped
from modelpack.pull import resolve as resolve_pack

SCHEME = "catalog+"
LIST_PATH = "/catalog/v1/models"
MAX_LISTING = 16 << 20


# -- errors from the catalog side (the DMCR's own errors stay RegistryError) -------


class CatalogAuthError(base.SourceAuthError):
    """401/403 from the catalog: the token is invalid, expired or not bound to the reader role."""

    reason = "CatalogUnauthorized"


class CatalogUnavailable(base.SourceUnavailable, RegistryError):
    """The catalog did not answer usefully: connection, TLS, 5xx, 429 (``retryable`` says
    which; a registry error too, so the client's own retries see it)."""

    reason = "CatalogUnavailable"


class CatalogNotFound(base.SourceNotFound):
    """The model or digest is not served (not Ready there, deleted, or never existed)."""

    reason = "CatalogModelNotFound"


WAITABLE = (CatalogAuthError, CatalogUnavailable, CatalogNotFound)


# -- URIs and CA bundles ----------------------------------------------------------------


def build_uri(base_url: str, model: str, digest: str) -> str:
    return f"{SCHEME}{base_url.rstrip('/')}#{model}@{digest}"


def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """``catalog+https://host[/prefix]#model[@sha256:…]`` → (base URL, model, digest)."""
    if not uri.startswith(SCHEME):
        raise base.InvalidSourceError(f"not a catalog URI: {uri[:100]!r}")
    rest = uri[len(SCHEME):]
    url, _, frag = rest.partition("#")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise base.InvalidSourceError(f"catalog URI needs an http(s) base URL: {url[:100]!r}")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise base.InvalidSourceError("a catalog is reached over https (http only on loopback): "
                                      "the bearer token must not cross the network in clear")
    model, _, digest = frag.partition("@")
    if not model:
        raise base.InvalidSourceError(f"catalog URI names no model: {uri[:100]!r}")
    if digest:
        try:
            dg.validate(digest)
        except Exception as e:
            raise base.InvalidSourceError(f"bad digest in catalog URI: {digest[:80]!r}") from e
    return url.rstrip("/"), model, digest or None


def ca_file(pem: bytes | str | None) -> str | None:
    """A file holding ``pem`` (requests verifies against a path), keyed by its hash."""
    if not pem:
        return None
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise base.InvalidSourceError("the CA bundle holds no PEM certificate")
    d = os.path.join(tempfile.gettempdir(), f"modelcache-catalog-ca-{os.getuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    path = os.path.join(d, hashlib.sha256(data).hexdigest()[:24] + ".pem")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(dir=d)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return path


# -- the client -----------------------------------------------------------------------------


class CatalogClient(RegistryClient):
    """A ``RegistryClient`` for a catalog's OCI endpoints: its verified, resumable blob
    I/O, with a fixed bearer token instead of the registry token dance, and errors
    mapped to the Catalog* classes above."""

    def __init__(self, base_url: str, token: str | None, *, ca_pem: bytes | str | None = None,
                 timeout: tuple[float, float] = (10.0, 120.0), retries: int = 3) -> None:
        netpolicy.check(base_url)  # before any connection; the connect guard does the rest
        parts = urlsplit(base_url)
        super().__init__(parts.netloc, insecure=parts.scheme == "http", token=token or "",
                         ca_bundle=ca_file(ca_pem), timeout=timeout, retries=retries)
        self.base = base_url.rstrip("/")

    def request(self, method: str, path_or_url: str, *, headers: dict[str, str] | None = None,
                data: Any = None, stream: bool = False, ok: tuple[int, ...] = (200,),
                what: str = "") -> requests.Response:
        url = self.base + path_or_url
        h = dict(headers or {})
        token = self._bearer()  # the fixed token given: no token dance against a catalog
        if token:
            h["Authorization"] = f"Bearer {token}"
        what = what or path_or_url
        try:
            # always streamed: bodies are read bounded (read_capped, error_text)
            resp = self.session.request(method, url, data=data, headers=h, stream=True,
                                        allow_redirects=False)
        except requests.exceptions.SSLError as e:
            raise CatalogUnavailable(f"{method} {what}: TLS: {e}", retryable=True,
                                     reason="CatalogTLSError") from e
        except requests.RequestException as e:
            raise CatalogUnavailable(f"{method} {what}: {type(e).__name__}: {e}",
                                     retryable=True, reason="CatalogUnreachable") from e
        if resp.status_code in ok:
            if not stream and method != "HEAD":
                try:
                    preload(resp, MAX_BODY, f"catalog {method} {what}")
                except RegistryError as e:
                    raise CatalogUnavailable(str(e), retryable=e.retryable,
                                             reason="CatalogBadResponse") from e
            return resp
        code = resp.status_code
        try:
            doc = json.loads(error_text(resp))
            text = str(((doc.get("errors") or [{}])[0]).get("message") or "")[:300]
        except (ValueError, AttributeError, IndexError):
            text = ""
        msg = f"catalog {method} {what}: HTTP {code} {text}".strip()
        if code in (401, 403):
            raise CatalogAuthError(msg, status=code,
                                   reason="CatalogUnauthorized" if code == 401
                                   else "CatalogForbidden")
        if code == 404:
            raise CatalogNotFound(msg, status=code)
        raise CatalogUnavailable(msg, status=code, retryable=code >= 500 or code in (416, 429),
                                 reason="CatalogUnavailable")

    def models(self) -> list[dict[str, Any]]:
        """The catalog's listing (``GET /catalog/v1/models``), checked for shape."""
        resp = self.request("GET", LIST_PATH, headers={"Accept": "application/json"},
                            stream=True, what="the model listing")
        try:
            raw = read_capped(resp, MAX_LISTING, "the model listing")
        except RegistryError as e:
            raise CatalogUnavailable(str(e), retryable=e.retryable and e.reason != "TooLarge",
                                     reason="CatalogBadResponse") from e
        try:
            doc = json.loads(raw)
            items = doc["models"]
            if not isinstance(items, list):
                raise TypeError("models is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise CatalogUnavailable(f"the model listing is not a catalog answer: {e}",
                                     retryable=True, reason="CatalogBadResponse") from e
        return [m for m in items if isinstance(m, dict) and isinstance(m.get("name"), str)]


# -- the Source interface (``modelcache pack catalog+…``: files, re-packed) ----------


class CatalogSource:
    """A catalog model as files, for the re-packing publish path (the CLI's ``pack``).

    The controller imports with ``catalog_import.import_model`` instead, which
    keeps the digest.
    """

    def __init__(self, uri: str, token: str | None = None,
                 ca_pem: bytes | str | None = None) -> None:
        self.uri = uri
        base_url, self.model, self.digest = parse_uri(uri)
        self.client = CatalogClient(base_url, token, ca_pem=ca_pem)

    def latest(self, timeout: float | None = None) -> base.Latest:
        """The digest the catalog lists for the model now (one listing call)."""
        if timeout is not None:
            self.client.session.timeout = (httpio.PROBE_CONNECT, timeout)
        for m in self.client.models():
            if m.get("name") == self.model and isinstance(m.get("digest"), str):
                return base.Latest(str(m["digest"]))
        return base.Latest(None, f"the catalog no longer lists {self.model!r}")

    def resolve(self) -> base.Resolved:
        digest = self.digest or self.latest().revision
        if digest is None:
            raise base.SourceNotFound(f"the catalog lists no model {self.model!r}")
        pack = resolve_pack(self.client, Reference(self.client.host, self.model, digest=digest))
        files = tuple(base.SourceFile(layer.path, layer.size, layer.digest)
                      for layer in pack.layers)
        return base.Resolved(digest, files, {"catalogDigest": digest})

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.client.request("GET", f"/v2/{self.model}/blobs/{file.sha256}",
                                   headers=headers, stream=True, ok=(200, 206))
        return httpio.ResponseStream(resp, offset if resp.status_code == 206 else 0,
                                     f"{self.uri} {file.sha256}")

    def close(self) -> None:
        self.client.session.close()
