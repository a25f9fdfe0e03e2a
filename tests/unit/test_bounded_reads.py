"""Every network read is bounded before it is buffered (issue 14, M6).

The attack: a hostile registry or catalog answers a manifest, a config blob, an
error or the model listing with 64 MiB. The client must refuse with a typed
error after reading at most its limit plus a chunk, and close the connection:
the server sees its send fail long before the 64 MiB are out.
"""

from __future__ import annotations

import socket
import threading

import pytest

from ingest.sources import catalog
from modelpack.errors import RegistryError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient

HUGE = 64 << 20
PIECE = 64 << 10


class HugeServer:
    """Answers every request with ``status`` and a 64 MiB body (no Content-Length, so only
    the reader's own bound stops it); counts what it managed to send."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.sent = 0
        self.cut_short = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, PIECE)
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                got = conn.recv(4096)
                if not got:
                    return
                data += got
            head = (f"HTTP/1.1 {self.status} X\r\nContent-Type: application/json\r\n"
                    "Connection: close\r\n\r\n").encode()
            piece = b" " * PIECE
            try:
                conn.sendall(head)
                while self.sent < HUGE:
                    conn.sendall(piece)
                    self.sent += PIECE
            except OSError:
                self.cut_short = True

    def done(self) -> None:
        self.thread.join(20)
        self.sock.close()
        assert not self.thread.is_alive()
        # the client stopped reading early and closed: the 64 MiB never went out
        assert self.cut_short and self.sent < 24 << 20, self.sent


def _client(srv: HugeServer) -> RegistryClient:
    return RegistryClient(f"127.0.0.1:{srv.port}", insecure=True, retries=0)


def test_huge_manifest_is_refused_unbuffered():
    srv = HugeServer()
    with pytest.raises(RegistryError) as e:
        _client(srv).get_manifest(parse(f"127.0.0.1:{srv.port}/team/m:v1"))
    assert e.value.reason == "TooLarge"
    srv.done()


def test_huge_config_blob_is_refused_unbuffered():
    srv = HugeServer()
    with pytest.raises(RegistryError) as e:
        _client(srv).get_blob_bytes("team/m", "sha256:" + "0" * 64, limit=1 << 20)
    assert e.value.reason == "TooLarge"
    srv.done()


def test_huge_error_body_is_read_only_a_little():
    srv = HugeServer(status=500)
    with pytest.raises(RegistryError) as e:
        _client(srv).get_manifest(parse(f"127.0.0.1:{srv.port}/team/m:v1"))
    assert e.value.status == 500 and len(str(e.value)) < 1000
    srv.done()


def test_huge_catalog_listing_is_refused_unbuffered(monkeypatch):
    monkeypatch.setattr(catalog, "MAX_LISTING", 1 << 20)
    srv = HugeServer()
    client = catalog.CatalogClient(f"http://127.0.0.1:{srv.port}", "t", retries=0)
    with pytest.raises(catalog.CatalogUnavailable) as e:
        client.models()
    assert e.value.reason == "CatalogBadResponse" and "over" in str(e.value)
    srv.done()


def test_huge_catalog_error_body_is_read_only_a_little():
    srv = HugeServer(status=503)
    client = catalog.CatalogClient(f"http://127.0.0.1:{srv.port}", "t", retries=0)
    with pytest.raises(catalog.CatalogUnavailable) as e:
        client.models()
    assert e.value.status == 503
    srv.done()
