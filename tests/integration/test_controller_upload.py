"""``source.upload`` end to end: a real API server, the upload gateway in-process, a real registry.

The manager (a subprocess, as in a pod) asks the gateway for a session, puts
its token in a Secret owned by the Model and shows the URL in
``status.upload``; the test uploads with ``jobs.upload_client`` as a
user would; the gateway publishes, the manager reads the result and writes
Ready exactly as for a Job. Also: a restarted manager keeps the session, an
expired session is replaced, a failed publish is Failed with its reason.
No Job is involved, so no kubelet either.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from controller.upload.gateway import Gateway, create_server
from ingest.publish import Options
from jobs import upload_client
from kube import client as k
from modelpack.oci.registry import RegistryClient
from tests import kubeenv
from tests.integration.test_controller import (
    ManagerProcess,
    cond,
    events_of,
    get_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import namespace as namespace
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
ADMIN = "upload-admin-test-token"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(str(tmp_path_factory.mktemp("gateway")), admin_token=ADMIN,
                 client_factory=lambda host: RegistryClient(host, insecure=True),
                 options=Options(backoff=0.01))
    server = create_server(("127.0.0.1", 0), gw)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield gw
    server.shutdown()
    server.server_close()


@pytest.fixture
def start_manager(kube: kubeenv.KubeEnv, cluster: k.Kube, gateway: Gateway, registry: Any,
                  tmp_path: Any) -> Iterator[Callable[..., ManagerProcess]]:
    started: list[ManagerProcess] = []

    def start(ttl: float = 3600.0) -> ManagerProcess:
        m = ManagerProcess(kube, registry.host, "http://127.0.0.1:9",
                           str(tmp_path / f"manager-{len(started)}.log"), extra=[
                               "--upload-gateway-url", gateway.public_url,
                               "--upload-session-ttl", str(ttl),
                               "--upload-poll-interval", "0.3"])
        started.append(m)
        os.environ["MODELCACHE_UPLOAD_ADMIN_TOKEN"] = ADMIN  # the subprocess inherits it
        try:
            return m.start()
        finally:
            del os.environ["MODELCACHE_UPLOAD_ADMIN_TOKEN"]

    yield start
    for m in started:
        m.stop()


def upload_model(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"upload": {}}}}


def token_of(client: k.Kube, ns: str, m: dict[str, Any]) -> str:
    ref = m["status"]["upload"]["tokenSecretRef"]["name"]
    secret = client.get(k.SECRETS, ref, ns)
    return base64.b64decode(secret["data"]["token"]).decode()


def waiting(client: k.Kube, ns: str, name: str) -> dict[str, Any]:
    m = wait_for(phase_is(client, ns, name, "WaitForUpload", "Failed", "Pending"), 30,
                 what="WaitForUpload")
    assert m["status"]["phase"] == "WaitForUpload", m["status"]
    return m


def test_upload_reaches_ready_and_pulls_back_identical(cluster, namespace, start_manager,
                                                       gateway, registry, client, small_model,
                                                       tmp_path):
    manager = start_manager()
    cluster.create(k.MODELS, upload_model("up", namespace), namespace)
    m = waiting(cluster, namespace, "up")
    up = m["status"]["upload"]
    assert up["url"].startswith(gateway.public_url + "/v1/uploads/")
    assert up["expiresAt"].endswith("Z")
    assert cond(m, "Published")["reason"] == "WaitForUpload"
    secret = cluster.get(k.SECRETS, up["tokenSecretRef"]["name"], namespace)
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("Model", m["metadata"]["uid"])
    wait_for(lambda: any(e["reason"] == "UploadSessionCreated"
                         for e in events_of(cluster, namespace, m["metadata"]["uid"])), 10,
             what="UploadSessionCreated event")

    status = upload_client.upload(up["url"], token_of(cluster, namespace, m), small_model)
    m = wait_for(phase_is(cluster, namespace, "up", "Ready", "Failed"), 30, what="Ready")
    st = m["status"]
    assert st["phase"] == "Ready", (st, manager.logs())
    assert st["artifact"]["digest"] == status["result"]["digest"]
    assert st["artifact"]["reference"].startswith(f"{registry.host}/models/{namespace}/up:gen-1")
    assert st["progress"]["percent"] == 100
    assert st["resolved"]["format"] == "Safetensors"
    assert "upload" not in st  # a published session's URL is of no more use
    for t in ("SourceResolved", "Published", "Ready"):
        assert cond(m, t)["status"] == "True", cond(m, t)
    assert jobs_of(cluster, m["metadata"]["uid"]) == []
    wait_for(lambda: get_secret(cluster, namespace, up["tokenSecretRef"]["name"]) is None, 10,
             what="token Secret deleted")
    dest = str(tmp_path / "pulled")
    pull_back(client, f"{registry.host}/models/{namespace}/up@{st['artifact']['digest']}", dest)
    same_tree(small_model, dest)

    cluster.delete(k.MODELS, "up", namespace)
    wait_for(lambda: get_model(cluster, namespace, "up") is None, 30, what="finalizer released")
    assert client.list_tags(f"models/{namespace}/up") == []


def get_secret(client: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return client.get(k.SECRETS, name, ns)
    except k.NotFound:
        return None


def test_restarted_manager_keeps_the_session(cluster, namespace, start_manager, gateway,
                                             small_model):
    first = start_manager()
    cluster.create(k.MODELS, upload_model("kept", namespace), namespace)
    m = waiting(cluster, namespace, "kept")
    url = m["status"]["upload"]["url"]
    sessions = len(gateway.sessions.sessions)
    first.kill()
    start_manager()
    time.sleep(1.5)  # several polls of the new manager
    m = get_model(cluster, namespace, "kept")
    assert m["status"]["upload"]["url"] == url
    assert len(gateway.sessions.sessions) == sessions
    upload_client.upload(url, token_of(cluster, namespace, m), small_model)
    m = wait_for(phase_is(cluster, namespace, "kept", "Ready", "Failed"), 30, what="Ready")
    assert m["status"]["phase"] == "Ready", m["status"]


def test_expired_session_is_replaced(cluster, namespace, start_manager, gateway, small_model):
    start_manager(ttl=1.0)
    cluster.create(k.MODELS, upload_model("renewed", namespace), namespace)
    m = waiting(cluster, namespace, "renewed")
    url = m["status"]["upload"]["url"]

    def renewed() -> Any:
        cur = get_model(cluster, namespace, "renewed")
        return cur if ((cur.get("status") or {}).get("upload") or {}).get("url") not in (
            None, url) else None
    m = wait_for(renewed, 15, what="a new session")
    assert m["status"]["phase"] == "WaitForUpload"
    wait_for(lambda: any(e["reason"] == "UploadSessionRenewed"
                         for e in events_of(cluster, namespace, m["metadata"]["uid"])), 10,
             what="UploadSessionRenewed event")
    with pytest.raises(upload_client.UploadError) as e:
        upload_client.upload(url, token_of(cluster, namespace, m), small_model)
    assert e.value.status == 401  # the old URL with the new token: another session


def test_failed_publish_is_failed_with_reason(cluster, namespace, start_manager, gateway,
                                              tmp_path):
    start_manager()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)  # not a safetensors header
    cluster.create(k.MODELS, upload_model("bad", namespace), namespace)
    m = waiting(cluster, namespace, "bad")
    with pytest.raises(upload_client.UploadError):
        upload_client.upload(m["status"]["upload"]["url"], token_of(cluster, namespace, m),
                             str(bad))
    m = wait_for(phase_is(cluster, namespace, "bad", "Failed", "Ready"), 30, what="Failed")
    assert m["status"]["phase"] == "Failed", m["status"]
    reason = cond(m, "Ready")["reason"]
    assert reason not in ("", "UploadPublishFailed", "WaitForUpload"), cond(m, "Ready")
    assert cond(m, "Published")["reason"] == reason
    wait_for(lambda: any(e["reason"] == reason and e["type"] == "Warning"
                         for e in events_of(cluster, namespace, m["metadata"]["uid"])), 10,
             what="the Warning event")
