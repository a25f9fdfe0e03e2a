"""The catalog's read-only OCI side: a served ClusterModel's manifests and blobs.

Where it sits: ``server.Handler`` routes ``GET|HEAD /v2/<name>/manifests/<digest>``
and ``/v2/<name>/blobs/<digest>`` here once the caller may read ``<name>``
and the model is served (the listing's rule, ``server.entry``). A manifest
comes from the model's own DMCR repository, by digest only, verified as a
ModelPack, and is kept (manifests are immutable by digest); a blob is served
only when a manifest of that model references it, so the DMCR's other
content cannot be fetched by guessing digests. Blobs are streamed from the
DMCR with ``Range`` passed through (206 and ``Content-Range`` back).

Errors use the OCI distribution error body (``{"errors": [{code, message}]}``),
which the listing API shares; the DMCR's own error texts stay inside.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from api import model
from kube.httpreply import reply
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import parse_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
CHUNK = 1 << 20
MANIFEST_CACHE = 256


def _repository(name: str) -> str:
    return model.repository({"kind": model.CLUSTER_MODEL, "metadata": {"name": name}})


class Manifests:
    """The verified manifests of served ClusterModels, by (model, digest), and the blobs
    each references."""

    def __init__(self, registry: Callable[[], RegistryClient],
                 current: Callable[[str], str | None]) -> None:
        self.registry = registry
        self.current = current  # the digest a model serves now, None when it serves none
        # (model, manifest digest) -> (bytes, media type, blob digests it references);
        # manifests are immutable by digest, so the cache never needs invalidation
        self._cache: OrderedDict[tuple[str, str], tuple[bytes, str, frozenset[str]]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self._client: RegistryClient | None = None

    def client(self) -> RegistryClient:
        if self._client is None:
            self._client = self.registry()
        return self._client

    def get(self, name: str, digest: str) -> tuple[bytes, str, frozenset[str]]:
        """A manifest of model ``name``'s repository, verified; ``NotFoundError`` if absent."""
        with self._lock:
            hit = self._cache.get((name, digest))
            if hit is not None:
                self._cache.move_to_end((name, digest))
                return hit
        client = self.client()
        raw, _, media_type = client.get_manifest(
            Reference(client.host, _repository(name), digest=digest))
        m, _ = parse_manifest(raw, digest)  # a ModelPack, or we do not serve it
        blobs = {str(m["config"]["digest"])}
        blobs.update(str(d.get("digest")) for d in m["layers"] if isinstance(d, dict))
        value = (raw, media_type or str(m.get("mediaType") or mt.OCI_MANIFEST), frozenset(blobs))
        with self._lock:
            self._cache[(name, digest)] = value
            while len(self._cache) > MANIFEST_CACHE:
                self._cache.popitem(last=False)
        return value

    def blob_allowed(self, name: str, digest: str) -> bool:
        """Whether a manifest of ``name`` references ``digest`` (the current one loaded if
        nothing cached says so: a restarted server serves a resumed import)."""
        with self._lock:
            if any(n == name and digest in blobs
                   for (n, _), (_, _, blobs) in self._cache.items()):
                return True
        current = self.current(name)
        if current is None:
            return False
        try:
            _, _, blobs = self.get(name, current)
        except NotFoundError:
            return False
        return digest in blobs


class OCIHandler(BaseHTTPRequestHandler):
    """The replies and the OCI routes of the catalog's request handler (``server.Handler``)."""

    manifests: Manifests  # set on the subclass server.create_server makes

    def _json(self, code: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        reply(self, code, json.dumps(doc, separators=(",", ":"), sort_keys=True).encode(),
              headers=headers)

    def _error(self, code: int, oci_code: str, message: str,
               headers: dict[str, str] | None = None) -> None:
        self._json(code, {"errors": [{"code": oci_code, "message": message}]}, headers)

    def send_response(self, code: int, message: str | None = None) -> None:
        self.status = code
        super().send_response(code, message)

    def _oci(self, name: str, kind: str, ref: str) -> None:
        """``kind`` (manifests|blobs) ``ref`` of served model ``name``."""
        if not DIGEST.match(ref):
            self._error(404, "MANIFEST_UNKNOWN" if kind == "manifests" else "BLOB_UNKNOWN",
                        "only sha256 digests are served")
            return
        try:
            if kind == "manifests":
                raw, media_type, _ = self.manifests.get(name, ref)
                self.send_response(200)
                self.send_header("Content-Type", media_type)
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("Docker-Content-Digest", ref)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)
                return
            if not self.manifests.blob_allowed(name, ref):
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
        headers = {}
        if self.headers.get("Range"):
            headers["Range"] = self.headers["Range"]
        resp = self.manifests.client().request(
            self.command, f"/v2/{_repository(name)}/blobs/{digest}", headers=headers,
            stream=True, ok=(200, 206, 416), what=digest)
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
