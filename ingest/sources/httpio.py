"""HTTP plumbing shared by the HTTP-based sources: sessions and ranged streams.

Every request has a connect and read timeout; a file is read with
``Range: bytes=N-`` so a dropped transfer resumes where it stopped (in this
pod, or the next one that finds the kept ``.part``); the answer is trusted
only as far as it says: a 206 must start at N (``Content-Range``), a 200 is
the whole file and the stream's ``offset`` says 0, so staging restarts. A
bounded range (``open_exact``, for a file fetched in several at once) must
be exactly the bytes asked for, else the caller falls back to one stream. It
is read with ``readinto`` into the caller's 4 MiB buffer (no per-chunk
copies). Transport errors and HTTP statuses become ``SourceError``s here,
with the retry decision, so sources never leak ``requests`` exceptions.

Every request, each redirect hop included, is first checked against the
process's source address policy (``ingest.sources.netpolicy``). A failed
answer becomes a message of its HTTP status and a fixed reason only: the
body a source sends is never put into a message, a log or a status (a
source pointed at an internal service would otherwise echo its answer).
"""

from __future__ import annotations

import http.client
from typing import Any

import requests
import urllib3

from ingest.sources import base, netpolicy
from modelpack.oci import ranged

TIMEOUT = (10.0, 60.0)
PROBE_CONNECT = 5.0  # seconds to connect for an upstream check (``Tracked.latest``)


class TimeoutSession(requests.Session):
    """A session whose every request has a connect and read timeout."""

    def __init__(self, timeout: tuple[float, float] = TIMEOUT, pool: int = 16) -> None:
        super().__init__()
        self.timeout = timeout
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", self.timeout)
        return super().request(*args, **kwargs)

    def send(self, request: Any, **kwargs: Any) -> Any:
        # requests sends the first request and every redirect hop through here
        netpolicy.check(str(request.url))
        return super().send(request, **kwargs)


def cut(text: str, n: int = 200) -> str:
    """Untrusted bodies are cut before they reach a message or a log."""
    text = text.replace("\n", " ").strip()
    return text if len(text) <= n else text[:n] + "…"


def raise_for(resp: requests.Response, what: str) -> None:
    """Map a non-success status to the SourceError hierarchy."""
    code = resp.status_code
    resp.close()  # the body is never read: a source's text stays out of messages
    msg = f"{what}: HTTP {code} {http.client.responses.get(code, 'error')}".strip()
    typed = resp.headers.get("X-Error-Code")  # the Hub types its errors in this header
    if typed in ("RepoNotFound", "RevisionNotFound", "EntryNotFound"):
        raise base.SourceNotFound(msg, reason=typed)
    if typed == "GatedRepo":
        raise base.SourceAuthError(msg, reason=typed)
    if code in (401, 403):
        raise base.SourceAuthError(msg)
    if code in (404, 410):
        raise base.SourceNotFound(msg)
    if code == 416:
        raise base.SourceIntegrityError(msg, reason="RangeNotSatisfiable")
    if code >= 500 or code in (408, 425, 429):
        raise base.SourceUnavailable(msg)
    raise base.SourceError(msg, reason="HTTPError")


def transport_error(e: Exception, what: str) -> base.SourceError:
    if (denied := netpolicy.denial(e)) is not None:  # the connect guard, if wrapped
        return denied
    return base.SourceUnavailable(f"{what}: {type(e).__name__}: {cut(str(e))}")


TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError,
                    http.client.HTTPException, ConnectionError, TimeoutError)


class ResponseStream:
    """A streamed response body read with ``readinto``; errors are SourceErrors."""

    def __init__(self, resp: requests.Response, offset: int, what: str) -> None:
        self.resp = resp
        self.offset = offset
        self.what = what
        raw = resp.raw
        fp = getattr(raw, "_fp", None)
        # http.client's readinto fills our buffer directly; a content-encoded
        # body must go through urllib3 (which we ask not to decode anyway)
        self._fp = fp if fp is not None and not resp.headers.get("Content-Encoding") else None
        length = resp.headers.get("Content-Length", "")
        self.expected = int(length) if length.isdigit() else None
        self.read = 0

    def readinto(self, buf: memoryview) -> int:
        try:
            if self._fp is not None:
                n = int(self._fp.readinto(buf))
            else:
                chunk = self.resp.raw.read(len(buf), decode_content=False)
                buf[:len(chunk)] = chunk
                n = len(chunk)
        except TRANSPORT_ERRORS as e:
            raise transport_error(e, self.what) from e
        self.read += n
        if n == 0 and self.expected is not None and self.read < self.expected:
            # http.client returns 0 rather than raising when the peer closes early
            raise base.SourceUnavailable(
                f"{self.what}: connection closed after {self.read} of {self.expected} bytes")
        return n

    def close(self) -> None:
        self.resp.close()


def open_range(session: requests.Session, url: str, offset: int, *,
               headers: dict[str, str] | None = None, if_range: str | None = None,
               what: str = "") -> ResponseStream:
    """GET ``url`` from ``offset``; a server that ignores Range restarts at 0."""
    h = {"Accept-Encoding": "identity", **(headers or {})}
    if offset:
        h["Range"] = f"bytes={offset}-"
        if if_range:
            h["If-Range"] = if_range  # a changed file comes back whole (200), not spliced
    try:
        resp = session.get(url, headers=h, stream=True, allow_redirects=True)
    except TRANSPORT_ERRORS as e:
        raise transport_error(e, what or url) from e
    if resp.status_code == 206:
        start = content_range_start(resp.headers.get("Content-Range", ""))
        if start != offset:
            resp.close()
            raise base.SourceError(f"{what or url}: asked for byte {offset}, got {start}",
                                   reason="BadContentRange", retryable=True)
        return ResponseStream(resp, offset, what or url)
    if resp.status_code == 200:
        return ResponseStream(resp, 0, what or url)
    raise_for(resp, what or url)
    raise AssertionError("unreachable")


def open_exact(session: requests.Session, url: str, start: int, end: int, size: int, *,
               headers: dict[str, str] | None = None, what: str = "") -> ResponseStream | None:
    """GET bytes ``[start, end)`` of a ``size``-byte file at ``url``; None where the server
    answers with other bytes (a 200: it ignores Range), so the caller takes one stream."""
    h = {"Accept-Encoding": "identity", **(headers or {}), "Range": f"bytes={start}-{end - 1}"}
    try:
        resp = session.get(url, headers=h, stream=True, allow_redirects=True)
    except TRANSPORT_ERRORS as e:
        raise transport_error(e, what or url) from e
    if resp.status_code not in (200, 206):
        raise_for(resp, what or url)
    if not ranged.exact(resp.status_code, resp.headers.get("Content-Range", ""), start, end,
                        size):
        resp.close()
        return None
    return ResponseStream(resp, start, what or url)


def content_range_start(value: str) -> int:
    """The first byte a ``Content-Range`` answer holds ("bytes 100-199/200" → 100), or -1."""
    try:
        unit, rest = value.split(" ", 1)
        return int(rest.split("-", 1)[0]) if unit == "bytes" else -1
    except ValueError:
        return -1
