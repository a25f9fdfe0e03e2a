"""Attacks through a source URL: the publish Job made to fetch cluster-internal addresses.

The publish Job (``modelcache-controller publish``, as the manager runs it)
denies link-local, loopback and the admin's ``--deny-source-cidr`` networks
before any connection, on every redirect hop too; and a source's answer
body never reaches the result (the Model's status), only the status code
and a fixed reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ingest.sources import base, netpolicy
from ingest.sources.url import UrlSource

SECRET = "AKIA-SECRET-" + "x" * 300


class Server:
    """Counts requests; answers per path: /redirect → Location, /fail → 500 + a secret."""

    def __init__(self, host: str = "127.0.0.1", location: str = "") -> None:
        self.requests = 0
        self.location = location
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _answer(self) -> None:
                outer.requests += 1
                if self.path.startswith("/redirect"):
                    self.send_response(302)
                    self.send_header("Location", outer.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = SECRET.encode()
                # /fail: a HEAD that promises the file, then a GET that fails
                fail = self.path.startswith("/fail") and self.command == "GET"
                self.send_response(500 if fail else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = _answer

        self.httpd = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def publish(source: str, tmp_path, *, env: dict[str, str] | None = None,
            extra: tuple[str, ...] = ()) -> tuple[int, dict]:
    """The publish Job's process, as the manager's Job runs it (no opt-out unless ``env``)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    p = subprocess.run([sys.executable, "-m", "controller.main", "publish", "--source", source,
                        "--to", "127.0.0.1:1/models/x:v1", "--insecure-registry",
                        "--work-dir", str(tmp_path / "w"), *extra],
                       capture_output=True, text=True, timeout=60,
                       env={**clean, **(env or {})})
    return p.returncode, json.loads(p.stdout)


def test_metadata_and_loopback_sources_are_refused_without_a_connection(server, tmp_path):
    code, res = publish("http://169.254.169.254/latest/meta-data/iam/x.safetensors", tmp_path)
    assert code == 1 and res["error"]["reason"] == "SourceAddressDenied", res
    # the API server's port on loopback, or any loopback service
    code, res = publish(f"{server.url}/model.safetensors", tmp_path)
    assert code == 1 and res["error"]["reason"] == "SourceAddressDenied", res
    assert server.requests == 0
    # an admin-denied network (the service CIDR) the same way
    code, res = publish("http://10.96.0.1/x.safetensors", tmp_path,
                        extra=("--deny-source-cidr", "10.96.0.0/12"))
    assert code == 1 and res["error"]["reason"] == "SourceAddressDenied", res


def test_redirect_from_an_allowed_host_to_a_denied_one_is_refused(tmp_path):
    denied = Server("127.0.0.2")
    allowed = Server("127.0.0.1", location=f"{denied.url}/model.safetensors")
    netpolicy.install(netpolicy.Policy(["127.0.0.2/32"]))
    try:
        src = UrlSource(f"{allowed.url}/redirect/model.safetensors")
        with pytest.raises(base.SourceError) as e:
            src.resolve()
        assert e.value.reason == "SourceAddressDenied"
        assert allowed.requests == 1 and denied.requests == 0
    finally:
        netpolicy.install(None)
        allowed.close()
        denied.close()


def test_source_error_body_never_reaches_the_result(server, tmp_path):
    code, res = publish(f"{server.url}/fail/model.safetensors", tmp_path,
                        env={"MODELCACHE_ALLOW_PRIVATE_SOURCES": "1"})
    assert server.requests >= 1
    text = json.dumps(res)
    assert "HTTP 500" in res["error"]["message"], res
    assert "AKIA" not in text and "xxxxxxxx" not in text, res


def test_no_policy_installed_denies_nothing(server):
    """``modelcache pack`` on a user's own machine installs none: loopback is fine."""
    assert netpolicy.current() is None
    UrlSource(f"{server.url}/model.safetensors").resolve()
    assert server.requests == 1


def test_s3_hf_and_ollama_endpoints_are_checked_before_any_connection(server):
    """A Model's S3 endpoint, HF endpoint or Ollama registry on loopback: refused when made."""
    from ingest.sources.huggingface import HuggingFaceSource
    from ingest.sources.ollama import OllamaSource
    from ingest.sources.s3 import S3Source

    netpolicy.install(netpolicy.Policy())
    try:
        host = server.url.removeprefix("http://")
        for make in (lambda: S3Source("bucket", endpoint=server.url),
                     lambda: HuggingFaceSource("acme/m", endpoint=server.url),
                     lambda: OllamaSource(host, "library/m")):
            with pytest.raises(base.SourceError) as e:
                make()
            assert e.value.reason == "SourceAddressDenied"
        assert server.requests == 0
    finally:
        netpolicy.install(None)
