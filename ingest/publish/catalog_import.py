"""Catalog imports: another cluster's ModelPack copied as-is into ours, verified.

Pipeline position: the publish Job's entry for ``catalog+…`` URIs
(``modelcache-controller publish --source catalog+https://HOST[/PREFIX]#MODEL@DIGEST``),
beside the re-packing worker (``worker.py``). The catalog's URIs, client and
errors are ``ingest.sources.catalog``; the remote side is
``controller.catalog.server``.

An import does not re-pack: the manifest digest is the model's identity, so
the manifest, config and layers are copied byte for byte and the model has
the same digest here as there. Each blob streams from the catalog's
response straight into a DMCR upload (``RegistryClient.upload_blob``),
hashed in the same pass, with a weight file's head kept aside for its
format check (safetensors/GGUF headers, ``_Probe``; pickle refused unless
allowed): the upload is committed only when the bytes hash to the layer
digest and the check passed, else it is cancelled and the DMCR never shows
the blob (it checks the digest of the commit once more itself). Downloads
and uploads of all blobs overlap; nothing is staged on local disk but the
headers. Blobs the DMCR already holds are skipped, so an import that
stopped half way (a revoked token, a pod restart) continues where it was;
a blob cut mid-stream starts again from its first byte (the upload session
cannot take it up from a resumed ``Range``); the manifest goes last, under
the frozen digest only.

A declared format (``--format``, the Model's ``spec.format``) must be the
one the artifact's config states, checked before a blob moves
(``FormatMismatch``): the copy is never re-described.

Source-side failures — a 401/403 (token expired or unbound), the catalog
unreachable or refusing TLS, a 404/5xx/429 — do not fail the import at once:
it waits with backoff and tries again for up to ``wait`` seconds, keeping
what it has. Bytes that do not match their digest fail it at once
(``IntegrityError``, terminal) and nothing is tagged.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import urllib3

from ingest.publish.progress import Tracker, null_sink
from ingest.sources import base
from ingest.sources.catalog import (
    WAITABLE,
    CatalogClient,
    CatalogUnavailable,
    build_uri,
    parse_uri,
)
from modelpack import digest as dg
from modelpack.errors import FormatError, IntegrityError
from modelpack.formats import classify, gguf, safetensors
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import Layer, ModelPack
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.parallel import run_all
from modelpack.pull import resolve as resolve_pack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportResult:
    digest: str
    size: int
    reference: str
    resolved: dict[str, Any]
    source: dict[str, Any]
    skipped: int  # bytes the DMCR already had

    def to_json(self) -> dict[str, Any]:
        # the revision of a catalog import is the remote artifact digest it was pinned to
        return {"digest": self.digest, "sizeBytes": self.size, "reference": self.reference,
                "resolvedRevision": self.digest, "resolved": self.resolved,
                "source": self.source}


SMALL = 4 << 20  # a blob this small never waits for a worker
GGUF_PREFIX = 64 << 20  # what of a GGUF is kept for its header check (see _Probe)


class _Probe:
    """The head of a weight file as it streams by, for its format check before the commit.

    The bytes are written to a sparse file of the blob's full size in the
    work dir (disk, not memory), named like the layer so the check's messages
    name the file; the rest of it is a hole. safetensors: exactly the 8-byte
    length and the header it announces (<= 100 MiB by the format's own bound),
    so the check is the one a whole local copy would get (it reads only the
    header and the file size). GGUF: the first 64 MiB, which holds the header
    of any real model (vocabularies are a few MiB); a header longer than that
    would be read as zeros past it, which the check refuses in practice
    (zero-filled tensor records overlap one another).
    """

    def __init__(self, layer: Layer, work: str, allow_pickle: bool) -> None:
        self.layer = layer
        self.allow_pickle = allow_pickle
        self.safetensors = layer.path.endswith(".safetensors")
        self.dir = tempfile.mkdtemp(prefix="probe-", dir=work)
        self.path = os.path.join(self.dir, os.path.basename(layer.path))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.restart()

    @staticmethod
    def wanted(layer: Layer, allow_pickle: bool) -> bool:
        """Whether ``layer`` is a weight file whose format is checked here."""
        return classify(layer.path, allow_pickle) == "weight" and \
            layer.path.endswith((".safetensors", ".gguf"))

    def restart(self) -> None:
        """A new stream of the blob begins at byte 0."""
        self.want = min(self.layer.size, 8 if self.safetensors else GGUF_PREFIX)
        self.known = not self.safetensors  # a safetensors head grows once its length is read

    def feed(self, data: memoryview, at: int) -> None:
        """``data`` is the blob's bytes from offset ``at``."""
        if at >= self.want:
            return
        n = min(len(data), self.want - at)
        os.pwrite(self.fd, data[:n], at)
        if not self.known and at + n >= 8:
            self.known = True
            (hlen,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
            # past the bound: 8 bytes are enough for the check to say why it refuses
            self.want = min(self.layer.size, 8 + hlen) if hlen <= safetensors.MAX_HEADER else 8
            if len(data) > n:
                self.feed(data[n:], at + n)

    def check(self) -> None:
        """Raise ``FormatError`` unless the file's format holds (the blob is all streamed)."""
        os.ftruncate(self.fd, self.layer.size)  # a hole: only the head is on disk
        if self.safetensors:
            safetensors.verify(self.path)
        else:
            gguf.verify(self.path)

    def close(self) -> None:
        os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)


class _BlobBody:
    """A catalog blob's response, read into the upload's buffer (RegistryClient.upload_blob).

    Opened lazily by the upload, so each retry is a fresh GET from byte 0.
    Transport failures become ``CatalogUnavailable`` (retryable): raised from
    inside the upload's body, they must not pass for the destination's own
    errors, and urllib3 would wrap a bare ``OSError`` as one.
    """

    def __init__(self, cat: CatalogClient, model: str, layer: Layer,
                 probe: _Probe | None) -> None:
        self.layer = layer
        self.probe = probe
        self.offset = 0
        if probe is not None:
            probe.restart()
        self.resp = cat.request("GET", f"/v2/{model}/blobs/{layer.digest}", stream=True,
                                what=layer.digest)
        raw = self.resp.raw
        fp = getattr(raw, "_fp", None)  # http.client response: readinto without a copy
        self._fp = fp if fp is not None and not raw.headers.get("Content-Encoding") else None

    def readinto(self, view: memoryview) -> int:
        want = min(len(view), self.layer.size - self.offset)
        if want <= 0:
            return 0
        try:
            if self._fp is not None:
                n = int(self._fp.readinto(view[:want]) or 0)
            else:
                chunk = self.resp.raw.read(want, decode_content=False)
                n = len(chunk)
                view[:n] = chunk
        except (OSError, http.client.HTTPException, urllib3.exceptions.HTTPError) as e:
            raise CatalogUnavailable(f"GET blob {self.layer.digest}: {type(e).__name__}: {e}",
                                     retryable=True, reason="CatalogUnreachable") from e
        if not n:
            raise CatalogUnavailable(f"GET blob {self.layer.digest}: connection closed at byte "
                                     f"{self.offset} of {self.layer.size}", retryable=True,
                                     reason="CatalogUnreachable")
        if self.probe is not None:
            self.probe.feed(view[:n], self.offset)
        self.offset += n
        return n

    def __enter__(self) -> _BlobBody:
        return self

    def __exit__(self, *_: object) -> None:
        self.resp.close()


class _Copy:
    def __init__(self, cat: CatalogClient, local: RegistryClient, model: str,
                 ref: Reference, work: str, tracker: Any, allow_pickle: bool,
                 expected_format: str = "Auto") -> None:
        self.cat = cat
        self.expected_format = expected_format
        self.local = local
        self.model = model
        self.ref = ref
        self.work = work
        self.tracker = tracker
        self.allow_pickle = allow_pickle
        self.skipped = 0

    def _progress(self, n: int) -> None:
        self.tracker.add(n)  # staged and pushed move together: nothing is staged locally
        self.tracker.add_pushed(n)

    def layer(self, layer: Layer) -> None:
        """Stream one blob from the catalog into the DMCR: hashed and format-checked on the
        way, committed only when both hold; a blob cut mid-stream starts again from 0."""
        repo = self.ref.repository
        if self.local.blob_exists(repo, layer.digest):
            self._progress(layer.size)
            self.skipped += layer.size
            return
        probe = _Probe(layer, self.work, self.allow_pickle) \
            if _Probe.wanted(layer, self.allow_pickle) else None
        try:
            self.local.upload_blob(
                repo, lambda: _BlobBody(self.cat, self.model, layer, probe), layer.size,
                self._progress, digest=layer.digest,
                before_commit=probe.check if probe is not None else None, check_present=False)
        finally:
            if probe is not None:
                probe.close()

    def run(self, digest: str, workers: int) -> ModelPack:
        pack = resolve_pack(self.cat, Reference(self.cat.host, self.model, digest=digest))
        found = pack.metadata()["format"]
        if self.expected_format not in ("Auto", "") and found != self.expected_format:
            # copied byte for byte, never re-described: a declared format must be the config's
            raise FormatError(f"expected format {self.expected_format}, the catalog's artifact "
                              f"{digest} is {found or 'of no stated format'}",
                              reason="FormatMismatch")
        for layer in pack.layers:
            classify(layer.path, self.allow_pickle)  # refuse pickle before moving a byte
        with self.tracker.lock:
            self.tracker.done = self.tracker.pushed = 0
        self.tracker.set_phase("download", total=pack.size)
        unique = list({layer.digest: layer for layer in pack.layers}.values())
        # small files (configs, tokenizers) go at once on threads of their own rather than
        # wait for a big one to finish (a few round trips each, not bandwidth); the big ones
        # longest first, at most ``workers`` at a time
        small = sorted((x for x in unique if x.size < SMALL), key=lambda x: x.size)
        big = sorted((x for x in unique if x.size >= SMALL), key=lambda x: -x.size)
        slots = threading.BoundedSemaphore(max(1, workers))

        def one(layer: Layer) -> None:
            if layer.size < SMALL:
                self.layer(layer)
                return
            with slots:
                self.layer(layer)

        run_all(one, small + big, max(1, workers) + len(small), name="catalog-import")
        self.tracker.set_phase("push")
        self.local.upload_bytes(self.ref.repository, pack.config_bytes)
        media_type = str(pack.manifest.get("mediaType") or mt.OCI_MANIFEST)
        got = self.local.put_manifest(self.ref.repository, self.ref.tag or digest,
                                      pack.manifest_bytes, media_type)
        if got != digest:  # cannot happen with the same bytes; the identity is worth a check
            raise IntegrityError(f"the DMCR stored the manifest as {got}, not {digest}")
        return pack


def import_model(uri: str, local: RegistryClient, ref: Reference, *, token: str | None,
                 ca_pem: bytes | str | None = None, work_dir: str, sink: Any = None,
                 wait: float = 1800.0, workers: int = 4, allow_pickle: bool = False,
                 max_delay: float = 15.0, expected_format: str = "Auto") -> ImportResult:
    """Copy the catalog model ``uri`` names (digest required: the frozen one) to ``ref``.

    Waits out source-side failures for up to ``wait`` seconds (then raises a
    retryable ``SourceUnavailable``); terminal errors are raised as they are.
    """
    base_url, model, digest = parse_uri(uri)
    if digest is None:
        raise base.InvalidSourceError("a catalog import needs the frozen digest in its URI "
                                      "(…#MODEL@sha256:…)")
    cat = CatalogClient(base_url, token, ca_pem=ca_pem)
    tracker = Tracker(sink or null_sink)
    root = os.path.join(work_dir, f"catalog-{dg.hex_of(digest)[:16]}")
    os.makedirs(root, exist_ok=True)
    copy = _Copy(cat, local, model, ref, root, tracker, allow_pickle, expected_format)
    deadline = time.monotonic() + wait
    delay = 1.0
    while True:
        try:
            pack = copy.run(digest, workers)
            break
        except WAITABLE as e:
            reason = e.reason
            if time.monotonic() + delay > deadline:
                raise base.SourceUnavailable(
                    f"the catalog still fails after waiting {int(wait)}s: {e}",
                    reason=reason) from e
            log.warning("catalog import waiting for the source",
                        extra={"model": model, "reason": reason, "error": str(e)[:300],
                               "retryIn": delay})
            tracker.set_phase("waiting")
            time.sleep(delay)
            delay = min(delay * 2, max_delay)
        except BaseException as e:
            if not getattr(e, "retryable", False):
                shutil.rmtree(root, ignore_errors=True)  # nothing of a refused import stays
            raise
    shutil.rmtree(root, ignore_errors=True)
    tracker.set_phase("done")
    return ImportResult(digest, pack.size, str(ref.with_digest(digest)), pack.metadata(),
                        {"uri": build_uri(base_url, model, digest), "catalog": base_url,
                         "model": model}, copy.skipped)
