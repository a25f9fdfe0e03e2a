"""Sharing a namespaced Model with other namespaces (``spec.sharing``) on the real API server.

The owner of ``team-a`` (a real ServiceAccount with the tenant role of
daemonset/tenant-rbac.yaml and the built-in ``system:aggregate-to-edit``,
nothing cluster-wide) grants its Model to listed namespaces or to a
namespace label selector; tenants of other namespaces name it
``team-a/<name>``. The webhook and the gate lifter run in-process as the
manager runs them (test_delivery_webhook.Env); the SharedPVC reconciler's
``backing`` is asked on the same informers; the node plugin runs as a
process with the node's own RBAC (daemonset/node-rbac.yaml) and is sent
NodePublishVolume as kubelet sends it (test_csi_kube). Shown: a grant by
list and by selector is injected at ``<ns>.<name>``, beside the workload's
own Model of that name; no grant is refused with one message for "absent"
and "not shared"; a revoked grant refuses new pods, keeps a gated pod gated
and keeps a running pod's mount; a tenant can neither edit the owner's
Model nor label its own namespace to match a selector; the node refuses a
forged volume naming another namespace's Model without a grant.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from api import names as c
from controller.delivery import sharedpvc
from controller.models import publishjob
from kube import client as k
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import kubeenv, modelgen
from tests.integration import test_csi_kube as ck
from tests.integration.test_csi_kube import node_kubeconfig as node_kubeconfig
from tests.integration.test_csi_node import targets as targets
from tests.integration.test_delivery_gates import events, lifted, settle
from tests.integration.test_delivery_webhook import (
    NAMESPACES,
    SYSTEM_NS,
    Env,
    body,
    running_env,
    template,
    wait_for,
)
from tests.integration.test_tenant_rbac import MANIFEST as TENANT_RBAC
from tests.integration.test_tenant_rbac import bind

kube = kubeenv.kube
api = ck.api  # the CRDs installed, for node_kubeconfig
RUN = uuid.uuid4().hex[:6]
SHARE_LABEL = f"share.example.com/{RUN}"


@pytest.fixture(scope="module")
def env(kube: kubeenv.KubeEnv) -> Iterator[Env]:
    for e in running_env(kube):
        e.delivery.lead()  # the lifter too
        yield e


class Teams:
    """Four namespaces, each with a tenant ``dev`` (models and workloads, own namespace)."""

    def __init__(self, kenv: kubeenv.KubeEnv, env: Env) -> None:
        self.env = env
        self.a, self.b, self.c, self.d = (env.namespace(p) for p in ("team-a", "team-b",
                                                                     "team-c", "team-d"))
        self.tenant: dict[str, k.Kube] = {}
        for ns in (self.a, self.b, self.c, self.d):
            bind(env.client, ns, "dev", "modelcache-edit")
            bind(env.client, ns, "dev", "system:aggregate-to-edit")
            self.tenant[ns] = k.Kube.from_config(kenv.serviceaccount_kubeconfig("dev", ns))
        self.label(self.c, "yes")

    def label(self, ns: str, value: str | None) -> None:
        self.env.client.patch(NAMESPACES, ns, {"metadata": {"labels": {SHARE_LABEL: value}}})

    def close(self) -> None:
        for t in self.tenant.values():
            t.close()


@pytest.fixture(scope="module")
def teams(kube: kubeenv.KubeEnv, env: Env) -> Iterator[Teams]:
    kube.kubectl("apply", "-f", TENANT_RBAC)
    t = Teams(kube, env)
    yield t
    t.close()


BY_LIST = "list"
BY_SELECTOR = "selector"


def grant(teams: Teams, how: str) -> dict[str, Any]:
    if how == BY_LIST:
        return {"namespaces": [teams.b]}
    return {"namespaceSelector": {"matchExpressions": [
        {"key": SHARE_LABEL, "operator": "In", "values": ["yes"]}]}}


def owned_model(teams: Teams, name: str, sharing: dict[str, Any] | None, *,
                phase: str = "Ready", mode: str | None = None) -> str:
    """The owner (team-a's tenant) creates the Model with its grant; the status is set
    as the controller would (env.model). Returns the digest."""
    spec: dict[str, Any] = {"source": {"huggingFace": {"repo": f"org/{name}"}}}
    if sharing is not None:
        spec["sharing"] = sharing
    if mode:
        spec["delivery"] = {"mode": mode}
    teams.tenant[teams.a].create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
        "metadata": {"name": name}, "spec": spec}, teams.a)
    return teams.env.model(name, teams.a, phase=phase)


def set_sharing(teams: Teams, name: str, sharing: dict[str, Any] | None) -> None:
    """The owner grants or revokes; returns once the webhook's cache shows it."""
    teams.tenant[teams.a].patch(k.MODELS, name, {"spec": {"sharing": sharing}}, teams.a)
    wait_for(lambda: (teams.env.models.get((teams.a, name)) or {}).get("spec", {})
             .get("sharing") == sharing, what="the grant in the webhook's cache")


def refusal(teams: Teams, name: str, ns: str) -> str:
    return (f"Model {teams.a}/{name} does not exist or is not shared with namespace {ns} "
            "(its owner grants it in the Model's spec.sharing)")


def create_as(teams: Teams, ns: str, kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    res = {"Pod": k.PODS, "Deployment": k.DEPLOYMENTS}[kind]
    return teams.tenant[ns].create(res, obj, ns)


def refused_as(teams: Teams, ns: str, kind: str, obj: dict[str, Any]) -> str:
    with pytest.raises(k.ApiError) as e:
        create_as(teams, ns, kind, obj)
    return str(e.value)


# -- the webhook ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", [BY_LIST, BY_SELECTOR])
def test_a_granted_namespace_gets_the_model_beside_its_own(env: Env, teams: Teams,
                                                           how: str) -> None:
    name = f"llama-{how}"
    digest = owned_model(teams, name, grant(teams, how))
    user = teams.b if how == BY_LIST else teams.c
    own = env.model(name, user)  # the user's own Model of the same name
    stored = create_as(teams, user, "Deployment", body("Deployment", "w", {
        c.ANN_MODELS: f"{name},{teams.a}/{name}"}))
    spec = template(stored, "Deployment")["spec"]
    attrs = [v["csi"]["volumeAttributes"] for v in spec["volumes"] if "csi" in v]
    assert attrs == [{"model": name, "digest": own},
                     {"model": name, "modelNamespace": teams.a, "digest": digest}]
    paths = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]][1:]
    assert paths == [f"{c.MOUNT_ROOT}/{name}", f"{c.MOUNT_ROOT}/{teams.a}.{name}"]
    assert spec["schedulingGates"] == [{"name": c.GATE}]


def test_without_a_grant_the_workload_is_refused(env: Env, teams: Teams) -> None:
    owned_model(teams, "private", None)
    owned_model(teams, "listed", {"namespaces": [teams.b]})
    for ns, name in ((teams.b, "private"), (teams.d, "listed"), (teams.d, "no-such")):
        msg = refused_as(teams, ns, "Deployment", body("Deployment", "w", {
            c.ANN_MODELS: f"{teams.a}/{name}"}))
        assert 'admission webhook "workloads.modelcache.io" denied the request: ' + \
            refusal(teams, name, ns) in msg, msg
    # a bare Pod too
    msg = refused_as(teams, teams.d, "Pod", body("Pod", "p", {
        c.ANN_MODELS: f"{teams.a}/listed"}))
    assert refusal(teams, "listed", teams.d) in msg


def test_a_selector_grants_whatever_namespace_matches_it_now(env: Env, teams: Teams) -> None:
    owned_model(teams, "by-label", grant(teams, BY_SELECTOR))
    obj = body("Deployment", "w", {c.ANN_MODELS: f"{teams.a}/by-label"})
    assert refusal(teams, "by-label", teams.d) in refused_as(teams, teams.d, "Deployment", obj)
    teams.label(teams.d, "yes")  # an admin's act: the tenant cannot (below)
    try:
        def admitted() -> bool:
            try:
                create_as(teams, teams.d, "Deployment", obj)
            except k.ApiError as e:
                assert "is not shared" in str(e), e
                return False
            return True
        wait_for(admitted, timeout=30, what="admission once team-d carries the label")
    finally:
        teams.label(teams.d, None)


def test_revoking_refuses_new_pods_and_holds_gated_ones(env: Env, teams: Teams) -> None:
    owned_model(teams, "rv", {"namespaces": [teams.b]}, phase="Publishing")
    gated = create_as(teams, teams.b, "Pod", body("Pod", "gated", {c.ANN_MODELS: f"{teams.a}/rv"}))
    assert gated["spec"]["schedulingGates"] == [{"name": c.GATE}]
    set_sharing(teams, "rv", None)  # revoked while the pod waits
    env.model("rv", teams.a, phase="Ready")
    settle(env, 2.0)
    assert not lifted(env, teams.b, "gated")
    wait_for(lambda: [e for e in events(env, teams.b, "gated")
                      if e["reason"] == "ModelNotShared"], what="a ModelNotShared event")
    assert refusal(teams, "rv", teams.b) in refused_as(teams, teams.b, "Pod", body(
        "Pod", "new", {c.ANN_MODELS: f"{teams.a}/rv"}))
    set_sharing(teams, "rv", {"namespaces": [teams.b]})  # granted again: the gate lifts
    wait_for(lambda: lifted(env, teams.b, "gated"), what="the gate lifted after the re-grant")


# -- attacks by RBAC --------------------------------------------------------------------------


def test_a_tenant_cannot_grant_itself(env: Env, teams: Teams) -> None:
    owned_model(teams, "guarded", None)
    intruder = teams.tenant[teams.d]
    with pytest.raises(k.ApiError) as e:  # editing the owner's Model
        intruder.patch(k.MODELS, "guarded", {"spec": {"sharing": {
            "namespaces": [teams.d]}}}, teams.a)
    assert e.value.status == 403
    with pytest.raises(k.ApiError) as e:  # labelling its own namespace to match a selector
        intruder.patch(NAMESPACES, teams.d, {"metadata": {"labels": {SHARE_LABEL: "yes"}}})
    assert e.value.status == 403
    assert (env.client.get(k.MODELS, "guarded", teams.a)["spec"]).get("sharing") is None
    assert refusal(teams, "guarded", teams.d) in refused_as(teams, teams.d, "Deployment", body(
        "Deployment", "w", {c.ANN_MODELS: f"{teams.a}/guarded"}))


def test_the_crd_refuses_a_malformed_grant(env: Env, teams: Teams) -> None:
    owner = teams.tenant[teams.a]
    for sharing, needle in (
            ({"namespaces": ["Not_A_Namespace"]}, "namespace names"),
            ({"namespaceSelector": {"matchExpressions": [
                {"key": "x", "operator": "In"}]}}, "In and NotIn need values")):
        with pytest.raises(k.ApiError) as e:
            owner.create(k.MODELS, {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                                    "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
                                    "spec": {"source": {"huggingFace": {"repo": "o/x"}},
                                             "sharing": sharing}}, teams.a)
        assert e.value.status == 422 and needle in str(e.value)


# -- SharedPVC -------------------------------------------------------------------------------


def test_sharedpvc_fills_a_claim_only_for_a_granted_namespace(env: Env, teams: Teams) -> None:
    digest = owned_model(teams, "emb", {"namespaces": [teams.b]}, mode="SharedPVC")
    stored = create_as(teams, teams.b, "Deployment", body("Deployment", "w-pvc", {
        c.ANN_MODELS: f"{teams.a}/emb"}))
    claim = template(stored, "Deployment")["spec"]["volumes"][-1]["persistentVolumeClaim"]
    assert claim == {"claimName": c.pvc_name(digest), "readOnly": True}
    reconciler = sharedpvc.SharedPVC(
        env.client, publishjob.Settings(namespace=SYSTEM_NS, registry="dmcr.test:5000"),
        sharedpvc.Config(), models=env.models, cluster_models=env.cluster_models,
        recorder=env.recorder, metrics=env.metrics)
    [(model, d, ref)] = reconciler.backing(teams.b, c.pvc_name(digest))
    assert (model["metadata"]["namespace"], d) == (teams.a, digest)
    assert ref == f"dmcr.test:5000/models/{teams.a}/emb@{digest}"
    # a forged claim of that name in a namespace without the grant is backed by nothing
    assert reconciler.backing(teams.d, c.pvc_name(digest)) == []
    set_sharing(teams, "emb", None)
    assert reconciler.backing(teams.b, c.pvc_name(digest)) == []


# -- the node plugin ------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.timeout(240)
def test_the_node_checks_the_grant_at_every_publish(env: Env, teams: Teams, registry, targets,
                                                     node_kubeconfig, tmp_path) -> None:
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=41)
    ref = f"{registry.host}/models/{teams.a}/tree:v1"
    pack = pack_to_registry(src, RegistryClient(registry.host, insecure=True),
                            reference.parse(ref)).pack
    teams.tenant[teams.a].create(k.MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "Model", "metadata": {"name": "tree"},
        "spec": {"source": {"huggingFace": {"repo": "o/tree"}},
                 "sharing": {"namespaces": [teams.b], **grant(teams, BY_SELECTOR)}}}, teams.a)
    env.client.patch(k.MODELS, "tree", {"status": {"phase": "Ready", "artifact": {
        "digest": pack.digest, "reference": ref, "sizeBytes": 1}}}, teams.a, sub="status")
    work = tmp_path / "plugin"
    work.mkdir()
    plugin = ck.KubePlugin(str(work), node_kubeconfig, [registry.host], [],
                           f"node-{RUN}").start()
    try:
        node = plugin.node()
        shared = {"model": "tree", "modelNamespace": teams.a}
        by_list = ck.kubelet_request(targets, teams.b, shared)
        assert ck.publish(node, by_list) == (grpc.StatusCode.OK, "")
        ck.assert_read_only_tree(pack, by_list.target_path)
        by_label = ck.kubelet_request(targets, teams.c, shared)  # labels read by the node
        assert ck.publish(node, by_label) == (grpc.StatusCode.OK, "")
        # a pod spec written by hand (no webhook): team-d names team-a's Model
        for attrs in (shared, {"model": "no-such", "modelNamespace": teams.a}):
            code, details = ck.publish(node, ck.kubelet_request(targets, teams.d, attrs))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert details == refusal(teams, attrs["model"], teams.d)
        # revoked: new publishes refused once the node's watch sees it; mounts stay
        set_sharing(teams, "tree", None)

        def refused() -> bool:
            return ck.call(node, ck.kubelet_request(targets, teams.b, shared))[0] == \
                grpc.StatusCode.PERMISSION_DENIED
        wait_for(refused, timeout=30, what="the node refusing after the revocation")
        ck.assert_read_only_tree(pack, by_list.target_path)
        ck.assert_read_only_tree(pack, by_label.target_path)
        assert ck.call(node, by_list)[0] == grpc.StatusCode.OK  # kubelet's retry: idempotent
        assert "Forbidden" not in open(plugin.log_path).read()
    finally:
        plugin.kill()
        cf_.unmount_everything_under(str(tmp_path))
