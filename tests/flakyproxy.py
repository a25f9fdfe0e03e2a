"""A loopback HTTP proxy in front of a real registry that can misbehave.

It forwards every request to the registry and streams the answer back,
counting requests, Range headers and body bytes; ``cut_after`` makes it
drop the connection after that many body bytes of the next N blob GETs,
and ``down`` makes it refuse everything (a registry outage).
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FlakyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.down = False
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.ranges: list[str] = []
        self.bytes_sent = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                if proxy.down:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "content-length",
                                                "connection")}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                is_blob_get = self.command == "GET" and "/blobs/sha256:" in self.path
                with proxy.lock:
                    proxy.requests[f"{self.command} {'blob' if '/blobs/' in self.path else 'other'}"] += 1
                    if is_blob_get and "Range" in self.headers:
                        proxy.ranges.append(self.headers["Range"])
                    cut = None
                    if is_blob_get and proxy.cuts_left > 0:
                        cut = proxy.cut_after
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in ("connection", "transfer-encoding"):
                        continue
                    if k.lower() == "location":
                        v = v.replace(proxy.upstream, f"127.0.0.1:{proxy.port}")
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                sent = 0
                while True:
                    chunk = resp.read(1 << 20)
                    if not chunk:
                        break
                    if cut is not None and sent + len(chunk) > cut and proxy._take_cut():
                        self.wfile.write(chunk[: cut - sent])
                        self.wfile.flush()
                        with proxy.lock:
                            proxy.bytes_sent += cut - sent
                        self.close_connection = True
                        conn.close()
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    with proxy.lock:
                        proxy.bytes_sent += len(chunk)
                conn.close()

            def _read_chunked(self) -> bytes:
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _take_cut(self) -> bool:
        with self.lock:
            if self.cuts_left <= 0:
                return False
            self.cuts_left -= 1
            return True

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
