"""A local Hugging Face Hub-compatible HTTP server on loopback.

The embedded demo serves the real all-MiniLM-L6-v2 directory from it (the
controller's Hugging Face source then runs unchanged, pointed at it by
``HF_ENDPOINT``); the tests and benchmarks serve generated models from it
(``tests/servers/hfhub.py`` re-exports it). It implements what
``huggingface_hub`` 2.x calls to download a model:
``GET /api/models/{repo}[/revision/{rev}]`` (the commit sha),
``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=true`` (paginated
with a ``Link: <…>; rel="next"`` header, like the Hub), and
``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``X-Repo-Commit``, ``ETag``;
LFS files answer 302 to a CDN-like ``/cdn/<sha256>`` URL on 127.0.0.2 with
``X-Linked-Etag``/``X-Linked-Size``, as the Hub does; ``Range`` honoured).
Errors carry ``X-Error-Code`` (RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo). For tests, ``Knobs`` make it hostile: drop the
connection halfway, lie about a size, serve corrupt bytes, list hostile
names. Files are served from disk with ``sendfile``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kube.httpreply import reply

LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".onnx", ".h5", ".msgpack")


@dataclass
class HubFile:
    path: str
    abspath: str | None  # served from disk, or
    data: bytes | None = None  # from memory
    size: int = 0
    sha256: str = ""
    git_sha1: str = ""
    lfs: bool = False

    def read_range(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        assert self.abspath is not None
        with open(self.abspath, "rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass
class Repo:
    repo_id: str
    sha: str
    files: dict[str, HubFile]
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> sha
    gated: bool = False
    private: bool = False


@dataclass
class Knobs:
    """Ways to misbehave; each keyed by file path."""

    drop_after: dict[str, int] = field(default_factory=dict)  # close after N bytes sent
    drops_left: dict[str, int] = field(default_factory=dict)  # how many times to drop
    size_lie: dict[str, int] = field(default_factory=dict)  # listed size; the body is the real one
    corrupt: set[str] = field(default_factory=set)  # flip a byte in what is served
    hostile_names: list[str] = field(default_factory=list)  # extra names listed in the tree
    rate: dict[str, int] = field(default_factory=dict)  # send at most N bytes a second
    page_size: int = 50


def _digest_file(path: str) -> tuple[str, str, int]:
    sha = hashlib.sha256()
    size = os.path.getsize(path)
    git = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            sha.update(chunk)
            git.update(chunk)
    return sha.hexdigest(), git.hexdigest(), size


class HubServer:
    def __init__(self, token: str | None = None) -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token  # required for private/gated repos
        self.knobs = Knobs()
        self.requests: list[tuple[str, str, str]] = []  # (method, path, Range)
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None
        self.cdn: ThreadingHTTPServer | None = None  # another host, as the Hub's CDN is

    # -- content ----------------------------------------------------------

    def add_repo(self, repo_id: str, root: str | None = None, *,
                 files: dict[str, bytes] | None = None, gated: bool = False,
                 private: bool = False, refs: dict[str, str] | None = None,
                 hash_files: bool = True) -> Repo:
        """Serve a directory (and/or in-memory files) as ``repo_id`` at a new commit."""
        entries: dict[str, HubFile] = {}
        if root:
            for dirpath, _, names in os.walk(root):
                for name in names:
                    full = os.path.join(dirpath, name)
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    sha, git, size = _digest_file(full)
                    entries[rel] = HubFile(rel, full, None, size, sha, git,
                                           rel.endswith(LFS_SUFFIXES))
        for rel, data in (files or {}).items():
            git = hashlib.sha1(f"blob {len(data)}\0".encode() + data,
                               usedforsecurity=False).hexdigest()
            entries[rel] = HubFile(rel, None, data, len(data), hashlib.sha256(data).hexdigest(),
                                   git, rel.endswith(LFS_SUFFIXES))
        commit = hashlib.sha1(json.dumps(sorted((f.path, f.sha256) for f in entries.values()))
                              .encode() + repo_id.encode(), usedforsecurity=False).hexdigest()
        repo = Repo(repo_id, commit, entries, {"main": commit, **(refs or {})}, gated, private)
        self.repos[repo_id] = repo
        return repo

    # -- lifecycle --------------------------------------------------------

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        assert self.cdn is not None
        return f"http://127.0.0.2:{self.cdn.server_address[1]}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        for httpd in (self.httpd, self.cdn):
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for httpd in (self.httpd, self.cdn):
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
        self.httpd = self.cdn = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_TREE_RE = re.compile(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?$")
_INFO_RE = re.compile(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?$")
_RESOLVE_RE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")
_CDN_RE = re.compile(r"^/cdn/([0-9a-f]{64})/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    # -- helpers ----------------------------------------------------------

    def _send_json(self, obj: object, code: int = 200, headers: dict[str, str] | None = None
                   ) -> None:
        reply(self, code, json.dumps(obj).encode(), headers=headers)

    def _error(self, code: int, error_code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if error_code:
            headers["X-Error-Code"] = error_code
        self._send_json({"error": message}, code, headers)

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return bool(self.hub.token) and auth == f"Bearer {self.hub.token}"

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            # the Hub answers 401 + RepoNotFound for both, so a private repo's existence leaks not
            self._error(401 if not self._authorized() else 404, "RepoNotFound",
                        "Repository Not Found")
            return None
        if repo.gated and not self._authorized():
            self._error(401, "GatedRepo", "Access to model is restricted")
            return None
        return repo

    def _sha(self, repo: Repo, rev: str) -> str | None:
        rev = urllib.parse.unquote(rev)
        if rev in repo.refs:
            return repo.refs[rev]
        if rev == repo.sha or rev in repo.refs.values():
            return rev
        self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return None

    # -- routes -----------------------------------------------------------

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        parsed = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(parsed.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, path, self.headers.get("Range", "")))
        try:
            if m := _TREE_RE.match(path):
                return self._tree(m.group(1), m.group(2), m.group(3) or "", parsed.query)
            if m := _INFO_RE.match(path):
                return self._info(m.group(1), m.group(2) or "main")
            if m := _RESOLVE_RE.match(path):
                return self._resolve(m.group(1), m.group(2), m.group(3))
            if m := _CDN_RE.match(path):
                return self._cdn(m.group(1), m.group(2))
            self._error(404, None, "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _info(self, repo_id: str, rev: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._sha(repo, rev)
        if sha is None:
            return
        self._send_json({
            "_id": "0" * 24, "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha,
            "private": repo.private, "gated": "manual" if repo.gated else False,
            "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "library_name": "transformers", "pipeline_tag": "feature-extraction",
            "siblings": [{"rfilename": p} for p in sorted(repo.files)],
            "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
        })

    def _tree(self, repo_id: str, rev: str, sub: str, query: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._sha(repo, rev)
        if sha is None:
            return
        params = urllib.parse.parse_qs(query)
        recursive = params.get("recursive", ["false"])[0].lower() == "true"
        cursor = int(params.get("cursor", ["0"])[0])
        knobs = self.hub.knobs
        items: list[dict[str, object]] = []
        dirs: set[str] = set()
        names = sorted(repo.files) + list(knobs.hostile_names)
        prefix = sub.rstrip("/") + "/" if sub else ""
        for name in names:
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if not recursive and "/" in rest:
                d = prefix + rest.split("/", 1)[0]
                if d not in dirs:
                    dirs.add(d)
                    items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
                continue
            if recursive:
                parts = rest.split("/")[:-1]
                for i in range(len(parts)):
                    d = prefix + "/".join(parts[:i + 1])
                    if d not in dirs:
                        dirs.add(d)
                        items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
            f = repo.files.get(name)
            if f is None:  # a hostile name: listed, with made-up content
                items.append({"type": "file", "oid": "1" * 40, "size": 3, "path": name})
                continue
            size = knobs.size_lie.get(name, f.size)
            item: dict[str, object] = {"type": "file", "oid": f.git_sha1, "size": size,
                                       "path": f.path}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": size, "pointerSize": 134}
            items.append(item)
        page = items[cursor:cursor + knobs.page_size]
        headers = {}
        if cursor + knobs.page_size < len(items):
            q = urllib.parse.urlencode({**{k: v[0] for k, v in params.items()},
                                        "cursor": str(cursor + knobs.page_size)})
            headers["Link"] = f'<{self.hub.url}{urllib.parse.urlsplit(self.path).path}?{q}>; rel="next"'
        self._send_json(page, headers=headers)

    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        sha = self._sha(repo, rev)
        if sha is None:
            return
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist at {sha}")
            return
        size = self.hub.knobs.size_lie.get(path, f.size)
        if f.lfs:
            location = f"{self.hub.cdn_url}/cdn/{f.sha256}/{urllib.parse.quote(repo_id + '/' + path)}"
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("X-Repo-Commit", sha)
            self.send_header("X-Linked-Etag", f'"{f.sha256}"')
            self.send_header("X-Linked-Size", str(size))
            self.send_header("ETag", f'"{f.git_sha1}"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self._body(f, {"X-Repo-Commit": sha, "ETag": f'"{f.git_sha1}"'})

    def _cdn(self, sha256: str, rest: str) -> None:
        repo_id, _, path = rest.partition("/")
        repo_id = repo_id + "/" + path.split("/", 1)[0]
        path = path.split("/", 1)[1] if "/" in path else ""
        repo = self.hub.repos.get(repo_id)
        f = repo.files.get(path) if repo else None
        if f is None or f.sha256 != sha256:
            self._error(404, None, "no such object")
            return
        self._body(f, {"ETag": f'"{sha256}"'})

    def _body(self, f: HubFile, headers: dict[str, str]) -> None:
        """Send ``f`` honouring Range; knobs may drop or corrupt (a size lie is in listings)."""
        knobs = self.hub.knobs
        real = f.size
        start, end = 0, real
        rng = self.headers.get("Range", "")
        m = re.match(r"^bytes=(\d+)-(\d*)$", rng)
        code = 200
        if m:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, real) if m.group(2) else real
            if start >= real:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{real}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            code = 206
        self.send_response(code)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        length = end - start
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{real}")
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = length
        with self.hub.lock:
            left = knobs.drops_left.get(f.path, 0)
            if left > 0 and f.path in knobs.drop_after:
                knobs.drops_left[f.path] = left - 1
                limit = max(0, min(length, knobs.drop_after[f.path] - start))
        if f.path in knobs.corrupt or f.data is not None:
            data = f.read_range(start, start + limit)
            if f.path in knobs.corrupt and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            self.wfile.write(data)
        else:
            self.wfile.flush()
            assert f.abspath is not None
            rate = knobs.rate.get(f.path, 0)
            # a throttled file goes out in tenths of its rate, a pause after each
            step = max(1, rate // 10) if rate else 8 << 20
            with open(f.abspath, "rb") as fp:
                offset, left_b = start, limit
                while left_b > 0:
                    n = os.sendfile(self.connection.fileno(), fp.fileno(), offset,
                                    min(left_b, step))
                    if n == 0:
                        break
                    offset += n
                    left_b -= n
                    if rate:
                        time.sleep(n / rate)
        if limit < length:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
