"""Upload sessions: who may upload what, until when, how much, and what arrived.

A session belongs to one model and one registry reference. Its token is
kept only as a sha256 and compared in constant time; it expires. Uploaded
bytes go straight into the session's ``BlobStore`` through a resumable,
hashing ``PartialBlob`` per file, so when the upload completes every file
already has its digest and the publish worker finds it staged. Session
state is a JSON file beside the store, so a restarted gateway keeps its
sessions and resumes half-uploaded files (the ``.part`` prefix is rehashed
once on first use).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from modelpack.store.blobs import BlobStore, PartialBlob

ARCHIVE = "__archive__"  # the pseudo path of an uploaded tar


class SessionError(Exception):
    """A request the session refuses; ``status`` is the HTTP answer."""

    def __init__(self, message: str, *, status: int, reason: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class SessionState:
    id: str
    model: str
    reference: str
    token_sha256: str
    expires_at: float
    max_bytes: int
    phase: str = "WaitForUpload"  # WaitForUpload | Publishing | Ready | Failed
    files: dict[str, list[Any]] = field(default_factory=dict)  # path -> [digest, size]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    format: str = "Auto"  # the Model's spec.format, verified at publish


class Session:
    def __init__(self, root: str, state: SessionState) -> None:
        self.root = root
        self.state = state
        self.lock = threading.Lock()
        self.store = BlobStore(os.path.join(root, "store"))
        self.parts: dict[str, PartialBlob] = {}
        self.sizes: dict[str, int] = {}  # declared total size of each file in progress

    # -- auth -------------------------------------------------------------

    def authorize(self, token: str | None, now: float | None = None) -> None:
        given = _hash_token(token or "")
        want = self.state.token_sha256
        if not token or not isinstance(want, str) or \
                not hmac.compare_digest(given.encode(), want.encode()):
            raise SessionError("invalid upload token", status=401, reason="InvalidToken")
        expires = self.state.expires_at
        # a state file garbled on disk (not a number) is an expired session, never an open one
        if not isinstance(expires, (int, float)) or (now or time.time()) >= expires:
            raise SessionError("the upload token has expired", status=401, reason="TokenExpired")

    # -- bookkeeping ------------------------------------------------------

    def save(self) -> None:
        tmp = os.path.join(self.root, "session.json.tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self.state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, "session.json"))

    def part_path(self, path: str) -> str:
        key = hashlib.sha256(f"{self.state.id}\0{path}".encode()).hexdigest()
        return os.path.join(self.store.ingest_dir, key + ".part")

    def committed_bytes(self, exclude: str | None = None) -> int:
        return sum(int(s) for p, (_, s) in self.state.files.items() if p != exclude)

    def offset(self, path: str) -> int:
        """Bytes of ``path`` received so far (all of them once committed)."""
        if path in self.state.files:
            return int(self.state.files[path][1])
        part = self.parts.get(path)
        if part is not None:
            return part.offset
        try:
            return os.path.getsize(self.part_path(path))
        except FileNotFoundError:
            return 0

    def open_part(self, path: str, total: int, start: int) -> PartialBlob:
        part = self.parts.get(path)
        if part is not None and (self.sizes.get(path) != total or start == 0):
            part.discard()
            part = None
        if part is None:
            if start == 0:
                try:
                    os.unlink(self.part_path(path))
                except FileNotFoundError:
                    pass
            # buffered, not O_DIRECT: the file is read back at once (format check, push),
            # from the page cache, as ingest's staged files are (ingest/publish/stage.py)
            part = PartialBlob(self.part_path(path), None, total, resume=True, direct=False)
            self.parts[path] = part
            self.sizes[path] = total
        return part

    def drop_part(self, path: str) -> None:
        part = self.parts.pop(path, None)
        if part is not None:
            part.discard()
        self.sizes.pop(path, None)


class SessionStore:
    """All sessions of a gateway, persisted under ``root``."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.lock = threading.Lock()
        self.sessions: dict[str, Session] = {}
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, "session.json")
            try:
                with open(path) as f:
                    state = SessionState(**json.load(f))
            except (OSError, ValueError, TypeError):
                continue
            if state.phase == "Publishing":  # the gateway died mid-publish: run it again
                state.phase = "WaitForUpload"
            self.sessions[state.id] = Session(os.path.join(root, name), state)

    def create(self, model: str, reference: str, ttl_seconds: float, max_bytes: int,
               expected_format: str = "Auto") -> tuple[Session, str]:
        token = secrets.token_urlsafe(32)
        sid = secrets.token_hex(12)
        state = SessionState(sid, model, reference, _hash_token(token),
                             time.time() + ttl_seconds, max_bytes, format=expected_format)
        session = Session(os.path.join(self.root, sid), state)
        os.makedirs(session.root, exist_ok=True)
        session.save()
        with self.lock:
            self.sessions[sid] = session
        return session, token

    def get(self, sid: str) -> Session:
        with self.lock:
            session = self.sessions.get(sid)
        if session is None:
            raise SessionError("no such upload session", status=404, reason="NotFound")
        return session

    def reap(self, grace_seconds: float = 24 * 3600, now: float | None = None) -> list[str]:
        """Delete sessions expired for longer than ``grace_seconds`` and not publishing."""
        now = now or time.time()
        with self.lock:
            old = [sid for sid, s in self.sessions.items()
                   if s.state.expires_at + grace_seconds < now and s.state.phase != "Publishing"]
        for sid in old:
            self.delete(sid)
        return old

    def delete(self, sid: str) -> None:
        with self.lock:
            session = self.sessions.pop(sid, None)
        if session is not None:
            shutil.rmtree(session.root, ignore_errors=True)
