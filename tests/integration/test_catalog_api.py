"""The catalog API against a real API server (TokenReview, SAR, RBAC) and a real registry.

Cluster A is the session API server and registry. The catalog server runs
in-process (``controller.catalog.server.build``, as the manager builds it)
with the controller's own ServiceAccount and the RBAC of
daemonset/controller-rbac.yaml, so its TokenReviews and
SubjectAccessReviews prove those rules too. Tokens are real ServiceAccount
tokens (TokenRequest). Shortcut, stated: no manager publishes in A; a model
is pushed with the publish worker and its ClusterModel's status is written
Ready as the manager would.

Acceptance: no token → 401, a token without ``modelcache:catalog:reader`` →
403, with it → 200; listing shows name, digest, size, format, metadata and
no registry host or path; manifests and blobs by digest, with Range; a blob
of some other model is not served; writes are 405; a flood is 429; a
deleted binding is refused within the decision TTL.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from cli.local import registry as localregistry
from controller.catalog import server as catalog_server
from ingest.publish import publish_uri
from kube import client as k
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient
from tests import kubeenv, modelgen
from tests.integration import test_controller
from tests.integration.test_controller import ensure_namespace, wait_for

kube = kubeenv.kube
cluster = test_controller.cluster  # cluster A: CRDs installed, modelcache-system

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_NS = "modelcache-system"
READER_ROLE = "modelcache:catalog:reader"
AUTH_TTL = 0.5  # seconds A's catalog reuses a TokenReview/SAR decision
CRB = k.Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings", False)


# --- helpers shared with test_catalog_import.py -----------------------------------------


def sa_token(env: kubeenv.KubeEnv, name: str, namespace: str) -> str:
    """A bound token of ServiceAccount ``namespace/name`` (created if missing)."""
    with open(env.serviceaccount_kubeconfig(name, namespace)) as f:
        return str(json.load(f)["users"][0]["user"]["token"])


def apply_controller_rbac(env: kubeenv.KubeEnv) -> None:
    env.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset", "controller-rbac.yaml"))


def bind_reader(client: k.Kube, name: str, sa: str, namespace: str) -> None:
    body = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": READER_ROLE},
            "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]}
    try:
        client.create(CRB, body)
    except k.Conflict:
        pass


def publish_ready(client: k.Kube, reg: localregistry.LocalRegistry, name: str,
                  model_dir: str) -> dict[str, Any]:
    """Push ``model_dir`` to ``cluster/<name>`` and mark its ClusterModel Ready (as A's
    manager would after its publish Job); the Ready status is returned."""
    res = publish_uri(model_dir, push=f"{reg.host}/cluster/{name}:gen-1",
                      client=RegistryClient(reg.host, insecure=True))
    body = {"apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
            "metadata": {"name": name},
            "spec": {"source": {"http": {"url": f"https://models.example/{name}.tar"}}}}
    try:
        client.create(k.CLUSTER_MODELS, body)
    except k.Conflict:
        pass
    resolved = {key: v for key, v in res.resolved.items()
                if key in ("format", "family", "architecture", "parameterCount", "precision",
                           "files") and v is not None}
    status = {"phase": "Ready", "observedGeneration": 1,
              "artifact": {"digest": res.digest, "sizeBytes": res.size,
                           "reference": res.reference},
              "source": {"resolvedRevision": "0123abcd"}, "resolved": resolved,
              "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                              "message": "ready", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}
    client.patch(k.CLUSTER_MODELS, name, {"status": status}, sub="status")
    return status


class CatalogA:
    """Cluster A's catalog: the server, its informer, and what the tests need to reach it."""

    def __init__(self, env: kubeenv.KubeEnv, reg: localregistry.LocalRegistry, ca_dir: str,
                 **config: Any) -> None:
        apply_controller_rbac(env)
        kubeconfig = env.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
        self.client = k.Kube.from_config(kubeconfig)  # the controller's own rights only
        self.informer = Informer(self.client, k.CLUSTER_MODELS)
        self.informer.start()
        wait_for(self.informer.synced.is_set, 30, what="ClusterModel informer")
        cfg = catalog_server.Config(listen=("127.0.0.1", 0), hosts=("127.0.0.1", "localhost"),
                                    **config)
        self.server = catalog_server.build(cfg, self.client, self.informer,
                                           lambda: RegistryClient(reg.host, insecure=True))
        self.catalog: catalog_server.Catalog = self.server.RequestHandlerClass.catalog  # type: ignore[attr-defined]
        assert self.server.cert_pem is not None
        self.ca_file = os.path.join(ca_dir, "catalog-ca.pem")
        with open(self.ca_file, "wb") as f:
            f.write(self.server.cert_pem)
        import threading

        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"

    @property
    def ca_b64(self) -> str:
        assert self.server.cert_pem is not None
        return base64.b64encode(self.server.cert_pem).decode()

    def get(self, path: str, token: str | None = None, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return requests.request(kw.pop("method", "GET"), self.url + path, headers=headers,
                                verify=self.ca_file, timeout=30, **kw)

    def wait_served(self, name: str) -> None:
        wait_for(lambda: self.catalog.served(name) is not None, 30, what=f"{name} in the cache")

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.informer.stop()
        self.client.close()


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def catalog(kube: kubeenv.KubeEnv, cluster: k.Kube, registry: localregistry.LocalRegistry,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[CatalogA]:
    cat = CatalogA(kube, registry, str(tmp_path_factory.mktemp("catalog")),
                   auth_ttl=AUTH_TTL)
    yield cat
    cat.stop()


@pytest.fixture(scope="module")
def tokens(kube: kubeenv.KubeEnv, cluster: k.Kube) -> dict[str, str]:
    ns = f"cat-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    bind_reader(cluster, f"{ns}-reader", "reader", ns)
    return {"ns": ns, "reader": sa_token(kube, "reader", ns),
            "stranger": sa_token(kube, "stranger", ns)}


@pytest.fixture(scope="module")
def served(cluster: k.Kube, registry: localregistry.LocalRegistry, catalog: CatalogA,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    name = f"api-{uuid.uuid4().hex[:6]}"
    root = str(tmp_path_factory.mktemp("model"))
    modelgen.make_safetensors_model(root, seed=11)
    status = publish_ready(cluster, registry, name, root)
    catalog.wait_served(name)
    return {"name": name, "status": status, "dir": root}


# --- tests ---------------------------------------------------------------------------------


def test_no_token_is_401(catalog: CatalogA, served: dict[str, Any]) -> None:
    for path in ("/catalog/v1/models", f"/v2/{served['name']}/manifests/"
                 f"{served['status']['artifact']['digest']}", "/v2/"):
        r = catalog.get(path)
        assert r.status_code == 401, path
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = catalog.get("/catalog/v1/models", "not-a-token")
    assert r.status_code == 401
    assert catalog.get("/healthz").status_code == 200  # probes need no token


def test_token_without_role_is_403(catalog: CatalogA, tokens: dict[str, str],
                                   served: dict[str, Any]) -> None:
    r = catalog.get("/catalog/v1/models", tokens["stranger"])
    assert r.status_code == 403
    assert READER_ROLE in r.json()["errors"][0]["message"]
    digest = served["status"]["artifact"]["digest"]
    assert catalog.get(f"/v2/{served['name']}/manifests/{digest}",
                       tokens["stranger"]).status_code == 403
    # an unknown name is 403 too, not 404: who may not read learns nothing about what exists
    assert catalog.get("/catalog/v1/models/nope", tokens["stranger"]).status_code == 403


def test_listing_with_role(catalog: CatalogA, tokens: dict[str, str], served: dict[str, Any],
                           registry: localregistry.LocalRegistry) -> None:
    r = catalog.get("/catalog/v1/models", tokens["reader"])
    assert r.status_code == 200
    entry = next(m for m in r.json()["models"] if m["name"] == served["name"])
    art = served["status"]["artifact"]
    assert entry["digest"] == art["digest"] and entry["sizeBytes"] == art["sizeBytes"]
    assert entry["format"] == "Safetensors" and entry["family"] == "llama"
    assert entry["revision"] == "0123abcd"
    assert entry["metadata"]["parameterCount"] > 0
    # nothing internal: no registry host, repository path or reference
    assert registry.host not in r.text and "cluster/" not in r.text
    assert "reference" not in entry
    one = catalog.get(f"/catalog/v1/models/{served['name']}", tokens["reader"])
    assert one.status_code == 200 and one.json() == entry
    assert catalog.get("/catalog/v1/models/absent-model", tokens["reader"]).status_code == 404


def test_not_ready_models_are_not_served(cluster: k.Kube, catalog: CatalogA,
                                         tokens: dict[str, str]) -> None:
    name = f"pending-{uuid.uuid4().hex[:6]}"
    cluster.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel", "metadata": {"name": name},
        "spec": {"source": {"http": {"url": "https://models.example/x.tar"}}}})
    wait_for(lambda: catalog.informer.get(("", name)) is not None, 30, what="cached")
    names = [m["name"] for m in catalog.get("/catalog/v1/models", tokens["reader"]).json()["models"]]
    assert name not in names
    assert catalog.get(f"/catalog/v1/models/{name}", tokens["reader"]).status_code == 404
    assert catalog.get(f"/v2/{name}/manifests/sha256:{'0' * 64}",
                       tokens["reader"]).status_code == 404


def test_manifest_and_blobs_with_range(catalog: CatalogA, tokens: dict[str, str],
                                       served: dict[str, Any]) -> None:
    name, digest = served["name"], served["status"]["artifact"]["digest"]
    r = catalog.get(f"/v2/{name}/manifests/{digest}", tokens["reader"])
    assert r.status_code == 200
    assert "sha256:" + hashlib.sha256(r.content).hexdigest() == digest
    assert r.headers["Docker-Content-Digest"] == digest
    manifest = r.json()
    layer = max(manifest["layers"], key=lambda x: x["size"])
    path = f"/v2/{name}/blobs/{layer['digest']}"
    full = catalog.get(path, tokens["reader"])
    assert full.status_code == 200 and len(full.content) == layer["size"]
    assert "sha256:" + hashlib.sha256(full.content).hexdigest() == layer["digest"]
    part = catalog.get(path, tokens["reader"], headers={"Range": "bytes=100-"})
    assert part.status_code == 206
    assert part.headers["Content-Range"] == f"bytes 100-{layer['size'] - 1}/{layer['size']}"
    assert part.content == full.content[100:]
    head = catalog.get(path, tokens["reader"], method="HEAD")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == layer["size"]
    cfg = catalog.get(f"/v2/{name}/blobs/{manifest['config']['digest']}", tokens["reader"])
    assert cfg.status_code == 200 and json.loads(cfg.content)["config"]["format"] == "safetensors"
    # tags are not served: an import names the digest it was pinned to
    assert catalog.get(f"/v2/{name}/manifests/gen-1", tokens["reader"]).status_code == 404


def test_other_blobs_are_not_served(cluster: k.Kube, registry: localregistry.LocalRegistry,
                                    catalog: CatalogA, tokens: dict[str, str],
                                    served: dict[str, Any],
                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    # a namespaced Model's blob in the same DMCR: no ClusterModel references it
    root = str(tmp_path_factory.mktemp("private"))
    modelgen.make_safetensors_model(root, seed=12)
    res = publish_uri(root, push=f"{registry.host}/models/team-a/private:gen-1",
                      client=RegistryClient(registry.host, insecure=True))
    client = RegistryClient(registry.host, insecure=True)
    raw, _, _ = client.get_manifest(client_ref(registry, "models/team-a/private", res.digest))
    private = json.loads(raw)["layers"][0]["digest"]
    assert client.blob_exists("models/team-a/private", private)
    r = catalog.get(f"/v2/{served['name']}/blobs/{private}", tokens["reader"])
    assert r.status_code == 404
    # nor another repository's manifest under a served model's name
    assert catalog.get(f"/v2/{served['name']}/manifests/{res.digest}",
                       tokens["reader"]).status_code == 404


def client_ref(reg: localregistry.LocalRegistry, repo: str, digest: str) -> Any:
    from modelpack.oci.reference import Reference

    return Reference(reg.host, repo, digest=digest)


def test_read_only(catalog: CatalogA, tokens: dict[str, str], served: dict[str, Any]) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = catalog.get(f"/v2/{served['name']}/blobs/uploads/", tokens["reader"], method=method)
        assert r.status_code == 405, method


def test_revoked_binding_refused_within_ttl(kube: kubeenv.KubeEnv, cluster: k.Kube,
                                           catalog: CatalogA, served: dict[str, Any]) -> None:
    ns = f"rev-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    bind_reader(cluster, f"{ns}-reader", "reader", ns)
    token = sa_token(kube, "reader", ns)
    assert catalog.get("/catalog/v1/models", token).status_code == 200
    cluster.delete(CRB, f"{ns}-reader")
    wait_for(lambda: catalog.get("/catalog/v1/models", token).status_code == 403, 15,
             interval=0.2, what="403 after the binding is gone")
    bind_reader(cluster, f"{ns}-reader", "reader", ns)
    wait_for(lambda: catalog.get("/catalog/v1/models", token).status_code == 200, 15,
             interval=0.2, what="200 after the binding is back")


def test_decisions_are_cached(catalog: CatalogA, tokens: dict[str, str],
                              served: dict[str, Any]) -> None:
    time.sleep(0.6)  # past the TTL: the first request reviews, the next ones do not
    before = catalog.catalog.authorizer.reviews
    for _ in range(20):
        assert catalog.get("/catalog/v1/models", tokens["reader"]).status_code == 200
    assert catalog.catalog.authorizer.reviews - before <= 4 * 2  # ≤ one pair per TTL window


def test_rate_limited(kube: kubeenv.KubeEnv, cluster: k.Kube,
                      registry: localregistry.LocalRegistry,
                      tmp_path_factory: pytest.TempPathFactory) -> None:
    cat = CatalogA(kube, registry, str(tmp_path_factory.mktemp("ratelimited")), rate=0.5,
                   burst=3)
    try:
        codes = [cat.get("/catalog/v1/models").status_code for _ in range(6)]
        assert codes[:3] == [401, 401, 401]  # bad requests count too: no TokenReview flood
        assert codes[3:] == [429, 429, 429]
        r = cat.get("/catalog/v1/models")
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    finally:
        cat.stop()


def test_list_latency(catalog: CatalogA, tokens: dict[str, str], served: dict[str, Any]) -> None:
    """Figure for the report: a listing's latency with the decision cached (not asserted)."""
    s = requests.Session()
    s.headers["Authorization"] = f"Bearer {tokens['reader']}"
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        r = s.get(catalog.url + "/catalog/v1/models", timeout=10, verify=catalog.ca_file)
        assert r.status_code == 200
        times.append(time.perf_counter() - t0)
    times.sort()
    print(f"\ncatalog list latency: p50 {times[25] * 1000:.2f} ms, "
          f"p90 {times[45] * 1000:.2f} ms (keep-alive, cached decision)")


def test_reader_role_manifest() -> None:
    docs = list(yaml.safe_load_all(open(os.path.join(REPO_ROOT, "daemonset",
                                                     "controller-rbac.yaml"))))
    role = next(d for d in docs if d and d["metadata"]["name"] == READER_ROLE)
    assert role["rules"] == [{"apiGroups": ["modelcache.io"],
                              "resources": ["clustermodels/catalog"], "verbs": ["get", "list"]}]
