"""Air-gap bundles: one ModelPack and one document of the caller's in a tar, and back.

Where it sits: the format under ``modelcache export`` and ``modelcache
import`` (cli/bundle.py, where the document is a ClusterModel's CR). This
module reads and verifies a bundle and pushes its blobs to a registry;
``bundle_export.py`` writes one. The document is opaque here: bytes, bounded
and named by the caller; what it must say is the caller's to check.

A bundle is an OCI image layout in a tar (``skopeo`` and ``oras`` read it as
an ``oci-archive``) plus the document::

    oci-layout
    index.json             one manifest; ref.name = the name the caller gives
    <document>             e.g. clustermodel.yaml
    blobs/sha256/<manifest>, blobs/sha256/<config>, then the layers by digest

Export is deterministic (that order, PAX format, mtime 0, uid/gid 0, mode
0444), so the same model gives the same bundle bytes.

Reading trusts nothing in the tar. A first pass reads it as a stream of
entries without extracting anything: names must be exactly the ones above
(no ``..``, no absolute path, no duplicates), entries must be regular files
(no links, devices or FIFOs), sizes must fit the file and the bounds, every
blob must hash to its name, and the archive must end with the tar end
marker. Then the manifest, the config and every layer are checked against
the index and one another, and no unreferenced blob is allowed. The blobs
are hashed side by side, after a first pass that reads only the headers.
Pushing sends blobs in parallel from their offsets in the tar (sendfile on
plain HTTP, the registry checking each digest as it commits) and the
manifest last, so a refused bundle leaves the registry untouched.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
import re
import tarfile
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from modelpack import digest as dg
from modelpack.errors import IntegrityError, ModelPackError, RegistryError
from modelpack.oci import layout as oci_layout
from modelpack.oci.manifest import MAX_MANIFEST, ModelPack, assemble
from modelpack.oci.registry import Progress, RegistryClient
from modelpack.pack import locked
from modelpack.parallel import run_all
from modelpack.paths import MAX_FILES

LAYOUT_FILES = ("oci-layout", "index.json")
LAYOUT_VERSION = {"imageLayoutVersion": "1.0.0"}
MAX_META = 4 << 20  # oci-layout, index.json, the document
MAX_CONFIG = 16 << 20
MAX_ENTRIES = MAX_FILES + 16
CHUNK = 4 << 20
HASHERS = 4  # blobs hashed side by side while a bundle is verified
ALIGN = 4096  # where every layer's data starts in the tar (O_DIRECT, reflink)
BLOB_RE = re.compile(r"^blobs/sha256/([0-9a-f]{64})$")


def _noop(_: int) -> None:
    pass


class BundleError(ModelPackError):
    """A bundle is refused, or cannot be made; ``reason`` says why. Terminal."""

    reason = "InvalidBundle"


def blob_name(digest: str) -> str:
    """The tar entry of a blob."""
    return f"blobs/sha256/{dg.hex_of(digest)}"


def _blob_hex(name: str) -> str:
    m = BLOB_RE.match(name)
    assert m is not None  # names were checked by _check_name
    return m.group(1)


@dataclass(frozen=True)
class Entry:
    offset: int  # of the data in the tar file
    size: int


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its model, the caller's document, where each blob sits in the tar."""

    path: str
    pack: ModelPack
    ref_name: str | None  # the manifest's org.opencontainers.image.ref.name
    document: bytes
    blobs: dict[str, Entry]

    @property
    def digest(self) -> str:
        return self.pack.digest


# --- reading: the tar's entries ------------------------------------------------------


def _check_name(name: str, m: tarfile.TarInfo, meta_files: tuple[str, ...]) -> None:
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
    if name not in meta_files and not BLOB_RE.match(name):
        raise BundleError(f"unexpected entry {name[:100]!r}", reason="UnexpectedEntry")


def _read_entries(path: str, f: BinaryIO, file_size: int, meta_files: tuple[str, ...],
                  progress: Progress, workers: int = HASHERS
                  ) -> tuple[dict[str, bytes], dict[str, Entry]]:
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
            _check_name(name, m, meta_files)
            key = name.rstrip("/")
            if key in seen:
                raise BundleError(f"{name[:100]!r} appears twice", reason="DuplicateEntry")
            seen.add(key)
            if m.isdir():
                continue
            if m.offset_data + m.size > file_size:
                raise BundleError(f"{name} needs {m.size} bytes at offset {m.offset_data}, "
                                  f"the file has {file_size}", reason="TruncatedBundle")
            if name in meta_files:
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
    return meta, {"sha256:" + _blob_hex(name): e for name, e in found}


def _hash_blobs(path: str, found: list[tuple[str, Entry]], progress: Progress,
                workers: int) -> None:
    """Every blob entry hashed against its name; the first mismatch stops the others."""
    stop = threading.Event()

    def one(item: tuple[str, Entry]) -> None:
        name, e = item
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
        if h.hexdigest() != _blob_hex(name):
            raise BundleError(f"{name} hashes to sha256:{h.hexdigest()}",
                              reason="DigestMismatch")

    # the running hashers see ``stop`` and return early once one has failed
    run_all(one, found, workers, size=lambda x: x[1].size, name="bundle-verify",
            on_error=stop.set)


# --- reading: the layout inside --------------------------------------------------------


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


def verify(path: str, document: str, progress: Progress = _noop) -> Bundle:
    """Verify a bundle completely, reading it once; raise ``BundleError`` with a reason.

    ``document`` names the caller's entry (it must be there); its content is
    returned unread."""
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        meta, blobs = _read_entries(path, f, file_size, (*LAYOUT_FILES, document), progress)
        if _json(meta, "oci-layout") != LAYOUT_VERSION:
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
        if document not in meta:
            raise BundleError(f"the bundle has no {document}", reason="InvalidBundle")
    return Bundle(path, pack, ref_name, meta[document], blobs)


# --- pushing -------------------------------------------------------------------------


def push(bundle: Bundle, client: RegistryClient, repository: str, tag: str,
         progress: Progress = _noop, workers: int = 4) -> str:
    """Push the verified blobs (parallel, skipping those present), then the manifest as ``tag``.

    Each blob goes from its offset in the tar (sendfile on a plain-HTTP
    registry: no copy through Python, no second hash on this side). The
    registry hashes what it receives and commits a blob only under the digest
    it was sent with, so a bundle changed on disk since ``verify`` still puts
    nothing wrong in the registry: that blob is refused (``IntegrityError``)
    and the manifest is never pushed. Returns ``host/repository:tag@digest``.
    """
    report = locked(progress)

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

    run_all(one, [d for d in bundle.blobs if d != bundle.digest], workers,
            size=lambda d: bundle.blobs[d].size, name="bundle-push")
    got = client.put_manifest(repository, tag, bundle.pack.manifest_bytes)
    if got != bundle.digest:
        raise IntegrityError(f"registry stored the manifest as {got}, expected {bundle.digest}")
    return f"{client.host}/{repository}:{tag}@{got}"
