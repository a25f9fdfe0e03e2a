"""The upload gateway as a Deployment runs it: probes, and a staging volume it must not outgrow.

In a cluster the gateway stages uploads on an emptyDir with a sizeLimit; a pod
past it is evicted with every session on it. ``max_staging_bytes`` (the
``--max-staging-bytes`` flag, set to the same size) makes the gateway refuse
what would not fit, with 507 before the body is read, counting an archive
twice (it is expanded beside itself). The server is the real one, in-process,
on loopback.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.upload.gateway import Gateway, create_server
from kube.flags import size_arg

ADMIN = "admin-staging-token"
LIMIT = 1000


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(str(tmp_path / "staging"), admin_token=ADMIN, max_staging_bytes=LIMIT)
    server = create_server(("127.0.0.1", 0), gw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield gw
    server.shutdown()
    server.server_close()


def session(gw: Gateway, name: str) -> dict[str, Any]:
    r = requests.post(f"{gw.public_url}/v1/sessions",
                      headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": f"team-a/{name}",
                            "reference": f"127.0.0.1:1/models/team-a/{name}:v1"}, timeout=10)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def put(s: dict[str, Any], what: str, body: bytes) -> requests.Response:
    return requests.put(f"{s['url']}/{what}", data=body, timeout=10,
                        headers={"Authorization": f"Bearer {s['token']}"})


def test_uploads_past_the_staging_limit_are_refused(gateway: Gateway) -> None:
    a, b = session(gateway, "a"), session(gateway, "b")
    assert put(a, "files/model.safetensors", b"x" * 600).status_code == 201
    # 600 staged: another 600 would pass the volume, whichever session sends it
    r = put(b, "files/model.safetensors", b"y" * 600)
    assert r.status_code == 507 and r.headers["X-Error-Reason"] == "StagingFull"
    assert "no room for 600 more bytes" in r.json()["message"]
    assert put(b, "files/config.json", b"{}" * 150).status_code == 201  # 300 fits
    # an archive counts twice: 60 bytes need 120 of the 100 left
    r = put(b, "archive", b"z" * 60)
    assert r.status_code == 507
    # replacing a file does not count the old copy: 600 → 650 fits where 650 more would not
    assert put(a, "files/model.safetensors", b"x" * 650).status_code == 201
    assert gateway.staged_bytes() == 650 + 300


def test_readyz_follows_the_staging_root(gateway: Gateway) -> None:
    r = requests.get(f"{gateway.public_url}/readyz", timeout=5)
    assert r.status_code == 200 and r.json()["freeBytes"] > 0
    assert requests.get(f"{gateway.public_url}/healthz", timeout=5).status_code == 200
    # the volume gone (unmounted, deleted): out of the Service until it is back
    shutil.rmtree(gateway.sessions.root)
    r = requests.get(f"{gateway.public_url}/readyz", timeout=5)
    assert r.status_code == 503 and r.json()["reason"] == "StagingUnavailable"
    os.makedirs(gateway.sessions.root)
    assert requests.get(f"{gateway.public_url}/readyz", timeout=5).status_code == 200


def test_sizes_are_read_as_kubernetes_quantities() -> None:
    assert size_arg("100Gi") == 100 << 30
    assert size_arg("500G") == 500 * 10**9
    assert size_arg("1048576") == 1 << 20
    assert size_arg("0") == 0
    for bad in ("", "1.5Gi", "-1", "10 GB", "lots"):
        with pytest.raises(ValueError, match="not a size"):
            size_arg(bad)
