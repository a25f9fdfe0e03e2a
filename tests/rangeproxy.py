"""A loopback proxy for blob GETs that tampers with ranges (tests of ranged downloads).

In front of a real registry, GET only (a test points only its blob fetches
here). It counts requests, Range headers and body bytes, and can: strip
the Range header (a server that ignores Range answers 200 with the whole
blob), flip one byte at an absolute blob offset in whatever response
carries it, cut a response after ``cut_after`` body bytes (``cuts_left``
times), and cap each connection at ``rate`` bytes per second.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class RangeProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.strip_range = False
        self.flip_at: int | None = None
        self.cut_after: int | None = None
        self.cuts_left = 0
        self.rate: float | None = None
        self.lock = threading.Lock()
        self.gets = 0
        self.ranges: list[str] = []
        self.bytes_sent = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                with proxy.lock:
                    proxy.gets += 1
                    if "Range" in self.headers:
                        proxy.ranges.append(self.headers["Range"])
                    if proxy.strip_range:
                        headers.pop("Range", None)
                    cut = proxy.cut_after if proxy.cuts_left > 0 else None
                    if cut is not None:
                        proxy.cuts_left -= 1
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request("GET", self.path, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.end_headers()
                m = re.match(r"bytes (\d+)-", resp.getheader("Content-Range") or "")
                at = int(m.group(1)) if m else 0
                sent = 0
                t0 = time.monotonic()
                try:
                    while True:
                        chunk = bytearray(resp.read(256 << 10))
                        if not chunk:
                            break
                        flip = proxy.flip_at
                        if flip is not None and at <= flip < at + len(chunk):
                            chunk[flip - at] ^= 0xFF
                        if cut is not None and sent + len(chunk) > cut:
                            self.wfile.write(chunk[: cut - sent])
                            self.wfile.flush()
                            with proxy.lock:
                                proxy.bytes_sent += cut - sent
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        at += len(chunk)
                        with proxy.lock:
                            proxy.bytes_sent += len(chunk)
                        if proxy.rate:
                            ahead = sent / proxy.rate - (time.monotonic() - t0)
                            if ahead > 0:
                                time.sleep(ahead)
                except OSError:  # the client went away (a killed puller, a stopped range)
                    self.close_connection = True
                finally:
                    conn.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
