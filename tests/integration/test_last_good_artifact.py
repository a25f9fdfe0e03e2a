"""The last good artifact stays servable: a re-publish never withholds a model from new pods.

The manager runs as a subprocess against the real API server, the HF test hub and a
real registry; the FAKE kubelet runs its publish Jobs (tests/integration/test_controller.py)
and ``hold()`` keeps a re-publish running while the test looks. Beside it, in this
process, every consumer of a model's servable artifact as the programs run them: the
node plugin's ``KubeResolver`` (its own informers), and the admission webhook and gate
lifter (test_delivery_webhook.py's ``Env``: the API server calls the webhook over TLS).

For each trigger of a re-publish (a scheduled re-sync of a moved upstream, a Secret
rotation, the ``modelcache.io/reimport`` annotation): the Model is Ready with artifact A;
the re-publish is held running, then fails (the hub serves corrupt weights). Meanwhile
and afterwards the resolver answers A, a new pod's gate is lifted with A pinned, a
SharedPVC workload is admitted on A's claim, and the Ready condition says why
(``Republishing``; then ``ServingPreviousArtifact`` naming A, Published=False with the
failure's reason, phase Failed, one Warning event). A successful re-publish of a new
commit then moves all of them to B, and a pod pinned to A still resolves.

Also, in-process: a pod pinned to an older digest of its own model keeps resolving from
the node cache while the registry is down (``Cache.pulled_as``), and a digest the cache
holds for another repository is still refused.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from api import names as c
from csi import errors
from csi.cache import Cache
from csi.errors import CsiError
from csi.resolvers.base import Volume
from csi.resolvers.kube import KubeResolver
from kube import client as k
from modelpack.oci import reference
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import kubeenv, modelgen
from tests.flakyproxy import FlakyProxy
from tests.integration.test_controller import (
    HUB_TOKEN,
    cond,
    events_of,
    get_model,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_controller import manager as manager
from tests.integration.test_delivery_webhook import Env, body, running_env

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube
_pods = itertools.count()


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv, cluster: k.Kube) -> Iterator[Env]:
    for e in running_env(kube):
        e.delivery.lead()  # the lifter's workers, as the leader runs them
        yield e


@pytest.fixture(scope="module")
def ns(env: Env) -> str:
    return env.namespace("lga")


@pytest.fixture(scope="module")
def resolver(cluster: k.Kube) -> Iterator[KubeResolver]:
    r = KubeResolver(cluster, lambda host: RegistryClient(host, insecure=True)).start()
    assert r.models.synced.wait(30)
    yield r
    r.stop()


# -- what every consumer answers -------------------------------------------------------


def put_secret(client: k.Kube, ns: str, name: str, token: str) -> None:
    data = {"token": base64.b64encode(token.encode()).decode()}
    try:
        client.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                  "metadata": {"name": name}, "data": data}, ns)
    except k.Conflict:
        client.patch(k.SECRETS, name, {"data": data}, ns)


def resolved(resolver: KubeResolver, ns: str, name: str, pinned: str | None = None) -> str:
    """The digest the node would publish; raises the ``CsiError`` the node would answer."""
    try:
        ref = resolver.resolve(Volume(ns, model=name, digest=pinned)).reference
    except Exception as e:  # what csi.node does with it
        raise errors.to_csi(e) from e
    return str(ref.digest)


def assert_served(env: Env, resolver: KubeResolver, ns: str, name: str, digest: str) -> None:
    """The node resolver, a new pod (webhook pin + gate lifter) and a SharedPVC
    admission all give ``digest``."""
    # each consumer has its own cache of the Model: the webhook's must have this status
    rv = int((get_model(env.client, ns, name) or {})["metadata"]["resourceVersion"])
    wait_for(lambda: int(env.models.get((ns, name))["metadata"]["resourceVersion"]) >= rv,
             30, what="the webhook's cache up to date")
    wait_for(lambda: resolved(resolver, ns, name) == digest, 30,
             what=f"the node resolver answering {digest}")
    assert resolved(resolver, ns, name, pinned=digest) == digest

    node_pod = f"p{next(_pods)}"
    stored = env.create("Pod", ns, body("Pod", node_pod, {c.ANN_MODELS: name}))
    assert stored["spec"]["schedulingGates"] == [{"name": c.GATE}]
    attrs = stored["spec"]["volumes"][-1]["csi"]["volumeAttributes"]
    assert attrs == {c.ATTR_MODEL: name, c.ATTR_DIGEST: digest}

    def lifted() -> bool:
        p = env.get("Pod", ns, node_pod)
        return not p["spec"].get("schedulingGates") and \
            p["metadata"]["labels"].get(c.LABEL_GATED) == "false"
    wait_for(lifted, 30, what=f"the gate of {node_pod} lifted")

    shared = env.create("Pod", ns, body("Pod", f"s{next(_pods)}", {
        c.ANN_MODELS: name, c.ANN_DELIVERY: "SharedPVC"}))
    assert shared["spec"]["volumes"][-1]["persistentVolumeClaim"]["claimName"] == \
        c.pvc_name(digest)


def wait_status(client: k.Kube, ns: str, name: str, phase: str, ready_reason: str,
                manager: Any) -> dict[str, Any]:
    def check() -> Any:
        m = get_model(client, ns, name) or {}
        st = m.get("status") or {}
        if st.get("phase") == phase and any(
                x.get("type") == "Ready" and x.get("reason") == ready_reason
                for x in st.get("conditions") or []):
            return m
        return None
    try:
        return wait_for(check, 90, what=f"{name} {phase} with Ready reason {ready_reason}")  # type: ignore[no-any-return]
    except AssertionError as e:
        raise AssertionError(f"{e}\nstatus: {(get_model(client, ns, name) or {}).get('status')}"
                             f"\nmanager:\n{manager.logs()}") from None


# -- the three triggers, each failing then succeeding ----------------------------------


@pytest.mark.parametrize("trigger", ["schedule", "secret", "reimport"])
def test_republish_keeps_serving_the_last_good_artifact(trigger, cluster, manager, kubelet,
                                                        hub, env, ns, resolver, small_model):
    name, repo = f"lg-{trigger}", f"acme/lg-{trigger}"
    hub.add_repo(repo, small_model)
    put_secret(cluster, ns, name, HUB_TOKEN)  # the repo is public: any token reads it
    spec: dict[str, Any] = {"source": {"huggingFace": {
        "repo": repo, "authSecretRef": {"name": name, "key": "token"}}}}
    if trigger == "schedule":
        spec["updatePolicy"] = {"schedule": "@every 1s"}
    cluster.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                              "metadata": {"name": name}, "spec": spec}, ns)
    m = wait_status(cluster, ns, name, "Ready", "Published", manager)
    a, uid = m["status"]["artifact"]["digest"], m["metadata"]["uid"]
    assert_served(env, resolver, ns, name, a)

    def republish(n: int) -> None:
        if trigger == "schedule":  # upstream moves: the next scheduled check publishes it
            hub.add_repo(repo, small_model, files={"README.md": f"# v{n}\n".encode()})
        elif trigger == "secret":  # a rotated token: a new publish key
            put_secret(cluster, ns, name, f"hf_rotated_{n}")
        else:
            cluster.patch(k.MODELS, name, {"metadata": {"annotations": {
                c.REIMPORT: str(n)}}}, ns)

    # 1. a re-publish runs (held): A is served, the condition says so
    kubelet.hold()
    try:
        hub.knobs.corrupt.add("model.safetensors")  # … and it will fail
        republish(2)
        m = wait_status(cluster, ns, name, "Publishing", "Republishing", manager)
        assert_served(env, resolver, ns, name, a)
        ready = cond(m, "Ready")
        assert ready["status"] == "True" and a in ready["message"], ready
        assert cond(m, "Published")["status"] == "False"
        assert m["status"]["artifact"]["digest"] == a
    finally:
        kubelet.release()

    # 2. it failed: phase Failed, A still served, the condition names A and the failure
    m = wait_status(cluster, ns, name, "Failed", "ServingPreviousArtifact", manager)
    ready, published = cond(m, "Ready"), cond(m, "Published")
    assert ready["status"] == "True", ready
    assert a in ready["message"] and "ChecksumMismatch" in ready["message"], ready
    assert (published["status"], published["reason"]) == ("False", "ChecksumMismatch")
    assert m["status"]["artifact"]["digest"] == a
    assert_served(env, resolver, ns, name, a)
    warnings = wait_for(lambda: [e for e in events_of(cluster, ns, uid)
                                 if e["type"] == "Warning"], 10, what="the Warning event")
    assert [(e["reason"], e.get("count", 1)) for e in warnings] == [("ChecksumMismatch", 1)]

    # 3. a successful re-publish of a new commit moves everyone to B
    hub.knobs.corrupt.clear()
    hub.add_repo(repo, small_model, files={"README.md": b"# fixed\n"})
    republish(3)

    def moved() -> Any:
        cur = get_model(cluster, ns, name) or {}
        st = cur.get("status") or {}
        return cur if st.get("phase") == "Ready" and \
            (st.get("artifact") or {}).get("digest") not in (None, a) else None
    m = wait_for(moved, 90, what=f"{name} Ready with a new artifact")
    b = m["status"]["artifact"]["digest"]
    assert (cond(m, "Ready")["status"], cond(m, "Ready")["reason"]) == ("True", "Published")
    assert_served(env, resolver, ns, name, b)
    # a pod admitted with A keeps A: confirmed in the model's own repository
    assert resolved(resolver, ns, name, pinned=a) == a


# -- the registry down: a pinned older digest from the node cache ------------------------


@pytest.fixture
def proxy(registry: Any) -> Iterator[FlakyProxy]:
    p = FlakyProxy(registry.host)
    yield p
    p.close()


def put_model(client: k.Kube, ns: str, name: str, ref: str, digest: str) -> None:
    """A Model Ready with ``ref``@``digest``, written as the controller would."""
    try:
        client.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                 "metadata": {"name": name},
                                 "spec": {"source": {"huggingFace": {"repo": f"o/{name}"}}}}, ns)
    except k.Conflict:
        pass
    client.patch(k.MODELS, name, {"status": {"phase": "Ready", "artifact": {
        "digest": digest, "reference": ref, "sizeBytes": 1}}}, ns, sub="status")


def test_pinned_digest_resolves_from_the_node_cache_while_the_registry_is_down(
        cluster, env, proxy, tmp_path):
    ns = env.namespace("down")
    push = RegistryClient(proxy.upstream, insecure=True)
    refs = {}
    for key, repo, seed in (("a", "own", 31), ("b", "own", 32), ("x", "other", 33)):
        src = tmp_path / f"src-{key}"
        src.mkdir()
        modelgen.make_safetensors_model(str(src), seed=seed)
        ref = reference.parse(f"{proxy.host}/models/{ns}/{repo}:{key}")
        pack = pack_to_registry(str(src), push, ref).pack
        refs[key] = Reference(proxy.host, ref.repository, None, pack.digest)
    a, b, x = refs["a"], refs["b"], refs["x"]

    def client_for(host: str) -> RegistryClient:
        return RegistryClient(host, insecure=True, retries=1, timeout=(2.0, 5.0))

    cache = Cache(str(tmp_path / "cache"), client_for)
    try:
        # the node served "own" at A and "other" at X: both trees are cached
        put_model(cluster, ns, "own", str(a), str(a.digest))
        put_model(cluster, ns, "other", str(x), str(x.digest))
        for ref in (a, x):
            cache.pull(ref).result(60)
        # "own" moves on to B; a pod admitted with A (from the old ReplicaSet) comes
        put_model(cluster, ns, "own", str(b), str(b.digest))

        def resolver() -> KubeResolver:  # a fresh one: nothing confirmed in memory
            r = KubeResolver(cluster, client_for, verified=cache.pulled_as).start()
            assert r.models.synced.wait(30)
            wait_for(lambda: resolved(r, ns, "own") == b.digest, 10, what="B in the cache")
            return r

        proxy.down = True
        r = resolver()
        try:
            # A was pulled as <own repository>@A: served from the node cache
            assert resolved(r, ns, "own", pinned=str(a.digest)) == a.digest
            assert cache.lease(str(a.digest)) is not None
            cache.release(str(a.digest))
            # X is cached too, but as another repository's: not shown to "own"'s pods
            with pytest.raises(CsiError) as e:
                resolved(r, ns, "own", pinned=str(x.digest))
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
            # the model's current digest needs no registry at all
            assert resolved(r, ns, "own") == b.digest
        finally:
            r.stop()

        proxy.down = False
        r = resolver()
        try:  # the registry back: X is answered by the registry, not the cache
            with pytest.raises(CsiError) as e:
                resolved(r, ns, "own", pinned=str(x.digest))
            assert e.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            r.stop()
    finally:
        cache.close()
