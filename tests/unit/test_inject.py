"""api/inject.py: what the admission webhook writes, field by field.

Pure functions, so every case is an object in and an object (or an error) out.
The JSON patch is applied back with a small RFC 6902 applier and must give
exactly the mutated object.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from api import inject, podspec
from api import names as c
from api.inject import InjectError, Ref

NS = "team-a"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def model(name: str, *, phase: str = "Ready", digest: str = D1, mode: str | None = None,
          namespace: str = NS, family: str = "qwen2", fmt: str = "Safetensors",
          reason: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"upload": {}}}
    if mode:
        spec["delivery"] = {"mode": mode}
    status: dict[str, Any] = {"phase": phase, "resolved": {"family": family, "format": fmt}}
    if phase in ("Ready", "Failed"):
        status["artifact"] = {"digest": digest}
    if reason:
        status["conditions"] = [{"type": "Ready", "status": "False", "reason": reason}]
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec, "status": status}


def lookup_of(models: dict[str, dict[str, Any]],
              cluster: dict[str, dict[str, Any]] | None = None) -> inject.Lookup:
    def look(ref: Ref) -> dict[str, Any] | None:
        return (models if ref.kind == "Model" else (cluster or {})).get(ref.name)
    return look


def pod_spec() -> dict[str, Any]:
    return {"initContainers": [{"name": "warm", "image": "busybox"}],
            "containers": [{"name": "app", "image": "vllm",
                            "env": [{"name": "USER_VAR", "value": "1"}],
                            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]},
                           {"name": "side", "image": "busybox"}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
            "schedulingGates": [{"name": "example.com/other"}],
            "affinity": {"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In",
                                           "values": ["h100"]}]}]},
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 10, "preference": {"matchExpressions": [
                        {"key": "zone", "operator": "In", "values": ["a"]}]}}]}}}


def workload(kind: str, annotations: dict[str, str]) -> dict[str, Any]:
    tpl = {"metadata": {"labels": {"app": "x"}}, "spec": pod_spec()}
    meta: dict[str, Any] = {"name": "w", "namespace": NS, "annotations": dict(annotations)}
    if kind == "Pod":
        meta["labels"] = {"app": "x"}
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": tpl["spec"]}
    if kind == "CronJob":
        return {"kind": kind, "metadata": meta,
                "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": tpl}}}}
    return {"kind": kind, "metadata": meta, "spec": {"template": tpl}}


def template(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    cur = obj
    for p in inject.TEMPLATE_PATH[kind]:
        cur = cur[p]
    return cur


def apply_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 add/remove/replace on maps (all inject.json_patch emits)."""
    out = copy.deepcopy(obj)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = out
        for p in parts[:-1]:
            parent = parent[p]
        if op["op"] == "remove":
            del parent[parts[-1]]
        else:
            if op["op"] == "replace":
                assert parts[-1] in parent, op
            parent[parts[-1]] = copy.deepcopy(op["value"])
    return out


def run(obj: dict[str, Any], kind: str = "Deployment", *, operation: str = "CREATE",
        models: dict[str, dict[str, Any]] | None = None,
        cluster: dict[str, dict[str, Any]] | None = None, **kw: Any) -> inject.Result:
    res = inject.mutate(kind, obj, operation=operation, namespace=NS,
                        lookup=lookup_of(models if models is not None else {
                            "qwen": model("qwen")}, cluster), **kw)
    assert apply_patch(obj, res.patch) == res.obj
    return res


# -- the annotation -----------------------------------------------------------------


def test_parse_refs_order_dedup_and_kinds():
    refs = inject.parse_refs({c.ANN_MODELS: " qwen, embedder ,qwen,,", c.ANN_CLUSTER_MODELS: "llama"})
    assert refs == [Ref("Model", "qwen"), Ref("Model", "embedder"), Ref("ClusterModel", "llama")]
    assert inject.parse_refs({}) == [] and inject.parse_refs(None) == []


@pytest.mark.parametrize("value,needle", [
    ("Other_NS/qwen", "is not a namespace name"),
    ("a/b/qwen", "is not a namespace name"),
    ("Qwen_Big", "not a valid Model name"),
    ("-x", "not a valid Model name"),
])
def test_parse_refs_refuses(value, needle):
    with pytest.raises(InjectError, match=needle) as e:
        inject.parse_refs({c.ANN_MODELS: value})
    assert e.value.code == 400


def test_same_name_as_model_and_cluster_model_is_refused():
    with pytest.raises(InjectError, match="Model x and ClusterModel x would both mount"):
        inject.parse_refs({c.ANN_MODELS: "x", c.ANN_CLUSTER_MODELS: "x"})


def test_volume_names_are_dns_labels_and_distinct():
    assert inject.volume_name(Ref("Model", "qwen")) == "modelcache-m-qwen"
    assert inject.volume_name(Ref("ClusterModel", "qwen")) == "modelcache-c-qwen"
    long = inject.volume_name(Ref("Model", "a" * 200))
    dotted = inject.volume_name(Ref("Model", "qwen.v2"))
    dashed = inject.volume_name(Ref("Model", "qwen-v2"))
    for n in (long, dotted, dashed):
        assert len(n) <= 63 and inject._DNS_LABEL.match(n), n
    assert dotted != dashed and dotted.startswith("modelcache-m-qwen-v2-")


# -- NodeCache ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", inject.KINDS)
def test_nodecache_injection_field_by_field(kind):
    obj = workload(kind, {c.ANN_MODELS: "qwen", c.ANN_CLUSTER_MODELS: "llama"})
    res = run(obj, kind, cluster={"llama": model("llama", namespace="", digest=D2,
                                                 family="llama", fmt="GGUF")})
    tpl = template(res.obj, kind)
    spec, meta = tpl["spec"], tpl["metadata"]
    assert spec["volumes"] == [
        {"name": "scratch", "emptyDir": {}},
        {"name": "modelcache-m-qwen", "csi": {"driver": "nodecache.modelcache.io",
                                              "readOnly": True, "volumeAttributes": {
                                                  "model": "qwen", "digest": D1}}},
        {"name": "modelcache-c-llama", "csi": {"driver": "nodecache.modelcache.io",
                                               "readOnly": True, "volumeAttributes": {
                                                   "clusterModel": "llama", "digest": D2}}}]
    want_env = [{"name": "AI_MODELS_MODELS_DIR", "value": "/data/modelcache/models"},
                {"name": "AI_MODELS_MODELS", "value": json.dumps([
                    {"name": "qwen", "path": "/data/modelcache/models/qwen", "digest": D1,
                     "family": "qwen2", "format": "Safetensors"},
                    {"name": "llama", "path": "/data/modelcache/models/llama", "digest": D2,
                     "family": "llama", "format": "GGUF"}], separators=(",", ":"))}]
    mounts = [{"name": "modelcache-m-qwen", "mountPath": "/data/modelcache/models/qwen",
               "readOnly": True},
              {"name": "modelcache-c-llama", "mountPath": "/data/modelcache/models/llama",
               "readOnly": True}]
    app, side = spec["containers"]
    warm = spec["initContainers"][0]
    assert app["volumeMounts"] == [{"name": "scratch", "mountPath": "/scratch"}, *mounts]
    assert app["env"] == [{"name": "USER_VAR", "value": "1"}, *want_env]
    assert side["volumeMounts"] == mounts and side["env"] == want_env
    assert warm["volumeMounts"] == mounts and warm["env"] == want_env
    assert spec["schedulingGates"] == [{"name": "example.com/other"},
                                       {"name": "modelcache.io/model-ready"}]
    assert meta["labels"] == {"app": "x", c.LABEL_GATED: "true"}
    fp = meta["annotations"][c.ANN_INJECTED]
    assert len(fp) == 16
    if kind != "Pod":
        assert res.obj["metadata"]["annotations"][c.ANN_INJECTED] == fp
        assert c.LABEL_USES_SHARED_PVC not in (res.obj["metadata"].get("labels") or {})
    # user affinity untouched: no node caches these digests
    assert spec["affinity"] == pod_spec()["affinity"]
    assert res.warnings == []


def test_not_ready_model_has_no_digest_and_warns():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen"})
    res = run(obj, models={"qwen": model("qwen", phase="Publishing")})
    vol = template(res.obj, "Deployment")["spec"]["volumes"][-1]
    assert vol["csi"]["volumeAttributes"] == {"model": "qwen"}
    env = template(res.obj, "Deployment")["spec"]["containers"][0]["env"][-1]
    assert json.loads(env["value"])[0]["digest"] == ""
    assert res.warnings == ["Model qwen is Publishing: pods wait at the scheduling gate "
                            "modelcache.io/model-ready until it is Ready"]


def test_failed_model_is_admitted_with_a_warning():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen"})
    res = run(obj, models={"qwen": model("qwen", phase="Failed", reason="SourceNotFound")})
    assert res.patch
    assert res.warnings == ["Model qwen is Failed (SourceNotFound): pods wait at the "
                            "scheduling gate modelcache.io/model-ready until it is Ready"]


# -- SharedPVC ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", inject.KINDS)
def test_sharedpvc_injection_field_by_field(kind):
    obj = workload(kind, {c.ANN_MODELS: "qwen", c.ANN_DELIVERY: "SharedPVC"})
    res = run(obj, kind)
    tpl = template(res.obj, kind)
    assert tpl["spec"]["volumes"][-1] == {"name": "modelcache-m-qwen", "persistentVolumeClaim": {
        "claimName": c.pvc_name(D1), "readOnly": True}}
    assert c.pvc_name(D1) == "modelcache-" + "1" * 40
    assert tpl["spec"]["containers"][0]["volumeMounts"][-1] == {
        "name": "modelcache-m-qwen", "mountPath": "/data/modelcache/models/qwen",
        "readOnly": True, "subPath": "1" * 64}
    assert tpl["metadata"]["labels"][c.LABEL_USES_SHARED_PVC] == "true"
    assert tpl["metadata"]["labels"][c.LABEL_GATED] == "true"
    assert res.obj["metadata"]["labels"][c.LABEL_USES_SHARED_PVC] == "true"
    assert {"name": c.GATE} in tpl["spec"]["schedulingGates"]


def test_sharedpvc_needs_a_ready_model():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen", c.ANN_DELIVERY: "SharedPVC"})
    with pytest.raises(InjectError, match="Model qwen is not Ready yet .phase Publishing.: "
                       "SharedPVC delivery needs") as e:
        run(obj, models={"qwen": model("qwen", phase="Publishing")})
    assert e.value.code == 409


def test_mode_precedence_annotation_model_default():
    models = {"a": model("a", mode="SharedPVC"), "b": model("b")}
    obj = workload("Deployment", {c.ANN_MODELS: "a,b"})
    vols = template(run(obj, models=models, default_mode="NodeCache").obj,
                    "Deployment")["spec"]["volumes"]
    assert "persistentVolumeClaim" in vols[1] and "csi" in vols[2]  # model's mode, default
    vols = template(run(obj, models=models, default_mode="SharedPVC").obj,
                    "Deployment")["spec"]["volumes"]
    assert "persistentVolumeClaim" in vols[1] and "persistentVolumeClaim" in vols[2]
    obj = workload("Deployment", {c.ANN_MODELS: "a,b", c.ANN_DELIVERY: "NodeCache"})
    vols = template(run(obj, models=models, default_mode="SharedPVC").obj,
                    "Deployment")["spec"]["volumes"]
    assert "csi" in vols[1] and "csi" in vols[2]
    with pytest.raises(InjectError, match="'Cache' is not one of NodeCache, SharedPVC"):
        run(workload("Deployment", {c.ANN_MODELS: "a", c.ANN_DELIVERY: "Cache"}),
            models=models)


# -- refusals -----------------------------------------------------------------------


def test_unknown_models_are_refused_with_the_namespace():
    with pytest.raises(InjectError, match="^Model nope not found in namespace team-a$") as e:
        run(workload("Deployment", {c.ANN_MODELS: "nope"}))
    assert e.value.code == 404
    with pytest.raises(InjectError, match="^ClusterModel big not found$"):
        run(workload("Deployment", {c.ANN_CLUSTER_MODELS: "big"}))


def test_deleting_model_is_refused():
    m = model("qwen")
    m["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    with pytest.raises(InjectError, match="being deleted"):
        run(workload("Deployment", {c.ANN_MODELS: "qwen"}), models={"qwen": m})


def test_mount_path_taken_by_the_user_is_refused():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen"})
    template(obj, "Deployment")["spec"]["containers"][1]["volumeMounts"] = [
        {"name": "scratch", "mountPath": "/data/modelcache/models/qwen/"}]
    with pytest.raises(InjectError, match="container 'side' already mounts"):
        run(obj)


def test_template_missing_is_refused():
    with pytest.raises(InjectError, match="no pod template at spec.template"):
        run({"kind": "Deployment", "metadata": {"annotations": {c.ANN_MODELS: "qwen"}},
             "spec": {}})


# -- idempotence and removal ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["Deployment", "StatefulSet", "DaemonSet", "CronJob"])
@pytest.mark.parametrize("mode", ["NodeCache", "SharedPVC"])
def test_reapply_is_idempotent_and_removal_restores_the_original(kind, mode):
    original = workload(kind, {c.ANN_MODELS: "qwen", c.ANN_DELIVERY: mode, "team": "a"})
    first = run(original, kind, cached_labels={c.node_label(D1)})
    again = run(first.obj, kind, operation="UPDATE", old=first.obj,
                cached_labels={c.node_label(D1)})
    assert again.patch == [] and again.obj == first.obj
    removed = copy.deepcopy(first.obj)
    del removed["metadata"]["annotations"][c.ANN_MODELS]
    del removed["metadata"]["annotations"][c.ANN_DELIVERY]
    back = run(removed, kind, operation="UPDATE", old=first.obj)
    want = copy.deepcopy(original)
    want["metadata"]["annotations"] = {"team": "a"}
    assert back.obj == want


def test_digest_change_on_update_re_pins():
    obj = workload("StatefulSet", {c.ANN_MODELS: "qwen"})
    first = run(obj, "StatefulSet")
    second = run(first.obj, "StatefulSet", operation="UPDATE",
                 models={"qwen": model("qwen", digest=D2)})
    vol = template(second.obj, "StatefulSet")["spec"]["volumes"][-1]
    assert vol["csi"]["volumeAttributes"]["digest"] == D2
    assert len(template(second.obj, "StatefulSet")["spec"]["volumes"]) == 2
    assert second.obj["metadata"]["annotations"][c.ANN_INJECTED] != \
        first.obj["metadata"]["annotations"][c.ANN_INJECTED]


def test_metadata_only_update_keeps_the_injection_without_lookups():
    """A label, a replica count: no re-resolution, so no rollout to a digest published
    since, and no refusal because a model went away."""
    first = run(workload("Deployment", {c.ANN_MODELS: "qwen"})).obj
    update = copy.deepcopy(first)
    update["metadata"].setdefault("labels", {})["touched"] = "yes"
    update["spec"]["replicas"] = 3
    for models in ({"qwen": model("qwen", digest=D2)}, {}):
        res = run(update, operation="UPDATE", old=first, models=models)
        assert res.patch == [] and res.obj == update


def test_update_without_the_injected_fields_gets_the_old_injection_back():
    """A PUT of the original manifest (no injected fields): the same injection returns,
    without looking the models up."""
    original = workload("Deployment", {c.ANN_MODELS: "qwen", c.ANN_DELIVERY: "SharedPVC"})
    first = run(original).obj
    res = run(copy.deepcopy(original), operation="UPDATE", old=first, models={})
    assert res.obj == first


def test_template_change_re_resolves():
    first = run(workload("Deployment", {c.ANN_MODELS: "qwen"})).obj
    update = copy.deepcopy(first)
    template(update, "Deployment")["spec"]["containers"][0]["image"] = "vllm:2"
    res = run(update, operation="UPDATE", old=first, models={"qwen": model("qwen", digest=D2)})
    vols = template(res.obj, "Deployment")["spec"]["volumes"]
    assert vols[-1]["csi"]["volumeAttributes"]["digest"] == D2 and len(vols) == 2
    with pytest.raises(InjectError, match="Model qwen not found"):
        run(update, operation="UPDATE", old=first, models={})


def test_update_of_a_deleting_workload_passes_through():
    first = run(workload("StatefulSet", {c.ANN_MODELS: "qwen"}), "StatefulSet").obj
    update = copy.deepcopy(first)
    update["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    template(update, "StatefulSet")["spec"]["containers"][0]["image"] = "other"
    assert run(update, "StatefulSet", operation="UPDATE", old=first, models={}).patch == []


def test_unannotated_objects_pass_through():
    obj = workload("Deployment", {})
    assert run(obj).patch == []
    assert run(workload("Pod", {}), "Pod").patch == []


# -- pods ---------------------------------------------------------------------------


def test_pod_update_passes_through():
    obj = workload("Pod", {c.ANN_MODELS: "qwen"})
    assert run(obj, "Pod", operation="UPDATE").patch == []


def test_pod_made_from_an_injected_template_passes_through():
    dep = run(workload("Deployment", {c.ANN_MODELS: "qwen"})).obj
    tpl = template(dep, "Deployment")
    pod = {"kind": "Pod", "metadata": {**copy.deepcopy(tpl["metadata"]), "name": "w-1",
                                       "ownerReferences": [{"kind": "ReplicaSet", "name": "w"}]},
           "spec": copy.deepcopy(tpl["spec"])}
    assert run(pod, "Pod").patch == []  # no model annotation on the pod
    pod["metadata"]["annotations"][c.ANN_MODELS] = "qwen"  # put on the template by the user
    assert run(pod, "Pod").patch == []


def test_bare_pod_bound_to_a_node_is_not_gated():
    obj = workload("Pod", {c.ANN_MODELS: "qwen"})
    obj["spec"]["nodeName"] = "n1"
    res = run(obj, "Pod")
    assert {"name": c.GATE} not in res.obj["spec"]["schedulingGates"]
    assert c.LABEL_GATED not in res.obj["metadata"]["labels"]
    assert "spec.nodeName is set" in res.warnings[0]


def test_job_update_passes_through_and_warns_when_models_change():
    job = run(workload("Job", {c.ANN_MODELS: "qwen"}), "Job").obj
    same = run(job, "Job", operation="UPDATE", old=job)
    assert same.patch == [] and same.warnings == []
    changed = copy.deepcopy(job)
    changed["metadata"]["annotations"][c.ANN_MODELS] = "qwen,other"
    res = run(changed, "Job", operation="UPDATE", old=job)
    assert res.patch == [] and "apply only to new Jobs" in res.warnings[0]


# -- cache-aware scheduling ----------------------------------------------------------


def test_preferred_affinity_is_merged_when_a_node_caches_the_digest():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen,emb"})
    models = {"qwen": model("qwen"), "emb": model("emb", digest=D2)}
    res = run(obj, models=models, cached_labels={c.node_label(D1)})
    aff = template(res.obj, "Deployment")["spec"]["affinity"]["nodeAffinity"]
    assert aff["requiredDuringSchedulingIgnoredDuringExecution"] == \
        pod_spec()["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert aff["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 10, "preference": {"matchExpressions": [
            {"key": "zone", "operator": "In", "values": ["a"]}]}},
        {"weight": 50, "preference": {"matchExpressions": [
            {"key": c.node_label(D1), "operator": "Exists"}]}}]
    assert c.node_label(D1) == "nodecache.modelcache.io/sha256-" + "1" * 40
    # a re-apply after the node lost the model keeps the term: no flip, no rollout
    again = run(res.obj, operation="UPDATE", models=models, cached_labels=set())
    assert again.patch == []


def test_affinity_added_to_a_template_without_any():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen"})
    del template(obj, "Deployment")["spec"]["affinity"]
    res = run(obj, cached_labels={c.node_label(D1)})
    assert template(res.obj, "Deployment")["spec"]["affinity"] == {"nodeAffinity": {
        "preferredDuringSchedulingIgnoredDuringExecution": [podspec.preferred_term(
            c.node_label(D1))]}}
    stripped = copy.deepcopy(res.obj)
    del stripped["metadata"]["annotations"][c.ANN_MODELS]
    assert "affinity" not in template(run(stripped, operation="UPDATE").obj,
                                      "Deployment")["spec"]


def test_sharedpvc_gets_no_node_affinity():
    obj = workload("Deployment", {c.ANN_MODELS: "qwen", c.ANN_DELIVERY: "SharedPVC"})
    res = run(obj, cached_labels={c.node_label(D1)})
    assert template(res.obj, "Deployment")["spec"]["affinity"] == pod_spec()["affinity"]


def test_json_patch_escapes_keys():
    ops = inject.json_patch({"a": {}}, {"a": {"x/y~z": 1}})
    assert ops == [{"op": "add", "path": "/a/x~1y~0z", "value": 1}]


# -- sharing: ``<namespace>/<name>`` (api/sharing.py) -------------------------------------


def test_parse_refs_takes_an_owner_namespace():
    refs = inject.parse_refs({c.ANN_MODELS: "qwen, team-b/qwen ,team-b/qwen"})
    assert refs == [Ref("Model", "qwen"), Ref("Model", "qwen", "team-b")]
    assert [r.directory for r in refs] == ["qwen", "team-b.qwen"]
    assert [r.shown for r in refs] == ["qwen", "team-b/qwen"]


@pytest.mark.parametrize("annotations,needle", [
    ({c.ANN_CLUSTER_MODELS: "team-b/llama"}, "a ClusterModel has no namespace"),
    ({c.ANN_MODELS: "/qwen"}, "'' is not a namespace name"),
    ({c.ANN_MODELS: "team-b/"}, "not a valid Model name"),
    ({c.ANN_MODELS: "n" * 64 + "/qwen"}, "is not a namespace name"),
    # the shared one's directory is the own one's name: refused, not silently overlaid
    ({c.ANN_MODELS: "team-b/qwen,team-b.qwen"}, "Model team-b/qwen and Model team-b.qwen "
                                                "would both mount at"),
])
def test_parse_refs_refuses_bad_shared_refs(annotations, needle):
    with pytest.raises(InjectError, match=needle) as e:
        inject.parse_refs(annotations)
    assert e.value.code == 400


def shared_lookup(models: dict[tuple[str, str], dict[str, Any]]) -> inject.Lookup:
    """As the webhook binds it: ``(owner, name)``; absent = not found or not shared."""
    def look(ref: Ref) -> dict[str, Any] | None:
        return models.get((ref.namespace or NS, ref.name))
    return look


def test_a_shared_model_mounts_beside_the_own_one():
    own, theirs = model("qwen"), model("qwen", digest=D2, namespace="team-b")
    obj = workload("Deployment", {c.ANN_MODELS: "qwen,team-b/qwen"})
    res = inject.mutate("Deployment", obj, operation="CREATE", namespace=NS,
                        lookup=shared_lookup({(NS, "qwen"): own, ("team-b", "qwen"): theirs}))
    spec = template(res.obj, "Deployment")["spec"]
    ours = [v for v in spec["volumes"] if v["name"].startswith(c.VOLUME_PREFIX)]
    assert [v["csi"]["volumeAttributes"] for v in ours] == [
        {c.ATTR_MODEL: "qwen", c.ATTR_DIGEST: D1},
        {c.ATTR_MODEL: "qwen", c.ATTR_MODEL_NAMESPACE: "team-b", c.ATTR_DIGEST: D2}]
    paths = [m["mountPath"] for m in spec["containers"][0]["volumeMounts"]]
    assert paths[-2:] == [f"{c.MOUNT_ROOT}/qwen", f"{c.MOUNT_ROOT}/team-b.qwen"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    assert [(m["name"], m["path"]) for m in json.loads(env[c.ENV_MODELS])] == [
        ("qwen", f"{c.MOUNT_ROOT}/qwen"), ("team-b/qwen", f"{c.MOUNT_ROOT}/team-b.qwen")]
    assert len({v["name"] for v in ours}) == 2


def test_a_model_not_shared_is_refused_with_one_message_for_absent_and_ungranted():
    obj = workload("Deployment", {c.ANN_MODELS: "team-b/qwen"})
    with pytest.raises(InjectError) as e:
        inject.mutate("Deployment", obj, operation="CREATE", namespace=NS,
                      lookup=shared_lookup({}))
    assert e.value.code == 403
    assert str(e.value) == ("Model team-b/qwen does not exist or is not shared with namespace "
                            "team-a (its owner grants it in the Model's spec.sharing)")


def test_own_namespace_written_out_is_the_own_model():
    obj = workload("Deployment", {c.ANN_MODELS: f"{NS}/qwen,qwen"})
    res = inject.mutate("Deployment", obj, operation="CREATE", namespace=NS,
                        lookup=shared_lookup({(NS, "qwen"): model("qwen")}))
    [p] = res.planned
    assert p.model.ref == Ref("Model", "qwen") and p.path == f"{c.MOUNT_ROOT}/qwen"
