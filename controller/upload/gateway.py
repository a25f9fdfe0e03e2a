"""The upload gateway: HTTP endpoints that take a model's files and publish them.

Protocol (every upload route needs ``Authorization: Bearer <session token>``):

* ``POST /v1/sessions`` (admin token) ``{model, reference, ttlSeconds, maxBytes,
  format}`` → ``{id, url, token, expiresAt}``; the controller calls this for a
  Model with ``source.upload`` (or ``pvc``), ``format`` being its spec.format.
* ``HEAD /v1/uploads/<id>/files/<path>`` → ``Upload-Offset`` (bytes received),
  ``Upload-Complete``; a client resumes from there.
* ``PUT /v1/uploads/<id>/files/<path>`` one file, whole or a piece with
  ``Content-Range: bytes A-B/TOTAL`` starting at the current offset (else
  416 with ``Upload-Offset``). ``PUT /v1/uploads/<id>/archive`` takes a tar
  (or zip) the same way; it is expanded safely when the upload completes.
* ``POST /v1/uploads/<id>/complete`` → 202; the session then runs the same
  verify-and-publish path as every source. ``GET /v1/uploads/<id>`` tells
  the phase, progress, result or error; the admin token may read it too,
  also after the session token expired (the controller polls that way).

Bodies stream into the session's store, hashed in the same pass; a
request whose declared size would pass the session's limit is refused
(413) before its body is read, and one that would pass the gateway's
staging limit (``max_staging_bytes``: the size of the volume under
``root``) with 507; a staging volume that cannot take the file is 503
with ``Retry-After``, and what arrived of it is dropped. An expired or
wrong token is 401 with a reason, compared in constant time; a session
whose state file is garbled refuses every token (fail closed).

Probes: ``GET /healthz`` (the process answers) and ``GET /readyz`` (the
staging root takes writes and has room; else 503 with a reason).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import threading
import urllib.parse
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from controller.upload.sessions import ARCHIVE, Session, SessionError, SessionStore
from ingest.publish import Options, PublishError, publish
from ingest.sources import base
from kube.httpreply import reply
from modelpack import formats
from modelpack.errors import IntegrityError, ModelPackError, StoreError, UnsafePathError
from modelpack.oci import reference as oci_reference
from modelpack.oci.registry import RegistryClient
from modelpack.paths import safe_relpath

log = logging.getLogger(__name__)
CHUNK = 4 << 20
MAX_JSON = 64 << 10
_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
MIN_FREE = 64 << 20  # below this the staging volume is full for readiness
class UploadSource:
    """The files of a completed upload, already staged in the session's store."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.uri = f"upload://{session.state.model}"

    def resolve(self) -> base.Resolved:
        files = []
        for path, (digest, size) in sorted(self.session.state.files.items()):
            name = "upload.tar" if path == ARCHIVE else path
            files.append(base.SourceFile(name, int(size), str(digest), archive=path == ARCHIVE))
        if not files:
            raise base.SourceError("nothing was uploaded", reason="EmptyUpload")
        revision = "sha256:" + hashlib.sha256(
            json.dumps([[f.path, f.sha256] for f in files]).encode()).hexdigest()
        return base.Resolved(revision, tuple(files), {"model": self.session.state.model})

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        raise base.SourceError(f"{file.path} is not in the upload store", reason="Missing")

    def close(self) -> None:
        pass


class Gateway:
    def __init__(self, root: str, *, public_url: str = "", admin_token: str | None = None,
                 client_factory: Callable[[str], RegistryClient] | None = None,
                 options: Options | None = None, max_staging_bytes: int = 0) -> None:
        self.sessions = SessionStore(root)
        self.public_url = public_url.rstrip("/")
        self.admin_token = admin_token
        self.client_factory = client_factory or (lambda host: RegistryClient(host))
        self.options = options or Options()
        self.max_staging_bytes = max_staging_bytes  # 0: no limit

    def staged_bytes(self, exclude: tuple[Session, str] | None = None) -> int:
        """Bytes the staging root holds or has been promised: committed files of sessions
        not yet published (an archive twice: it is expanded beside itself before it is
        deleted) and the declared sizes of files in progress. An estimate without
        locking the other sessions: a guard against filling the volume (an emptyDir past
        its sizeLimit gets the pod evicted, with every session on it), not an account."""
        total = 0
        with self.sessions.lock:
            sessions = list(self.sessions.sessions.values())
        for s in sessions:
            if s.state.phase == "Ready":  # its store was removed after the push
                continue
            for path, (_, size) in list(s.state.files.items()):
                if (s, path) != exclude:
                    total += int(size) * (2 if path == ARCHIVE else 1)
            for path, size in list(s.sizes.items()):
                if (s, path) != exclude and path not in s.state.files:
                    total += size * (2 if path == ARCHIVE else 1)
        return total

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether uploads can be taken: the staging root exists, is writable, has room."""
        root = self.sessions.root
        try:
            st = os.statvfs(root)
        except OSError as e:
            return False, {"reason": "StagingUnavailable", "message": str(e)[:200]}
        free = st.f_bavail * st.f_frsize
        if not os.access(root, os.W_OK):
            return False, {"reason": "StagingReadOnly", "freeBytes": free}
        if free < MIN_FREE:
            return False, {"reason": "StagingFull", "freeBytes": free}
        return True, {"ok": True, "freeBytes": free}

    def create_session(self, model: str, reference: str, ttl_seconds: float = 3600,
                       max_bytes: int = 1 << 40, expected_format: str = "Auto"
                       ) -> dict[str, Any]:
        oci_reference.parse(reference)  # refuse a bad reference now, not at publish time
        if expected_format not in formats.EXPECTABLE:
            raise ValueError(f"format must be one of {formats.EXPECTABLE}")
        session, token = self.sessions.create(model, reference, ttl_seconds, max_bytes,
                                              expected_format)
        return {"id": session.state.id, "url": f"{self.public_url}/v1/uploads/{session.state.id}",
                "token": token, "expiresAt": session.state.expires_at}

    def status(self, session: Session) -> dict[str, Any]:
        s = session.state
        return {"id": s.id, "model": s.model, "phase": s.phase, "expiresAt": s.expires_at,
                "maxBytes": s.max_bytes, "bytesReceived": session.committed_bytes(),
                "files": {p: {"digest": d, "size": n} for p, (d, n) in s.files.items()},
                "progress": s.progress, "result": s.result, "error": s.error}

    # -- uploads ----------------------------------------------------------

    def receive(self, session: Session, path: str, headers: Any, body: Any
                ) -> tuple[int, dict[str, Any]]:
        length_h = headers.get("Content-Length")
        if length_h is None or not length_h.isdigit():
            raise SessionError("Content-Length is required", status=411, reason="LengthRequired")
        length = int(length_h)
        crange = headers.get("Content-Range")
        if crange:
            m = _RANGE_RE.match(crange.strip())
            if not m:
                raise SessionError("bad Content-Range", status=400, reason="BadContentRange")
            start, end, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if end < start or end >= total or end - start + 1 != length:
                raise SessionError("Content-Range does not match the body", status=400,
                                   reason="BadContentRange")
        else:
            start, total = 0, length
        with session.lock:
            if session.state.phase != "WaitForUpload":
                raise SessionError(f"session is {session.state.phase}", status=409,
                                   reason="NotAcceptingUploads")
            if total > session.state.max_bytes - session.committed_bytes(exclude=path):
                raise SessionError(
                    f"upload of {total} bytes exceeds the session limit of "
                    f"{session.state.max_bytes} bytes", status=413, reason="TooLarge")
            need = total * (2 if path == ARCHIVE else 1)
            if self.max_staging_bytes and start == 0 and \
                    need > self.max_staging_bytes - self.staged_bytes(exclude=(session, path)):
                raise SessionError(
                    f"the gateway's staging volume has no room for {total} more bytes "
                    f"(limit {self.max_staging_bytes}); retry when other uploads are "
                    "published", status=507, reason="StagingFull")
            if path in session.state.files:
                if start == 0:  # a new whole upload replaces the committed file
                    del session.state.files[path]
                else:
                    raise SessionError("file is already complete", status=416,
                                       reason="AlreadyComplete",
                                       headers={"Upload-Offset": str(session.offset(path))})
            try:
                part = session.open_part(path, total, start)
            except (OSError, StoreError) as e:  # fail closed: take nothing we cannot keep
                log.warning("upload staging unavailable", extra={"error": str(e)[:200]})
                raise SessionError("the gateway's staging volume is unavailable; retry",
                                   status=503, reason="StagingUnavailable",
                                   headers={"Retry-After": "5"}) from e
            if part.offset != start:
                raise SessionError(f"expected a piece starting at {part.offset}", status=416,
                                   reason="OffsetMismatch",
                                   headers={"Upload-Offset": str(part.offset)})
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            left = length
            try:
                while left:
                    n = body.readinto(view[:min(left, CHUNK)])
                    if not n:
                        break
                    part.write(view[:n])
                    left -= n
            except IntegrityError as e:
                session.drop_part(path)
                raise SessionError(str(e), status=400, reason="SizeMismatch") from e
            except StoreError as e:  # the volume failed under the write: keep none of it
                session.drop_part(path)
                raise SessionError("the gateway's staging volume failed; retry", status=503, reason="StagingUnavailable",
                                   headers={"Retry-After": "5"}) from e
            except OSError as e:  # the client went away: keep what arrived
                raise SessionError(f"upload interrupted: {e}", status=400,
                                   reason="Interrupted") from e
            if left:
                raise SessionError("body shorter than Content-Length", status=400,
                                   reason="Interrupted",
                                   headers={"Upload-Offset": str(part.offset)})
            if part.offset < total:
                return 202, {"path": path, "offset": part.offset, "size": total}
            digest = session.store.commit(part)
            session.parts.pop(path, None)
            session.sizes.pop(path, None)
            session.state.files[path] = [digest, total]
            session.save()
            return 201, {"path": path, "digest": digest, "size": total}

    def complete(self, session: Session) -> None:
        with session.lock:
            if session.state.phase in ("Publishing", "Ready"):
                return
            if not session.state.files:
                raise SessionError("nothing was uploaded", status=409, reason="EmptyUpload")
            for path in list(session.parts):
                session.drop_part(path)  # unfinished pieces are not part of the model
            session.state.phase = "Publishing"
            session.state.error = None
            session.save()
        threading.Thread(target=self._publish, args=(session,), daemon=True).start()

    def _publish(self, session: Session) -> None:
        ref = oci_reference.parse(session.state.reference)

        def sink(event: dict[str, Any]) -> None:
            session.state.progress = event

        try:
            client = self.client_factory(ref.host)
            result = publish(UploadSource(session), client, ref, work_dir=session.root,
                             sink=sink, store=session.store, options=dataclasses.replace(
                                 self.options, expected_format=session.state.format))
            session.state.result = result.to_json()
            session.state.phase = "Ready"
            # the registry holds the model now: the uploaded bytes are not kept twice
            shutil.rmtree(session.store.root, ignore_errors=True)
        except PublishError as e:
            session.state.error = {"reason": e.reason, "message": str(e)[:500],
                                   "retryable": e.retryable}
            # a terminal failure needs a new upload; a retryable one may complete again
            session.state.phase = "WaitForUpload" if e.retryable else "Failed"
        except ModelPackError as e:
            session.state.error = {"reason": e.reason, "message": str(e)[:500],
                                   "retryable": e.retryable}
            session.state.phase = "Failed"
        with session.lock:
            session.save()


def _path_of(raw: str) -> str:
    try:
        return safe_relpath(urllib.parse.unquote(raw))
    except UnsafePathError as e:
        raise SessionError(str(e), status=400, reason="UnsafePath") from e


IDLE_TIMEOUT = 60.0  # seconds a connection may send nothing (per read, so big uploads go on)


class _Handler(BaseHTTPRequestHandler):
    gateway: Gateway
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        log.debug("upload gateway request", extra={"line": format % args})

    def _json(self, code: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        reply(self, code, json.dumps(obj).encode(), headers=headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _session(self, sid: str) -> Session:
        session = self.gateway.sessions.get(sid)
        session.authorize(self._token())
        return session

    def _dispatch(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            self._route(path)
        except SessionError as e:
            if self.command == "PUT" and e.status in (401, 404, 411, 413, 409, 503, 507):
                self.close_connection = True  # the body was not read
            # the reason also rides in a header, since a HEAD answer has no body
            self._json(e.status, {"reason": e.reason, "message": str(e)},
                       {**e.headers, "X-Error-Reason": e.reason})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _route(self, path: str) -> None:
        if path == "/healthz" and self.command in ("GET", "HEAD"):
            return self._json(200, {"ok": True})
        if path == "/readyz" and self.command in ("GET", "HEAD"):
            ok, detail = self.gateway.ready()
            return self._json(200 if ok else 503, detail)
        parts = path.strip("/").split("/", 4)
        if parts[:2] == ["v1", "sessions"] and len(parts) == 2 and self.command == "POST":
            return self._create()
        if parts[:2] != ["v1", "uploads"] or len(parts) < 3:
            raise SessionError("not found", status=404, reason="NotFound")
        rest = parts[3:]
        if not rest and self.command == "GET" and self._admin():
            # the controller polls with the admin token: it must still read a result that
            # lands after the session token expired
            return self._json(200, self.gateway.status(self.gateway.sessions.get(parts[2])))
        session = self._session(parts[2])
        if not rest and self.command == "GET":
            return self._json(200, self.gateway.status(session))
        if rest == ["complete"] and self.command == "POST":
            self.gateway.complete(session)
            return self._json(202, self.gateway.status(session))
        if rest and rest[0] in ("files", "archive"):
            name = ARCHIVE if rest[0] == "archive" else _path_of(rest[1] if len(rest) > 1 else "")
            if self.command == "HEAD":
                with session.lock:
                    done = name in session.state.files
                    offset = session.offset(name)
                self.send_response(200)
                self.send_header("Upload-Offset", str(offset))
                self.send_header("Upload-Complete", "true" if done else "false")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if self.command == "PUT":
                code, body = self.gateway.receive(session, name, self.headers, self.rfile)
                return self._json(code, body)
        raise SessionError("not found", status=404, reason="NotFound")

    def _admin(self) -> bool:
        token = self._token() or ""
        admin = self.gateway.admin_token
        return bool(admin) and hmac.compare_digest(token.encode(), (admin or "").encode())

    def _create(self) -> None:
        if not self._admin():
            raise SessionError("admin token required", status=401, reason="InvalidToken")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_JSON:
            raise SessionError("request too large", status=413, reason="TooLarge")
        try:
            req = json.loads(self.rfile.read(length) or b"{}")
            out = self.gateway.create_session(
                str(req["model"]), str(req["reference"]),
                float(req.get("ttlSeconds", 3600)), int(req.get("maxBytes", 1 << 40)),
                str(req.get("format", "Auto")))
        except (KeyError, ValueError, TypeError, ModelPackError) as e:
            raise SessionError(f"bad session request: {e}", status=400,
                               reason="BadRequest") from e
        self._json(201, out)

    do_GET = do_PUT = do_POST = do_HEAD = _dispatch


def create_server(address: tuple[str, int], gateway: Gateway) -> ThreadingHTTPServer:
    """An HTTP server for ``gateway`` bound to ``address`` (port 0 picks one)."""

    class Handler(_Handler):
        pass

    Handler.gateway = gateway
    Handler.timeout = IDLE_TIMEOUT  # a client silent this long (no bytes) loses its connection
    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    if not gateway.public_url:
        host, port = server.server_address[:2]
        gateway.public_url = f"http://{host!s}:{port}"
    return server

