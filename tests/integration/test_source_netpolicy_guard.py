"""Attacks that the URL check alone does not see: the connect guard (``netpolicy``).

A hub API or an Ollama registry that redirects inside its own client, a
name whose DNS answer changes between the check and the connect, a catalog
import and the manager's upstream probe / catalog listing aimed at a denied
address: each is refused with ``SourceAddressDenied`` and the denied server
never sees a request. 127.0.0.2 stands for the denied network (the policy
denies 127.0.0.2/32) where the attacker's own server on 127.0.0.1 must stay
reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ingest.sources import base, netpolicy
from tests.integration.test_source_netpolicy import Server, publish

DENIED = "127.0.0.2"


class Redirector:
    """Answers every request with a 307 to ``location`` + the request's path."""

    def __init__(self, location: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _answer(self) -> None:
                outer.requests += 1
                self.send_response(307)
                self.send_header("Location", location + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = _answer

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def denied() -> Iterator[Server]:
    s = Server(DENIED)
    yield s
    s.close()


@pytest.fixture
def policy() -> Iterator[None]:
    """The publish Job's way: the whole process guarded."""
    netpolicy.install(netpolicy.Policy([f"{DENIED}/32"]))
    yield
    netpolicy.install(None)


def test_hub_client_redirect_to_a_denied_address_is_refused(denied, policy):
    from ingest.sources.huggingface import HuggingFaceSource

    hub = Redirector(denied.url)
    try:
        src = HuggingFaceSource("acme/m", endpoint=hub.url, token="")
        with pytest.raises(base.SourceError) as e:
            src.resolve()
        assert e.value.reason == "SourceAddressDenied" and not e.value.retryable
        assert hub.requests >= 1 and denied.requests == 0
    finally:
        hub.close()


def test_ollama_registry_redirect_to_a_denied_address_is_refused(denied, policy):
    from ingest.sources.ollama import OllamaSource

    registry = Redirector(denied.url)
    try:
        src = OllamaSource(registry.url.removeprefix("http://"), "library/m")
        with pytest.raises(base.SourceError) as e:
            src.resolve()
        assert e.value.reason == "SourceAddressDenied" and not e.value.retryable
        assert registry.requests >= 1 and denied.requests == 0
    finally:
        registry.close()


def test_dns_rebinding_between_the_check_and_the_connect_is_refused(denied, policy,
                                                                     monkeypatch):
    """``rebind.test`` answers 127.0.0.1 to the URL check, 127.0.0.2 to the connection."""
    from ingest.sources.url import UrlSource

    real = socket.getaddrinfo

    def rebinding(host: Any, port: Any, *a: Any, **kw: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *a, **kw)
        caller = sys._getframe(1).f_code.co_name
        return real("127.0.0.1" if caller == "check_url" else DENIED, port, *a, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = denied.url.rsplit(":", 1)[1]
    with pytest.raises(base.SourceError) as e:
        UrlSource(f"http://rebind.test:{port}/model.safetensors").resolve()
    assert e.value.reason == "SourceAddressDenied"
    assert denied.requests == 0


def test_the_jobs_own_endpoints_stay_reachable(denied):
    """Trusted host:port only: the same host on another port is still refused."""
    other = Server(DENIED)
    netpolicy.install(netpolicy.Policy([f"{DENIED}/32"]), trusted=(denied.url,))
    try:
        socket.create_connection(denied.url.removeprefix("http://").split(":"), 5).close()
        with pytest.raises(netpolicy.SourceAddressDenied):
            host, port = other.url.removeprefix("http://").split(":")
            socket.create_connection((host, int(port)), 5)
    finally:
        netpolicy.install(None)
        other.close()


def test_catalog_import_of_a_denied_address_is_refused(tmp_path):
    """The publish Job as the manager runs it (default policy: loopback denied)."""
    target = Server()
    try:
        code, res = publish(f"catalog+{target.url}#llama@sha256:{'a' * 64}", tmp_path,
                            extra=("--catalog-wait", "0"))
        assert code == 1 and res["error"]["reason"] == "SourceAddressDenied", res
        assert target.requests == 0
    finally:
        target.close()


@pytest.fixture
def manager_policy() -> Iterator[None]:
    """The manager's own policy, from its default flags (no opt-out)."""
    from controller import main

    parser = argparse.ArgumentParser()
    main._manager_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["manager", "--registry", "127.0.0.1:1"])
    assert not args.allow_private_sources, "MODELCACHE_ALLOW_PRIVATE_SOURCES is set here"
    main._install_source_policy(args)
    yield
    netpolicy.install(None)


def test_manager_installs_a_scoped_guard(manager_policy):
    """Loopback is denied to the manager's source calls, not to its own (the API server)."""
    target = Server()
    try:
        socket.create_connection(("127.0.0.1", int(target.url.rsplit(":", 1)[1])), 5).close()
        with netpolicy.guarded(), pytest.raises(netpolicy.SourceAddressDenied):
            socket.create_connection(("127.0.0.1", int(target.url.rsplit(":", 1)[1])), 5)
    finally:
        target.close()


def test_upstream_probe_redirected_to_a_denied_address_is_refused(denied):
    """The manager's probe of a Hugging Face model whose hub redirects to 127.0.0.2."""
    from controller.models import publishjob as jobs
    from controller.models import upstream

    netpolicy.install(netpolicy.Policy([f"{DENIED}/32"]), whole_process=False)
    hub = Redirector(denied.url)
    try:
        settings = jobs.Settings(namespace="x", registry="127.0.0.1:1", hf_endpoint=hub.url)
        obj = {"kind": "Model", "metadata": {"name": "m", "namespace": "ns"},
               "spec": {"source": {"huggingFace": {"repo": "acme/m"}}}}
        with pytest.raises(base.SourceError) as e:
            upstream.probe(obj, settings, {})
        assert e.value.reason == "SourceAddressDenied" and not e.value.retryable
        assert hub.requests >= 1 and denied.requests == 0
    finally:
        netpolicy.install(None)
        hub.close()


def test_catalog_listing_of_a_denied_address_is_refused(manager_policy):
    """A ModelCatalogSource whose URL is on loopback: the manager's listing sends nothing."""
    from ingest.sources import catalog

    target = Server()
    try:
        with netpolicy.guarded(), pytest.raises(base.SourceError) as e:
            catalog.CatalogClient(target.url, "t", retries=0).models()
        assert e.value.reason == "SourceAddressDenied"
        assert target.requests == 0
    finally:
        target.close()


def test_the_publish_job_still_reaches_its_registry_on_a_denied_address(registry, small_model,
                                                                         tmp_path):
    """The guard covers the whole Job; the DMCR (here on loopback, denied) is exempt."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODELCACHE_")}
    p = subprocess.run([sys.executable, "-m", "controller.main", "publish", "--source",
                        small_model, "--to", f"{registry.host}/models/guarded:v1",
                        "--insecure-registry", "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=60, env=clean)
    assert p.returncode == 0, p.stdout + p.stderr[-2000:]
    assert json.loads(p.stdout)["digest"].startswith("sha256:")
