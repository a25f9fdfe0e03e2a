"""Catalog import between two clusters on one machine: export from A, import into B.

Cluster A: the session API server and registry, its catalog server
in-process (test_catalog_api.CatalogA: the controller's ServiceAccount and
RBAC, real TokenReview/SAR). Cluster B: a second etcd + kube-apiserver and
a second registry, started here; B's manager runs in-process with the
ModelCatalogSource controller, and its publish Jobs run as real
``modelcache-controller publish`` processes under the FAKE kubelet
(tests/fake_kubelet.py). The token B uses is a real ServiceAccount token of
A, kept in a Secret in B's controller namespace.

Acceptance: B's ModelCatalogSource lists A's Ready models (Reachable/Ready,
lastListedAt), with reasons when the CA or the token is wrong; a ClusterModel
with ``source.catalog`` reaches Ready in B with A's digest frozen in
``status.catalog``, byte-identical (same manifest bytes, same files); the
reader binding deleted mid-import makes it wait, restored it completes
without fetching any blob twice; a tampered blob is refused and nothing is
tagged in B. The throughput figure against ``skopeo copy`` is
bench/catalog/run.py's.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from cli.local import registry as localregistry
from controller import app
from controller.catalog.auth import Denied
from controller.models import publishjob as jobs
from kube import client as k
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from tests import kubeenv, modelgen
from tests.fake_kubelet import FakeKubelet
from tests.integration import test_catalog_api, test_controller
from tests.integration.test_catalog_api import (
    AUTH_TTL,
    CRB,
    SYSTEM_NS,
    CatalogA,
    bind_reader,
    publish_ready,
    sa_token,
)
from tests.integration.test_controller import ensure_namespace, install_crds, wait_for
from tests.servers.helpers import pull_back, same_tree

kube = kubeenv.kube
cluster = test_controller.cluster  # cluster A
catalog = test_catalog_api.catalog  # A's catalog server, decisions cached AUTH_TTL
MCS = k.MODEL_CATALOG_SOURCES


# --- cluster A -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def importer(kube: kubeenv.KubeEnv, cluster: k.Kube) -> dict[str, str]:
    """A's ServiceAccount for B, bound to modelcache:catalog:reader."""
    ns = f"imp-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    binding = f"{ns}-importer"
    bind_reader(cluster, binding, "importer", ns)
    return {"ns": ns, "binding": binding, "token": sa_token(kube, "importer", ns)}


@pytest.fixture(scope="module")
def a_models(cluster: k.Kube, registry: localregistry.LocalRegistry, catalog: CatalogA,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    suffix = uuid.uuid4().hex[:5]
    out: dict[str, dict[str, Any]] = {}
    for kind in ("small", "big", "tamper"):
        name = f"{kind}-{suffix}"
        root = str(tmp_path_factory.mktemp(kind))
        if kind == "big":
            modelgen.make_big_model(root, files=10, total=40 << 20, seed=21)
        else:
            modelgen.make_safetensors_model(root, seed={"small": 22, "tamper": 23}[kind])
        out[kind] = {"name": name, "dir": root,
                     "digest": publish_ready(cluster, registry, name, root)["artifact"]["digest"]}
        catalog.wait_served(name)
    return out


# --- cluster B -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_b() -> Iterator[kubeenv.KubeEnv]:
    with kubeenv.running() as env:
        install_crds(env)
        yield env


@pytest.fixture(scope="module")
def registry_b() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running() as reg:
        yield reg


@pytest.fixture(scope="module")
def cluster_b(env_b: kubeenv.KubeEnv) -> Iterator[k.Kube]:
    client = k.Kube.from_config(env_b.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    yield client
    client.close()


@pytest.fixture(scope="module")
def manager_b(env_b: kubeenv.KubeEnv, cluster_b: k.Kube, registry_b: localregistry.LocalRegistry,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[app.Manager]:
    kubelet = FakeKubelet(cluster_b, SYSTEM_NS, work_root=str(tmp_path_factory.mktemp("kubelet")))
    kubelet.start()
    # the token Secret is lent to the import Job at start, over the manager's plain
    # listener (no token realm here: a test), never copied (models/credentials.py)
    port = kubeenv.free_port()
    settings = jobs.Settings(namespace=SYSTEM_NS, registry=registry_b.host,
                             registry_insecure=True, backoff_limit=1, report_key=b"k",
                             credentials_url=f"http://127.0.0.1:{port}")
    mgr = app.Manager(app.Options(settings=settings, kubeconfig=env_b.kubeconfig,
                                  listen=("127.0.0.1", port), workers=2, leader_elect=False,
                                  shared_pvc=None), k.Kube.from_config(env_b.kubeconfig))
    mgr.start()
    yield mgr
    mgr.stop()
    kubelet.stop()


def put_secret(client: k.Kube, name: str, token: str) -> None:
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": name, "namespace": SYSTEM_NS,
        "labels": {"modelcache.io/usable-by-cluster-models": "true"}},  # the admin's opt-in
            "data": {"token": base64.b64encode(token.encode()).decode()}}
    try:
        client.create(k.SECRETS, body, SYSTEM_NS)
    except k.Conflict:
        client.replace(k.SECRETS, name, body, SYSTEM_NS)


def make_source(client: k.Kube, name: str, url: str, ca_b64: str | None,
                secret: str | None) -> None:
    spec: dict[str, Any] = {"url": url, "refreshInterval": "1m"}
    if ca_b64:
        spec["caBundle"] = ca_b64
    if secret:
        spec["tokenSecretRef"] = {"name": secret}
    client.create(MCS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "ModelCatalogSource",
                        "metadata": {"name": name}, "spec": spec})


def cond(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((obj or {}).get("status") or {}).get("conditions") or []
                 if c.get("type") == type_), {})


def get(client: k.Kube, res: k.Resource, name: str) -> dict[str, Any] | None:
    try:
        return client.get(res, name)
    except k.NotFound:
        return None


@pytest.fixture(scope="module")
def source_b(cluster_b: k.Kube, manager_b: app.Manager, catalog: CatalogA,
             importer: dict[str, str], a_models: dict[str, dict[str, Any]]) -> str:
    put_secret(cluster_b, "upstream-token", importer["token"])
    make_source(cluster_b, "upstream", catalog.url, catalog.ca_b64, "upstream-token")
    wait_for(lambda: cond(get(cluster_b, MCS, "upstream"), "Ready").get("status") == "True",
             60, what="ModelCatalogSource Ready")
    return "upstream"


def import_model(client: k.Kube, name: str, model: str, source: str = "upstream") -> None:
    client.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"source": {"catalog": {"sourceRef": source, "model": model}}}})


def phase(client: k.Kube, name: str) -> str:
    return str(((get(client, k.CLUSTER_MODELS, name) or {}).get("status") or {}).get("phase"))


# --- tests -----------------------------------------------------------------------------------


def test_source_lists_the_catalog(cluster_b: k.Kube, source_b: str,
                                  a_models: dict[str, dict[str, Any]],
                                  importer: dict[str, str]) -> None:
    mcs = get(cluster_b, MCS, source_b)
    assert mcs is not None
    st = mcs["status"]
    assert cond(mcs, "Reachable")["status"] == "True"
    assert st["lastListedAt"]
    offered = {m["name"]: m for m in st["models"]}
    for m in a_models.values():
        assert offered[m["name"]]["digest"] == m["digest"]
        assert offered[m["name"]]["format"] == "Safetensors"
        assert offered[m["name"]]["revision"] == "0123abcd"
    # the token is in no status field
    assert importer["token"] not in json.dumps(mcs)


def test_source_reasons_and_ca_fixed_later(cluster_b: k.Kube, manager_b: app.Manager,
                                           catalog: CatalogA, source_b: str) -> None:
    from kube import certs

    wrong_ca, _ = certs.self_signed(["127.0.0.1"])
    name = f"badca-{uuid.uuid4().hex[:5]}"
    make_source(cluster_b, name, catalog.url, base64.b64encode(wrong_ca).decode(),
                "upstream-token")
    mcs = wait_for(lambda: (o := get(cluster_b, MCS, name)) and
                   cond(o, "Reachable").get("status") == "False" and o, 30, what="TLS refusal")
    assert cond(mcs, "Reachable")["reason"] == "CatalogTLSError"
    assert cond(mcs, "Ready")["status"] == "False"
    cluster_b.patch(MCS, name, {"spec": {"caBundle": catalog.ca_b64}})  # the CA fixed
    wait_for(lambda: cond(get(cluster_b, MCS, name), "Ready").get("status") == "True", 30,
             what="Ready once the CA is right")

    anon = f"anon-{uuid.uuid4().hex[:5]}"
    make_source(cluster_b, anon, catalog.url, catalog.ca_b64, None)
    mcs = wait_for(lambda: (o := get(cluster_b, MCS, anon)) and
                   cond(o, "Ready").get("reason") and o, 30, what="anonymous refused")
    assert cond(mcs, "Ready")["reason"] == "CatalogUnauthorized"
    assert cond(mcs, "Reachable")["status"] == "True"

    missing = f"nosecret-{uuid.uuid4().hex[:5]}"
    make_source(cluster_b, missing, catalog.url, catalog.ca_b64, "no-such-secret")
    mcs = wait_for(lambda: (o := get(cluster_b, MCS, missing)) and
                   cond(o, "Ready").get("reason") and o, 30, what="missing Secret")
    assert cond(mcs, "Ready")["reason"] == "TokenSecretNotFound"


def test_import_is_byte_identical(cluster_b: k.Kube, source_b: str,
                                  registry: localregistry.LocalRegistry,
                                  registry_b: localregistry.LocalRegistry,
                                  a_models: dict[str, dict[str, Any]], tmp_path: Any) -> None:
    m = a_models["small"]
    import_model(cluster_b, m["name"], m["name"])
    wait_for(lambda: phase(cluster_b, m["name"]) in ("Ready", "Failed"), 120, interval=0.3,
             what="import finished")
    cm = get(cluster_b, k.CLUSTER_MODELS, m["name"])
    assert cm is not None
    st = cm["status"]
    assert st["phase"] == "Ready", st
    assert st["artifact"]["digest"] == m["digest"]  # the identity survives the copy
    assert st["catalog"]["digest"] == m["digest"] and st["catalog"]["revision"] == "0123abcd"
    assert st["resolved"]["format"] == "Safetensors"
    a_raw, _, _ = RegistryClient(registry.host, insecure=True).get_manifest(
        Reference(registry.host, f"cluster/{m['name']}", digest=m["digest"]))
    b_client = RegistryClient(registry_b.host, insecure=True)
    b_raw, _, _ = b_client.get_manifest(
        Reference(registry_b.host, f"cluster/{m['name']}", digest=m["digest"]))
    assert a_raw == b_raw
    dest = os.path.join(str(tmp_path), "pulled")
    pull_back(b_client, f"{registry_b.host}/cluster/{m['name']}@{m['digest']}", dest)
    same_tree(m["dir"], dest)


def test_revoked_token_waits_then_completes(cluster: k.Kube, cluster_b: k.Kube,
                                            registry: localregistry.LocalRegistry,
                                            catalog: CatalogA, source_b: str,
                                            importer: dict[str, str],
                                            a_models: dict[str, dict[str, Any]]) -> None:
    m = a_models["big"]
    raw, _, _ = RegistryClient(registry.host, insecure=True).get_manifest(
        Reference(registry.host, f"cluster/{m['name']}", digest=m["digest"]))
    layers = {x["digest"] for x in json.loads(raw)["layers"]}
    calls: collections.Counter[str] = collections.Counter()
    denied = collections.Counter()
    state: dict[str, float] = {"until": 0.0}
    lock = threading.Lock()
    orig_blob, orig_authz = catalog.catalog.manifests.blob_allowed, catalog.catalog.authorizer.authorize

    def blob_allowed(name: str, digest: str) -> bool:
        if name == m["name"]:
            with lock:
                calls[digest] += 1
                if not state["until"] and digest in layers:
                    # revoke at the first blob; hold the first wave until the cached
                    # decision has expired, so every later request is reviewed again
                    cluster.delete(CRB, importer["binding"])
                    state["until"] = time.monotonic() + AUTH_TTL + 1.0
            time.sleep(max(0.0, state["until"] - time.monotonic()))
        return orig_blob(name, digest)

    def authorize(ident: Any, verb: str, name: str = "") -> None:
        try:
            orig_authz(ident, verb, name)
        except Denied:
            denied[name] += 1
            raise

    catalog.catalog.manifests.blob_allowed = blob_allowed  # type: ignore[method-assign]
    catalog.catalog.authorizer.authorize = authorize  # type: ignore[method-assign]
    try:
        import_model(cluster_b, m["name"], m["name"])
        wait_for(lambda: denied[m["name"]] >= 2, 60, what="the import refused (403) and retrying")
        cm = get(cluster_b, k.CLUSTER_MODELS, m["name"])
        assert cm is not None and cm["status"]["phase"] == "Publishing", cm.get("status")
        frozen = cm["status"]["catalog"]["digest"]
        assert frozen == m["digest"]
        first_wave = set(calls)
        bind_reader(cluster, importer["binding"], "importer", importer["ns"])  # restored
        wait_for(lambda: phase(cluster_b, m["name"]) in ("Ready", "Failed"), 120, interval=0.3,
                 what="import finished after the token came back")
    finally:
        del catalog.catalog.manifests.blob_allowed
        del catalog.catalog.authorizer.authorize
    cm = get(cluster_b, k.CLUSTER_MODELS, m["name"])
    assert cm is not None and cm["status"]["phase"] == "Ready", cm.get("status")
    assert cm["status"]["artifact"]["digest"] == frozen == cm["status"]["catalog"]["digest"]
    assert first_wave & layers and not layers <= first_wave  # revoked mid-import
    # no layer fetched twice: what B had before the revocation was kept, not fetched again
    # (the config blob, a few hundred bytes, is read again by every attempt's resolve)
    assert layers <= set(calls) and all(calls[d] == 1 for d in layers), calls


def test_tampered_blob_is_refused(cluster_b: k.Kube, source_b: str,
                                  registry: localregistry.LocalRegistry,
                                  registry_b: localregistry.LocalRegistry,
                                  a_models: dict[str, dict[str, Any]]) -> None:
    m = a_models["tamper"]
    a_client = RegistryClient(registry.host, insecure=True)
    raw, _, _ = a_client.get_manifest(Reference(registry.host, f"cluster/{m['name']}",
                                                digest=m["digest"]))
    layer = max(json.loads(raw)["layers"], key=lambda x: x["size"])
    path = registry.blob_path(layer["digest"])
    with open(path, "r+b") as f:  # one byte flipped, size unchanged: what a bad proxy would do
        f.seek(layer["size"] // 2)
        b = f.read(1)
        f.seek(layer["size"] // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    import_model(cluster_b, m["name"], m["name"])
    wait_for(lambda: phase(cluster_b, m["name"]) in ("Ready", "Failed"), 120, interval=0.3,
             what="import finished")
    cm = get(cluster_b, k.CLUSTER_MODELS, m["name"])
    assert cm is not None and cm["status"]["phase"] == "Failed", cm.get("status")
    ready = cond(cm, "Ready")
    assert ready["reason"] == "DigestMismatch", ready
    assert layer["digest"] in ready["message"] or "hashes to" in ready["message"]
    b_client = RegistryClient(registry_b.host, insecure=True)
    assert b_client.list_tags(f"cluster/{m['name']}") == []
    assert not b_client.blob_exists(f"cluster/{m['name']}", layer["digest"])
