"""The CLI's cluster side, as a user runs it: upload finds its session, import its registry.

A real API server of this module's own (etcd + kube-apiserver: its
ClusterModels are this module's alone, so "no registry anywhere" is a state
it can be in), the upload gateway as a process (``modelcache-controller
upload-gateway``), a real registry, and ``modelcache`` as a subprocess. No
manager runs: the test writes the Model's ``status.upload`` and token
Secret exactly as controller/upload/reconcile.py does, from a session the
gateway opened. A loopback TCP proxy in front of the gateway cuts the first
upload connection partway, so the resume is the client's, over a real cut.
"""

from __future__ import annotations

import base64
import datetime
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from cli import bundle
from kube import client as k
from modelpack.oci import bundle_export
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import kubeenv, modelgen
from tests.integration.test_controller import REPO_ROOT, ensure_namespace, install_crds
from tests.servers.helpers import pull_back, same_tree

ADMIN = "cli-cluster-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CutProxy:
    """Forwards TCP to ``upstream``; cuts the next ``cuts`` connections after ``cut_after``
    bytes from the client (both sides closed, as a dropped network would)."""

    def __init__(self, upstream: tuple[str, int], cut_after: int, cuts: int = 1) -> None:
        self.upstream, self.cut_after, self.cuts_left = upstream, cut_after, cuts
        self.cuts = 0
        self.sent = 0  # bytes forwarded client -> upstream, all connections
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            threading.Thread(target=self._up, args=(conn, up), daemon=True).start()
            threading.Thread(target=self._down, args=(up, conn), daemon=True).start()

    def _up(self, conn: socket.socket, up: socket.socket) -> None:
        seen = 0
        with self.lock:
            cut = self.cut_after if self.cuts_left > 0 else None
        try:
            while data := conn.recv(1 << 16):
                if cut is not None and seen + len(data) > cut:
                    with self.lock:
                        if self.cuts_left > 0:
                            self.cuts_left -= 1
                            self.cuts += 1
                            data = data[:cut - seen]
                            up.sendall(data)
                            self.sent += len(data)
                            raise ConnectionAbortedError("cut")
                        cut = None
                up.sendall(data)
                seen += len(data)
                with self.lock:
                    self.sent += len(data)
        except OSError:
            pass
        for s in (conn, up):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _down(self, up: socket.socket, conn: socket.socket) -> None:
        try:
            while data := up.recv(1 << 16):
                conn.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[kubeenv.KubeEnv, k.Kube]]:
    with kubeenv.running() as cluster:
        install_crds(cluster)
        client = k.Kube.from_config(cluster.kubeconfig)
        yield cluster, client
        client.close()


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("gateway")
    (root / "admin").write_text(ADMIN + "\n")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "controller.main", "upload-gateway",
                             "--listen", f"127.0.0.1:{port}", "--root", str(root / "gw"),
                             "--admin-token-file", str(root / "admin"), "--insecure-registry"],
                            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # the module from this tree (the console script may be another checkout's install)
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})


def one_line(p: subprocess.CompletedProcess[str], code: int, reason: str) -> str:
    assert p.returncode == code, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"modelcache: {reason}: "), p.stderr
    return p.stderr


def model(name: str, ns: str, source: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns}, "spec": {"source": source}}


def rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(reason: str, message: str) -> dict[str, Any]:
    return {"type": "Ready", "status": "False", "reason": reason, "message": message,
            "lastTransitionTime": rfc3339(time.time())}


def open_session(client: k.Kube, gateway_url: str, registry: Any, ns: str, name: str,
                 url_base: str, expires: float | None = None) -> str:
    """What the manager does for ``source.upload``: a session, its Secret, status.upload."""
    r = requests.post(f"{gateway_url}/v1/sessions", headers={"Authorization": f"Bearer {ADMIN}"},
                      json={"model": f"{ns}/{name}",
                            "reference": f"{registry.host}/models/{ns}/{name}:upload"},
                      timeout=10)
    assert r.status_code == 201, r.text
    s = r.json()
    secret = f"{name}-upload-token"
    client.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                              "metadata": {"name": secret, "namespace": ns},
                              "data": {"token": base64.b64encode(s["token"].encode()).decode()}},
                  ns)
    url = s["url"].replace(gateway_url, url_base)
    client.patch(k.MODELS, name, {"status": {"phase": "WaitForUpload", "upload": {
        "url": url, "tokenSecretRef": {"name": secret},
        "expiresAt": rfc3339(expires or float(s["expiresAt"]))}}}, ns, sub="status")
    return str(s["token"])


@pytest.fixture(scope="module")
def namespace(env: tuple[kubeenv.KubeEnv, k.Kube]) -> str:
    ns = f"cli-{uuid.uuid4().hex[:6]}"
    ensure_namespace(env[1], ns)
    return ns


# --- upload ------------------------------------------------------------------------------


def test_upload_finds_its_session_and_resumes_after_a_cut(env, namespace, gateway_url,
                                                           registry, client, tmp_path):
    cluster, kc = env
    src = str(tmp_path / "model")
    modelgen.make_big_model(src, 1, 8 << 20)
    size = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src))
    kc.create(k.MODELS, model("finetune", namespace, {"upload": {}}), namespace)
    host, port = gateway_url.removeprefix("http://").split(":")
    proxy = CutProxy((host, int(port)), cut_after=3 << 20)
    try:
        token = open_session(kc, gateway_url, registry, namespace, "finetune", proxy.url)
        # the standard resolution: $KUBECONFIG, whose context names the namespace (no -n)
        with open(cluster.kubeconfig) as f:
            cfg = yaml.safe_load(f)
        for ctx in cfg["contexts"]:
            ctx["context"]["namespace"] = namespace
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(cfg))
        p = cli("upload", "finetune", src, "--progress", env={"KUBECONFIG": str(kubeconfig)})
    finally:
        proxy.close()
    assert p.returncode == 0, p.stderr
    assert "Ready" in p.stdout and "digest: sha256:" in p.stdout
    assert "upload finetune" in p.stderr and "100%" in p.stderr  # the progress bar
    assert token not in p.stdout + p.stderr
    # cut once, then resumed from the gateway's offset: not sent again from byte 0
    assert proxy.cuts == 1
    assert size < proxy.sent < size + (1 << 20), (size, proxy.sent)
    digest = p.stdout.split("digest: ")[1].split()[0]
    dest = str(tmp_path / "back")
    pull_back(client, f"{registry.host}/models/{namespace}/finetune@{digest}", dest)
    same_tree(src, dest)


def test_upload_says_why_a_model_takes_no_upload(env, namespace, gateway_url, registry,
                                                  small_model, tmp_path):
    cluster, kc = env
    kcfg = ("-n", namespace, "--kubeconfig", cluster.kubeconfig)
    kc.create(k.MODELS, model("from-hf", namespace, {"huggingFace": {"repo": "a/b"}}), namespace)
    err = one_line(cli("upload", "from-hf", small_model, *kcfg), 1, "NotAnUploadSource")
    assert f"Model {namespace}/from-hf has no upload source (spec.source: huggingFace)" in err

    kc.create(k.MODELS, model("no-gateway", namespace, {"upload": {}}), namespace)
    err = one_line(cli("upload", "no-gateway", small_model, *kcfg), 1, "NotAcceptingUploads")
    assert "the controller has not written a status yet" in err
    kc.patch(k.MODELS, "no-gateway", {"status": {"phase": "Pending", "conditions": [condition(
        "UploadGatewayNotConfigured", "the manager has no upload gateway")]}}, namespace,
        sub="status")
    err = one_line(cli("upload", "no-gateway", small_model, *kcfg), 1, "NotAcceptingUploads")
    assert "phase Pending; UploadGatewayNotConfigured: the manager has no upload gateway" in err

    kc.create(k.MODELS, model("expired", namespace, {"upload": {}}), namespace)
    open_session(kc, gateway_url, registry, namespace, "expired", gateway_url,
                 expires=time.time() - 60)
    one_line(cli("upload", "expired", small_model, *kcfg), 1, "SessionExpired")

    err = one_line(cli("upload", "nothing-here", small_model, *kcfg), 1, "NotFound")
    assert f"Model {namespace}/nothing-here not found" in err
    # a user who may not read the Model: the way forward is --url/--token-file
    sa = cluster.serviceaccount_kubeconfig("nobody", namespace)
    err = one_line(cli("upload", "expired", small_model, "-n", namespace, "--kubeconfig", sa),
                   2, "ModelUnreadable")
    assert "--url URL --token-file FILE" in err
    one_line(cli("upload", "x", small_model, "--url", f"{gateway_url}/v1/uploads/x",
                 env={"MODELCACHE_UPLOAD_TOKEN": ""}), 2, "MissingUploadToken")
    one_line(cli("upload", "x", small_model, "--token-file", "/dev/null"), 2,
             "MissingUploadSession")
    one_line(cli("upload", "x", small_model, env={
        "KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}), 2, "KubeconfigError")


def test_unreadable_token_secret_points_to_url_and_token_file(env, namespace, gateway_url,
                                                              registry, small_model):
    cluster, kc = env
    kc.create(k.MODELS, model("guarded", namespace, {"upload": {}}), namespace)
    open_session(kc, gateway_url, registry, namespace, "guarded", gateway_url)
    sa = cluster.serviceaccount_kubeconfig("model-reader", namespace)
    rbac = "rbac.authorization.k8s.io"
    kc.create(k.Resource(rbac, "v1", "roles", True), {
        "apiVersion": f"{rbac}/v1", "kind": "Role",
        "metadata": {"name": "model-reader", "namespace": namespace},
        "rules": [{"apiGroups": ["modelcache.io"], "resources": ["models"],
                   "verbs": ["get"]}]}, namespace)
    kc.create(k.Resource(rbac, "v1", "rolebindings", True), {
        "apiVersion": f"{rbac}/v1", "kind": "RoleBinding",
        "metadata": {"name": "model-reader", "namespace": namespace},
        "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "model-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "model-reader",
                      "namespace": namespace}]}, namespace)
    deadline = time.monotonic() + 10
    while True:  # RBAC reaches the authorizer's cache within a moment
        p = cli("upload", "guarded", small_model, "-n", namespace, "--kubeconfig", sa)
        if "TokenUnreadable" in p.stderr or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    err = one_line(p, 2, "TokenUnreadable")
    assert f"may not read Secret {namespace}/guarded-upload-token (HTTP 403)" in err
    assert "--url URL --token-file FILE" in err


# --- import: where the registry comes from -------------------------------------------------


@pytest.fixture(scope="module")
def bundle_file(registry: Any, client: RegistryClient,
                tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("bundle")
    modelgen.make_safetensors_model(str(d / "m"))
    res = pack_to_registry(str(d / "m"), client, Reference(registry.host, "cluster/cli-src",
                                                            "v1"))
    cr = {"apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
          "metadata": {"name": "cli-imported"},
          "spec": {"source": {"huggingFace": {"repo": "a/b"}}}}
    digest = res.pack.digest
    doc = yaml.safe_dump(bundle.bundle_cr(cr, digest), sort_keys=True).encode()
    out = str(d / "cli-imported.tar")
    bundle_export.export(client, "cluster/cli-src", digest, out, ref_name="cli-imported",
                         document=(bundle.CR_FILE, doc))
    return out


def test_import_finds_the_registry_or_says_what_is_missing(env, registry, client,
                                                           bundle_file):
    cluster, kc = env
    args = ("import", bundle_file, "--kubeconfig", cluster.kubeconfig, "--no-progress")
    # no flag, no environment, no ClusterModel naming a registry: exit 2, said before reading
    err = one_line(cli(*args, env={"MODELCACHE_REGISTRY": ""}), 2, "MissingRegistry")
    assert "no --registry, no MODELCACHE_REGISTRY, and no ClusterModel in this cluster " \
           "names its registry" in err and "give --registry HOST:PORT" in err
    assert kc.list(k.CLUSTER_MODELS)[0] == []
    # $MODELCACHE_REGISTRY
    p = cli(*args, env={"MODELCACHE_REGISTRY": registry.host})
    assert p.returncode == 0, p.stderr
    assert f"pushed: {registry.host}/cluster/cli-imported:" in p.stdout
    # else the registry this cluster's ClusterModels are published to
    kc.patch(k.CLUSTER_MODELS, "cli-imported", {"status": {"phase": "Ready", "artifact": {
        "digest": "sha256:" + "0" * 64, "reference": f"{registry.host}/cluster/cli-imported"}}},
        sub="status")
    p = cli(*args, env={"MODELCACHE_REGISTRY": ""})
    assert p.returncode == 0, p.stderr
    assert f"pushed: {registry.host}/cluster/cli-imported:" in p.stdout


# --- export of a namespaced Model -------------------------------------------------------


def test_export_of_a_namespaced_model_says_the_way_forward(env, namespace, tmp_path):
    cluster, kc = env
    kc.create(k.MODELS, model("team-model", namespace, {"huggingFace": {"repo": "a/b"}}),
              namespace)
    for name in ("team-model", f"{namespace}/team-model"):
        err = one_line(cli("export", name, "-o", str(tmp_path / "x.tar"),
                           "--kubeconfig", cluster.kubeconfig), 1, "NamespacedModel")
        assert f"export takes a ClusterModel; Model {namespace}/team-model is namespaced" in err
        assert "create one with the same spec (kind: ClusterModel" in err
    one_line(cli("export", "nowhere", "-o", str(tmp_path / "x.tar"),
                 "--kubeconfig", cluster.kubeconfig), 1, "NotFound")
    assert not os.path.exists(tmp_path / "x.tar")
