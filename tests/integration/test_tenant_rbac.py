"""The tenant roles modelcache-edit and modelcache-view on the real kube-apiserver.

Tenants are real ServiceAccounts calling with their own bound tokens
(TokenRequest), holding only a RoleBinding in their namespace to one of the
roles of daemonset/tenant-rbac.yaml. Shortcut, stated: the test cluster runs
no kube-controller-manager, so ClusterRole aggregation into the built-in
admin/edit/view never happens here; the roles are bound directly, and the
aggregation labels are checked on the manifests and the chart template.
ClusterModels are cluster-scoped, so the roles' read of them works only
through a ClusterRoleBinding; modelcache-clustermodels-view is the role for
that binding.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import yaml

from kube import client as k
from tests import kubeenv
from tests.integration import test_controller
from tests.integration.test_controller import ensure_namespace, wait_for

kube = kubeenv.kube
cluster = test_controller.cluster  # CRDs installed

MANIFEST = os.path.join(kubeenv.REPO_ROOT, "daemonset", "tenant-rbac.yaml")
TEMPLATE = os.path.join(kubeenv.REPO_ROOT, "charts", "modelcache", "templates",
                        "tenant-rbac.yaml")
ROLE_BINDINGS = k.Resource("rbac.authorization.k8s.io", "v1", "rolebindings", True)
CLUSTER_ROLE_BINDINGS = k.Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings",
                                  False)
AGG = "rbac.authorization.k8s.io/aggregate-to-"


def model(name: str) -> dict[str, object]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model", "metadata": {"name": name},
            "spec": {"source": {"http": {"url": "https://models.example/m.tar"}}}}


def cluster_model(name: str) -> dict[str, object]:
    return {**model(name), "kind": "ClusterModel"}


def bind(client: k.Kube, namespace: str, sa: str, role: str) -> None:
    client.create(ROLE_BINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": f"{sa}-{role}"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": namespace}]}, namespace)


@pytest.fixture(scope="module")
def tenants(kube: kubeenv.KubeEnv, cluster: k.Kube) -> Iterator[dict[str, object]]:
    kube.kubectl("apply", "-f", MANIFEST)
    ns, other = f"team-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    ensure_namespace(cluster, other)
    bind(cluster, ns, "dev", "modelcache-edit")
    bind(cluster, ns, "auditor", "modelcache-view")
    editor = k.Kube.from_config(kube.serviceaccount_kubeconfig("dev", ns))
    viewer = k.Kube.from_config(kube.serviceaccount_kubeconfig("auditor", ns))
    cm = f"shared-{uuid.uuid4().hex[:6]}"
    cluster.create(k.CLUSTER_MODELS, cluster_model(cm))
    yield {"ns": ns, "other": other, "editor": editor, "viewer": viewer, "cm": cm}
    editor.close()
    viewer.close()


def test_editor_manages_models_in_its_own_namespace(tenants: dict[str, object]) -> None:
    editor, ns = tenants["editor"], str(tenants["ns"])
    assert isinstance(editor, k.Kube)
    created = editor.create(k.MODELS, model("mine"), ns)
    assert created["metadata"]["namespace"] == ns
    editor.patch(k.MODELS, "mine", {"metadata": {"labels": {"team": "x"}}}, ns)
    assert [m["metadata"]["name"] for m in editor.list(k.MODELS, ns)[0]] == ["mine"]
    editor.delete(k.MODELS, "mine", ns)


def test_editor_cannot_reach_another_namespace(tenants: dict[str, object]) -> None:
    editor, other = tenants["editor"], str(tenants["other"])
    assert isinstance(editor, k.Kube)
    with pytest.raises(k.ApiError) as e:
        editor.create(k.MODELS, model("intruder"), other)
    assert e.value.status == 403
    with pytest.raises(k.ApiError) as e:
        editor.list(k.MODELS, other)
    assert e.value.status == 403


def test_editor_cannot_write_cluster_models(tenants: dict[str, object]) -> None:
    editor, cm = tenants["editor"], str(tenants["cm"])
    assert isinstance(editor, k.Kube)
    for call in (lambda: editor.create(k.CLUSTER_MODELS, cluster_model(f"x-{uuid.uuid4().hex[:6]}")),
                 lambda: editor.patch(k.CLUSTER_MODELS, cm, {"metadata": {"labels": {"a": "b"}}}),
                 lambda: editor.delete(k.CLUSTER_MODELS, cm),
                 lambda: editor.patch(k.MODELS, "any", {"status": {"phase": "Ready"}},
                                      str(tenants["ns"]), sub="status")):
        with pytest.raises(k.ApiError) as e:
            call()
        assert e.value.status == 403


def test_cluster_models_readable_through_cluster_binding(tenants: dict[str, object],
                                                         cluster: k.Kube) -> None:
    """A RoleBinding cannot grant a cluster-scoped read (RBAC's rule, not ours):
    modelcache-clustermodels-view, bound cluster-wide, grants exactly that read."""
    editor, ns, cm = tenants["editor"], str(tenants["ns"]), str(tenants["cm"])
    assert isinstance(editor, k.Kube)
    with pytest.raises(k.ApiError) as e:
        editor.get(k.CLUSTER_MODELS, cm)
    assert e.value.status == 403
    cluster.create(CLUSTER_ROLE_BINDINGS, {
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": f"{ns}-clustermodels-view"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "modelcache-clustermodels-view"},
        "subjects": [{"kind": "ServiceAccount", "name": "dev", "namespace": ns}]})
    try:
        wait_for(lambda: _can_get(editor, cm), 10, what="the cluster binding to take effect")
        assert cm in [m["metadata"]["name"] for m in editor.list(k.CLUSTER_MODELS)[0]]
        with pytest.raises(k.ApiError) as e:
            editor.create(k.CLUSTER_MODELS, cluster_model(f"y-{uuid.uuid4().hex[:6]}"))
        assert e.value.status == 403
        with pytest.raises(k.ApiError) as e:  # and still no other namespace's Models
            editor.list(k.MODELS, str(tenants["other"]))
        assert e.value.status == 403
    finally:
        cluster.delete(CLUSTER_ROLE_BINDINGS, f"{ns}-clustermodels-view")


def _can_get(client: k.Kube, name: str) -> bool:
    try:
        client.get(k.CLUSTER_MODELS, name)
    except k.ApiError:
        return False
    return True


def test_viewer_reads_only(tenants: dict[str, object], cluster: k.Kube) -> None:
    viewer, ns = tenants["viewer"], str(tenants["ns"])
    assert isinstance(viewer, k.Kube)
    cluster.create(k.MODELS, model("seen"), ns)
    assert viewer.get(k.MODELS, "seen", ns)["metadata"]["name"] == "seen"
    assert [m["metadata"]["name"] for m in viewer.list(k.MODELS, ns)[0]] == ["seen"]
    with pytest.raises(k.ApiError) as e:
        viewer.create(k.MODELS, model("nope"), ns)
    assert e.value.status == 403
    with pytest.raises(k.ApiError) as e:
        viewer.delete(k.MODELS, "seen", ns)
    assert e.value.status == 403


def roles(docs: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    return {str(d["metadata"]["name"]): d for d in docs  # type: ignore[index]
            if d and d.get("kind") == "ClusterRole"}


def test_aggregation_labels_and_chart_match_manifest() -> None:
    with open(MANIFEST) as f:
        plain = roles(list(yaml.safe_load_all(f)))
    edit_labels = plain["modelcache-edit"]["metadata"]["labels"]  # type: ignore[index]
    view_labels = plain["modelcache-view"]["metadata"]["labels"]  # type: ignore[index]
    assert edit_labels[AGG + "admin"] == "true" and edit_labels[AGG + "edit"] == "true"
    assert AGG + "view" not in edit_labels
    assert view_labels[AGG + "view"] == "true"
    assert not any(key.startswith(AGG) and key != AGG + "view" for key in view_labels)
    # the chart template carries the same rules and aggregation labels (helm renders
    # only the common labels around them; test_chart renders the whole chart)
    with open(TEMPLATE) as f:
        text = f.read()
    chart = roles([yaml.safe_load(doc.replace('{{- include "modelcache.labels" . | nindent 4 }}',
                                              "")) for doc in text.split("\n---\n")])
    assert set(chart) == set(plain)
    assert not any(key.startswith(AGG) for key in
                   plain["modelcache-clustermodels-view"]["metadata"]["labels"])  # type: ignore[index]
    for name in plain:
        assert chart[name]["rules"] == plain[name]["rules"], name
        assert {k_: v for k_, v in chart[name]["metadata"]["labels"].items()  # type: ignore[index]
                if k_.startswith(AGG)} == \
            {k_: v for k_, v in plain[name]["metadata"]["labels"].items()  # type: ignore[index]
             if k_.startswith(AGG)}, name
    # no tenant role reaches the status subresource, the catalog or anything but models
    for role in plain.values():
        for rule in role["rules"]:  # type: ignore[attr-defined]
            assert rule["apiGroups"] == ["modelcache.io"]
            assert set(rule["resources"]) <= {"models", "clustermodels"}
