"""Writing an air-gap bundle: a ModelPack from a registry, streamed into one tar.

Where it sits: ``modelcache export`` (cli/bundle.py) hands over the model's
repository and digest, the name for the index and its document (the
ClusterModel's CR); the format itself and its reading side are in
``bundle.py``. Layers are fetched a few at a time (bounded), each hashed
once against its digest as it arrives (resumed with ``Range`` after a
dropped connection), hashed once more in tar order into the bundle's sha256,
and written at its place in the tar with O_DIRECT (``_write_layers``,
``aligned_tar.py``); the file appears under its name only when every digest
matched.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass

import requests
import urllib3

from modelpack.errors import IntegrityError, RegistryError
from modelpack.oci import layout as oci_layout
from modelpack.oci import mediatypes as mt
from modelpack.oci.aligned_tar import AlignedTarWriter
from modelpack.oci.bundle import CHUNK, LAYOUT_VERSION, blob_name
from modelpack.oci.manifest import canonical
from modelpack.oci.reference import Reference
from modelpack.oci.registry import Progress, RegistryClient
from modelpack.pull import resolve

log = logging.getLogger(__name__)


def _noop(_: int) -> None:
    pass


@dataclass(frozen=True)
class Exported:
    path: str
    digest: str  # the model's manifest digest
    sha256: str  # of the bundle file
    bundle_bytes: int
    model_bytes: int
    blobs: int


class _BlobReader:
    """A registry blob, read into caller buffers: hashed, resumed with ``Range`` after drops."""

    def __init__(self, client: RegistryClient, repository: str, digest: str, size: int) -> None:
        self.client, self.repository, self.digest, self.size = client, repository, digest, size
        self.h = hashlib.sha256()
        self.offset = 0
        self.resp: requests.Response | None = None
        self.stalls = 0

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.offset}-"} if self.offset else {}
        resp = self.client.request("GET", f"/v2/{self.repository}/blobs/{self.digest}",
                                   headers=headers, stream=True, ok=(200, 206), what=self.digest)
        skip = self.offset if resp.status_code == 200 else 0
        while skip:  # the server ignored Range: read past what we already have
            n = len(resp.raw.read(min(skip, CHUNK), decode_content=False))
            if not n:
                resp.close()
                raise requests.ConnectionError("connection closed while skipping")
            skip -= n
        self.resp = resp

    def _readinto(self, view: memoryview) -> int:
        assert self.resp is not None
        raw = self.resp.raw
        fp = getattr(raw, "_fp", None)  # http.client response: readinto without a copy
        if fp is not None and not raw.headers.get("Content-Encoding"):
            return int(fp.readinto(view) or 0)
        chunk = raw.read(len(view), decode_content=False)
        view[:len(chunk)] = chunk
        return len(chunk)

    def fill(self, view: memoryview) -> int:
        """Fill ``view`` (short only at the blob's end); the bytes are hashed."""
        want = min(len(view), self.size - self.offset)
        got = 0
        while got < want:
            try:
                if self.resp is None:
                    self._open()
                n = self._readinto(view[got:want])
                if not n:
                    raise requests.ConnectionError(f"closed at byte {self.offset} of {self.size}")
            except (RegistryError, requests.RequestException, urllib3.exceptions.HTTPError,
                    OSError) as e:
                self.close()
                if isinstance(e, RegistryError) and not e.retryable:
                    raise
                self.stalls += 1
                if self.stalls > self.client.retries:
                    raise RegistryError(f"GET blob {self.digest}: {e}", retryable=True,
                                        reason="RegistryUnavailable") from e
                log.info("resuming blob", extra={"digest": self.digest, "offset": self.offset})
                time.sleep(min(0.2 * 2 ** self.stalls, 5.0))
                continue
            self.stalls = 0
            self.h.update(view[got:got + n])
            got += n
            self.offset += n
        return got

    def close(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None

    def check(self) -> None:
        got = "sha256:" + self.h.hexdigest()
        if self.offset != self.size or got != self.digest:
            raise IntegrityError(f"blob {self.digest} from {self.repository} hashes to {got}")


class _Aborted(Exception):
    """Another stage of the export failed; its own error is the one raised."""


class _Buffers:
    """A fixed pool of page-aligned chunk buffers (O_DIRECT wants them aligned).

    Blobs fetched ahead of the one being hashed into the bundle hold their
    buffers until the hasher reaches them, so they may not take the last
    ``RESERVE``: the blob at the head always finds one, and the pipeline
    cannot wedge with every buffer parked behind it.
    """

    RESERVE = 3

    def __init__(self, count: int, size: int) -> None:
        self.maps = [mmap.mmap(-1, size) for _ in range(count)]
        self.free = [memoryview(m) for m in self.maps]
        self.cond = threading.Condition()
        self.head = 0  # index of the layer the hasher is on
        self.failed = False

    def take(self, blob: int) -> memoryview:
        with self.cond:
            while True:
                if self.failed:
                    raise _Aborted()
                if self.free and (blob <= self.head or len(self.free) > self.RESERVE):
                    return self.free.pop()
                self.cond.wait()

    def give(self, view: memoryview) -> None:
        with self.cond:
            self.free.append(view)
            self.cond.notify_all()

    def advance(self, head: int) -> None:
        with self.cond:
            self.head = head
            self.cond.notify_all()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify_all()

    def close(self) -> None:
        self.free.clear()
        for m in self.maps:
            try:
                m.close()
            except BufferError:  # a view still held by a traceback: the GC closes it
                pass


Chunk = tuple[memoryview, int]


def _write_layers(out: AlignedTarWriter, client: RegistryClient, repo: str,
                  layers: list[tuple[str, int]], progress: Progress, fetchers: int) -> None:
    """Every layer into the tar in order, each byte hashed once per digest it belongs to.

    Three stages overlap: ``fetchers`` threads download layers in tar order
    (the next ones start while the current one is still arriving), each
    hashing its own layer against its digest as it reads (``_BlobReader``:
    resumed with Range, checked at its end); this thread takes the chunks in
    tar order into the bundle's sha256; one writer thread puts them at their
    precomputed offsets with O_DIRECT. Memory is the buffer pool, nothing more.
    """
    pool = _Buffers(max(2 * fetchers + _Buffers.RESERVE, 8), CHUNK)
    queues: list[queue.Queue[Chunk | BaseException | None]] = [queue.Queue() for _ in layers]
    writes: queue.Queue[tuple[memoryview, int, int] | None] = queue.Queue()
    order = iter(range(len(layers)))
    order_lock = threading.Lock()
    errors: list[BaseException] = []

    def fail(e: BaseException) -> None:
        if not isinstance(e, _Aborted):
            errors.append(e)
        pool.abort()

    def fetch() -> None:
        while True:
            with order_lock:
                i = next(order, None)
            if i is None:
                return
            digest, size = layers[i]
            reader = _BlobReader(client, repo, digest, size)
            try:
                while reader.offset < size:
                    view = pool.take(i)
                    try:
                        n = reader.fill(view)
                    except BaseException:
                        pool.give(view)
                        raise
                    queues[i].put((view, n))
                reader.check()
                queues[i].put(None)
            except BaseException as e:
                fail(e)
                queues[i].put(e)
                return
            finally:
                reader.close()

    def write() -> None:
        while (item := writes.get()) is not None:
            view, n, offset = item
            try:
                if not pool.failed:
                    out.write_at(view[:n], offset)
            except BaseException as e:
                fail(e)
            finally:
                pool.give(view)

    threads = [threading.Thread(target=fetch, name=f"bundle-fetch-{k}", daemon=True)
               for k in range(max(1, min(fetchers, len(layers))))]
    threads.append(threading.Thread(target=write, name="bundle-write", daemon=True))
    for t in threads:
        t.start()
    try:
        for i, (digest, size) in enumerate(layers):
            pool.advance(i)
            offset = out.begin_blob(blob_name(digest), size)
            at = offset
            while (item := queues[i].get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                view, n = item
                if pool.failed:
                    pool.give(view)
                    raise _Aborted()
                out.h.update(view[:n])
                writes.put((view, n, at))
                at += n
                progress(n)
            out.end_blob(size)
    except BaseException as e:
        fail(e)
    finally:
        writes.put(None)
        for t in threads:
            t.join()
        pool.close()
    if errors:
        raise errors[0]
    if pool.failed:
        raise _Aborted()


def export(client: RegistryClient, repository: str, digest: str, output: str, *,
           ref_name: str, document: tuple[str, bytes], progress: Progress = _noop,
           fetchers: int = 3) -> Exported:
    """Write the bundle of the model ``repository@digest`` (read from ``client``) to ``output``.

    ``ref_name`` tags the manifest in index.json; ``document`` is the entry
    (name, bytes) that travels with the model, third after the layout files."""
    pack = resolve(client, Reference(client.host, repository, None, digest))
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": pack.digest, "size": len(pack.manifest_bytes),
         "artifactType": mt.ARTIFACT, "annotations": {oci_layout.REF_NAME: ref_name}}]}
    small = [("oci-layout", canonical(LAYOUT_VERSION)), ("index.json", canonical(index)),
             document, (blob_name(pack.digest), pack.manifest_bytes),
             (blob_name(pack.config_digest), pack.config_bytes)]
    layers = sorted({layer.digest: layer.size for layer in pack.layers
                     if layer.digest not in (pack.digest, pack.config_digest)}.items())
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    part = f"{output}.part"
    out = AlignedTarWriter(part)
    try:
        for entry, data in small:
            out.add_bytes(entry, data)
        _write_layers(out, client, repository, layers, progress, fetchers)
        out.finish()
        out.close()
        os.replace(part, output)
    except BaseException:
        out.close()
        try:
            os.unlink(part)
        except FileNotFoundError:
            pass
        raise
    return Exported(output, pack.digest, "sha256:" + out.h.hexdigest(), out.offset, pack.size,
                    len(layers) + 2)
