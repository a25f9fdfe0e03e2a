"""One large blob fetched as several byte ranges at once, written in place.

Called by ``RegistryClient.download_blob`` (``download``) for a blob of at
least ``RangePolicy.min_size`` bytes, and by the publish staging for a
large source file whose sha256 the source states (``fill`` with a
``Remote``: ``ingest.publish.ranged``). Why: a registry backed by object
storage caps each connection (tens to a few hundred MB/s), and so does the
Hugging Face CDN, so one 40 GB file on one stream is the whole pull time;
N streams divide it by up to N. The machinery below knows no transport: a
``Remote`` opens a byte range and names its errors (``_Blob`` is the
registry's).

Only where one stream is slow: the blob starts as one stream, written with
O_DIRECT and hashed as it comes (no second pass), and ``Probe`` times its
first ``RangePolicy.probe`` bytes. A stream at ``RangePolicy.fast`` or more
goes on alone, and so does a slower one whose thread spent most of the
probe running or waiting for a core (``Probe``: the stream is slow because
the cores are busy, and more connections only add work); one that spent it
waiting for bytes (a capped connection, a slow server) stops there and the
rest is split into ranges from its hashed prefix. Why not always split: ranges cost CPU that one stream
does not (buffered writes, each byte read back to be hashed in order, a
registry serving N connections): on a fast link, 2 GiB in 8 shards of 256 MiB
took 5.4–6.9 CPU-seconds ranged against 1.9–2.1 in one stream each, for no
gain in wall time on 2 cores (bench/RESULTS.md, "cold path").

How it stays a verified download:

- The ``.part`` is preallocated to the blob's size and each range's worker
  ``pwrite``s its bytes at their offsets (``PartialBlob.write_at``).
- This thread hashes the file in order as the written prefix grows, reading
  it back (from the page cache while it is hot; a range written long before
  the prefix reaches it may come from the disk). Every byte is hashed from
  the file that is committed, so the digest stays the gate: ``commit`` checks
  it as for one stream, and a wrong byte anywhere fails it and discards the
  whole part.
- How far each range got is recorded in an extended attribute of the
  ``.part`` (``partial.RANGES_XATTR``), written only after an ``fdatasync``
  of the bytes it counts: every ``CHECKPOINT`` bytes, and when the download
  stops for any reason. A restart (another attempt, another process after a
  crash) rehashes the written prefix from the file and fetches only what each
  range still lacks; a crash loses at most what came since the last record.
- A server that answers a Range with 200 (or a 206 for other bytes) gets one
  stream instead: ``None`` back to the caller, which writes the blob the
  ordinary way, from the hashed prefix. A filesystem without user extended
  attributes gets one stream too.
"""

from __future__ import annotations

import http.client
import logging
import mmap
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import requests
import urllib3

from modelpack.errors import ModelPackError, RegistryError, StoreError
from modelpack.store import partial
from modelpack.store.blobs import PartialBlob

if TYPE_CHECKING:  # the client calls us; we use its requests and retry budget
    from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
READ = 4 << 20
ALIGN = 1 << 20  # range boundaries on MiB: page-aligned writes, tidy records
CHECKPOINT = 64 << 20  # bytes written between two records of the ranges
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RangePolicy:
    """How a large blob is split: ``streams`` connections for blobs of ``min_size`` or more."""

    streams: int = 8
    min_size: int = 256 << 20
    probe: int = 32 << 20  # bytes one stream gets to show its rate; 0: split at once
    fast: float = 150e6  # bytes/s from which one stream goes on alone

    def applies(self, size: int) -> bool:
        return self.streams > 1 and size >= max(self.min_size, 2 * ALIGN)


def on_cpu() -> float:
    """Seconds this thread has run or waited for a core (Linux schedstat); -1 if unknown."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            run, wait = f.read().split()[:2]
        return (int(run) + int(wait)) / 1e9
    except (OSError, ValueError):
        return -1.0


def network_bound(cpu: float, wall: float) -> bool:
    """Whether a stream's thread spent most of ``wall`` waiting for bytes, not for CPU."""
    return cpu < 0 or cpu < wall / 2


class Probe:
    """Times one stream from its first byte on; ``slow`` says, once, whether to split.

    Call ``slow`` from the thread that reads the stream: its CPU is measured."""

    def __init__(self, policy: RangePolicy) -> None:
        self.policy = policy
        self.decided = False
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._start = -1

    def slow(self, offset: int) -> bool:
        """True once ``policy.probe`` bytes came slower than ``policy.fast``; then never."""
        if self.decided:
            return False
        now = time.monotonic()
        if self._start < 0:  # the first chunk: the clock starts after the first byte
            self._t0, self._cpu0, self._start = now, on_cpu(), offset
            return False
        got = offset - self._start
        if got < self.policy.probe:
            return False
        self.decided = True
        wall = now - self._t0
        cpu = on_cpu()
        return got < self.policy.fast * wall and network_bound(
            cpu - self._cpu0 if cpu >= 0 and self._cpu0 >= 0 else -1.0, wall)


def plan(size: int, streams: int, prefix: int) -> list[list[int]]:
    """[start, end, done] ranges tiling [0, size): a written ``prefix`` is one done range.

    Every boundary past the prefix is on ``ALIGN``, so the ranges' writes can
    go with O_DIRECT (``PartialBlob.write_at``)."""
    out = [[0, prefix, prefix]] if prefix else []
    rest = size - prefix
    step = max(ALIGN, rest // streams // ALIGN * ALIGN)
    at = prefix
    while at < size:
        end = at - at % ALIGN + step
        if size - end < step:
            end = size
        out.append([at, end, 0])
        at = end
    return out


def exact(status: int, content_range: str, start: int, end: int, size: int) -> bool:
    """Whether an answer to ``Range: bytes=start-(end-1)`` holds exactly those bytes."""
    m = _CONTENT_RANGE.fullmatch(content_range.strip())
    return (status == 206 and m is not None and int(m.group(1)) == start
            and int(m.group(2)) == end - 1 and m.group(3) in ("*", str(size)))


class Body(Protocol):
    """The bytes of one range as they come; errors leave as the remote's own kind."""

    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Remote(Protocol):
    """Where a ranged download gets its bytes: a registry blob, a model source's file.

    ``open_range`` answers a body of exactly the bytes ``[start, end)``, or
    None where the server answered the Range with other bytes (a 200); its
    failures and its body's are ``ModelPackError``s with their retry decision.
    ``cut`` is the retryable error of that kind for a body that ended early;
    ``retries`` bounds the tries of a range that makes no progress."""

    retries: int

    def open_range(self, start: int, end: int) -> Body | None: ...

    def cut(self, message: str) -> ModelPackError: ...


class _RangeIgnored(Exception):
    """The server answered a Range with the whole blob or other bytes."""


class _Job:
    """The shared state of one ranged download: the ranges, and how it is going."""

    def __init__(self, ranges: list[list[int]]) -> None:
        self.ranges = ranges
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.ignored = False
        self.stop = False

    def written(self) -> int:
        return sum(r[2] for r in self.ranges)

    def snapshot(self) -> list[list[int]]:
        with self.cond:
            return [list(r) for r in self.ranges]


def download(client: RegistryClient, repository: str, digest: str, size: int,
             part: PartialBlob, policy: RangePolicy, progress: Progress) -> bool:
    """Fill ``part`` with a registry blob over ``policy.streams`` ranges (``fill``)."""
    return fill(_Blob(client, repository, digest, size), digest, size, part, policy, progress)


def fill(remote: Remote, what: str, size: int, part: PartialBlob, policy: RangePolicy,
         progress: Progress) -> bool:
    """Fill ``part`` with ``remote``'s ``size`` bytes over ``policy.streams`` ranges; True
    when it is all there and hashed (the caller commits), False to go on in one stream."""
    ranges = part.ranges or plan(size, policy.streams, part.offset)
    if not part.begin_ranged(ranges):
        return False
    job = _Job(ranges)
    progress(job.written())  # reported so far is always job.written(): each n goes to both
    workers = [threading.Thread(target=_worker, name=f"range-{i}",
                                args=(remote, what, part, job, r, progress))
               for i, r in enumerate(ranges) if r[2] < r[1] - r[0]]
    log.info("ranged download", extra={"what": what, "bytes": size,
                                       "streams": len(workers), "resumed": job.written()})
    for w in workers:
        w.start()
    saved = job.written()
    try:
        while part.offset < size:
            with job.cond:
                while (partial.contiguous(job.ranges) == part.offset and job.error is None
                       and not job.ignored and job.written() - saved < CHECKPOINT):
                    job.cond.wait(1.0)
                frontier = partial.contiguous(job.ranges)
                if job.error is not None or job.ignored:
                    break
            part.hash_to(frontier)
            # recorded as the ranges grow, whether or not the prefix moved
            if job.written() - saved >= CHECKPOINT:
                snap = job.snapshot()
                part.save_ranges(snap)
                saved = sum(r[2] for r in snap)
    finally:
        with job.cond:
            job.stop = True
        for w in workers:
            w.join()
        if part.offset < size and part.ranges is not None:
            part.save_ranges(job.snapshot())  # what the next attempt resumes from
    if job.error is not None:
        raise job.error
    if job.ignored:
        log.info("server ignores Range: one stream", extra={"what": what})
        progress(-job.written())
        part.drop_ranges()
        return False
    return True


def _worker(remote: Remote, what: str, part: PartialBlob, job: _Job, r: list[int],
            progress: Progress) -> None:
    """Fetch what range ``r`` lacks, resuming after drops within ``remote.retries``."""
    attempts = 0
    delay = 0.2
    buf = mmap.mmap(-1, READ)
    view = memoryview(buf)
    try:
        while not job.stop and r[2] < r[1] - r[0]:
            before = r[2]
            try:
                _fetch(remote, what, part, job, r, view, progress)
            except _RangeIgnored:
                with job.cond:
                    job.ignored = job.stop = True
                    job.cond.notify_all()
                return
            except StoreError:
                raise  # a local error (disk full) is not the server's
            except ModelPackError as e:
                if not e.retryable or attempts >= remote.retries:
                    raise
            if job.stop or r[2] >= r[1] - r[0]:
                return
            attempts = attempts + 1 if r[2] == before else 0
            log.info("resuming range", extra={"what": what, "offset": r[0] + r[2]})
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    except BaseException as e:  # whatever stops a range stops the download, and is raised
        with job.cond:
            if job.error is None:
                job.error = e
            job.stop = True
            job.cond.notify_all()


def _fetch(remote: Remote, what: str, part: PartialBlob, job: _Job, r: list[int],
           view: memoryview, progress: Progress) -> None:
    start, end = r[0] + r[2], r[1]
    body = remote.open_range(start, end)
    if body is None:
        raise _RangeIgnored()
    try:
        at = start
        window = at // partial.WRITEBACK_WINDOW
        while at < end and not job.stop:
            # a start off the page grid reads up to it first: the rest is written aligned
            want = view[:min(len(view), end - at, (-at) % partial.DIRECT_ALIGN or len(view))]
            n = body.readinto(want)
            if not n:
                raise remote.cut(f"{what}: connection closed at byte {at} of range "
                                 f"{r[0]}-{end - 1}")
            part.write_at(view[:n], at)
            at += n
            with job.cond:
                r[2] = at - r[0]
                job.cond.notify_all()
            progress(n)
            if at // partial.WRITEBACK_WINDOW != window:  # start writeback, as one stream does
                window = at // partial.WRITEBACK_WINDOW
                partial.start_writeback(part.fd, (window - 1) * partial.WRITEBACK_WINDOW,
                                        partial.WRITEBACK_WINDOW)
    finally:
        body.close()


_TRANSPORT = (requests.RequestException, urllib3.exceptions.HTTPError,
              http.client.HTTPException, OSError)


class _Blob:
    """A registry blob as a ``Remote``: the client's requests, auth and retry budget."""

    def __init__(self, client: RegistryClient, repository: str, digest: str,
                 size: int) -> None:
        self.client = client
        self.path = f"/v2/{repository}/blobs/{digest}"
        self.digest = digest
        self.size = size
        self.retries = client.retries

    def open_range(self, start: int, end: int) -> Body | None:
        resp = self.client.request("GET", self.path, headers={"Range": f"bytes={start}-{end - 1}"},
                                   stream=True, ok=(200, 206), what=self.digest)
        if not exact(resp.status_code, resp.headers.get("Content-Range", ""), start, end,
                     self.size):
            resp.close()
            return None
        return _BlobBody(self, resp)

    def cut(self, message: str) -> ModelPackError:
        return RegistryError(f"GET blob {message}", retryable=True, reason="RegistryUnavailable")


class _BlobBody:
    """A blob range's response body, read into the caller's buffer without a copy."""

    def __init__(self, blob: _Blob, resp: requests.Response) -> None:
        self.blob = blob
        self.resp = resp
        fp = getattr(resp.raw, "_fp", None)  # http.client response: readinto without a copy
        self._fp = fp if fp is not None and not resp.headers.get("Content-Encoding") else None

    def readinto(self, buf: memoryview) -> int:
        try:
            if self._fp is not None:
                return int(self._fp.readinto(buf) or 0)
            chunk = self.resp.raw.read(len(buf), decode_content=False)
        except _TRANSPORT as e:
            raise self.blob.cut(f"{self.blob.digest}: {type(e).__name__}: {e}") from e
        buf[:len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        self.resp.close()
