"""The client side of the upload gateway: ``modelcache upload MODEL PATH``.

``upload`` sends a directory (file by file), a single model file, or a
tar/zip archive to a session URL, in pieces with ``Content-Range``; after
a dropped connection or a restart it asks the gateway (``HEAD``) how much
arrived and continues from there. Then it asks the gateway to publish and
waits for the result. ``progress(done, total)`` is called as bytes go out.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import requests

from api import jobresult
from modelpack.paths import walk_model_dir

PIECE = 64 << 20
CHUNK = 4 << 20
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
Progress = Callable[[int, int], None]


class UploadError(jobresult.JobError):
    """``retryable``: the same upload may succeed later (the gateway or the network was
    down, or the publish failed for a reason that may pass); else it needs a change."""

    def __init__(self, message: str, *, reason: str = "UploadFailed", status: int = 0,
                 retryable: bool = False) -> None:
        super().__init__(message, reason=reason, retryable=retryable)
        self.status = status


def _noop(_done: int, _total: int) -> None:
    pass


def _fail(resp: requests.Response, what: str) -> UploadError:
    reason, msg = resp.headers.get("X-Error-Reason", "UploadFailed"), ""
    try:
        body = resp.json()
        reason, msg = str(body.get("reason", reason)), str(body.get("message", ""))
    except ValueError:
        msg = resp.text[:200]
    return UploadError(f"{what}: HTTP {resp.status_code} {reason}: {msg}", reason=reason,
                       status=resp.status_code, retryable=resp.status_code >= 500)


def _plan(path: str) -> list[tuple[str, str, int]]:
    """(remote route, local file, size) for everything to send."""
    if os.path.isdir(path):
        return [(f"files/{urllib.parse.quote(f.path)}", f.abspath, f.size)
                for f in walk_model_dir(path)]
    size = os.path.getsize(path)
    if path.lower().endswith(ARCHIVE_SUFFIXES):
        return [("archive", path, size)]
    return [(f"files/{urllib.parse.quote(os.path.basename(path))}", path, size)]


class _Piece:
    """A file-like view of ``length`` bytes from ``offset`` that counts what is read."""

    def __init__(self, path: str, offset: int, length: int, report: Callable[[int], None]) -> None:
        self.f = open(path, "rb", buffering=0)
        self.f.seek(offset)
        self.left = length
        self.report = report

    def __len__(self) -> int:
        return self.left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left, CHUNK)
        data = self.f.read(n) if n else b""
        self.left -= len(data)
        self.report(len(data))
        return data

    def close(self) -> None:
        self.f.close()


def upload(url: str, token: str, path: str, *, progress: Progress = _noop,
           piece_size: int = PIECE, wait: bool = True, timeout: float = 3600.0,
           retries: int = 5, session: requests.Session | None = None) -> dict[str, Any]:
    """Upload ``path`` to the session at ``url``; return the gateway's final status."""
    http = session or requests.Session()
    auth = {"Authorization": f"Bearer {token}"}
    plan = _plan(path)
    total = sum(size for _, _, size in plan)
    done = 0

    def report(n: int) -> None:
        nonlocal done
        done += n
        progress(done, total)

    for route, local, size in plan:
        target = f"{url.rstrip('/')}/{route}"
        attempts = 0
        while True:
            try:
                head = http.head(target, headers=auth, timeout=(10, 60))
                if head.status_code != 200:
                    raise _fail(head, f"HEAD {route}")
                offset = int(head.headers.get("Upload-Offset", "0"))
                complete = head.headers.get("Upload-Complete") == "true"
                if complete and offset == size:
                    report(size)
                    break
                if offset > size:
                    offset = 0
                report(offset)
                while offset < size or size == 0:
                    n = min(piece_size, size - offset)
                    body = _Piece(local, offset, n, report)
                    headers = {**auth, "Content-Length": str(n),
                               "Content-Type": "application/octet-stream"}
                    if size:
                        headers["Content-Range"] = f"bytes {offset}-{offset + n - 1}/{size}"
                    try:
                        resp = http.put(target, data=body, headers=headers, timeout=(10, 300))
                    finally:
                        body.close()
                    if resp.status_code not in (201, 202):
                        report(-n)
                        raise _fail(resp, f"PUT {route}")
                    offset += n
                    if size == 0:
                        break
                break
            except (requests.ConnectionError, requests.Timeout) as e:
                attempts += 1
                done = sum(s for r, _, s in plan[:plan.index((route, local, size))])
                if attempts > retries:
                    raise UploadError(f"upload of {route} keeps failing: {e}",
                                      reason="Unavailable", retryable=True) from e
                time.sleep(min(0.2 * 2 ** attempts, 5.0))
    resp = http.post(f"{url.rstrip('/')}/complete", headers=auth, timeout=(10, 60))
    if resp.status_code != 202:
        raise _fail(resp, "complete")
    status: dict[str, Any] = resp.json()
    if not wait:
        return status
    deadline = time.monotonic() + timeout
    while status.get("phase") == "Publishing":
        if time.monotonic() > deadline:
            raise UploadError("the gateway did not finish publishing in time", reason="Timeout",
                              retryable=True)
        time.sleep(0.1)
        resp = http.get(url, headers=auth, timeout=(10, 60))
        if resp.status_code != 200:
            raise _fail(resp, "status")
        status = resp.json()
    if status.get("phase") != "Ready":
        err = status.get("error") or {}
        raise UploadError(f"publish failed: {err.get('message', status.get('phase'))}",
                          reason=str(err.get("reason", "PublishFailed")),
                          retryable=bool(err.get("retryable")))
    return status
