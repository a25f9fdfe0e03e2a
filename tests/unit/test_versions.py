"""Versions, pins and rollback: the pure parts (controller/models/history.py, ModelView,
the webhook's ``name@sha256:…`` pin). The controller glue against the real API server
and registry: tests/integration/test_model_versions.py."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from api import inject
from api import names as c
from api.inject import InjectError
from api.model import ModelView
from controller.models import history
from csi.errors import CsiError
from csi.resolvers import kube as csikube

NS = "team-a"
D1, D2, D3, D4 = ("sha256:" + ch * 64 for ch in "1234")
OTHER = "sha256:" + "f" * 64


def entry(gen: int, digest: str) -> dict[str, Any]:
    return history.entry(gen, {"digest": digest, "resolvedRevision": f"rev{gen}",
                               "sizeBytes": 10 * gen, "reference": f"r/x:gen-{gen}"},
                         f"2026-01-0{gen}T00:00:00Z")


def model(*, digests: tuple[str, ...] = (D3, D2, D1), pin: str = "",
          phase: str = "Ready") -> dict[str, Any]:
    ann = {c.PIN: pin} if pin else {}
    hist = [entry(len(digests) - i, d) for i, d in enumerate(digests)]
    return {"kind": "Model", "metadata": {"name": "qwen", "namespace": NS, "annotations": ann},
            "spec": {}, "status": {"phase": phase, "artifact": {"digest": digests[0]},
                                   "history": hist,
                                   "resolved": {"family": "qwen2", "format": "Safetensors"}}}


# -- the history ----------------------------------------------------------------------


def test_record_puts_newest_first_and_moves_a_republished_digest_up():
    h = history.record([], entry(1, D1))
    h = history.record(h, entry(2, D2))
    h = history.record(h, entry(3, D1))  # the same files published again
    assert [(x["generation"], x["digest"]) for x in h] == [(3, D1), (2, D2)]
    assert h[0] == {"generation": 3, "digest": D1, "revision": "rev3",
                    "publishedAt": "2026-01-03T00:00:00Z", "sizeBytes": 30,
                    "reference": "r/x:gen-3"}
    assert history.record(h, dict(entry(3, D1), publishedAt="later")) == h  # applied twice


def test_plan_keeps_newest_and_held_and_collects_the_rest():
    hist = [entry(4, D4), entry(3, D3), entry(2, D2), entry(1, D1)]
    p = history.plan(hist, 2, held={D1})
    assert [x["digest"] for x in p.keep] == [D4, D3, D1]
    assert p.collect == [D2] and p.held == [D1]
    assert history.plan(hist, 0, set()).collect == [D3, D2, D1]  # keep is at least 1
    assert history.plan(hist, 500, set()).collect == []


def csi_volume(name: str, attrs: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "csi": {"driver": c.CSI_DRIVER, "volumeAttributes": attrs}}


def pod(phase: str, volumes: list[dict[str, Any]], sub: str = "") -> dict[str, Any]:
    mounts = [{"name": v["name"], "mountPath": "/m", **({"subPath": sub} if sub else {})}
              for v in volumes]
    return {"metadata": {"name": "p", "namespace": NS},
            "spec": {"volumes": volumes, "containers": [{"name": "a", "volumeMounts": mounts}]},
            "status": {"phase": phase}}


def test_mounts_reads_pinned_digests_pvcs_and_unpinned_models_of_live_pods_only():
    pods = [
        pod("Running", [csi_volume("modelcache-m-qwen", {c.ATTR_MODEL: "qwen",
                                                          c.ATTR_DIGEST: D1})]),
        pod("Pending", [csi_volume("modelcache-c-big", {c.ATTR_CLUSTER_MODEL: "big"})]),
        pod("Running", [{"name": "modelcache-m-x", "persistentVolumeClaim": {
            "claimName": c.pvc_name(D2)}}], sub=c.pvc_subpath(D2)),
        pod("Succeeded", [csi_volume("modelcache-m-qwen", {c.ATTR_MODEL: "qwen",
                                                            c.ATTR_DIGEST: D3})]),
        pod("Running", [csi_volume("user-volume", {c.ATTR_MODEL: "qwen",
                                                    c.ATTR_DIGEST: D4})]),  # not injected
    ]
    m = history.mounts(pods)
    assert m.digests == {D1, D2}
    assert m.unpinned == {("ClusterModel", "", "big")}


# -- the owner's pin ------------------------------------------------------------------


def test_pin_to_a_generation_changes_the_servable_digest_and_says_so():
    view = ModelView.of(model(pin=D1))
    assert view.digest == D3 and view.pinned == D1 and view.servable_digest == D1
    cond = history.pin_condition(view)
    assert cond is not None and cond["status"] == "True" and cond["reason"] == "Pinned"
    assert "generation 1" in cond["message"] and D1 in cond["message"]


def test_pin_to_a_foreign_digest_is_ignored_with_pin_not_found():
    view = ModelView.of(model(pin=OTHER))
    assert view.pinned == "" and view.servable_digest == D3
    cond = history.pin_condition(view)
    assert cond is not None and cond["reason"] == history.PIN_NOT_FOUND


def test_no_pin_writes_no_condition_until_one_was_set():
    assert history.pin_condition(ModelView.of(model())) is None
    was = model()
    was["status"]["conditions"] = [{"type": "Pinned", "status": "True", "reason": "Pinned"}]
    cond = history.pin_condition(ModelView.of(was))
    assert cond is not None and cond["reason"] == history.NOT_PINNED


# -- the workload's pin (the webhook) ---------------------------------------------------


def test_parse_refs_reads_a_pin_and_refuses_a_malformed_one():
    refs = inject.parse_refs({c.ANN_MODELS: f"qwen@{D1}, other"})
    assert [(r.name, r.pin) for r in refs] == [("qwen", D1), ("other", "")]
    with pytest.raises(InjectError, match="sha256"):
        inject.parse_refs({c.ANN_MODELS: "qwen@sha256:abc"})


def test_parse_refs_keeps_a_shared_models_pin():
    (ref,) = inject.parse_refs({c.ANN_MODELS: f"team-b/qwen@{D2}"})
    assert (ref.namespace, ref.name, ref.pin) == ("team-b", "qwen", D2)


def deployment(models: str) -> dict[str, Any]:
    return {"kind": "Deployment", "metadata": {"name": "w", "namespace": NS,
                                               "annotations": {c.ANN_MODELS: models}},
            "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x"}]}}}}


def mutate(models: str, obj: dict[str, Any]) -> inject.Result:
    return inject.mutate("Deployment", deployment(models), operation="CREATE", namespace=NS,
                         lookup=lambda ref: obj if ref.name == "qwen" else None)


def test_webhook_injects_a_pinned_generation():
    res = mutate(f"qwen@{D1}", model())
    vol = res.obj["spec"]["template"]["spec"]["volumes"][0]
    assert vol["csi"]["volumeAttributes"][c.ATTR_DIGEST] == D1


def test_webhook_injects_the_owners_pin_when_the_workload_names_none():
    res = mutate("qwen", model(pin=D2))
    vol = res.obj["spec"]["template"]["spec"]["volumes"][0]
    assert vol["csi"]["volumeAttributes"][c.ATTR_DIGEST] == D2


def test_webhook_refuses_a_digest_that_is_not_one_of_the_models_generations():
    with pytest.raises(InjectError, match="not one of the model's published generations") as e:
        mutate(f"qwen@{OTHER}", model())
    assert e.value.code == 403


# -- the node resolver's copy ----------------------------------------------------------


def test_csi_trim_keeps_the_pin_and_the_generations():
    entry_ = csikube.model_entry(csikube.trim(dict(model(pin=D1), status=dict(
        model(pin=D1)["status"], artifact={"digest": D3, "reference": "r.local/m/x:gen-3"}))))
    assert entry_.digest == D1 and set(entry_.generations) == {D1, D2, D3}


# -- the collection's decisions (a recording host: the real API server and registry are
# tests/integration/test_model_versions.py's) -----------------------------------------


class Host:
    def __init__(self, pods: list[dict[str, Any]], keep: int = 2) -> None:
        self.pods, self.deleted, self.patches = pods, [], []
        self.events: list[tuple[str, str]] = []
        self.settings = type("S", (), {"history_keep": keep})()
        self.client = type("C", (), {"list": lambda _, res, ns, **kw: (self.pods, "1")})()
        self.recorder = type("R", (), {
            "record": lambda _, obj, typ, reason, msg: self.events.append((typ, reason))})()
        self.registry = lambda: type("Reg", (), {
            "delete_manifest": lambda _, repo, d: self.deleted.append((repo, d))})()

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]:
        self.patches.append(patch)
        return obj


def test_ensure_collects_unheld_generations_and_retries_while_a_pod_holds_one():
    four = model(digests=(D4, D3, D2, D1))
    held = pod("Running", [csi_volume("modelcache-m-qwen", {c.ATTR_MODEL: "qwen",
                                                             c.ATTR_DIGEST: D1})])
    host = Host([held])
    _, wait = history.ensure(host, four)  # type: ignore[arg-type]
    assert host.deleted == [(f"models/{NS}/qwen", D2)]
    assert [h["digest"] for h in host.patches[-1]["history"]] == [D4, D3, D1]
    assert wait == history.RETRY and ("Normal", "GenerationsCollected") in host.events


def test_ensure_deletes_nothing_while_a_pod_mounts_the_model_without_a_digest():
    unpinned = pod("Running", [csi_volume("modelcache-m-qwen", {c.ATTR_MODEL: "qwen"})])
    host = Host([unpinned])
    _, wait = history.ensure(host, model(digests=(D4, D3, D2, D1)))  # type: ignore[arg-type]
    assert host.deleted == [] and host.patches == [] and wait == history.RETRY


def test_ensure_never_collects_the_pinned_generation_and_warns_on_a_foreign_pin():
    host = Host([], keep=1)
    _, wait = history.ensure(host, model(pin=D1))  # type: ignore[arg-type]
    assert host.deleted == [(f"models/{NS}/qwen", D2)] and wait == history.RETRY
    host = Host([], keep=5)
    history.ensure(host, model(pin=OTHER))  # type: ignore[arg-type]
    assert ("Warning", history.PIN_NOT_FOUND) in host.events and host.deleted == []
    assert history.clamp(500) == history.MAX_KEEP == 50


def test_csi_refuses_a_pin_outside_the_history_before_asking_the_registry():
    asked: list[Any] = []
    r = csikube.KubeResolver.__new__(csikube.KubeResolver)  # no informers: one check only
    r._confirmed, r.verified = set(), None
    r.client_for = lambda host: type("Reg", (), {  # type: ignore[method-assign]
        "get_manifest": lambda _, ref: asked.append(ref)})()
    obj = model()
    obj["status"]["artifact"]["reference"] = "r.local/models/team-a/qwen:gen-3"
    entry_ = csikube.model_entry(csikube.trim(obj))
    with pytest.raises(CsiError) as e:
        r._confirm_pinned(entry_.reference(OTHER), entry_)
    assert e.value.code == grpc.StatusCode.NOT_FOUND and asked == []
    r._confirm_pinned(entry_.reference(D1), entry_)  # a generation: the registry confirms
    assert [str(x.digest) for x in asked] == [D1]
