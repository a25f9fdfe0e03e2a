"""Staging: each source file streamed once into a local ``BlobStore``.

Pipeline position: after ``resolve``, before verification and push. A
file goes into ``ingest/<key>.part`` while it is hashed (sha256, plus the
weaker digest the source states: an S3 MD5 ETag, a git blob id) in the
same pass; it becomes a blob only when its size and digests match. The
key is the expected digest, or a digest of (source, revision, path,
version), so a restarted worker (this pod's, or the next pod's when the work
directory is a volume that outlives the pod: ``--publish-work-size``) finds
its ``.part``, rehashes the prefix from local disk and asks the source for
the rest with ``Range``; a source that answers from byte 0 instead (the
stream's ``offset``) restarts the ``.part``. A dropped connection is
retried with backoff while it makes progress; a lie about the size or a
checksum mismatch is terminal and the bad ``.part`` is discarded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from ingest.publish import ranges
from ingest.sources import base
from modelpack.errors import IntegrityError
from modelpack.oci import ranged
from modelpack.store.blobs import BlobStore, PartialBlob

log = logging.getLogger(__name__)
CHUNK = 4 << 20
MAX_STALLS = 5  # consecutive attempts without a single new byte


def part_key(uri: str, revision: str, f: base.SourceFile) -> str:
    return hashlib.sha256(f"{uri}\0{revision}\0{f.path}\0{f.version}".encode()).hexdigest()


def _check_hasher(f: base.SourceFile) -> Any:
    if f.check is None:
        return None
    algo, _ = f.check
    if algo == "md5":
        return hashlib.md5(usedforsecurity=False)
    if algo == "git-sha1" and f.size is not None:
        h = hashlib.sha1(usedforsecurity=False)
        h.update(f"blob {f.size}\0".encode())
        return h
    return None


def _rehash_prefix(path: str, length: int, hasher: Any) -> None:
    with open(path, "rb", buffering=0) as fp:
        left = length
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while left:
            n = fp.readinto(view[:min(left, CHUNK)])
            if not n:
                break
            hasher.update(view[:n])
            left -= n


def stage_file(source: base.Source, revision: str, f: base.SourceFile, store: BlobStore,
               progress: Callable[[int], None], *, backoff: float = 0.2,
               sleep: Callable[[float], None] = time.sleep,
               policy: ranged.RangePolicy | None = None) -> str:
    """Ensure ``f`` is a verified blob in ``store``; return its sha256 digest.

    ``policy``: how a large file of a ranged source is split (``ranges``);
    as the registry client does, one stream first, split after its probe
    where it is slow and waiting for bytes, at once with ``probe=0`` or to
    resume recorded ranges."""
    if f.sha256 is not None and store.has(f.sha256, f.size):
        progress(f.size or 0)
        return f.sha256
    # buffered writes, not O_DIRECT: a staged file is read back at once (its format
    # check, then the push), and from the page cache that costs no disk read
    if f.sha256 is not None:
        part = store.open_partial(f.sha256, f.size, direct=False)
    else:
        # an unnamed .part is resumed only when its key pins the content (a commit, an
        # ETag, a listing digest): a plain URL that states no validator may have changed
        # since the last pod, and a spliced file would hash to a name of its own
        part = PartialBlob(os.path.join(store.ingest_dir, part_key(source.uri, revision, f)
                                        + ".part"), None, f.size,
                           resume=bool(revision or f.version), direct=False)
    try:
        split = policy if ranges.applies(source, f, policy) and not part.present else None
        if split is not None and (part.ranges is not None or not split.probe):
            if ranges.fill(source, f, part, split, progress, MAX_STALLS):
                return _commit(store, part, f)
            split = None  # the source ignores Range: one stream, no probe
        part.drop_ranges()  # one stream continues the hashed prefix
        check = _check_hasher(f)
        if check is not None and part.offset:
            _rehash_prefix(part.path, part.offset, check)
        if part.offset:
            progress(part.offset)
        check = _fill(source, f, part, check, progress, backoff, sleep, split)
        if check is not None and f.check is not None and check.hexdigest() != f.check[1]:
            part.discard()
            raise base.SourceIntegrityError(
                f"{f.path}: content {f.check[0]} is {check.hexdigest()}, the source states "
                f"{f.check[1]}", reason="ChecksumMismatch")
        return _commit(store, part, f)
    finally:
        part.close()


def _commit(store: BlobStore, part: PartialBlob, f: base.SourceFile) -> str:
    """The digest gate: size and sha256 checked, the blob renamed into place."""
    try:
        return store.commit(part)
    except IntegrityError as e:
        raise base.SourceIntegrityError(f"{f.path}: {e}", reason=(
            "SizeMismatch" if e.reason == "SizeMismatch" else "ChecksumMismatch")) from e


def _fill(source: base.Source, f: base.SourceFile, part: PartialBlob, check: Any,
          progress: Callable[[int], None], backoff: float,
          sleep: Callable[[float], None], split: ranged.RangePolicy | None = None) -> Any:
    """Read the rest of ``f`` into ``part``; return the check hasher (new if restarted).

    With ``split``, the stream is timed (``ranged.Probe``) and, where slow, stopped
    after the probe: the rest comes in ranges from its hashed prefix."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    probe = ranged.Probe(split) if split is not None else None
    stalls = 0
    delay = backoff
    cut: base.SourceError | None = None  # the last transport failure, if the last try had one
    while True:
        start = part.offset
        if f.size is not None and start >= f.size and start > 0:
            return check
        try:
            stream = source.open(f, start)
        except base.SourceError as e:
            if e.reason == "RangeNotSatisfiable" and f.size is not None and start:
                part.discard()
                raise base.SourceIntegrityError(
                    f"{f.path}: the source declared {f.size} bytes but has only {start}",
                    reason="SizeMismatch") from e
            if not e.retryable or stalls >= MAX_STALLS:
                raise
            stalls += 1
            log.info("source open failed, retrying", extra={"path": f.path, "error": str(e)})
            sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        cut = None
        slow = False
        try:
            if stream.offset != start:  # the source cannot resume: take it from the top
                progress(-start)
                part.restart()
                if check is not None:
                    check = _check_hasher(f)
            while True:
                n = stream.readinto(view)
                if not n:
                    break
                try:
                    part.write(view[:n])
                except IntegrityError as e:
                    part.discard()
                    raise base.SourceIntegrityError(
                        f"{f.path}: the source sent more than the declared {f.size} bytes",
                        reason="SizeMismatch") from e
                if check is not None:
                    check.update(view[:n])
                progress(n)
                if probe is not None and part.offset < (f.size or 0) and probe.slow(part.offset):
                    slow = True
                    break
        except base.SourceError as e:
            if not e.retryable:
                raise
            cut = e
            log.info("transfer cut, resuming", extra={"path": f.path, "offset": part.offset,
                                                      "error": str(e)[:200]})
        finally:
            stream.close()
        if slow and split is not None:
            probe = None
            progress(-part.offset)  # ranges.fill reports the prefix itself
            if ranges.fill(source, f, part, split, progress, MAX_STALLS):
                return check
            progress(part.offset)  # Range ignored: on with one stream
            continue
        if f.size is None and cut is None:
            return check  # no declared size: the end of a clean stream is the end
        if f.size is not None and part.offset >= f.size:
            return check
        stalls = 0 if part.offset > start else stalls + 1
        if stalls > MAX_STALLS:
            if cut is not None:  # keep the .part: a later attempt resumes from here
                raise base.SourceUnavailable(
                    f"{f.path}: the transfer keeps breaking at byte {part.offset} of "
                    f"{f.size}: {cut}")
            part.discard()
            raise base.SourceIntegrityError(
                f"{f.path}: the source keeps ending at byte {part.offset} of the declared "
                f"{f.size}", reason="SizeMismatch")
        sleep(delay if stalls else 0.0)
        delay = min(delay * 2, 10.0) if stalls else backoff
