"""Upload gateway + upload client → verified ModelPack in a real registry."""

from __future__ import annotations

import os
import tarfile
import threading
import time

import pytest
import requests

from controller.upload.gateway import Gateway, create_server
from ingest.publish import Options
from jobs import upload_client
from modelpack.oci.registry import RegistryClient
from tests import modelgen
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]

ADMIN = "admin-test-token"


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(str(tmp_path / "gw"), admin_token=ADMIN,
                 client_factory=lambda host: RegistryClient(host, insecure=True),
                 options=Options(backoff=0.01))
    server = create_server(("127.0.0.1", 0), gw)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield gw
    server.shutdown()
    server.server_close()


def _session(gw: Gateway, registry, name: str, **kw) -> dict:
    resp = requests.post(f"{gw.public_url}/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"model": f"team-a/{name}",
                               "reference": f"{registry.host}/models/team-a/{name}:v1", **kw},
                         timeout=10)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_upload_directory_in_pieces_publishes(gateway, registry, client, minilm_dir, tmp_path):
    s = _session(gateway, registry, "minilm")
    seen: list[tuple[int, int]] = []
    status = upload_client.upload(s["url"], s["token"], minilm_dir, piece_size=16 << 20,
                                  progress=lambda d, t: seen.append((d, t)))
    assert status["phase"] == "Ready"
    result = status["result"]
    assert result["resolved"]["family"] == "bert" and result["resolved"]["files"] == 13
    assert seen[-1][0] == seen[-1][1] == result["sizeBytes"]
    dest = str(tmp_path / "out")
    pull_back(client, result["reference"], dest)
    same_tree(minilm_dir, dest)
    session_dir = os.path.join(gateway.sessions.root, s["id"])
    assert os.listdir(session_dir) == ["session.json"]  # uploaded bytes freed once published


def test_upload_tar_publishes(gateway, registry, client, small_model, tmp_path):
    tar = str(tmp_path / "m.tar.gz")
    with tarfile.open(tar, "w:gz") as tf:
        for n in sorted(os.listdir(small_model)):
            tf.add(os.path.join(small_model, n), arcname=n)
    s = _session(gateway, registry, "tarred")
    status = upload_client.upload(s["url"], s["token"], tar)
    dest = str(tmp_path / "out")
    pull_back(client, status["result"]["reference"], dest)
    same_tree(small_model, dest)


def test_interrupted_upload_resumes_after_gateway_restart(gateway, registry, client, tmp_path):
    model = str(tmp_path / "m")
    modelgen.make_big_model(model, 1, 3 << 20)
    s = _session(gateway, registry, "resumed")
    name = sorted(os.listdir(model))[-1]  # the shard
    full = os.path.join(model, name)
    size = os.path.getsize(full)
    half = size // 2
    with open(full, "rb") as f:
        first = f.read(half)
    r = requests.put(f"{s['url']}/files/{name}", data=first, timeout=10, headers={
        "Authorization": f"Bearer {s['token']}", "Content-Range": f"bytes 0-{half - 1}/{size}"})
    assert r.status_code == 202 and r.json()["offset"] == half
    # a piece that does not start at the offset is refused with the offset to resume from
    r = requests.put(f"{s['url']}/files/{name}", data=b"xx", timeout=10, headers={
        "Authorization": f"Bearer {s['token']}", "Content-Range": f"bytes 5-6/{size}"})
    assert r.status_code == 416 and r.headers["Upload-Offset"] == str(half)
    # a new gateway over the same root keeps the session and the received half; the old
    # one's open .part goes as its process would go (its lock with it: one writer per file)
    for part in gateway.sessions.get(s["id"]).parts.values():
        part.close()
    gw2 = Gateway(gateway.sessions.root, admin_token=ADMIN,
                  client_factory=lambda host: RegistryClient(host, insecure=True))
    server = create_server(("127.0.0.1", 0), gw2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"{gw2.public_url}/v1/uploads/{s['id']}"
        head = requests.head(f"{url}/files/{name}", headers={"Authorization": f"Bearer {s['token']}"},
                             timeout=10)
        assert head.headers["Upload-Offset"] == str(half)
        sent: list[int] = []
        status = upload_client.upload(url, s["token"], model, progress=lambda d, t: sent.append(d))
        assert status["phase"] == "Ready"
        dest = str(tmp_path / "out")
        pull_back(client, status["result"]["reference"], dest)
        same_tree(model, dest)
    finally:
        server.shutdown()
        server.server_close()


def test_expired_and_wrong_tokens_are_refused(gateway, registry, small_model):
    s = _session(gateway, registry, "expiring", ttlSeconds=0.2)
    with pytest.raises(upload_client.UploadError) as e:
        upload_client.upload(s["url"], "not-the-token", small_model)
    assert e.value.status == 401 and e.value.reason == "InvalidToken"
    time.sleep(0.3)
    with pytest.raises(upload_client.UploadError) as e:
        upload_client.upload(s["url"], s["token"], small_model)
    assert e.value.status == 401 and e.value.reason == "TokenExpired"
    r = requests.post(f"{gateway.public_url}/v1/sessions", json={}, timeout=10,
                      headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_upload_over_the_limit_is_refused(gateway, registry, client, small_model):
    s = _session(gateway, registry, "limited", maxBytes=50_000)
    with pytest.raises(upload_client.UploadError) as e:
        upload_client.upload(s["url"], s["token"], small_model)
    assert e.value.status == 413 and e.value.reason == "TooLarge"
    assert client.list_tags("models/team-a/limited") == []


def test_hostile_paths_and_invalid_models_are_refused(gateway, registry, client, tmp_path):
    s = _session(gateway, registry, "hostile")
    auth = {"Authorization": f"Bearer {s['token']}"}
    r = requests.put(f"{s['url']}/files/..%2F..%2Fetc%2Fpasswd", data=b"x", headers=auth,
                     timeout=10)
    assert r.status_code == 400 and r.json()["reason"] == "UnsafePath"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors file
    with pytest.raises(upload_client.UploadError) as e:
        upload_client.upload(s["url"], s["token"], str(bad))
    assert e.value.reason == "InvalidSafetensors" or "safetensors" in str(e.value).lower()
    assert client.list_tags("models/team-a/hostile") == []


def test_gateway_process_serves_sessions(registry, client, small_model, tmp_path):
    """``modelcache-controller upload-gateway`` as a process, end to end."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token_file = tmp_path / "admin"
    token_file.write_text(ADMIN + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "controller.main", "upload-gateway",
                             "--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "gw"),
                             "--admin-token-file", str(token_file), "--insecure-registry"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        r = requests.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"model": "team-b/proc",
                                "reference": f"{registry.host}/models/team-b/proc:v1"},
                          timeout=10)
        s = r.json()
        status = upload_client.upload(s["url"], s["token"], small_model)
        dest = str(tmp_path / "out")
        pull_back(client, status["result"]["reference"], dest)
        same_tree(small_model, dest)
    finally:
        proc.terminate()
        proc.wait(10)


def test_expired_sessions_are_reaped(tmp_path):
    gw = Gateway(str(tmp_path / "gw"))
    s = gw.create_session("ns/m", "127.0.0.1:1/models/m:v1", ttl_seconds=1)
    assert gw.sessions.reap(grace_seconds=10) == []
    assert gw.sessions.reap(grace_seconds=10, now=time.time() + 60) == [s["id"]]
    assert not os.path.exists(os.path.join(str(tmp_path / "gw"), s["id"]))


def test_cli_upload_with_progress(gateway, registry, client, small_model, tmp_path):
    import subprocess

    s = _session(gateway, registry, "cli-upload")
    token_file = tmp_path / "token"
    token_file.write_text(s["token"] + "\n")
    p = subprocess.run(["modelcache", "upload", "cli-upload", small_model, "--url", s["url"],
                        "--token-file", str(token_file), "--progress"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Ready" in p.stdout and "digest: sha256:" in p.stdout
    assert "upload cli-upload" in p.stderr and "100%" in p.stderr  # the progress bar
    assert s["token"] not in p.stdout + p.stderr
    bad = subprocess.run(["modelcache", "upload", "cli-upload", small_model, "--url", s["url"]],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MODELCACHE_UPLOAD_TOKEN": "wrong"})
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
