"""Versions: ``status.history``, pins, rollback and garbage collection, end to end.

The manager runs as a subprocess against the real API server, the HF test hub and a
real registry (``--history-keep 2``); the FAKE kubelet runs its publish Jobs
(tests/integration/test_controller.py). Beside it, in this process, the admission
webhook and gate lifter (test_delivery_webhook.py's ``Env``, called by the API server)
and the node plugin's ``KubeResolver``. Workloads and the owner's pin are written by a
tenant ServiceAccount (modelcache-edit plus pods in its namespace), not by an admin.

One Model is published three times (A, B, C: ``modelcache.io/reimport`` after the
hub's files moved). Along the way: a workload pins ``name@A``; a pin naming another
namespace's artifact is refused by the webhook and by the node resolver; the owner's
``modelcache.io/pin`` rolls the model back to A and forward again, and a pin naming a
foreign digest says ``PinNotFound`` while the latest keeps serving. With three
generations and retention 2, A stays in the registry while a pod mounts it, and is
deleted (and leaves the history) once no pod does.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from api import names as c
from csi import errors
from csi.errors import CsiError
from csi.resolvers.base import Volume
from csi.resolvers.kube import KubeResolver
from kube import client as k
from modelpack.errors import NotFoundError
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    ManagerProcess,
    cond,
    events_of,
    get_model,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_delivery_webhook import Env, body, new_digest, running_env
from tests.integration.test_sharedpvc_tenant import tenant

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
_pods = itertools.count()
HOLD = 3.0  # seconds the manager gets to act on a generation over retention


@pytest.fixture(scope="module")
def manager(kube: kubeenv.KubeEnv, cluster: k.Kube, kubelet: FakeKubelet, registry: Any,
            hub_server: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ManagerProcess]:
    m = ManagerProcess(kube, registry.host, hub_server.url,
                       str(tmp_path_factory.mktemp("manager") / "manager.log"),
                       extra=["--history-keep", "2"]).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv, cluster: k.Kube) -> Iterator[Env]:
    for e in running_env(kube):
        e.delivery.lead()
        yield e


@pytest.fixture(scope="module")
def resolver(cluster: k.Kube) -> Iterator[KubeResolver]:
    r = KubeResolver(cluster, lambda host: RegistryClient(host, insecure=True)).start()
    assert r.models.synced.wait(30)
    yield r
    r.stop()


def resolve(resolver: KubeResolver, ns: str, name: str, pinned: str | None = None) -> str:
    """The digest the node would publish; raises the ``CsiError`` the node would answer."""
    try:
        ref = resolver.resolve(Volume(ns, model=name, digest=pinned)).reference
    except Exception as e:  # what csi.node does with it
        raise errors.to_csi(e) from e
    return str(ref.digest)


def status_of(client: k.Kube, ns: str, name: str) -> dict[str, Any]:
    return dict((get_model(client, ns, name) or {}).get("status") or {})


def publish(client: k.Kube, ns: str, name: str, before: str | None,
            manager: ManagerProcess) -> str:
    """Wait for Ready with an artifact other than ``before``; its digest."""
    def moved() -> str | None:
        st = status_of(client, ns, name)
        d = (st.get("artifact") or {}).get("digest")
        return d if st.get("phase") == "Ready" and d and d != before else None
    try:
        return str(wait_for(moved, 120, what=f"{name} Ready with a new artifact"))
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {status_of(client, ns, name)}"
                             f"\nmanager:\n{manager.logs()}") from None


def pod(client: k.Kube, ns: str, models: str) -> dict[str, Any]:
    return client.create(k.PODS, body("Pod", f"v{next(_pods)}", {c.ANN_MODELS: models}), ns)


def pinned_digest(p: dict[str, Any]) -> str:
    return str(p["spec"]["volumes"][-1]["csi"]["volumeAttributes"][c.ATTR_DIGEST])


def manifest_exists(reg: RegistryClient, repo: str, digest: str) -> bool:
    try:
        reg.get_manifest(Reference(reg.host, repo, None, digest))
    except NotFoundError:
        return False
    return True


def pin_condition(client: k.Kube, ns: str, name: str, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        m = get_model(client, ns, name) or {}
        got = [x for x in (m.get("status") or {}).get("conditions") or []
               if x.get("type") == "Pinned" and x.get("reason") == reason]
        return m if got else None
    return wait_for(check, 30, what=f"Pinned condition {reason}")  # type: ignore[no-any-return]


def test_history_pins_rollback_and_collection(kube, cluster, manager, kubelet, hub, env,
                                              resolver, registry, small_model):
    ns, other = env.namespace("ver"), env.namespace("ver-other")
    dev = tenant(kube, cluster, ns)
    name, repo = "llm", f"acme/ver-{uuid.uuid4().hex[:6]}"
    oci_repo = f"models/{ns}/{name}"
    reg = RegistryClient(registry.host, insecure=True)
    # another namespace's Model and its artifact. Only the digest matters below, and
    # the manager (running here) may rewrite that Model's status with its own publish
    # of org/theirs before an informer sees Ready: write it, wait for the API, not a cache
    foreign = new_digest()
    theirs = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
              "metadata": {"name": "theirs"},
              "spec": {"source": {"huggingFace": {"repo": "org/theirs"}}}}
    cluster.create(k.MODELS, theirs, other)
    cluster.patch(k.MODELS, "theirs", {"status": {"phase": "Ready", "artifact": {
        "digest": foreign, "sizeBytes": 1}}}, other, sub="status")

    # generation A, by the tenant
    hub.add_repo(repo, small_model)
    dev.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                          "metadata": {"name": name},
                          "spec": {"source": {"huggingFace": {"repo": repo}}}}, ns)
    a = publish(cluster, ns, name, None, manager)
    (first,) = status_of(cluster, ns, name)["history"]
    assert first["digest"] == a and first["generation"] == 1 and first["revision"]
    assert first["publishedAt"].endswith("Z") and first["sizeBytes"] > 0

    def republish(n: int, before: str) -> str:
        hub.add_repo(repo, small_model, files={"README.md": f"# v{n}\n".encode()})
        dev.patch(k.MODELS, name, {"metadata": {"annotations": {c.REIMPORT: str(n)}}}, ns)
        return publish(cluster, ns, name, before, manager)

    b = republish(2, a)
    assert [h["digest"] for h in status_of(cluster, ns, name)["history"]] == [b, a]

    # a workload pins A by name@digest: the webhook injects A, the node resolves A
    held = pod(dev, ns, f"{name}@{a}")
    assert pinned_digest(held) == a
    assert resolve(resolver, ns, name, pinned=a) == a
    # … but not another namespace's artifact: refused at admission and on the node
    with pytest.raises(k.ApiError, match="not one of the model's published generations"):
        pod(dev, ns, f"{name}@{foreign}")
    wait_for(lambda: len(((resolver.models.get((ns, name)) or {}).get("status") or {})
                         .get("history") or []) == 2, 30, what="the node's copy of history")
    with pytest.raises(CsiError) as e:
        resolve(resolver, ns, name, pinned=foreign)
    assert e.value.code.name == "NOT_FOUND", e.value

    # the owner rolls back to A: every consumer serves A; a foreign pin is ignored
    dev.patch(k.MODELS, name, {"metadata": {"annotations": {c.PIN: a}}}, ns)
    m = pin_condition(cluster, ns, name, "Pinned")
    assert a in cond(m, "Pinned")["message"] and m["status"]["artifact"]["digest"] == b
    wait_for(lambda: resolve(resolver, ns, name) == a, 30, what="the node serving A")
    wait_for(lambda: (((env.models.get((ns, name)) or {}).get("metadata") or {})
                      .get("annotations") or {}).get(c.PIN) == a, 30, what="webhook cache")
    rolled = pod(dev, ns, name)
    assert pinned_digest(rolled) == a
    dev.patch(k.MODELS, name, {"metadata": {"annotations": {c.PIN: foreign}}}, ns)
    m = pin_condition(cluster, ns, name, "PinNotFound")
    wait_for(lambda: [e for e in events_of(cluster, ns, m["metadata"]["uid"])
                      if (e["type"], e["reason"]) == ("Warning", "PinNotFound")],
             10, what="the PinNotFound event")
    wait_for(lambda: resolve(resolver, ns, name) == b, 30, what="the node serving B again")
    dev.patch(k.MODELS, name, {"metadata": {"annotations": {c.PIN: None}}}, ns)
    pin_condition(cluster, ns, name, "NotPinned")

    # generation C: three generations, newest first; A is over retention but mounted
    cc = republish(3, b)
    # the pass that made C current applies retention right after: give it time to (wrongly)
    # delete A, then A must still be listed and in the registry
    time.sleep(HOLD)
    st = status_of(cluster, ns, name)
    assert [h["digest"] for h in st["history"]] == [cc, b, a]
    assert len({cc, b, a}) == 3
    stamps = [h["publishedAt"] for h in st["history"]]
    assert stamps == sorted(stamps, reverse=True)
    assert manifest_exists(reg, oci_repo, a)

    # no pod mounts A any more: the next pass deletes it from the registry and history
    for p in (held, rolled):
        cluster.delete(k.PODS, p["metadata"]["name"], ns)
    wait_for(lambda: not [p for p in cluster.list(k.PODS, ns)[0]
                          if p["metadata"]["name"] in (held["metadata"]["name"],
                                                       rolled["metadata"]["name"])],
             30, what="the pods gone")
    dev.patch(k.MODELS, name, {"metadata": {"annotations": {"example.com/touch": "1"}}}, ns)
    wait_for(lambda: [h["digest"] for h in status_of(cluster, ns, name)["history"]]
             == [cc, b], 30, what="A collected from the history")
    assert not manifest_exists(reg, oci_repo, a)
    assert manifest_exists(reg, oci_repo, b) and manifest_exists(reg, oci_repo, cc)
    # a pod pinned to A now is refused, by the webhook and by the node
    with pytest.raises(k.ApiError, match="not one of the model's published generations"):
        pod(dev, ns, f"{name}@{a}")
    wait_for(lambda: len(((resolver.models.get((ns, name)) or {}).get("status") or {})
                         .get("history") or []) == 2, 30, what="the node's copy of history")
    with pytest.raises(CsiError) as e:
        resolve(resolver, ns, name, pinned=a)
    assert e.value.code.name == "NOT_FOUND", e.value

    # deleting the Model deletes every generation listed, not only the tagged one (the
    # reimports re-tagged gen-1, so B is reachable by digest alone)
    cluster.delete(k.MODELS, name, ns)
    wait_for(lambda: get_model(cluster, ns, name) is None, 60, what="the Model gone")
    assert not manifest_exists(reg, oci_repo, b) and not manifest_exists(reg, oci_repo, cc)
