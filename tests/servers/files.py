"""A plain HTTP file server on loopback with Range, ETag, auth and a drop knob."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    def __init__(self, root: str, token: str | None = None) -> None:
        self.root = root
        self.token = token
        self.drop_after: dict[str, int] = {}  # path -> close after this absolute byte
        self.drops_left: dict[str, int] = {}
        self.requests: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        server = self

        class Handler(_Handler):
            fs = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    fs: FileServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _plain(self, code: int, text: str = "") -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        with self.fs.lock:
            self.fs.requests.append((self.command, name, self.headers.get("Range", "")))
        if self.fs.token and self.headers.get("Authorization") != f"Bearer {self.fs.token}":
            return self._plain(401, "unauthorized")
        full = os.path.join(self.fs.root, name)
        if ".." in name.split("/") or not os.path.isfile(full):
            return self._plain(404, "not found")
        size = os.path.getsize(full)
        st = os.stat(full)
        etag = '"' + hashlib.sha256(f"{st.st_ino}-{st.st_mtime_ns}-{size}".encode()).hexdigest()[:32] + '"'
        start, code = 0, 200
        m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
        if m and self.headers.get("If-Range", etag) == etag:
            start, code = int(m.group(1)), 206
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self.send_response(code)
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = size - start
        with self.fs.lock:
            if self.fs.drops_left.get(name, 0) > 0:
                self.fs.drops_left[name] -= 1
                limit = max(0, self.fs.drop_after[name] - start)
        try:
            self.wfile.flush()
            with open(full, "rb") as fp:
                off, left = start, limit
                while left > 0:
                    n = os.sendfile(self.connection.fileno(), fp.fileno(), off, min(left, 8 << 20))
                    if n == 0:
                        break
                    off += n
                    left -= n
            if limit < size - start:
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass
