"""A hostile registry mirror on loopback (a fake: it stands for a mirror that lies).

Every GET or HEAD of a blob or a manifest is answered 200 with garbage of
the length asked for (the right size, the wrong bytes: the worst case, as
no size check catches it); ``seen`` records each request's path, query and
Authorization header, so a test can say what the mirror was sent.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class BadMirror:
    def __init__(self, size_of: dict[str, int] | None = None) -> None:
        self.size_of = dict(size_of or {})  # digest -> size to claim; else 1 KiB
        self.seen: list[tuple[str, str, str | None]] = []  # (method, path?query, Authorization)
        self.lock = threading.Lock()
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> BadMirror:
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, body: bool) -> None:
                with mirror.lock:
                    mirror.seen.append((self.command, self.path,
                                        self.headers.get("Authorization")))
                digest = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
                size = mirror.size_of.get(digest, 1024)
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(b"\xee" * size)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
