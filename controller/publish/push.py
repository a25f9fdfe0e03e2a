"""Push: staged, verified blobs and the ModelPack manifest into the registry.

Pipeline position: last. A blob the registry already has (same digest) is
skipped with one HEAD. Otherwise it is streamed from the staging store in
one POST/PATCH/PUT without hashing it again: we hashed it while staging,
and the registry recomputes the digest and refuses a commit that does not
match. The manifest goes last, so a failure anywhere before leaves no tag.
The manifest is built exactly as ``modelpack.pack`` builds it, so a model
published here and one packed from a directory have the same digest.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.parse
from collections.abc import Callable, Iterator

from modelpack import digest as dg
from modelpack.errors import RegistryError
from modelpack.formats import ModelInfo
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import Layer, ModelPack, assemble, build_config, build_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)
CHUNK = 4 << 20
ATTEMPTS = 4


def push_blob(client: RegistryClient, repository: str, path: str, size: int, digest: str,
              progress: Callable[[int], None]) -> None:
    """Ensure the registry has blob ``digest`` (the file at ``path``)."""
    if client.blob_exists(repository, digest):
        progress(size)
        return
    delay = 0.2
    for attempt in range(ATTEMPTS):
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            with open(path, "rb", buffering=0) as f:
                while True:
                    chunk = f.read(CHUNK)
                    if not chunk:
                        return
                    sent += len(chunk)
                    progress(len(chunk))
                    yield chunk

        try:
            resp = client.request("POST", f"/v2/{repository}/blobs/uploads/", ok=(202,),
                                  what=f"{repository} upload")
            location = client._location(resp)
            # the credentials that opened the session (requests records what it sent)
            auth = resp.request.headers.get("Authorization")
            moved = _patch_sendfile(location, path, size, auth, progress) \
                if location.startswith("http://") else None
            if moved is not None:
                sent = size
                location = moved if moved.startswith("http") else client.base + moved
            else:
                if location.startswith("http://"):  # that session may hold a partial body
                    resp = client.request("POST", f"/v2/{repository}/blobs/uploads/",
                                          ok=(202,), what=f"{repository} upload")
                    location = client._location(resp)
                resp = client.request("PATCH", location, data=body(), ok=(202,),
                                      headers={"Content-Type": "application/octet-stream"},
                                      what=f"{repository} upload {digest}")
                location = client._location(resp)
            sep = "&" if "?" in location else "?"
            client.request("PUT", f"{location}{sep}digest={urllib.parse.quote(digest)}",
                           ok=(201,), what=f"{repository} commit {digest}")
            return
        except RegistryError as e:
            progress(-sent)
            if not e.retryable or attempt == ATTEMPTS - 1:
                raise
            log.info("blob push failed, retrying", extra={"digest": digest, "error": str(e)[:200]})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _patch_sendfile(location: str, path: str, size: int, auth: str | bytes | None,
                    progress: Callable[[int], None]) -> str | None:
    """PATCH the whole file with sendfile; the new Location, or None to use the slow path.

    Anything but a clean 202 (a 401 for an expired token, a redirect, an
    old server) returns None after undoing the progress, and the caller
    streams the blob the ordinary way instead.
    """
    u = urllib.parse.urlsplit(location)
    conn = http.client.HTTPConnection(u.hostname or "", u.port or 80, timeout=120)
    sent = 0
    try:
        conn.putrequest("PATCH", u.path + (f"?{u.query}" if u.query else ""),
                        skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        if auth:
            conn.putheader("Authorization", auth)
        conn.endheaders()
        assert conn.sock is not None
        with open(path, "rb") as f:
            while sent < size:
                n = conn.sock.sendfile(f, sent, min(size - sent, 64 << 20))
                if not n:
                    break
                sent += n
                progress(n)
        resp = conn.getresponse()
        resp.read()
        location_out = resp.getheader("Location")
        if resp.status == 202 and location_out and sent == size:
            return location_out
        log.info("sendfile push refused, streaming instead", extra={"status": resp.status})
    except (OSError, http.client.HTTPException) as e:
        log.info("sendfile push failed, streaming instead", extra={"error": str(e)[:200]})
    finally:
        conn.close()
    progress(-sent)
    return None


def layers_for(info: ModelInfo, digests: dict[str, str]) -> list[Layer]:
    return [Layer(f.path, digests[f.path], f.size, mt.layer_type(f.kind)) for f in info.files]


def push_manifest(client: RegistryClient, ref: Reference, info: ModelInfo,
                  digests: dict[str, str], name: str | None = None) -> ModelPack:
    layers = layers_for(info, digests)
    config = build_config(info, layers, name=name)
    manifest = build_manifest(info, layers, config)
    client.upload_bytes(ref.repository, config)
    digest = client.put_manifest(ref.repository, ref.tag or dg.of_bytes(manifest), manifest)
    return assemble(manifest, config, digest)
