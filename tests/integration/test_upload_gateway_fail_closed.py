"""The upload gateway fails closed when what it decides with cannot be read.

The gateway makes no API call to decide: the admin token is a file read at
start, a session's token hash and expiry are its state file on the staging
volume. The attacks: no admin token configured and a caller sending an
empty or guessed one; a session whose state file is garbled or unreadable
after a restart (token hash gone, expiry not a number); a staging volume
that cannot take the bytes. Each is refused (401, 404, or 503 with
``Retry-After`` before the body is read), and no byte lands on the volume.
The server is the real one, in-process, on loopback.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from controller.upload.gateway import Gateway, create_server

ADMIN = "admin-fail-closed-token"


def serve(gw: Gateway) -> Any:
    server = create_server(("127.0.0.1", 0), gw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "staging")


@pytest.fixture
def gateway(root: str) -> Iterator[Gateway]:
    gw = Gateway(root, admin_token=ADMIN)
    server = serve(gw)
    yield gw
    server.shutdown()
    server.server_close()


def new_session(gw: Gateway) -> dict[str, Any]:
    r = requests.post(f"{gw.public_url}/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": "team-a/m", "reference": "127.0.0.1:1/models/team-a/m:v1"},
                      timeout=10)
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


def put(s: dict[str, Any], body: bytes = b"x" * 1000) -> requests.Response:
    return requests.put(f"{s['url']}/files/model.safetensors", data=body, timeout=10,
                        headers={"Authorization": f"Bearer {s['token']}"})


def staged_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs
               if not f.startswith("session.json"))


@pytest.mark.parametrize("admin", [None, ""])
def test_no_admin_token_configured_lets_nobody_create(root: str, admin: str | None) -> None:
    gw = Gateway(root, admin_token=admin)
    server = serve(gw)
    try:
        for auth in ("Bearer ", "Bearer None", "Bearer null", None):
            r = requests.post(f"{gw.public_url}/v1/sessions", timeout=10,
                              headers={"Authorization": auth} if auth else {},
                              json={"model": "team-a/m",
                                    "reference": "127.0.0.1:1/models/team-a/m:v1"})
            assert r.status_code == 401, (auth, r.text)
        assert not os.listdir(root)  # no session was made
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("garble", ["not json", "no token hash", "token hash not a string",
                                    "expiry not a number"])
def test_garbled_session_state_is_refused_after_restart(root: str, gateway: Gateway,
                                                        garble: str) -> None:
    s = new_session(gateway)
    path = os.path.join(root, s["id"], "session.json")
    with open(path) as f:
        state = json.load(f)
    if garble == "no token hash":
        state["token_sha256"] = ""
    elif garble == "token hash not a string":
        state["token_sha256"] = None
    elif garble == "expiry not a number":
        state["expires_at"] = "never"
    with open(path, "w") as f:
        f.write("{" if garble == "not json" else json.dumps(state))
    restarted = Gateway(root, admin_token=ADMIN)  # reads the state files again
    server = serve(restarted)
    try:
        s["url"] = f"{restarted.public_url}/v1/uploads/{s['id']}"
        r = put(s)
        assert r.status_code in (401, 404), r.text
        assert staged_bytes(root) == 0
    finally:
        server.shutdown()
        server.server_close()


def test_staging_volume_unavailable_is_503_and_takes_nothing(root: str,
                                                            gateway: Gateway) -> None:
    s = new_session(gateway)
    store = os.path.join(root, s["id"], "store")
    os.makedirs(store, exist_ok=True)
    ingest = os.path.join(store, "ingest")
    if os.path.isdir(ingest):
        os.rmdir(ingest)
    with open(ingest, "w"):  # a file where the staging directory should be
        pass
    r = put(s)
    assert r.status_code == 503, r.text
    assert r.headers["X-Error-Reason"] == "StagingUnavailable" and r.headers["Retry-After"]
    assert staged_bytes(root) == 0
    os.unlink(ingest)  # the volume is back: the same upload goes through
    os.makedirs(ingest)
    assert put(s).status_code == 201
