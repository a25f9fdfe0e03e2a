"""One reply for the project's small HTTP servers (catalog, upload gateway,
webhook, the manager's report/health endpoint, the demo's hub): status,
Content-Type, Content-Length, extra headers, then the body unless the request
was HEAD. Callers encode their own bodies (JSON layouts differ on purpose)."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler


def reply(handler: BaseHTTPRequestHandler, code: int, body: bytes,
          ctype: str = "application/json", headers: dict[str, str] | None = None) -> None:
    handler.send_response(code)
    handler.send_header("Content-Type", ctype)
    handler.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(body)
