"""The project's HTTP servers under hostile clients (issue 14, M7, L2, L3).

- the admission webhook refuses a body over 4 MiB with 413 without reading it,
  and answers a fast 429 beyond 32 requests in flight;
- every server drops a connection that opens and sends nothing (slowloris);
- the node's ``/inventory`` answers loopback peers only.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from controller import registrytokens
from controller.delivery import webhook
from controller.metrics import Metrics
from controller.models import report
from controller.upload import gateway
from csi import metrics as node_metrics
from kube import certs

SLOW = 1.0  # the idle timeout the tests set


def _serve(server: Any) -> Any:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def hook(monkeypatch) -> Iterator[tuple[int, ssl.SSLContext]]:
    monkeypatch.setattr(webhook._Handler, "timeout", SLOW)
    cert, key = certs.self_signed(["127.0.0.1"])
    server, _ = webhook.create_server(("127.0.0.1", 0), None,  # type: ignore[arg-type]
                                      certs.Bundle(cert, key, cert))
    _serve(server)
    client = ssl.create_default_context(cadata=cert.decode())
    client.check_hostname = False
    yield server.server_address[1], client
    server.shutdown()
    server.server_close()


def _post(port: int, ctx: ssl.SSLContext, length: int, body: bytes = b"") -> ssl.SSLSocket:
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5))
    s.sendall((f"POST {webhook.webhookconfig.WEBHOOK_PATH} HTTP/1.1\r\nHost: x\r\n"
               f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()
              + body)
    return s


def _status(s: socket.socket) -> int:
    """The answer's status code; 0 when the server closed without one."""
    line = s.recv(4096).split(b"\r\n", 1)[0]
    return int(line.split()[1]) if line else 0


def test_webhook_refuses_a_5mib_body_unread(hook):
    port, ctx = hook
    t0 = time.monotonic()
    # only the headers: a server that waits for the declared 5 MiB never answers
    # in time; one that refuses on Content-Length answers at once (sending body
    # bytes too would race the server's close after its 413)
    s = _post(port, ctx, 5 << 20)
    assert _status(s) == 413
    assert time.monotonic() - t0 < 2
    s.close()


def test_webhook_caps_requests_in_flight(hook):
    port, ctx = hook
    # 40 slow clients: headers sent, the body never comes; each holds a slot
    conns = [_post(port, ctx, 100) for _ in range(40)]
    refused = 0
    for s in conns:
        s.settimeout(0.3)
        try:
            refused += _status(s) == 429
        except TimeoutError:
            pass
    assert refused >= 8, refused
    for s in conns:
        s.close()


def _dropped_within(port: int, seconds: float) -> bool:
    """Open a connection, send nothing: is it closed by the server in time?"""
    s = socket.create_connection(("127.0.0.1", port), timeout=seconds + 3)
    t0 = time.monotonic()
    try:
        got = s.recv(4096)  # b"" (or a 408) once the server gives up
    except TimeoutError:
        return False
    except ConnectionResetError:
        got = b""
    finally:
        s.close()
    return time.monotonic() - t0 < seconds + 2 and (got == b"" or b" 408 " in got)


def test_slowloris_is_dropped_by_every_server(hook, monkeypatch, tmp_path):
    port, _ = hook
    assert _dropped_within(port, SLOW)

    monkeypatch.setattr(gateway, "IDLE_TIMEOUT", SLOW)
    gw = _serve(gateway.create_server(("127.0.0.1", 0), gateway.Gateway(str(tmp_path))))
    monkeypatch.setattr(report, "IDLE_TIMEOUT", SLOW)
    rep = _serve(report.create_server(
        ("127.0.0.1", 0), metrics=Metrics(), healthy=lambda: True, ready=lambda: True,
        job_lookup=lambda _: None, progress=None, report_key=b"k"))
    monkeypatch.setattr(node_metrics, "IDLE_TIMEOUT", SLOW)
    node = node_metrics.serve("127.0.0.1:0", lambda: {})
    monkeypatch.setattr(registrytokens, "IDLE_TIMEOUT", SLOW)
    realm = _serve(registrytokens.create_server(
        ("127.0.0.1", 0), registrytokens.Issuer(registrytokens.new_keys(), lambda: None),
        None))
    try:
        for server in (gw, rep, node, realm):
            assert _dropped_within(server.server_address[1], SLOW), server
    finally:
        for server in (gw, rep, node, realm):
            server.shutdown()
            server.server_close()


def _non_loopback_address() -> str:
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.254", 9))  # no packet is sent; picks the outbound address
        return str(probe.getsockname()[0])
    finally:
        probe.close()


def _get(host: str, port: int, path: str, source: str | None = None) -> int:
    s = socket.create_connection((host, port), timeout=5,
                                 source_address=(source, 0) if source else None)
    try:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        return _status(s)
    finally:
        s.close()


def test_inventory_only_to_loopback_peers():
    node = node_metrics.serve("0.0.0.0:0", lambda: {"models": ["team-b/secret-model"]})
    port = node.server_address[1]
    try:
        here = _non_loopback_address()
        assert not here.startswith("127.")
        assert _get(here, port, "/inventory", source=here) == 403
        assert _get(here, port, "/metrics", source=here) == 200
        assert _get("127.0.0.1", port, "/inventory") == 200
    finally:
        node.shutdown()
        node.server_close()
