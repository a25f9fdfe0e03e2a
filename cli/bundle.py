"""Air-gap bundles: a Ready ClusterModel as one tar file, and back into another cluster.

Where it sits: behind ``modelcache export`` and ``modelcache import``
(cli/main.py). Export reads the ClusterModel from the API server and its
artifact from the cluster registry (DMCR); import verifies a bundle, pushes
it to the other cluster's DMCR at the repository the controller uses for
that model (``jobs.repository``) and applies the CR with the annotation
``modelcache.io/imported-digest``, which makes the controller adopt the
pushed artifact (controller/models/adopt.py) instead of publishing from a
source the air-gapped cluster cannot reach.

A bundle is an OCI image layout in a tar (``skopeo`` and ``oras`` read it as
an ``oci-archive``) plus the CR::

    oci-layout
    index.json             one manifest; ref.name = the ClusterModel's name
    clustermodel.yaml      apiVersion, kind, metadata (name, labels, annotations), spec;
                           annotation modelcache.io/imported-digest = the manifest digest
    blobs/sha256/<manifest>, blobs/sha256/<config>, then the layers by digest

Export is deterministic (that order, PAX format, mtime 0, uid/gid 0, mode
0444), so the same model gives the same bundle bytes, and streamed: layers
are fetched a few at a time (bounded), each hashed once against its digest
as it arrives (resumed with ``Range`` after a dropped connection), hashed
once more in tar order into the bundle's sha256, and written at its place in
the tar with O_DIRECT (``_write_layers``); the file appears under its name
only when every digest matched.

Import trusts nothing in the tar. A first pass reads it as a stream of
entries without extracting anything: names must be exactly the ones above
(no ``..``, no absolute path, no duplicates), entries must be regular files
(no links, devices or FIFOs), sizes must fit the file and the bounds, every
blob must hash to its name, and the archive must end with the tar end
marker. Then the manifest, the config and every layer are checked against
the index and one another, no unreferenced blob is allowed, and the CR must
name the same model and digest. The blobs are hashed side by side, after a
first pass that reads only the headers. Only then is anything pushed
(blobs in parallel from their offsets in the tar, sendfile on plain HTTP,
the registry checking each digest as it commits; the manifest last) and
applied; a bundle refused at any step leaves both the registry and the
cluster untouched.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import io
import json
import logging
import mmap
import os
import queue
import re
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import requests
import urllib3
import yaml

from api import model, names
from kube import client as kube
from modelpack import digest as dg
from modelpack.errors import IntegrityError, ModelPackError, RegistryError
from modelpack.oci import layout as oci_layout
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import MAX_MANIFEST, ModelPack, assemble, canonical
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import locked
from modelpack.paths import MAX_FILES
from modelpack.pull import resolve

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
API_VERSION = "modelcache.io/v1alpha1"
KIND = "ClusterModel"
CR_FILE = "clustermodel.yaml"
META_FILES = ("oci-layout", "index.json", CR_FILE)
MAX_META = 4 << 20  # oci-layout, index.json, the CR
MAX_CONFIG = 16 << 20
MAX_ENTRIES = MAX_FILES + 16
FIELD_MANAGER = "modelcache-import"
CHUNK = 4 << 20
HASHERS = 4  # blobs hashed side by side while a bundle is verified
ALIGN = 4096  # where every layer's data starts in the tar (O_DIRECT, reflink)
BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# what leaves the source cluster of a CR's metadata: never its identity or history
DROP_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration", names.REIMPORT,
                    names.UPSTREAM)


def _noop(_: int) -> None:
    pass


class BundleError(ModelPackError):
    """A bundle is refused, or cannot be made; ``reason`` says why. Terminal."""

    reason = "InvalidBundle"


# --- export --------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    path: str
    digest: str  # the model's manifest digest
    sha256: str  # of the bundle file
    bundle_bytes: int
    model_bytes: int
    blobs: int


def ready_cluster_model(client: kube.Kube, name: str) -> dict[str, Any]:
    """The ClusterModel ``name``; it must be Ready with an artifact."""
    try:
        obj = client.get(kube.CLUSTER_MODELS, name)
    except kube.NotFound as e:
        raise BundleError(f"ClusterModel {name} not found", reason="NotFound") from e
    except kube.ApiError as e:
        raise BundleError(f"reading ClusterModel {name}: {e}", reason="ApiError") from e
    status = obj.get("status") or {}
    digest = (status.get("artifact") or {}).get("digest")
    if status.get("phase") != "Ready" or not digest:
        raise BundleError(f"ClusterModel {name} is {status.get('phase') or 'not published'}, "
                          "not Ready: only a published model can be exported",
                          reason="NotReady")
    return obj


def registry_host(obj: dict[str, Any]) -> str | None:
    """The registry host in the model's ``status.artifact.reference``, if any."""
    ref = str(((obj.get("status") or {}).get("artifact") or {}).get("reference") or "")
    return ref.split("/", 1)[0] if "/" in ref else None


def bundle_cr(obj: dict[str, Any], digest: str) -> dict[str, Any]:
    """The CR that travels: its name, labels, annotations and spec; never status or uid."""
    meta = obj["metadata"]
    ann = {k: v for k, v in (meta.get("annotations") or {}).items() if k not in DROP_ANNOTATIONS}
    ann[names.IMPORTED] = digest
    revision = ((obj.get("status") or {}).get("source") or {}).get("resolvedRevision")
    if revision:
        ann[names.IMPORTED_REVISION] = str(revision)
    out_meta: dict[str, Any] = {"name": meta["name"], "annotations": ann}
    if meta.get("labels"):
        out_meta["labels"] = dict(meta["labels"])
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": out_meta,
            "spec": obj.get("spec") or {}}


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


def _open_direct(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_DIRECT)
    except (OSError, AttributeError):  # tmpfs refuses O_DIRECT; not Linux: no O_DIRECT
        return -1


class _TarWriter:
    """The bundle's tar, written by hand so every layer's data starts on a 4 KiB boundary.

    Aligned data goes to the disk with O_DIRECT straight from the download
    buffer (on the project's VMs ~1.5 GB/s against ~0.27 GB/s buffered plus
    fsync); headers, padding and a layer's unaligned tail take the buffered
    path. The alignment is a PAX ``comment`` record of computed length, which
    every tar reader ignores. Every byte is hashed on the way: the bundle's sha256.
    """

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.dfd = _open_direct(path)
        self.h = hashlib.sha256()
        self.offset = 0

    def _write(self, data: bytes | memoryview) -> None:
        """Headers, small files, padding: hashed and written buffered, in order."""
        self.h.update(data)
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self.offset)
            view, self.offset = view[n:], self.offset + n

    def _header(self, name: str, size: int, align: bool) -> None:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = \
            size, 0, 0o444, 0, 0, "", ""
        blocks = (-self.offset - tarfile.BLOCKSIZE) % ALIGN // tarfile.BLOCKSIZE
        if align and blocks:
            # a PAX header is one block, its records, then the ustar block: >= 3 blocks
            records = (blocks if blocks >= 2 else blocks + ALIGN // tarfile.BLOCKSIZE) - 1
            length = records * tarfile.BLOCKSIZE
            ti.pax_headers = {"comment": "x" * (length - 10 - len(str(length)))}
        buf = ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self._write(buf)
        if align:
            assert self.offset % ALIGN == 0, (name, self.offset)

    def add_bytes(self, name: str, data: bytes) -> None:
        self._header(name, len(data), align=False)
        self._write(data)
        self._pad()

    def begin_blob(self, name: str, size: int) -> int:
        """The header of a layer of ``size`` bytes; returns where its data starts (aligned).

        The data itself is hashed by the caller and written with ``write_at``;
        ``end_blob`` then moves past it."""
        self._header(name, size, align=True)
        return self.offset

    def end_blob(self, size: int) -> None:
        self.offset += size
        self._pad()

    def write_at(self, view: memoryview, offset: int) -> None:
        """Write already-hashed layer bytes at ``offset`` (4 KiB aligned): the aligned part
        with O_DIRECT straight from the page-aligned buffer, a tail buffered."""
        whole = len(view) - len(view) % ALIGN
        done = 0
        if whole and self.dfd >= 0:
            try:
                while done < whole:
                    done += os.pwrite(self.dfd, view[done:whole], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: O_DIRECT refused after all; go buffered
                    raise
                os.close(self.dfd)
                self.dfd = -1
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def _pad(self) -> None:
        if self.offset % tarfile.BLOCKSIZE:
            self._write(bytes(tarfile.BLOCKSIZE - self.offset % tarfile.BLOCKSIZE))

    def finish(self) -> None:
        """The end-of-archive marker, padding to a whole record, then fsync."""
        self._write(bytes(2 * tarfile.BLOCKSIZE))
        self._write(bytes(-self.offset % tarfile.RECORDSIZE))
        os.fsync(self.fd)

    def close(self) -> None:
        for fd in (self.dfd, self.fd):
            if fd >= 0:
                os.close(fd)
        self.dfd = self.fd = -1


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


def _write_layers(out: _TarWriter, client: RegistryClient, repo: str,
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
            offset = out.begin_blob(f"blobs/sha256/{dg.hex_of(digest)}", size)
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


def export_bundle(obj: dict[str, Any], client: RegistryClient, output: str,
                  progress: Progress = _noop, fetchers: int = 3) -> Exported:
    """Write the bundle of Ready ClusterModel ``obj`` (its artifact read from ``client``)."""
    digest = str(obj["status"]["artifact"]["digest"])
    repo = model.repository(dict(obj, kind=KIND))
    pack = resolve(client, Reference(client.host, repo, None, digest))
    name = str(obj["metadata"]["name"])
    index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [
        {"mediaType": mt.OCI_MANIFEST, "digest": pack.digest, "size": len(pack.manifest_bytes),
         "artifactType": mt.ARTIFACT, "annotations": {oci_layout.REF_NAME: name}}]}
    cr = yaml.safe_dump(bundle_cr(obj, pack.digest), sort_keys=True,
                        default_flow_style=False).encode()
    small = [("oci-layout", canonical({"imageLayoutVersion": "1.0.0"})),
             ("index.json", canonical(index)), (CR_FILE, cr),
             (f"blobs/sha256/{dg.hex_of(pack.digest)}", pack.manifest_bytes),
             (f"blobs/sha256/{dg.hex_of(pack.config_digest)}", pack.config_bytes)]
    layers = sorted({layer.digest: layer.size for layer in pack.layers
                     if layer.digest not in (pack.digest, pack.config_digest)}.items())
    os.makedirs(os.path.dirname(os.path.abspath(output)) or ".", exist_ok=True)
    part = f"{output}.part"
    out = _TarWriter(part)
    try:
        for entry, data in small:
            out.add_bytes(entry, data)
        _write_layers(out, client, repo, layers, progress, fetchers)
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


# --- import: verification ------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    offset: int  # of the data in the tar file
    size: int


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its model, its CR, and where each blob sits in the tar."""

    path: str
    pack: ModelPack
    cr: dict[str, Any]
    blobs: dict[str, Entry]

    @property
    def name(self) -> str:
        return str(self.cr["metadata"]["name"])

    @property
    def digest(self) -> str:
        return self.pack.digest


def _check_name(name: str, m: tarfile.TarInfo) -> None:
    """Refuse an entry by its name or type before any byte of it is read."""
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise BundleError(f"absolute path {name[:100]!r} in the bundle", reason="UnsafePath")
    if ".." in name.split("/") or "\\" in name or "\0" in name:
        raise BundleError(f"path {name[:100]!r} climbs out of the bundle", reason="UnsafePath")
    if m.issym() or m.islnk():
        raise BundleError(f"link {name[:100]!r} → {m.linkname[:100]!r} in the bundle",
                          reason="UnsafeEntry")
    if m.isdir():
        if name.rstrip("/") not in ("blobs", "blobs/sha256"):
            raise BundleError(f"unexpected directory {name[:100]!r}", reason="UnexpectedEntry")
        return
    if not m.isreg() or m.issparse():
        raise BundleError(f"{name[:100]!r} is not a regular file (tar type {m.type!r})",
                          reason="UnsafeEntry")
    if name not in META_FILES and not BLOB_RE.match(name):
        raise BundleError(f"unexpected entry {name[:100]!r}", reason="UnexpectedEntry")


def _read_entries(path: str, f: BinaryIO, file_size: int, progress: Progress,
                  workers: int = HASHERS) -> tuple[dict[str, bytes], dict[str, Entry]]:
    """The tar's entries: small files read, blobs hashed against their names.

    A first pass reads only the headers (tarfile seeks over the data) and
    refuses a bad name, type, size or order before any blob byte is read;
    then the blobs are hashed side by side, ``workers`` at a time, each from
    its own file descriptor (hashlib releases the GIL on large updates, and a
    cold disk serves parallel reads faster than one stream).
    """
    meta: dict[str, bytes] = {}
    found: list[tuple[str, Entry]] = []
    seen: set[str] = set()
    try:
        tar = tarfile.TarFile(fileobj=f, mode="r")
        count = 0
        while True:
            m = tar.next()
            if m is None:
                break
            count += 1
            if count > MAX_ENTRIES:
                raise BundleError(f"more than {MAX_ENTRIES} entries", reason="TooManyEntries")
            name = m.name
            _check_name(name, m)
            key = name.rstrip("/")
            if key in seen:
                raise BundleError(f"{name[:100]!r} appears twice", reason="DuplicateEntry")
            seen.add(key)
            if m.isdir():
                continue
            if m.offset_data + m.size > file_size:
                raise BundleError(f"{name} needs {m.size} bytes at offset {m.offset_data}, "
                                  f"the file has {file_size}", reason="TruncatedBundle")
            if name in META_FILES:
                if m.size > MAX_META:
                    raise BundleError(f"{name} is {m.size} bytes (bound {MAX_META})",
                                      reason="EntryTooLarge")
                meta[name] = cast(io.BufferedReader, tar.extractfile(m)).read()
                continue
            found.append((name, Entry(m.offset_data, m.size)))
        end = tar.offset  # where the end-of-archive marker must be
    except tarfile.ReadError as e:
        if "unexpected end" in str(e) or "empty file" in str(e):
            raise BundleError(f"{path} is truncated: {e}", reason="TruncatedBundle") from e
        raise BundleError(f"{path} is not a valid tar: {e}", reason="InvalidTar") from e
    except tarfile.TarError as e:
        raise BundleError(f"{path} is not a valid tar: {e}", reason="InvalidTar") from e
    if end + 2 * tarfile.BLOCKSIZE > file_size:
        raise BundleError(f"{path} is truncated: no end-of-archive marker after the last entry",
                          reason="TruncatedBundle")
    f.seek(end)
    if f.read(2 * tarfile.BLOCKSIZE).strip(b"\0"):
        raise BundleError(f"{path}: data after the last entry that is not a tar entry",
                          reason="InvalidTar")
    _hash_blobs(path, found, locked(progress), workers)
    return meta, {"sha256:" + BLOB_RE.match(name).group(1): e  # type: ignore[union-attr]
                  for name, e in found}


def _hash_blobs(path: str, found: list[tuple[str, Entry]], progress: Progress,
                workers: int) -> None:
    """Every blob entry hashed against its name; the first mismatch stops the others."""
    stop = threading.Event()

    def one(name: str, e: Entry) -> None:
        h = hashlib.sha256()
        at, left = e.offset, e.size
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, e.offset, e.size, os.POSIX_FADV_SEQUENTIAL)
            with mmap.mmap(-1, min(CHUNK, max(e.size, 1))) as buf, memoryview(buf) as view:
                while left and not stop.is_set():
                    n = os.preadv(fd, [view[:min(left, len(view))]], at)
                    if not n:
                        raise BundleError(f"{name} ends early", reason="TruncatedBundle")
                    h.update(view[:n])
                    at, left = at + n, left - n
                    progress(n)
        finally:
            os.close(fd)
        if left:
            return  # another blob failed: its error is the one raised
        hexd = BLOB_RE.match(name).group(1)  # type: ignore[union-attr]
        if h.hexdigest() != hexd:
            raise BundleError(f"{name} hashes to sha256:{h.hexdigest()}",
                              reason="DigestMismatch")

    if not found:
        return
    # the biggest first, so the last one to finish is a small one
    todo = sorted(found, key=lambda x: -x[1].size)
    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo))),
                               thread_name_prefix="bundle-verify") as pool:
        futures = [pool.submit(one, name, e) for name, e in todo]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            stop.set()
            for fut in futures:
                fut.cancel()
            raise


def _json(meta: dict[str, bytes], name: str) -> Any:
    if name not in meta:
        raise BundleError(f"the bundle has no {name}", reason="InvalidBundle")
    try:
        return json.loads(meta[name])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{name} is not JSON: {e}", reason="InvalidBundle") from e


def _blob(f: BinaryIO, blobs: dict[str, Entry], digest: str, bound: int, what: str) -> bytes:
    e = blobs.get(digest)
    if e is None:
        reason = "MissingManifest" if what == "manifest" else "MissingBlob"
        raise BundleError(f"the {what} {digest} is not in blobs/", reason=reason)
    if e.size > bound:
        raise BundleError(f"the {what} is {e.size} bytes (bound {bound})", reason="EntryTooLarge")
    f.seek(e.offset)
    return f.read(e.size)


def _size(blobs: dict[str, Entry], digest: str, declared: Any, what: str) -> None:
    if blobs[digest].size != declared:
        raise BundleError(f"{what} {digest} is {blobs[digest].size} bytes, declared {declared}",
                          reason="SizeMismatch")


def _check_cr(meta: dict[str, bytes], ref_name: str | None, digest: str) -> dict[str, Any]:
    if CR_FILE not in meta:
        raise BundleError(f"the bundle has no {CR_FILE}", reason="InvalidBundle")
    try:
        cr = yaml.safe_load(meta[CR_FILE])
    except yaml.YAMLError as e:
        raise BundleError(f"{CR_FILE} is not YAML: {str(e)[:200]}", reason="InvalidBundle") from e
    if not isinstance(cr, dict) or cr.get("apiVersion") != API_VERSION or cr.get("kind") != KIND:
        raise BundleError(f"{CR_FILE} is not a {API_VERSION} {KIND}", reason="InvalidBundle")
    extra = set(cr) - {"apiVersion", "kind", "metadata", "spec"}
    md = cr.get("metadata")
    if extra or not isinstance(md, dict) or not isinstance(cr.get("spec"), dict) \
            or set(md) - {"name", "labels", "annotations"}:
        raise BundleError(f"{CR_FILE} may hold only apiVersion, kind, metadata (name, labels, "
                          "annotations) and spec", reason="InvalidBundle")
    name = md.get("name")
    if not isinstance(name, str) or len(name) > 63 or not NAME_RE.match(name):
        raise BundleError(f"{CR_FILE} names no valid ClusterModel ({str(name)[:80]!r})",
                          reason="InvalidBundle")
    if name != ref_name:
        raise BundleError(f"{CR_FILE} names {name!r} but the manifest is tagged {ref_name!r}",
                          reason="BundleMismatch")
    ann = md.get("annotations") or {}
    if not isinstance(ann, dict) or ann.get(names.IMPORTED) != digest:
        got = ann.get(names.IMPORTED) if isinstance(ann, dict) else None
        raise BundleError(f"{CR_FILE} records digest {got!r}, the manifest is {digest}",
                          reason="BundleMismatch")
    return cr


def _warm_kube_client() -> None:
    """Import the Kubernetes client package in the background.

    An import's next step (``connect``, the dry-run apply) needs it, and its
    import costs ~0.2 s of CPU; while ``verify`` waits on the disk and on
    hashlib (both without the GIL) that time is free. Import locks make a
    later import in the main thread wait for this one, never run it twice.
    """
    def run() -> None:
        try:
            import kubernetes.client  # noqa: F401
        except Exception as e:  # the main thread's own import reports a real problem
            log.debug("kubernetes client not preloaded", extra={"error": str(e)[:200]})

    threading.Thread(target=run, name="bundle-warm-kube", daemon=True).start()


def verify(path: str, progress: Progress = _noop) -> Bundle:
    """Verify a bundle completely, reading it once; raise ``BundleError`` with a reason."""
    if "kubernetes.client" not in sys.modules:
        _warm_kube_client()
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        meta, blobs = _read_entries(path, f, file_size, progress)
        if _json(meta, "oci-layout") != {"imageLayoutVersion": "1.0.0"}:
            raise BundleError("oci-layout is not an OCI image layout 1.0.0", reason="InvalidBundle")
        index = _json(meta, "index.json")
        manifests = index.get("manifests") if isinstance(index, dict) else None
        if not isinstance(manifests, list) or len(manifests) != 1 \
                or not isinstance(manifests[0], dict):
            raise BundleError("index.json must list exactly one manifest", reason="InvalidBundle")
        desc = manifests[0]
        try:
            digest = dg.validate(str(desc.get("digest")))
        except ModelPackError as e:
            raise BundleError(f"index.json: {e}", reason="InvalidBundle") from e
        mbytes = _blob(f, blobs, digest, MAX_MANIFEST, "manifest")
        _size(blobs, digest, desc.get("size"), "manifest")
        try:
            cfg_desc = json.loads(mbytes)["config"]
            cfg_digest = dg.validate(str(cfg_desc["digest"]))
        except (ValueError, KeyError, TypeError, ModelPackError) as e:
            raise BundleError(f"manifest {digest} has no valid config descriptor",
                              reason="InvalidManifest") from e
        cbytes = _blob(f, blobs, cfg_digest, MAX_CONFIG, "config")
        _size(blobs, cfg_digest, cfg_desc.get("size"), "config")
        pack = assemble(mbytes, cbytes, digest)
        for layer in pack.layers:
            if layer.digest not in blobs:
                raise BundleError(f"layer {layer.path} ({layer.digest}) is not in blobs/",
                                  reason="MissingBlob")
            _size(blobs, layer.digest, layer.size, f"layer {layer.path}")
        extra = set(blobs) - {digest, cfg_digest} - {layer.digest for layer in pack.layers}
        if extra:
            raise BundleError(f"blob {sorted(extra)[0]} is not part of the model",
                              reason="UnexpectedEntry")
        ref_name = (desc.get("annotations") or {}).get(oci_layout.REF_NAME)
        cr = _check_cr(meta, ref_name, digest)
    return Bundle(path, pack, cr, blobs)


# --- import: push and apply ----------------------------------------------------------


def push(bundle: Bundle, client: RegistryClient, repository: str,
         progress: Progress = _noop, workers: int = 4) -> str:
    """Push the verified blobs (parallel, skipping those present), then the manifest.

    Each blob goes from its offset in the tar (sendfile on a plain-HTTP
    registry: no copy through Python, no second hash on this side). The
    registry hashes what it receives and commits a blob only under the digest
    it was sent with, so a bundle changed on disk since ``verify`` still puts
    nothing wrong in the registry: that blob is refused (``IntegrityError``)
    and the manifest is never pushed.
    """
    report = locked(progress)
    todo = [d for d in bundle.blobs if d != bundle.digest]
    todo.sort(key=lambda d: -bundle.blobs[d].size)

    def one(d: str) -> None:
        e = bundle.blobs[d]
        try:
            client.upload_file(repository, bundle.path, e.size, d, report, offset=e.offset)
        except RegistryError as err:
            if err.status == 400 and "DIGEST_INVALID" in str(err):
                raise IntegrityError(f"blob {d} of {bundle.path} no longer matches its digest "
                                     "(the file changed after it was verified): the registry "
                                     "refused it") from err
            raise

    with cf.ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo)))) as pool:
        futures = [pool.submit(one, d) for d in todo]
        try:
            for fut in cf.as_completed(futures):
                fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    got = client.put_manifest(repository, names.imported_tag(bundle.digest), bundle.pack.manifest_bytes)
    if got != bundle.digest:
        raise IntegrityError(f"registry stored the manifest as {got}, expected {bundle.digest}")
    return f"{client.host}/{repository}:{names.imported_tag(bundle.digest)}@{got}"


def apply(client: kube.Kube, cr: dict[str, Any], dry_run: bool = False) -> dict[str, Any]:
    """Server-side apply of the bundle's CR (a dry run validates it without a change)."""
    name = str(cr["metadata"]["name"])
    try:
        return client.request("PATCH", kube.CLUSTER_MODELS.path(None, name), body=cr,
                              content_type="application/apply-patch+yaml",
                              query={"fieldManager": FIELD_MANAGER, "force": True,
                                     "dryRun": "All" if dry_run else None})
    except kube.ApiError as e:
        raise BundleError(f"applying ClusterModel {name}: {e}", reason="ApplyFailed") from e


def repository(bundle: Bundle) -> str:
    return model.repository(dict(bundle.cr, kind=KIND))


def connect(kubeconfig: str | None) -> kube.Kube:
    """An API client from ``kubeconfig`` (else in-cluster, else KUBECONFIG/~/.kube/config)."""
    try:
        return kube.Kube.from_config(kubeconfig)
    except Exception as e:  # the kubernetes package's config errors share no base class
        raise BundleError(f"cannot load a kubeconfig: {e}", reason="KubeconfigError") from e


def wait_ready(client: kube.Kube, name: str, digest: str, timeout: float) -> dict[str, Any]:
    """Wait until the controller reports ClusterModel ``name`` Ready with ``digest``."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            status = client.get(kube.CLUSTER_MODELS, name).get("status") or {}
        except kube.ApiError as e:
            log.info("waiting for the ClusterModel", extra={"error": str(e)[:200]})
        if status.get("phase") == "Ready" and \
                (status.get("artifact") or {}).get("digest") == digest:
            return status
        if status.get("phase") == "Failed":
            conds = {c.get("type"): c for c in status.get("conditions") or []}
            ready = conds.get("Ready") or {}
            raise BundleError(f"ClusterModel {name} Failed: {ready.get('message')}",
                              reason=str(ready.get("reason") or "Failed"))
        time.sleep(1.0)
    raise BundleError(f"ClusterModel {name} not Ready with {digest} after {timeout:.0f}s "
                      f"(phase {status.get('phase')})", reason="Timeout")
