"""The gate lifter: lets a gated pod schedule once every model it mounts is usable.

Where it sits: the webhook (webhook.py, inject.py) adds the scheduling gate
``GATE`` and the label ``LABEL_GATED=true`` to pods; the manager watches only
pods with that label (a label-selected informer, cached through
``pod_transform`` as the few fields needed here). A pod is re-checked when it
changes, when a Model or ClusterModel it mounts changes phase or digest, and
when a SharedPVC it mounts changes. It runs in the leader only.

A pod is ready to go when:
* each NodeCache volume's Model/ClusterModel has a servable artifact
  (``ModelView.servable_digest``: Ready, or still serving its last published
  artifact while a newer one publishes or after it failed; the node plugin
  pulls it on publish), and
* each SharedPVC volume's claim carries ``ANN_PVC_MATERIALIZED`` equal to
  the digest the pod mounts (the SharedPVC reconciler sets it when the
  materializer Job has filled the volume).

Then one JSON patch, conditional on the resourceVersion, removes our gate
(other gates stay), sets the label to ``false`` (the pod leaves the watch)
and, for NodeCache models that some node already caches, merges a
*preferred* node affinity term (the API server allows changing preferred
node affinity while a pod is gated). A missing model, or a Failed one with
nothing to serve, keeps the gate and gets one Warning event on the pod per
(model, reason). A shared Model (another namespace's, ``api/sharing.py``) is
re-checked here: its grant revoked while a pod waits keeps the gate, with a
``ModelNotShared`` Warning.

At scale (bench/scale: 200 Models, 10,000 gated pods) a Model turning Ready
must free its pods within a second or two: the pods are indexed by what they
wait for (``_waiting``), so a Model event queues exactly its own pods without
scanning the others, and ``workers`` lifts are in flight at once (each a
blocking PATCH on the client's keep-alive pool, which must hold that many
connections besides the watches: ``controller/app.py`` sizes it).
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
import time
from collections.abc import Hashable
from typing import Any

from api import names as c
from api import podspec, sharing
from api.model import ModelView
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from kube.namespaces import NamespaceLabels
from kube.workqueue import WorkerPool, WorkQueue

log = logging.getLogger(__name__)

Obj = dict[str, Any]
PodKey = tuple[str, str]  # (namespace, name)
Need = tuple[str, str, str]  # (Model|ClusterModel|PVC, namespace or "" for ClusterModel, name)
_AFFINITY = "preferredDuringSchedulingIgnoredDuringExecution"


# -- what the caches keep ------------------------------------------------------------


def requirements(pod: Obj) -> list[Obj]:
    """What a pod's injected volumes need: ``{kind: Model|ClusterModel, name, digest}``
    (digest "" when not pinned) or ``{kind: PVC, name: claim, digest}``."""
    spec = pod.get("spec") or {}
    sub_paths = {m.get("name"): m.get("subPath") or ""
                 for lst in ("initContainers", "containers") for ctr in spec.get(lst) or []
                 for m in ctr.get("volumeMounts") or []}
    out: list[Obj] = []
    for v in spec.get("volumes") or []:
        if not podspec.is_injected_volume(v):
            continue
        if "csi" in v:
            attrs = v["csi"].get("volumeAttributes") or {}
            kind = "Model" if attrs.get(c.ATTR_MODEL) else "ClusterModel"
            out.append({"kind": kind,
                        "name": attrs.get(c.ATTR_MODEL) or attrs.get(c.ATTR_CLUSTER_MODEL) or "",
                        "digest": attrs.get(c.ATTR_DIGEST) or "",
                        # a shared Model's owner namespace; "" = the pod's own
                        "namespace": attrs.get(c.ATTR_MODEL_NAMESPACE) or ""})
        else:
            sub = sub_paths.get(v["name"], "")
            out.append({"kind": "PVC", "name": v["persistentVolumeClaim"]["claimName"],
                        "digest": f"sha256:{sub}" if sub else ""})
    return out


def pod_transform(obj: Obj) -> Obj:
    """A gated pod as identity, gates, affinity and what it needs: a few hundred bytes."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid", "resourceVersion",
                                                  "labels", "deletionTimestamp",
                                                  "creationTimestamp")},
            "spec": {"schedulingGates": spec.get("schedulingGates") or [],
                     "affinity": spec.get("affinity")},
            "requires": requirements(obj)}


def oldest_held_seconds(pods: list[Obj], now: float) -> float:
    """How long the oldest of these gated pods has existed (0 when none): the
    ``modelcache_scheduling_gate_oldest_seconds`` gauge, which the GatesStuck alert reads."""
    ages = [now - _timestamp(str(p["metadata"]["creationTimestamp"])) for p in pods
            if (p.get("metadata") or {}).get("creationTimestamp")]
    return max([0.0, *ages])


def _timestamp(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def node_transform(obj: Obj) -> Obj:
    """A node as its name and its cache labels: thousands of nodes in little memory."""
    meta = obj.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "resourceVersion": meta.get("resourceVersion"),
                         "labels": {k: v for k, v in (meta.get("labels") or {}).items()
                                    if k.startswith(c.NODE_LABEL_PREFIX)}}}


class NodeIndex:
    """Which ``node_label(digest)`` labels some node carries; ``label in index``.

    Fed by the node informer's handler; a count per label, so a lookup during
    admission is one dict access however many nodes there are."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_node: dict[str, frozenset[str]] = {}
        self._count: collections.Counter[str] = collections.Counter()

    def handle(self, event: str, obj: Obj, old: Obj | None) -> None:
        name = str(obj["metadata"]["name"])
        labels = frozenset() if event == "DELETED" else frozenset(
            k for k, v in (obj["metadata"].get("labels") or {}).items()
            if k.startswith(c.NODE_LABEL_PREFIX) and v != "false")
        with self._lock:
            before = self._by_node.pop(name, frozenset())
            self._count.subtract(before)
            self._count.update(labels)
            if labels:
                self._by_node[name] = labels
            for k in before - labels:
                if self._count[k] <= 0:
                    del self._count[k]

    def __contains__(self, label: object) -> bool:
        with self._lock:
            return self._count.get(str(label), 0) > 0


# -- the lifter ------------------------------------------------------------------------


def needs(pod: Obj) -> frozenset[Need]:
    """The objects whose change may free ``pod``: the keys of the lifter's index."""
    ns = pod["metadata"].get("namespace") or ""
    return frozenset((r["kind"], "" if r["kind"] == "ClusterModel"
                      else r.get("namespace") or ns, r["name"])
                     for r in pod["requires"])


class GateLifter:
    def __init__(self, client: kube.Kube, *, pods: Informer, models: Informer,
                 cluster_models: Informer, pvcs: Informer | None, nodes: NodeIndex,
                 recorder: Recorder, metrics: Any = None, workers: int = 16) -> None:
        self.client = client
        self.pods = pods
        self.models = models
        self.cluster_models = cluster_models
        self.pvcs = pvcs
        self.nodes = nodes
        self.recorder = recorder
        self.metrics = metrics
        self.workers = workers
        self.queue = WorkQueue(name="gates")
        self._told: dict[str, set[tuple[str, str]]] = {}  # pod uid -> (what, reason) told
        self.namespace_labels = NamespaceLabels(client)  # for spec.sharing.namespaceSelector
        # gated pods by what they wait for, and back: fed by the pod informer's thread,
        # read by the Model/ClusterModel/PVC informers' threads
        self._index_lock = threading.Lock()
        self._waiting: dict[Need, set[PodKey]] = {}
        self._needs_of: dict[PodKey, frozenset[Need]] = {}
        self._pool = WorkerPool(self.queue, self._handle, workers=self.workers, name="gates")
        pods.handlers.append(self._on_pod)
        models.handlers.append(self._on_model("Model"))
        cluster_models.handlers.append(self._on_model("ClusterModel"))
        if pvcs is not None:
            pvcs.handlers.append(self._on_pvc)

    # -- triggers ---------------------------------------------------------------

    def _on_pod(self, event: str, obj: Obj, old: Obj | None) -> None:
        meta = obj["metadata"]
        key = (meta.get("namespace") or "", meta["name"])
        if event == "DELETED":
            self._told.pop(str(meta.get("uid")), None)
            self._index(key, frozenset())
            return
        self._index(key, needs(obj))
        self.queue.add(key)

    def _index(self, key: PodKey, now: frozenset[Need]) -> None:
        with self._index_lock:
            before = self._needs_of.pop(key, frozenset())
            for need in before - now:
                keys = self._waiting.get(need)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del self._waiting[need]
            for need in now - before:
                self._waiting.setdefault(need, set()).add(key)
            if now:
                self._needs_of[key] = now

    def waiting_for(self, need: Need) -> list[PodKey]:
        """The gated pods that mount ``need`` (from the index, no scan)."""
        with self._index_lock:
            return list(self._waiting.get(need, ()))

    def _requeue(self, need: Need) -> None:
        for key in self.waiting_for(need):
            self.queue.add(key)

    def _on_model(self, kind: str) -> Any:
        def handler(event: str, obj: Obj, old: Obj | None) -> None:
            def state(o: Obj | None) -> tuple[str, str, str]:
                view = ModelView.of(o)  # a grant given or revoked counts too
                return (view.phase, view.servable_digest, repr(view.spec.get("sharing")))
            # the same resourceVersion: ``old`` is our own write, put in the cache by
            # ``Informer.observe`` (no handler saw it), so this event is the change itself
            same_rv = old is not None and old["metadata"].get("resourceVersion") == \
                obj["metadata"].get("resourceVersion")
            if old is not None and event == "MODIFIED" and state(old) == state(obj) \
                    and not same_rv:
                return  # progress writes, every second while publishing: nothing for us
            ns = "" if kind == "ClusterModel" else obj["metadata"].get("namespace") or ""
            self._requeue((kind, ns, obj["metadata"]["name"]))
        return handler

    def _on_pvc(self, event: str, obj: Obj, old: Obj | None) -> None:
        self._requeue(("PVC", obj["metadata"].get("namespace") or "", obj["metadata"]["name"]))

    # -- one pass ---------------------------------------------------------------

    def _model(self, kind: str, ns: str, name: str) -> Obj | None:
        if kind == "Model":
            return self.models.get((ns, name))
        return self.cluster_models.get(("", name))

    def blockers(self, pod: Obj) -> list[tuple[str, str, str]]:
        """What keeps ``pod`` gated: ``(what, reason, message)``; reason "" = just waiting."""
        ns = pod["metadata"].get("namespace") or ""
        out: list[tuple[str, str, str]] = []
        for r in pod["requires"]:
            owner = r.get("namespace") or ns  # a shared Model's, else the pod's
            what = f"{r['kind']} {owner}/{r['name']}" if owner != ns else \
                f"{r['kind']} {r['name']}"
            if r["kind"] == "PVC":
                pvc = self.pvcs.get((ns, r["name"])) if self.pvcs is not None else None
                ann = ((pvc or {}).get("metadata") or {}).get("annotations") or {}
                if not r["digest"] or ann.get(c.ANN_PVC_MATERIALIZED) != r["digest"]:
                    out.append((what, "", f"waiting for {what} to be materialized"))
                continue
            m = self._model(r["kind"], owner, r["name"])
            if owner != ns and (m is None or not sharing.granted(m, ns, self.namespace_labels)):
                out.append((what, "ModelNotShared", sharing.refusal(owner, r["name"], ns) +
                            f": the pod stays gated ({c.GATE})"))
                continue
            if m is None:
                where = f" in namespace {ns}" if r["kind"] == "Model" else ""
                out.append((what, "ModelNotFound", f"{what} not found{where}: the pod stays "
                            f"gated ({c.GATE}) until it exists and is Ready"))
                continue
            view = ModelView.of(m)
            if view.servable_digest:  # Ready, or serving its last artifact meanwhile
                continue
            phase = view.phase or "Pending"
            if phase == "Failed":
                cond = view.condition("Ready") or {}
                out.append((what, "ModelFailed",
                            f"{what} is Failed ({cond.get('reason') or 'no reason'}: "
                            f"{(cond.get('message') or '')[:300]}): the pod stays gated "
                            f"({c.GATE}) until it is Ready"))
            else:
                out.append((what, "", f"waiting for {what} ({phase})"))
        return out

    def sync(self, key: tuple[str, str]) -> None:
        """Look at one pod; lift its gate if nothing blocks it. Raises ``kube.ApiError``."""
        pod = self.pods.get(key)
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return
        gates = pod["spec"]["schedulingGates"]
        if not any(g.get("name") == c.GATE for g in gates):
            # someone else removed it: stop watching the pod
            self._patch(pod, [{"op": "add", "path": "/metadata/labels/" + _esc(c.LABEL_GATED),
                               "value": "false"}])
            return
        blocked = self.blockers(pod)
        if blocked:
            uid = str(pod["metadata"].get("uid"))
            told = self._told.setdefault(uid, set())
            for what, reason, message in blocked:
                if reason and (what, reason) not in told:
                    told.add((what, reason))
                    self.recorder.record(pod, "Warning", reason, message)
            return
        self.lift(pod)

    def lift(self, pod: Obj) -> None:
        ops = lift_ops(pod)
        affinity = self._affinity_ops(pod)
        try:
            self._patch(pod, ops + affinity)
        except kube.ApiError as e:
            if not affinity or e.status != 422:
                raise
            # an API server that refuses the affinity edit: lifting matters more
            log.info("affinity not accepted on a gated pod; lifting without",
                     extra={"pod": _name(pod), "error": str(e)[:200]})
            self._patch(pod, ops)
        self._told.pop(str(pod["metadata"].get("uid")), None)
        if self.metrics is not None:
            self.metrics.gates_lifted.inc()
        log.info("scheduling gate lifted", extra={"pod": _name(pod),
                                                  "affinity": bool(affinity)})

    def _affinity_ops(self, pod: Obj) -> list[Obj]:
        ns = pod["metadata"].get("namespace") or ""
        labels: list[str] = []
        for r in pod["requires"]:
            if r["kind"] == "PVC":
                continue
            digest = r["digest"] or ModelView.of(
                self._model(r["kind"], r.get("namespace") or ns, r["name"])).servable_digest
            if digest and c.node_label(digest) in self.nodes:
                labels.append(c.node_label(digest))
        return affinity_ops(pod, labels)

    def _patch(self, pod: Obj, ops: list[Obj]) -> None:
        meta = pod["metadata"]
        # the answer is not put in the cache: every patch here sets the label to "false",
        # so the watch drops the pod (a DELETED event) and it must stay dropped
        self.client.patch(kube.PODS, meta["name"], conditional(pod, ops), meta["namespace"],
                          content_type=kube.JSON_PATCH)

    # -- workers ----------------------------------------------------------------

    def start(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop(5)

    def _handle(self, key: Hashable) -> None:
        t0 = time.monotonic()
        try:
            self.sync(key)  # type: ignore[arg-type]
            self.queue.forget(key)
        except kube.NotFound:
            self.queue.forget(key)
        except Exception as e:
            delay = self.queue.add_rate_limited(key)
            log.info("gate not lifted; will retry", exc_info=not isinstance(e, kube.ApiError),
                     extra={"pod": "/".join(key), "error": str(e)[:300],  # type: ignore
                            "retryIn": round(delay, 3)})
        finally:
            log.debug("gate pass", extra={"pod": "/".join(key),  # type: ignore[arg-type]
                                          "seconds": round(time.monotonic() - t0, 4)})

def lift_ops(pod: Obj) -> list[Obj]:
    """The JSON patch ops that lift our gate from ``pod`` (others' gates stay) and mark
    it no longer gated (the label the lifter's watch selects on)."""
    rest = [g for g in pod["spec"]["schedulingGates"] if g.get("name") != c.GATE]
    return [{"op": "replace", "path": "/spec/schedulingGates", "value": rest} if rest
            else {"op": "remove", "path": "/spec/schedulingGates"},
            {"op": "add", "path": "/metadata/labels/" + _esc(c.LABEL_GATED), "value": "false"}]


def affinity_ops(pod: Obj, labels: list[str]) -> list[Obj]:
    """Ops adding a preferred node-affinity term for each node label in ``labels`` that
    ``pod`` does not prefer yet, wherever its affinity already stops."""
    spec = {"affinity": pod["spec"].get("affinity")} if pod["spec"].get("affinity") else {}
    have = podspec.affinity_labels(spec)
    terms = [podspec.preferred_term(lb) for lb in dict.fromkeys(labels) if lb not in have]
    if not terms:
        return []
    aff = spec.get("affinity") or {}
    node = aff.get("nodeAffinity")
    if not aff:
        return [{"op": "add", "path": "/spec/affinity",
                 "value": {"nodeAffinity": {_AFFINITY: terms}}}]
    if not node:
        return [{"op": "add", "path": "/spec/affinity/nodeAffinity",
                 "value": {_AFFINITY: terms}}]
    if not node.get(_AFFINITY):
        return [{"op": "add", "path": f"/spec/affinity/nodeAffinity/{_AFFINITY}",
                 "value": terms}]
    return [{"op": "add", "path": f"/spec/affinity/nodeAffinity/{_AFFINITY}/-", "value": t}
            for t in terms]


def conditional(pod: Obj, ops: list[Obj]) -> list[Obj]:
    """``ops`` applied only if ``pod`` is still the version we looked at: a pod changed
    meanwhile gets 422 and is looked at again."""
    return [{"op": "test", "path": "/metadata/resourceVersion",
             "value": pod["metadata"]["resourceVersion"]}, *ops]


def _esc(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _name(pod: Obj) -> str:
    return f"{pod['metadata'].get('namespace')}/{pod['metadata'].get('name')}"
