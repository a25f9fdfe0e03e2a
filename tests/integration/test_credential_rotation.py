"""A new DMCR password, taken without restarts, with a real docker-registry.

In a cluster the password lives in Secrets that kubelet mounts as files and
replaces in place (a new ``..data`` directory, swapped in by one rename).
This checks the three readers of those files:

* distribution re-reads its htpasswd file when the file changes (the chart
  restarts the DMCR on a new ``dmcr.password`` anyway, to take it at once);
* the upload gateway (``modelcache-controller upload-gateway
  --registry-username-file/--registry-password-file``, as a process) reads
  the files for every publish;
* the node plugin's ``csi.main.Clients`` re-reads its credential directory
  and makes new registry clients when the pair changed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import requests

from cli.local import registry as localregistry
from jobs import upload_client
from modelpack.errors import ModelPackError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests.integration.test_controller import wait_for
from tests.servers.helpers import pull_back, same_tree

USER = "modelcache"
FIRST, SECOND = "pw-first-4b1c", "pw-second-9e2d"  # distinct: searched for in logs
ADMIN = "gateway-admin-token"


def set_htpasswd(reg: localregistry.LocalRegistry, password: str) -> None:
    """Replace the registry's htpasswd file, as a changed mounted Secret does."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    path = os.path.join(reg.root, "htpasswd")
    with open(path + ".new", "w") as f:
        f.write(f"{reg.username}:{hashed}\n")
    os.replace(path + ".new", path)


def mount_secret(directory: Path, data: dict[str, str], generation: int) -> None:
    """Write ``data`` the way kubelet updates a mounted Secret: a new timestamped
    directory, ``..data`` switched to it with one rename, the keys symlinks through it."""
    directory.mkdir(exist_ok=True)
    version = directory / f"..{generation}"
    version.mkdir()
    for key, value in data.items():
        (version / key).write_text(value)
    tmp = directory / "..data_tmp"
    tmp.symlink_to(version.name)
    os.replace(tmp, directory / "..data")
    for key in data:
        link = directory / key
        if not link.is_symlink():
            link.symlink_to(f"..data/{key}")


def registry_accepts(reg: localregistry.LocalRegistry, password: str) -> bool:
    r = requests.get(f"http://{reg.host}/v2/", auth=(USER, password), timeout=5)
    return r.status_code == 200


@pytest.fixture
def dmcr(tmp_path: Path) -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running(root=str(tmp_path / "reg"), username=USER,
                               password=FIRST) as reg:
        yield reg


def test_distribution_rereads_a_changed_htpasswd(dmcr: localregistry.LocalRegistry) -> None:
    assert registry_accepts(dmcr, FIRST)
    time.sleep(1.1)  # distribution compares the file's modification time
    set_htpasswd(dmcr, SECOND)
    assert registry_accepts(dmcr, SECOND) and not registry_accepts(dmcr, FIRST)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_gateway_pushes_with_the_credential_files_of_the_moment(
        dmcr: localregistry.LocalRegistry, small_model: str, tmp_path: Path) -> None:
    creds = tmp_path / "registry"
    mount_secret(creds, {"username": USER, "password": FIRST}, 1)
    token = tmp_path / "admin"
    token.write_text(ADMIN + "\n")
    port = _free_port()
    log = open(tmp_path / "gateway.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller.main", "upload-gateway",
         "--listen", f"127.0.0.1:{port}", "--root", str(tmp_path / "staging"),
         "--admin-token-file", str(token), "--insecure-registry",
         "--registry-username-file", str(creds / "username"),
         "--registry-password-file", str(creds / "password"), "--max-staging-bytes", "1Gi"],
        stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "gateway.log").read_text()
        try:
            return requests.get(f"{url}/readyz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def publish(name: str) -> dict[str, Any]:
        r = requests.post(f"{url}/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"model": f"team-a/{name}",
                                "reference": f"{dmcr.host}/models/team-a/{name}:v1"},
                          timeout=10)
        assert r.status_code == 201, r.text
        s = r.json()
        return upload_client.upload(s["url"], s["token"], small_model)

    try:
        wait_for(up, 30, what="the gateway's /readyz")
        ready = requests.get(f"{url}/readyz", timeout=5).json()
        assert ready["ok"] is True and ready["freeBytes"] > 0
        assert publish("before")["phase"] == "Ready"
        # the password changes: registry first, then the mounted Secret; no restart
        time.sleep(1.1)
        set_htpasswd(dmcr, SECOND)
        mount_secret(creds, {"username": USER, "password": SECOND}, 2)
        status = publish("after")
        assert status["phase"] == "Ready", status
        reader = RegistryClient(dmcr.host, insecure=True, username=USER, password=SECOND)
        dest = str(tmp_path / "out")
        pull_back(reader, status["result"]["reference"], dest)
        same_tree(small_model, dest)
        assert proc.poll() is None  # the same process throughout
        log.seek(0)
        text = log.read()
        assert "upload gateway listening" in text
        assert SECOND not in text and FIRST not in text  # never logged
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_gateway_refuses_half_a_credential(tmp_path: Path) -> None:
    (tmp_path / "user").write_text(USER)
    done = subprocess.run(
        [sys.executable, "-m", "controller.main", "upload-gateway", "--root",
         str(tmp_path / "staging"), "--registry-username-file", str(tmp_path / "user")],
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "--registry-password-file go together" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "controller.main", "upload-gateway", "--root",
         str(tmp_path / "staging"), "--max-staging-bytes", "lots"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "not a size: 'lots'" in done.stderr


def test_node_plugin_rereads_its_credentials(dmcr: localregistry.LocalRegistry,
                                             small_model: str, tmp_path: Path) -> None:
    from csi.main import Clients

    pusher = RegistryClient(dmcr.host, insecure=True, username=USER, password=FIRST)
    digest = pack_to_registry(small_model, pusher,
                              parse(f"{dmcr.host}/models/team-a/n:v1")).pack.digest
    ref = parse(f"{dmcr.host}/models/team-a/n@{digest}")
    creds = tmp_path / "pull"
    mount_secret(creds, {"username": USER, "password": FIRST}, 1)
    clients = Clients([dmcr.host], None, credentials_dir=str(creds), reread=0.0)
    first = clients(dmcr.host)
    assert clients(dmcr.host) is first  # unchanged files: the same client
    pull_to_dir(first, ref, str(tmp_path / "a"))

    time.sleep(1.1)
    set_htpasswd(dmcr, SECOND)
    stale = RegistryClient(dmcr.host, insecure=True, username=USER, password=FIRST)
    with pytest.raises(ModelPackError):  # the old password is refused from now on
        stale.get_manifest(ref)
    mount_secret(creds, {"username": USER, "password": SECOND}, 2)
    fresh = clients(dmcr.host)
    assert fresh is not first
    pull_to_dir(fresh, ref, str(tmp_path / "b"))
    same_tree(small_model, str(tmp_path / "b"))

    # a half-written update (a key missing for a moment) keeps the pair that worked
    (creds / "..data").unlink()
    assert clients(dmcr.host) is fresh
