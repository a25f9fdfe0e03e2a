"""The catalog fails closed when the API server cannot decide who may read.

The attack: make TokenReview or SubjectAccessReview fail (the API server
down, slow, answering 500, or something that is not a review answering in
its place) and hope the catalog serves anyway, or caches the failure as a
decision. The catalog's reviews go through a loopback proxy in front of the
real kube-apiserver (``ApiProxy``, this file) that can misbehave on demand;
its informer, TLS and everything else use the real API server directly with
the controller's own ServiceAccount and RBAC. Tokens are real ServiceAccount
tokens. Each failure is a 503 with no catalog data; once the API server
answers again the same token is reviewed afresh and served at once, though
the decision TTL here is a minute: nothing of the failure was kept.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli.local import registry as localregistry
from controller.catalog.auth import Authorizer
from kube import client as k
from tests import kubeenv
from tests.integration import test_catalog_api as api
from tests.integration import test_controller

kube = kubeenv.kube
cluster = test_controller.cluster
tokens = api.tokens

LIST = "/catalog/v1/models"
TTL = 60.0  # long: a cached failure would still be answering when the test looks


class ApiProxy:
    """Plain HTTP on loopback, forwarding to the real API server over TLS, unless
    ``mode`` says otherwise: "500", "garbage" (a 200 HTML page), "strings"
    (a 200 review with "true"/"false" as strings), "nouser" (authenticated, no
    username), "hang" (answers after ``hang`` seconds); ``only`` limits the
    misbehaviour to paths containing it. ``stop``/``start`` leave a dead address."""

    def __init__(self, upstream: str, ca_file: str) -> None:
        u = urllib.parse.urlsplit(upstream)
        self.host, self.port_up = u.hostname or "127.0.0.1", u.port or 443
        self.ctx = ssl.create_default_context(cafile=ca_file)
        self.mode = "ok"
        self.only = ""
        self.hang = 1.5
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _reply(self, code: int, body: bytes, ctype: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")  # stop() leaves no live connection
                self.end_headers()
                self.close_connection = True
                self.wfile.write(body)

            def do_POST(self) -> None:
                self._forward()

            def do_GET(self) -> None:
                self._forward()

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                mode = proxy.mode if proxy.only in self.path else "ok"
                if mode == "500":
                    return self._reply(500, json.dumps({
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "code": 500, "reason": "InternalError"}).encode())
                if mode == "garbage":
                    return self._reply(200, b"<html>gateway says hello</html>", "text/html")
                if mode == "strings":
                    return self._reply(200, json.dumps({"status": {
                        "authenticated": "true", "allowed": "true",
                        "user": {"username": "system:serviceaccount:x:y"}}}).encode())
                if mode == "nouser":
                    return self._reply(200, json.dumps({"status": {
                        "authenticated": True, "user": {}}}).encode())
                if mode == "hang":
                    time.sleep(proxy.hang)
                conn = http.client.HTTPSConnection(proxy.host, proxy.port_up,
                                                   context=proxy.ctx, timeout=30)
                headers = {h: v for h, v in self.headers.items()
                           if h.lower() in ("authorization", "content-type", "accept")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self._reply(resp.status, data, resp.getheader("Content-Type") or "")

        ThreadingHTTPServer.allow_reuse_address = True
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@pytest.fixture(scope="module")
def proxy(kube: kubeenv.KubeEnv) -> Iterator[ApiProxy]:
    p = ApiProxy(kube.server, kube.pki.ca)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def catalog(kube: kubeenv.KubeEnv, cluster: k.Kube, registry: localregistry.LocalRegistry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[api.CatalogA]:
    cat = api.CatalogA(kube, registry, str(tmp_path_factory.mktemp("failclosed")))
    yield cat
    cat.stop()


@pytest.fixture(scope="module")
def reviews_client(kube: kubeenv.KubeEnv, catalog: api.CatalogA,
                   proxy: ApiProxy) -> Iterator[k.Kube]:
    """The controller's own token (its RBAC is applied by CatalogA), reaching the API
    server only through the proxy."""
    from kubernetes import client as kc

    cfg = kc.Configuration()
    cfg.host = proxy.url
    cfg.api_key = {"authorization": "Bearer " + api.sa_token(kube, "modelcache-controller",
                                                               api.SYSTEM_NS)}
    client = k.Kube(kc.ApiClient(cfg))
    yield client
    client.close()


@pytest.fixture
def authorizer(catalog: api.CatalogA, reviews_client: k.Kube, proxy: ApiProxy) -> Authorizer:
    """A fresh Authorizer per test (empty caches), its reviews through the proxy."""
    proxy.mode, proxy.only = "ok", ""
    if proxy.server is None:
        proxy.start()
    auth = Authorizer(reviews_client, ttl=TTL, timeout=0.5)
    catalog.catalog.authorizer = auth
    return auth


def assert_unavailable(catalog: api.CatalogA, token: str) -> None:
    for path in (LIST, "/catalog/v1/models/anything", "/v2/"):
        r = catalog.get(path, token)
        assert r.status_code == 503, (path, r.status_code, r.text[:200])
        assert "models" not in r.json() and r.json()["errors"][0]["code"] == "UNAVAILABLE"
        assert r.headers["Retry-After"] == "1"


def assert_back(catalog: api.CatalogA, auth: Authorizer, token: str) -> None:
    before = auth.reviews
    r = catalog.get(LIST, token)
    assert r.status_code == 200, r.text[:200]
    assert "models" in r.json()
    assert auth.reviews > before  # asked afresh, not answered from a cache


@pytest.mark.parametrize("mode", ["500", "garbage", "strings", "nouser", "hang"])
def test_token_review_failure_is_503_and_not_cached(catalog: api.CatalogA, proxy: ApiProxy,
                                                    authorizer: Authorizer,
                                                    tokens: dict[str, str], mode: str) -> None:
    proxy.mode = mode
    assert_unavailable(catalog, tokens["reader"])
    assert_unavailable(catalog, tokens["stranger"])  # an unknown answer grants nobody
    proxy.mode = "ok"
    assert_back(catalog, authorizer, tokens["reader"])
    assert catalog.get(LIST, tokens["stranger"]).status_code == 403


@pytest.mark.parametrize("mode", ["500", "garbage", "strings", "hang"])
def test_access_review_failure_is_503_and_not_cached(catalog: api.CatalogA, proxy: ApiProxy,
                                                     authorizer: Authorizer,
                                                     tokens: dict[str, str], mode: str) -> None:
    proxy.mode, proxy.only = mode, "subjectaccessreviews"
    for token in (tokens["reader"], tokens["stranger"]):
        r = catalog.get(LIST, token)
        assert r.status_code == 503 and "models" not in r.json()
    proxy.mode = "ok"
    assert_back(catalog, authorizer, tokens["reader"])
    assert catalog.get(LIST, tokens["stranger"]).status_code == 403


def test_dead_api_server_is_503_and_not_cached(catalog: api.CatalogA, proxy: ApiProxy,
                                               authorizer: Authorizer,
                                               tokens: dict[str, str]) -> None:
    proxy.stop()  # nothing listens on the API server's address now
    assert_unavailable(catalog, tokens["reader"])
    proxy.start()  # the same address answers again
    assert_back(catalog, authorizer, tokens["reader"])


def test_failure_after_a_good_review_keeps_nothing_stale(catalog: api.CatalogA,
                                                         proxy: ApiProxy,
                                                         authorizer: Authorizer,
                                                         tokens: dict[str, str]) -> None:
    """One model's review failing does not let another model's request through."""
    assert catalog.get(LIST, tokens["reader"]).status_code == 200
    proxy.mode, proxy.only = "500", "subjectaccessreviews"
    r = catalog.get("/catalog/v1/models/other-model", tokens["reader"])
    assert r.status_code == 503
    proxy.mode = "ok"
    assert catalog.get("/catalog/v1/models/other-model", tokens["reader"]).status_code == 404
