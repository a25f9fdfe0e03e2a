"""SharedPVC delivery: one RWX PVC per (namespace, digest), filled once, collected when unused.

Where it sits: the admission webhook (``inject.py``) has already given a
workload's pod template a read-only ``persistentVolumeClaim`` volume named
``contract.pvc_name(digest)`` (``subPath`` = ``contract.pvc_subpath``) and
the label ``LABEL_USES_SHARED_PVC=true``; the gate lifter holds its pods
until the PVC carries ``ANN_PVC_MATERIALIZED=<digest>``. This reconciler
makes that annotation come true, and takes the PVC away once nothing uses it.

Its state is the cluster's: informers over the six workload kinds (only
those labelled), over our PVCs and our materializer Jobs (``LABEL_PVC``).
The work queue's key is ``(namespace, claimName)``. One pass:

* in use (some workload's pod spec names the claim): ensure the PVC
  (ReadWriteMany, storage class from the model's
  ``spec.delivery.sharedPVC.storageClassName`` or ``--shared-pvc-storage-class``,
  else the cluster default; size = artifact + 10 % + 1 GiB, see ``pvc_size``);
  once it is materialized, nothing else. Else ensure the one materializer
  Job (``materializer.py``: absent → create; Complete → annotate the PVC
  ``ANN_PVC_MATERIALIZED``; Failed → a Warning Event on the PVC, then, after
  a backoff that doubles per failure, delete the Job and make it again).
* not in use: stamp ``unused-since`` on the PVC; ``--shared-pvc-grace``
  later, if still unused, delete the Job, the pull-credential copy and the
  PVC. A user appearing meanwhile removes the stamp.

Everything is found by name or label, so a restarted controller takes up
the PVC and Job it made before; creates that race answer 409 and are taken
as found.

Trust: what fills a claim (digest and registry reference) comes only from a
Model of the claim's namespace, a Model whose owner shares it with that
namespace (``api.sharing``), or a ClusterModel, whose servable digest the
claim is named for (``backing``), never from the PVC: a tenant may create a
PVC with our name, labels and annotations in its own namespace. A claim no
such model backs gets no Job and no credential; a PVC present whose
annotations disagree with those models is left alone (a warning, no Job).

Registry credential: the materializer runs in the workload's namespace (the
PVC's) and needs only PULL access. The publish Jobs' push credential never
leaves the controller's namespace. If ``--registry-pull-secret`` names a
Secret there (``username``/``password`` of a pull-only DMCR account), its
two keys are copied next to each Job as ``<pvc>-pull`` (owned by the PVC,
deleted once materialized and at collection); without it the materializer
pulls anonymously, which the DMCR must then allow for reads. (The bundled
DMCR's htpasswd accounts cannot be read-only: naming its push credential
here works, and hands push rights to the namespace while a Job runs.)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from api import names as contract
from api import sharing
from api.model import ModelView, repository
from controller.delivery import materializer
from controller.delivery.materializer import parse_ts, ts
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models.reconciler import job_transform
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from kube.namespaces import NamespaceLabels
from kube.workqueue import WorkerPool, WorkQueue

log = logging.getLogger(__name__)

WORKLOAD_KINDS: tuple[kube.Resource, ...] = (
    kube.DEPLOYMENTS, kube.STATEFULSETS, kube.DAEMONSETS, kube.CRONJOBS, kube.JOBS, kube.PODS)

# PVC size = artifact + 10 % + 1 GiB, rounded up to a GiB. Why: a block-backed
# RWX volume loses space to its filesystem (ext4 keeps 5 % for root and up to
# 1 GiB of journal; XFS a log), every file rounds up to a block, and the
# materializer places the tree by hardlink from its verified blobs on the same
# volume, so its peak is one copy of the model plus metadata. (A volume whose
# filesystem can neither hardlink nor reflink would need twice the model while
# placing; NFS, CephFS and GlusterFS all hardlink.)
HEADROOM_RATIO = 0.10
HEADROOM_BYTES = 1 << 30
GIB = 1 << 30

Obj = dict[str, Any]


@dataclass(frozen=True)
class Config:
    """What the manager's ``--shared-pvc-*`` flags decide."""

    storage_class: str | None = None  # the default when a model names none
    grace: float = 600.0  # seconds a PVC stays after its last user went
    pull_secret: str | None = None  # Secret (username/password) in the controller namespace
    pull_registry: str | None = None  # HOST:PORT materializers pull from (the DMCR's read-only one)
    # Secret of the DMCR's token realm (controller/registrytokens.py): set, a materializer
    # gets a ticket for its one repository, never the pull account of ``pull_secret``
    ticket_secret: str | None = None
    retry_base: float = 30.0  # first delay after a failed materializer Job, doubled per failure
    retry_max: float = 3600.0
    workers: int = 2


# -- pure functions: what a workload uses, what we create ----------------------------


def pod_spec(kind: str, obj: Obj) -> Obj:
    spec = obj.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec") or {})
    return ((spec.get("template") or {}).get("spec") or {})


def claims_of(kind: str, obj: Obj) -> list[str]:
    """The SharedPVC claims the webhook injected into a workload's pod spec."""
    out = []
    for v in pod_spec(kind, obj).get("volumes") or []:
        claim = str(((v or {}).get("persistentVolumeClaim") or {}).get("claimName") or "")
        if str(v.get("name", "")).startswith(contract.VOLUME_PREFIX) and \
                claim.startswith(contract.PVC_PREFIX):
            out.append(claim)
    return sorted(set(out))


def workload_transform(kind: str) -> Callable[[Obj], Obj]:
    """Cache a workload as its identity and the claims it uses: nothing else is read."""
    def transform(obj: Obj) -> Obj:
        meta = obj.get("metadata") or {}
        return {"kind": kind, "claims": claims_of(kind, obj),
                "metadata": {k: meta.get(k) for k in (
                    "name", "namespace", "uid", "resourceVersion", "deletionTimestamp")}}
    return transform


def pvc_transform(obj: Obj) -> Obj:
    meta = obj.get("metadata") or {}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {k: meta.get(k) for k in (
                "name", "namespace", "uid", "resourceVersion", "labels", "annotations",
                "deletionTimestamp", "creationTimestamp")},
            "spec": obj.get("spec") or {}, "status": obj.get("status") or {}}


def pvc_size(size_bytes: int) -> str:
    """The storage request for an artifact of ``size_bytes`` (see HEADROOM_*)."""
    want = max(0, size_bytes) * (1 + HEADROOM_RATIO) + HEADROOM_BYTES
    return f"{math.ceil(want / GIB)}Gi"


def build_pvc(namespace: str, digest: str, reference: str, size_bytes: int,
              storage_class: str | None) -> Obj:
    spec: Obj = {"accessModes": ["ReadWriteMany"], "volumeMode": "Filesystem",
                 "resources": {"requests": {"storage": pvc_size(size_bytes)}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    claim = contract.pvc_name(digest)
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace, "labels": materializer.labels(claim),
                         "annotations": {contract.ANN_PVC_DIGEST: digest,
                                         contract.ANN_PVC_REFERENCE: reference}},
            "spec": spec}


def path(reference: str) -> str:
    """``repository@digest`` of a reference, without its registry host."""
    return reference.partition("/")[2]


# -- the reconciler ------------------------------------------------------------------------


class SharedPVC:
    """Informers, an index of users per claim, a work queue and its workers."""

    def __init__(self, client: kube.Kube, settings: jobs.Settings, config: Config, *,
                 models: Informer, cluster_models: Informer, recorder: Recorder,
                 metrics: Metrics) -> None:
        self.client = client
        self.settings = settings
        self.config = config
        self.models = models
        self.cluster_models = cluster_models
        self.recorder = recorder
        self.metrics = metrics
        selector = f"{contract.LABEL_USES_SHARED_PVC}=true"
        self.workloads = {res.kind: Informer(client, res, label_selector=selector,
                                             transform=workload_transform(res.kind))
                          for res in WORKLOAD_KINDS}
        self.pvcs = Informer(client, kube.PVCS, label_selector=f"{contract.LABEL_PVC}=true",
                             transform=pvc_transform)
        self.jobs = Informer(client, kube.JOBS, label_selector=f"{contract.LABEL_PVC}=true",
                             transform=job_transform)
        self.informers = [*self.workloads.values(), self.pvcs, self.jobs]
        self.queue = WorkQueue(name="sharedpvc")
        self._lock = threading.Lock()
        self._users: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (ns, claim) -> users
        self._claims: dict[tuple[str, str, str], list[str]] = {}  # (kind, ns, name) -> claims
        self._pool = WorkerPool(self.queue, self._handle, workers=self.config.workers,
                                name="sharedpvc")
        self.namespace_labels = NamespaceLabels(client)  # for spec.sharing.namespaceSelector
        self.materializer = materializer.Materializer(
            client, settings, jobs_cache=self.jobs, recorder=recorder, metrics=metrics,
            annotate=self.annotate, pull_secret=config.pull_secret,
            ticket_secret=config.ticket_secret,
            retry_base=config.retry_base, retry_max=config.retry_max)
        self._wire()

    # -- wiring ---------------------------------------------------------------

    def _wire(self) -> None:
        def on_workload(event: str, obj: Obj, old: Obj | None) -> None:
            meta = obj["metadata"]
            ns, name, kind = str(meta.get("namespace") or ""), str(meta["name"]), obj["kind"]
            claims = [] if event == "DELETED" else list(obj.get("claims") or [])
            with self._lock:
                before = self._claims.pop((kind, ns, name), [])
                for c in before:
                    users = self._users.get((ns, c))
                    if users is not None:
                        users.discard((kind, name))
                        if not users:
                            del self._users[(ns, c)]
                if claims:
                    self._claims[(kind, ns, name)] = claims
                for c in claims:
                    self._users.setdefault((ns, c), set()).add((kind, name))
            changed = (set(before) ^ set(claims)) if event == "MODIFIED" \
                else (set(before) | set(claims))
            for c in changed:
                self.queue.add((ns, c))

        for inf in self.workloads.values():
            inf.handlers.append(on_workload)

        def on_pvc(event: str, obj: Obj, old: Obj | None) -> None:
            meta = obj["metadata"]
            self.queue.add((str(meta.get("namespace") or ""), str(meta["name"])))

        self.pvcs.handlers.append(on_pvc)

        def on_job(event: str, obj: Obj, old: Obj | None) -> None:
            meta = obj["metadata"]
            claim = (meta.get("labels") or {}).get(contract.LABEL_CLAIM)
            if claim:
                self.queue.add((str(meta.get("namespace") or ""), str(claim)))

        self.jobs.handlers.append(on_job)

        def on_model(event: str, obj: Obj, old: Obj | None) -> None:
            # a model getting an artifact (or its cache arriving) may unblock a waiting claim
            digest = ModelView.of(obj).servable_digest
            if event == "DELETED" or not digest.startswith("sha256:"):
                return
            claim = contract.pvc_name(digest)
            with self._lock:  # every namespace: a Model may be shared with others
                keys = [k for k in self._users if k[1] == claim]
            for k in keys:
                self.queue.add(k)

        self.models.handlers.append(on_model)
        self.cluster_models.handlers.append(on_model)

    def users(self, namespace: str, claim: str) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._users.get((namespace, claim), ()))

    # -- workers --------------------------------------------------------------

    def start_workers(self) -> None:
        self._pool.start()

    def stop(self) -> None:
        self._pool.stop()

    def _handle(self, key: Hashable) -> None:
        ns, claim = (str(part) for part in key)  # type: ignore[attr-defined]
        t0 = time.monotonic()
        result = "ok"
        try:
            after = self.reconcile(ns, claim)
            self.queue.forget(key)
            if after is not None:
                self.queue.add_after(key, after)
        except kube.Conflict:
            result = "conflict"
            self.queue.add_rate_limited(key)
        except Exception as e:
            result = "error"
            delay = self.queue.add_rate_limited(key)
            log.warning("shared pvc reconcile error", exc_info=not isinstance(e, kube.ApiError),
                        extra={"pvc": f"{ns}/{claim}", "error": str(e)[:300],
                               "retryIn": round(delay, 3)})
        finally:
            self.metrics.reconciles.labels("SharedPVC", result).inc()
            self.metrics.reconcile_seconds.labels("SharedPVC").observe(time.monotonic() - t0)

    # -- one pass ---------------------------------------------------------------

    def reconcile(self, namespace: str, claim: str) -> float | None:
        """Ensure the state of one claim; the seconds after which to look again, if any."""
        pvc = self.pvcs.get((namespace, claim))
        if not self.users(namespace, claim):
            return self.collect(namespace, claim, pvc)
        if pvc is not None and pvc["metadata"].get("deletionTimestamp"):
            return 2.0  # collected just before a new user came: make it again once it is gone
        # what to fill the claim with comes only from a model of this namespace (or a
        # ClusterModel), never from the PVC: its author may be the tenant itself
        backing = self.backing(namespace, claim)
        if not backing:
            log.info("shared pvc waits for its model", extra={"pvc": f"{namespace}/{claim}"})
            return 30.0  # no model has this digest (yet): the model watch brings us back
        model, digest, reference = backing[0]
        if pvc is None:
            pvc = self.create_pvc(namespace, model, digest, reference)
        ann = pvc["metadata"].get("annotations") or {}
        # the PVC's repository must be one of those models' (the registry host may have
        # changed with the flags: the pull goes to the models' reference, never the PVC's)
        named = {path(ref): ref for _, _, ref in backing}
        reference = named.get(path(str(ann.get(contract.ANN_PVC_REFERENCE) or ""))) or ""
        if ann.get(contract.ANN_PVC_DIGEST) != digest or not reference:
            log.warning("shared pvc not trusted: its annotations disagree with its model",
                        extra={"pvc": f"{namespace}/{claim}", "digest": digest})
            return None  # not ours to fix: a human (or a tenant) made or edited it
        if ann.get(contract.ANN_UNUSED_SINCE):
            pvc = self.annotate(pvc, {contract.ANN_UNUSED_SINCE: None})
            ann = pvc["metadata"].get("annotations") or {}
        if ann.get(contract.ANN_PVC_MATERIALIZED) == digest:
            return None
        return self.materializer.ensure(pvc, digest, reference)

    def find_model(self, namespace: str, claim: str) -> Obj | None:
        """The Model of the namespace (first) or ClusterModel whose servable artifact
        (``ModelView.servable_digest``, the webhook's pin) this claim is for."""
        backing = self.backing(namespace, claim)
        return backing[0][0] if backing else None

    def backing(self, namespace: str, claim: str) -> list[tuple[Obj, str, str]]:
        """``(model, digest, reference)`` of every Model of ``namespace`` (first, by name),
        then every Model another namespace shares with it (``api.sharing``), then every
        ClusterModel, whose servable artifact this claim is for; the reference is where
        the materializer pulls from (the read-only registry when one is set)."""
        out = []
        for inf, own in ((self.models, True), (self.models, False), (self.cluster_models, True)):
            found = [m for m in inf.items() if self._backs(m, namespace, claim, own)]
            for m in sorted(found, key=lambda m: (str(m["metadata"].get("namespace")),
                                                  str(m["metadata"].get("name")))):
                digest = ModelView.of(m).servable_digest
                if digest and contract.pvc_name(digest) == claim:
                    model = dict(m, kind=inf.res.kind)
                    out.append((model, digest, self.reference(model, digest)))
        return out

    def _backs(self, model: Obj, namespace: str, claim: str, own: bool) -> bool:
        """``own``: a model of ``namespace`` (or a ClusterModel); else another namespace's
        Model shared with ``namespace``, asked only of one whose digest names the claim."""
        ns = model["metadata"].get("namespace") or ""
        if own:
            return ns in ("", namespace)
        digest = ModelView.of(model).servable_digest
        return ns not in ("", namespace) and bool(digest) and \
            contract.pvc_name(digest) == claim and \
            sharing.granted(model, namespace, self.namespace_labels)

    def reference(self, model: Obj, digest: str) -> str:
        reference = ModelView.of(model).reference
        if not reference.endswith("@" + digest):
            reference = f"{self.settings.registry}/{repository(model)}@{digest}"
        if self.config.pull_registry:  # same repositories and digests, read-only
            reference = f"{self.config.pull_registry}/{reference.split('/', 1)[1]}"
        return reference

    def create_pvc(self, namespace: str, model: Obj, digest: str, reference: str) -> Obj:
        view, claim = ModelView.of(model), contract.pvc_name(digest)
        storage_class = (((model.get("spec") or {}).get("delivery") or {}).get("sharedPVC")
                         or {}).get("storageClassName") or self.config.storage_class
        body = build_pvc(namespace, digest, reference, view.size, storage_class)
        try:
            answer = self.client.create(kube.PVCS, body, namespace)
            self.metrics.shared_pvcs.labels("created").inc()
            log.info("shared pvc created", extra={
                "pvc": f"{namespace}/{claim}", "digest": digest,
                "size": body["spec"]["resources"]["requests"]["storage"],
                "storageClass": storage_class or "(cluster default)"})
        except kube.Conflict:  # ours from before a restart, or someone else's: reconcile checks
            answer = self.client.get(kube.PVCS, body["metadata"]["name"], namespace)
        pvc = pvc_transform(answer)
        self.pvcs.observe(pvc)
        return pvc

    def annotate(self, pvc: Obj, annotations: dict[str, str | None]) -> Obj:
        meta = pvc["metadata"]
        answer = self.client.patch(kube.PVCS, meta["name"], {"metadata": {
            "annotations": annotations, "resourceVersion": meta["resourceVersion"]}},
            meta["namespace"])
        out = pvc_transform(answer)
        self.pvcs.observe(out)
        return out

    def collect(self, namespace: str, claim: str, pvc: Obj | None) -> float | None:
        """No user: after the grace period, the Job, the credential copy and the PVC go."""
        leftover = [j for j in self.jobs.items() if j["metadata"].get("namespace") == namespace
                    and (j["metadata"].get("labels") or {}).get(contract.LABEL_CLAIM) == claim]
        if pvc is None or pvc["metadata"].get("deletionTimestamp"):
            for j in leftover:  # a Job whose PVC is gone has nothing left to fill
                self.client.delete(kube.JOBS, j["metadata"]["name"], namespace)
            return None
        ann = pvc["metadata"].get("annotations") or {}
        since = parse_ts(ann.get(contract.ANN_UNUSED_SINCE))
        now = time.time()
        if since is None:
            self.annotate(pvc, {contract.ANN_UNUSED_SINCE: ts(now)})
            return self.config.grace
        if now - since < self.config.grace:
            return self.config.grace - (now - since)
        for j in leftover:
            self.client.delete(kube.JOBS, j["metadata"]["name"], namespace)
        self.materializer.delete_pull_secret(namespace, claim)
        # exactly the version judged unused (a stale cache answers 409 and looks again);
        # a user that appears after this recreates the PVC once this one is gone
        meta = pvc["metadata"]
        try:
            answer = self.client.request("DELETE", kube.PVCS.path(namespace, claim), body={
                "kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {
                    "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]}})
        except kube.NotFound:
            return None
        if answer.get("kind") == "PersistentVolumeClaim":  # still there: finalizers pending
            self.pvcs.observe(answer)
        self.metrics.shared_pvcs.labels("deleted").inc()
        log.info("shared pvc collected", extra={"pvc": f"{namespace}/{claim}",
                                                "unusedFor": round(now - since, 1)})
        return None
