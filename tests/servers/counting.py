"""A loopback HTTP file server that counts the body bytes it serves, per request.

For the resume tests: ``served`` lists every GET as ``[Range, body bytes sent]``
(bytes counted as ``sendfile`` reports them sent), so a test can say how much
of a file a retry fetched. Knobs: ``ignore_range`` answers every GET with the
whole file (200), as a server without Range support does; ``hold_at`` stops
the first transfer that reaches that absolute byte of the file: it sends
exactly up to it, sets ``holding`` and waits, then drops the connection
without sending more once ``release`` is set (the client is being killed
meanwhile). ETag is stable per file, and ``If-Range`` is honoured.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class CountingServer:
    def __init__(self, root: str) -> None:
        self.root = root
        self.ignore_range = False
        self.hold_at: int | None = None
        self.holding = threading.Event()
        self.release = threading.Event()
        self.served: list[list[object]] = []  # [Range header, body bytes sent] per GET
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def body_bytes(self, since: int = 0) -> int:
        """Body bytes sent by the GETs from the ``since``-th on."""
        with self.lock:
            return sum(int(n) for _, n in self.served[since:])  # type: ignore[call-overload]

    def __enter__(self) -> CountingServer:
        server = self

        class Handler(_Handler):
            cs = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    cs: CountingServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def _serve(self) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.join(self.cs.root, name)
        if ".." in name.split("/") or not os.path.isfile(full):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        st = os.stat(full)
        size = st.st_size
        etag = '"' + hashlib.sha256(f"{st.st_ino}-{st.st_mtime_ns}-{size}".encode()
                                    ).hexdigest()[:32] + '"'
        start, code = 0, 200
        m = re.match(r"^bytes=(\d+)-$", self.headers.get("Range", ""))
        if (m and not self.cs.ignore_range and self.headers.get("If-Range", etag) == etag
                and int(m.group(1)) < size):
            start, code = int(m.group(1)), 206
        self.send_response(code)
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(size - start))
        if not self.cs.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if code == 206:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with self.cs.lock:
            record: list[object] = [self.headers.get("Range", ""), 0]
            self.cs.served.append(record)
        try:
            self.wfile.flush()
            with open(full, "rb") as fp:
                off = start
                while off < size:
                    end = size
                    hold = self.cs.hold_at
                    if hold is not None and off < hold and not self.cs.holding.is_set():
                        end = hold
                    elif hold is not None and off >= hold and self.cs.holding.is_set() \
                            and not self.cs.release.is_set():
                        self.cs.release.wait()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    n = os.sendfile(self.connection.fileno(), fp.fileno(), off,
                                    min(end - off, 8 << 20))
                    if n == 0:
                        break
                    off += n
                    with self.cs.lock:
                        record[1] = int(record[1]) + n  # type: ignore[call-overload]
                    if hold is not None and off == hold and not self.cs.holding.is_set():
                        self.cs.holding.set()
        except (BrokenPipeError, ConnectionResetError):
            pass
