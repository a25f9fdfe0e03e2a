"""The Model / ClusterModel reconcile: level-triggered, every step an idempotent "ensure".

One pass, from the object as the cache has it:

1. deleting → ``finalize.py``: phase Deleting, publish Jobs and copied
   Secrets deleted, every manifest of the model's repository deleted from
   the registry, then the finalizer dropped;
2. ensure the finalizer, before the Job: the Job's pod pushes an artifact,
   and a namespaced Model cannot own a Job in the controller's namespace, so
   a Model deleted between "Job created" and "finalizer added" would leave a
   Job publishing an artifact nobody deletes. One write, one round trip;
   the urgent lane (below) keeps it off the queueing path;
3. an air-gap import (``adopt.py``) is adopted, never published; a catalog
   import has its remote digest pinned first (``catalog/sources.py``);
   plan the source (``publishjob.plan``); an invalid one is Failed
   (terminal), an upload waits (WaitForUpload, ``controller/upload/reconcile.py``), a PVC
   is read by a Job in the Model's namespace and published through the
   upload gateway (``pvcsource.py``), a source this controller does not
   publish stays Pending with a reason;
4. the publish key (generation, reimport annotation, upstream revision,
   Secret hash): if ``status.publish.key`` already equals it and the model
   is Ready or Failed, nothing is owed (an unchanged spec never re-publishes);
   a model with ``spec.updatePolicy.schedule`` gets its upstream check
   (``schedule.py`` says when, ``upstream.py`` probes; Failed ones too, once
   published or moved), and the owner's pin and old generations out of
   retention are seen to (``history.py``);
5. else the Job named by the key (``publish.py``): absent → create it and
   stop there, asking for a follow-up pass (``Result.follow_up``) in the
   normal lane; active →
   Publishing; Complete → read the result from the pod's termination message
   → Ready with artifact, resolved metadata, revision, progress 100 %
   (a Model with ``spec.validation``: Validating first, while its check runs
   as a Job in the Model's namespace on the candidate, ``validation.py``;
   a failed check is Failed under this key, the last artifact still served);
   Failed → Failed with the worker's reason, and an event.

While a newer publish runs, waits or has failed, ``status.artifact`` keeps the
last artifact published and the Ready condition stays True
(``api.model.ready_condition``: reason ``Republishing``, or
``ServingPreviousArtifact`` with the digest and why the new one is not
there): new pods keep getting it (``ModelView.servable_digest``).

So a new Model costs, on the way to its Job, the finalizer patch and the
Job create only; the Publishing status (one merge patch of the status
subresource, with the ``PublishStarted`` Event queued beside it) comes in
the follow-up pass, which the work queue runs after the urgent lane — new
Models' Job creations — is empty. Status writes are skipped when they would
change nothing, and their answers go back into the cache so the next pass
does not act on a stale status.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from api import conditions, model, names
from api import conditions as c
from api.model import ModelView
from controller.catalog import sources as catalogsources
from controller.errors import PermanentError, Result
from controller.metrics import Metrics
from controller.models import (
    adopt,
    finalize,
    history,
    publish,
    pvcsource,
    schedule,
    upstream,
    validation,
)
from controller.models import publishjob as jobs
from controller.models.publish import job_transform
from controller.models.secretreader import SecretSource, secret_transform
from controller.upload import client as uploads
from controller.upload import reconcile as uploadsource
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, client: kube.Kube, settings: jobs.Settings, *, models: Informer,
                 cluster_models: Informer, job_cache: Informer, secrets: SecretSource,
                 recorder: Recorder, metrics: Metrics,
                 registry: Callable[[], RegistryClient],
                 upload_gateway: uploads.Gateway | None = None,
                 catalog_sources: Informer | None = None) -> None:
        self.client = client
        self.uploads = upload_gateway
        self.catalog_sources = catalog_sources  # ModelCatalogSources, for source.catalog
        self.settings = settings
        self.informers = {"Model": models, "ClusterModel": cluster_models}
        self.jobs = job_cache
        self.secrets = secrets
        self.recorder = recorder
        self.metrics = metrics
        self.registry = registry
        self.completed_without_result: dict[str, float] = {}
        self.scheduler = schedule.Scheduler()
        self.prober = upstream.Prober()  # upstream probes: manager threads, not Jobs

    # -- entry --------------------------------------------------------------

    def reconcile(self, kind: str, namespace: str, name: str) -> Result:
        obj = self.informers[kind].get((namespace, name))
        if obj is None:
            return Result()  # gone; the finalizer already cleaned up
        obj = dict(obj, kind=kind)
        if ModelView.of(obj).deleting:
            finalize.finalize(self, obj)
            return Result()
        obj = self.ensure_finalizer(obj)
        obj = validation.forget(self, obj)  # spec.validation removed: no Validated condition
        catalog_source = None
        try:
            if adopt.imported_digest(obj) is not None:
                # an air-gap import (`modelcache import`): adopt the pushed artifact; never a Job
                return Result(requeue_after=adopt.ensure(self, obj))
            if catalogsources.is_import(obj):
                # freeze the remote digest first; the Job imports exactly that one
                obj, catalog_source, wait = catalogsources.ensure_pin(
                    obj, self.catalog_sources, self.write_status)
                if wait is not None:
                    return Result(requeue_after=wait or None)
            p = jobs.plan(obj, self.settings, catalog_source)
            if p.secret is not None:  # before the Secret is read, hashed or copied
                jobs.check_secret(obj, p.secret, self.secrets.get(
                    (p.secret.namespace, p.secret.name)), self.settings)
        except PermanentError as e:
            # the one place a terminal reconcile error becomes status: Failed, with its reason
            self.set_failed(obj, e.reason, str(e), cond=e.condition)
            raise
        if p.kind == "unsupported":
            self.write_status(obj, {"phase": c.PENDING, "conditions": [
                c.condition("SourceResolved", False, p.reason, p.message),
                model.ready_condition(ModelView.of(obj), p.reason, p.message)]})
            return Result()
        secret_hash = self.secret_hash(obj, p)
        if secret_hash is None:
            return Result()
        key = jobs.publish_key(obj, secret_hash + p.key_extra)
        view = ModelView.of(obj)
        if view.publish_key == key and view.phase in (c.READY, c.FAILED):
            if view.phase == c.FAILED and view.has_artifact and not view.serving:
                # Failed by a controller that withheld the previous artifact: serve it again
                failed = view.condition("Published") or view.condition("Ready") or {}
                self.write_status(obj, {"conditions": [model.ready_condition(
                    view, "", f"the new publish failed ({failed.get('reason')}): "
                    f"{failed.get('message')}")]})
            # the owner's pin, and old generations out of retention (history.py)
            obj, wait = history.ensure(self, self.fresh(obj))
            # Failed too: a later upstream commit may repair what a moved one broke
            return history.sooner(self.check_upstream(obj), wait)
        if p.kind == "upload":
            return uploadsource.ensure(self, obj, p, key)
        if p.kind == "pvc":  # a reader Job in the Model's namespace → the upload gateway
            return Result(requeue_after=pvcsource.ensure(self, obj, key))
        return publish.ensure(self, obj, p, key)

    # -- steps --------------------------------------------------------------

    def res(self, obj: dict[str, Any]) -> kube.Resource:
        return kube.CLUSTER_MODELS if model.model_kind(obj) == model.CLUSTER_MODEL \
            else kube.MODELS

    def ns(self, obj: dict[str, Any]) -> str | None:
        return obj["metadata"].get("namespace") or None

    def observe(self, obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        """Put an API answer into the cache (if newer) and return it with our kind."""
        self.informers[model.model_kind(obj)].observe(answer)
        return dict(answer, kind=model.model_kind(obj))

    def fresh(self, obj: dict[str, Any]) -> dict[str, Any]:
        """The cache's copy of ``obj`` (a status write of this pass observed), else ``obj``."""
        meta = obj["metadata"]
        got = self.informers[model.model_kind(obj)].get((meta.get("namespace") or "",
                                                          meta["name"]))
        return dict(got, kind=model.model_kind(obj)) if got is not None else obj

    def ensure_finalizer(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        fins = list(meta.get("finalizers") or [])
        if names.FINALIZER in fins:
            return obj
        # the resourceVersion makes this a compare-and-swap: nobody's finalizer is lost
        answer = self.client.patch(self.res(obj), meta["name"], {"metadata": {
            "finalizers": [*fins, names.FINALIZER],
            "resourceVersion": meta["resourceVersion"]}}, self.ns(obj))
        return self.observe(obj, answer)

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]:
        gen = ModelView.of(obj).generation
        # the writer compares the whole status document, not the view's fields
        current = obj.get("status") or {}
        patch = dict(patch, observedGeneration=gen)
        if "conditions" in patch:
            patch["conditions"] = c.merge(current.get("conditions"), patch["conditions"], gen)
        if c.same(current, patch):
            return obj
        answer = self.client.patch(self.res(obj), obj["metadata"]["name"], {"status": patch},
                                   self.ns(obj), sub="status")
        self.metrics.status_patches.labels(what).inc()
        return self.observe(obj, answer)

    def set_failed(self, obj: dict[str, Any], reason: str, message: str,
                   cond: str = "Published", key: str | None = None,
                   job: str | None = "") -> None:
        before = ModelView.of(obj)
        # a re-publish that failed: phase Failed, the previous artifact still served
        wanted = [c.condition(cond, False, reason, message), model.ready_condition(
            before, reason, message if not before.has_artifact else
            f"the new {'spec' if cond == 'SourceResolved' else 'publish'} failed "
            f"({reason}): {message}")]
        if cond != "SourceResolved":
            wanted.insert(0, c.condition("SourceResolved", True, "SourceValid",
                                         "the source is valid"))
        patch: dict[str, Any] = {"phase": c.FAILED, "conditions": wanted}
        if key is not None:
            # job None: published without a Job (an upload session)
            patch["publish"] = {"key": key,
                                "jobName": jobs.job_name(obj, key) if job == "" else job}
        self.write_status(obj, patch)
        # key None (a failure before any publish): an event whenever a publish key is recorded
        if before.phase != c.FAILED or (before.publish_key or None) != key:
            self.recorder.record(obj, "Warning", reason, message)

    def secret_hash(self, obj: dict[str, Any], p: jobs.Plan) -> str | None:
        """A hash of the Secret values the worker reads; None (and Pending) if missing."""
        if p.secret is None:
            return ""
        secret = self.secrets.get((p.secret.namespace, p.secret.name))
        reason, message = "", ""
        if secret is None:
            reason = "SecretNotFound"
            message = f"Secret {p.secret.namespace}/{p.secret.name} not found"
        else:
            hashes = secret.get("hashes") or {}
            missing = [k for env, k in p.secret.keys.items()
                       if k not in hashes and env not in p.secret.optional]
            if missing:
                reason = "SecretKeyNotFound"
                message = f"Secret {p.secret.namespace}/{p.secret.name} has no key {missing[0]!r}"
        if reason:
            if ModelView.of(obj).phase != c.PENDING:
                self.recorder.record(obj, "Warning", reason, message)
            self.write_status(obj, {"phase": c.PENDING, "conditions": [
                c.condition("SourceResolved", False, reason, message),
                model.ready_condition(ModelView.of(obj), reason, message)]})
            return None  # the Secret watch or re-check (secretreader) brings it back
        assert secret is not None
        hashes = secret.get("hashes") or {}
        return hashlib.sha256(json.dumps(
            sorted((k, hashes.get(k, "")) for k in p.secret.keys.values())).encode()
        ).hexdigest()[:16]

    # -- called back by the step modules (pvcsource's Host names the last three) --

    def check_upstream(self, obj: dict[str, Any], first: bool = False) -> Result:
        """``spec.updatePolicy.schedule``: probe the upstream when due (``upstream.py``).
        A move was marked (0): pass again now to publish it; the annotation's own watch
        event finds it already in the cache and brings no pass."""
        wait = upstream.ensure_checked(self, obj, first)
        return Result(follow_up=True) if wait == 0 else Result(requeue_after=wait)

    def apply_result(self, obj: dict[str, Any], result: dict[str, Any], key: str,
                     jname: str | None) -> Result:
        return publish.apply_result(self, obj, result, key, jname)

    def mark_publishing(self, obj: dict[str, Any], key: str, job: str) -> None:
        publish.mark_publishing(self, obj, key, job)

    def mark_upload_publishing(self, obj: dict[str, Any], key: str,
                               session: dict[str, Any]) -> None:
        uploadsource.mark_publishing(self, obj, key, session)


__all__ = ["Reconciler", "Result", "conditions", "job_transform", "secret_transform"]
