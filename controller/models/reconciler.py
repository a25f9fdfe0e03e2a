"""The Model / ClusterModel reconcile: level-triggered, every step an idempotent "ensure".

One pass, from the object as the cache has it:

1. deleting → ``finalize``: phase Deleting, publish Jobs and copied Secrets
   deleted, every manifest of the model's repository deleted from the
   registry, then the finalizer dropped;
2. ensure the finalizer, before the Job: the Job's pod pushes an artifact,
   and a namespaced Model cannot own a Job in the controller's namespace, so
   a Model deleted between "Job created" and "finalizer added" would leave a
   Job publishing an artifact nobody deletes. One write, one round trip;
   the urgent lane (below) keeps it off the queueing path;
3. plan the source (``jobs.plan``); an invalid one is Failed (terminal), an
   upload waits (WaitForUpload), a PVC is read by a Job in the Model's
   namespace and published through the upload gateway (``pvcsource``), a
   source this controller does not publish stays Pending with a reason;
4. the publish key (generation, reimport annotation, upstream revision,
   Secret hash): if ``status.publish.key`` already equals it and the model
   is Ready or Failed, nothing is owed (an unchanged spec never re-publishes);
   a model with ``spec.updatePolicy.schedule`` gets its upstream check
   (``schedule.py`` says when, ``upstream.py`` probes; Failed ones too, once
   published or moved);
5. else the Job named by the key: absent → create it and stop there, asking
   for a follow-up pass (``Result.follow_up``) in the normal lane; active →
   Publishing; Complete → read the result from the pod's termination message
   → Ready with artifact, resolved metadata, revision, progress 100 %;
   Failed → Failed with the worker's reason, and an event.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api import conditions
from api import conditions as c
from controller.catalog import sources as catalogsources
from controller.errors import PermanentError, TemporaryError
from controller.metrics import Metrics
from controller.models import adopt, artifacts, pvcsource, schedule, upstream
from controller.models import publishjob as jobs
from controller.upload import reconcile as uploads
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

RESOLVED_FIELDS = ("format", "family", "architecture", "parameterCount", "paramSize",
                   "precision", "quantization", "contextLength", "tensors", "files")
RESULT_GRACE = 60.0  # seconds a Complete Job may lack a readable result before we give up


@dataclass
class Result:
    """What a reconcile asks of the queue: nothing, a re-check after ``requeue_after``,
    or (``follow_up``) another pass in the normal lane, for work deferred behind
    other models' urgent Job creations."""

    requeue_after: float | None = None
    follow_up: bool = False


def secret_transform(obj: dict[str, Any]) -> dict[str, Any]:
    """Cache a Secret as its identity and a hash per key: values never stay in memory."""
    meta = obj.get("metadata") or {}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "resourceVersion": meta.get("resourceVersion")},
            "hashes": {k: hashlib.sha256(str(v).encode()).hexdigest()[:16]
                       for k, v in (obj.get("data") or {}).items()}}


def job_transform(obj: dict[str, Any]) -> dict[str, Any]:
    """Cache a Job as metadata and status: the pod template is ours and not needed back."""
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in (
        "name", "namespace", "uid", "labels", "annotations", "creationTimestamp",
        "resourceVersion", "deletionTimestamp")}, "status": obj.get("status") or {}}


class Reconciler:
    def __init__(self, client: kube.Kube, settings: jobs.Settings, *, models: Informer,
                 cluster_models: Informer, job_cache: Informer, secrets: Informer,
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
        if (obj["metadata"]).get("deletionTimestamp"):
            self.finalize(obj)
            return Result()
        obj = self.ensure_finalizer(obj)
        if adopt.imported_digest(obj) is not None:
            # an air-gap import (`modelcache import`): adopt the pushed artifact; never a Job
            return Result(requeue_after=adopt.ensure(self, obj, RESOLVED_FIELDS))
        catalog_source = None
        if catalogsources.is_import(obj):
            # freeze the remote digest first; the Job imports exactly that one
            obj, catalog_source, wait = catalogsources.ensure_pin(
                obj, self.catalog_sources, self.write_status)
            if wait is not None:
                return Result(requeue_after=wait or None)
        try:
            p = jobs.plan(obj, self.settings, catalog_source)
        except PermanentError as e:
            self.set_failed(obj, e.reason, str(e), cond="SourceResolved")
            raise
        if p.kind == "unsupported":
            self.write_status(obj, {"phase": c.PENDING, "conditions": [
                c.condition("SourceResolved", False, p.reason, p.message),
                c.condition("Ready", False, p.reason, p.message)]})
            return Result()
        secret_hash = self.secret_hash(obj, p)
        if secret_hash is None:
            return Result()
        key = jobs.publish_key(obj, secret_hash + p.key_extra)
        status = obj.get("status") or {}
        if (status.get("publish") or {}).get("key") == key and \
                status.get("phase") in (c.READY, c.FAILED):
            # Failed too: a later upstream commit may repair what a moved one broke
            return self.check_upstream(obj)
        if p.kind == "upload":
            return self.ensure_uploaded(obj, p, key)
        if p.kind == "pvc":  # a reader Job in the Model's namespace → the upload gateway
            return Result(requeue_after=pvcsource.ensure(self, obj, key))
        return self.ensure_published(obj, p, key)

    # -- steps --------------------------------------------------------------

    def res(self, obj: dict[str, Any]) -> kube.Resource:
        return kube.CLUSTER_MODELS if jobs.model_kind(obj) == "ClusterModel" else kube.MODELS

    def ns(self, obj: dict[str, Any]) -> str | None:
        return obj["metadata"].get("namespace") or None

    def observe(self, obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]:
        """Put an API answer into the cache (if newer) and return it with our kind."""
        self.informers[jobs.model_kind(obj)].observe(answer)
        return dict(answer, kind=jobs.model_kind(obj))

    def ensure_finalizer(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        fins = list(meta.get("finalizers") or [])
        if jobs.FINALIZER in fins:
            return obj
        # the resourceVersion makes this a compare-and-swap: nobody's finalizer is lost
        answer = self.client.patch(self.res(obj), meta["name"], {"metadata": {
            "finalizers": [*fins, jobs.FINALIZER],
            "resourceVersion": meta["resourceVersion"]}}, self.ns(obj))
        return self.observe(obj, answer)

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]:
        meta = obj["metadata"]
        gen = int(meta.get("generation") or 1)
        current = obj.get("status") or {}
        patch = dict(patch, observedGeneration=gen)
        if "conditions" in patch:
            patch["conditions"] = c.merge(current.get("conditions"), patch["conditions"], gen)
        if c.same(current, patch):
            return obj
        answer = self.client.patch(self.res(obj), meta["name"], {"status": patch},
                                   self.ns(obj), sub="status")
        self.metrics.status_patches.labels(what).inc()
        return self.observe(obj, answer)

    def set_failed(self, obj: dict[str, Any], reason: str, message: str,
                   cond: str = "Published", key: str | None = None,
                   job: str | None = "") -> None:
        was = (obj.get("status") or {}).get("phase")
        wanted = [c.condition(cond, False, reason, message),
                  c.condition("Ready", False, reason, message)]
        if cond != "SourceResolved":
            wanted.insert(0, c.condition("SourceResolved", True, "SourceValid",
                                         "the source is valid"))
        patch: dict[str, Any] = {"phase": c.FAILED, "conditions": wanted}
        if key is not None:
            # job None: published without a Job (an upload session)
            patch["publish"] = {"key": key,
                                "jobName": jobs.job_name(obj, key) if job == "" else job}
        before = obj.get("status") or {}
        self.write_status(obj, patch)
        if was != c.FAILED or (before.get("publish") or {}).get("key") != key:
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
            if (obj.get("status") or {}).get("phase") != c.PENDING:
                self.recorder.record(obj, "Warning", reason, message)
            self.write_status(obj, {"phase": c.PENDING, "conditions": [
                c.condition("SourceResolved", False, reason, message),
                c.condition("Ready", False, reason, message)]})
            return None  # the Secret watch brings the model back when it appears
        assert secret is not None
        hashes = secret.get("hashes") or {}
        return hashlib.sha256(json.dumps(
            sorted((k, hashes.get(k, "")) for k in p.secret.keys.values())).encode()
        ).hexdigest()[:16]

    def ensure_published(self, obj: dict[str, Any], p: jobs.Plan, key: str) -> Result:
        name = jobs.job_name(obj, key)
        job = self.jobs.get((self.settings.namespace, name))
        if job is None:
            job = self.create_job(obj, p, key)
            if jobs.state(job) == "Active":
                return Result(follow_up=True)  # Publishing is written by the next pass
        st = jobs.state(job)
        if st == "Active":
            self.mark_publishing(obj, key, name)
            return Result()
        if st == "Complete":
            return self.on_complete(obj, job, key)
        self.on_failed(obj, job, key)
        # the schedule goes on (from the status just written): a later upstream revision
        # may repair what this one broke
        fresh = self.informers[jobs.model_kind(obj)].get(
            (obj["metadata"].get("namespace") or "", obj["metadata"]["name"]))
        return self.check_upstream(dict(fresh, kind=jobs.model_kind(obj))) if fresh else Result()

    def create_job(self, obj: dict[str, Any], p: jobs.Plan, key: str) -> dict[str, Any]:
        body = jobs.build(obj, p, key, self.settings)
        name = body["metadata"]["name"]
        if p.secret is not None:
            self.ensure_secret_copy(obj, p.secret, name)
        try:
            answer = self.client.create(kube.JOBS, body, self.settings.namespace)
            self.metrics.jobs_created.labels(jobs.model_kind(obj)).inc()
            log.info("publish job created", extra={"model": _id(obj), "job": name,
                                                   "target": jobs.target(obj, self.settings)})
        except kube.Conflict:
            # ours from before (a restart, or a cache that had not seen it yet): found, not made
            answer = self.client.get(kube.JOBS, name, self.settings.namespace)
        job = job_transform(answer)
        self.jobs.observe(job)
        return job

    def ensure_secret_copy(self, obj: dict[str, Any], use: jobs.SecretUse, job: str) -> None:
        try:
            secret = self.client.get(kube.SECRETS, use.name, use.namespace)
        except kube.NotFound as e:
            raise TemporaryError(f"Secret {use.namespace}/{use.name} vanished",
                                 reason="SecretNotFound") from e
        body = jobs.copied_secret(obj, job, self.settings, use, secret.get("data") or {})
        try:
            self.client.create(kube.SECRETS, body, self.settings.namespace)
        except kube.Conflict:
            pass  # made by an earlier pass for this very Job name, so for these very values

    def mark_publishing(self, obj: dict[str, Any], key: str, job: str) -> None:
        status = obj.get("status") or {}
        republish = bool((status.get("artifact") or {}).get("digest"))
        if republish:
            ready = c.condition("Ready", True, "Republishing",
                                "serving the previous artifact while publishing again")
        else:
            ready = c.condition("Ready", False, "Publishing", f"publish Job {job} is running")
        patch: dict[str, Any] = {"phase": c.PUBLISHING, "conditions": [
            c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
            c.condition("Published", False, "Publishing", f"publish Job {job} is running"),
            ready], "publish": {"key": key, "jobName": job}}
        if (status.get("publish") or {}).get("key") != key:
            patch["progress"] = {"bytesDone": 0, "bytesTotal": 0, "percent": 0,
                                 "bytesPerSecond": 0, "etaSeconds": 0}
        if status.get("phase") != c.PUBLISHING or (status.get("publish") or {}).get("key") != key:
            self.recorder.record(obj, "Normal", "PublishStarted",
                                 f"publishing {jobs.target(obj, self.settings)} (Job {job})")
        self.write_status(obj, patch)

    def read_result(self, job: dict[str, Any], want_success: bool) -> dict[str, Any] | None:
        """The worker's result JSON from the newest matching pod's termination message."""
        name = job["metadata"]["name"]
        pods, _ = self.client.list(kube.PODS, self.settings.namespace,
                                   label_selector=f"job-name={name}")
        pods.sort(key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp", "")),
                  reverse=True)
        for pod in pods:
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = ((cs.get("state") or {}).get("terminated")) or {}
                if not term or (want_success and term.get("exitCode") != 0):
                    continue
                try:
                    doc = json.loads(term.get("message") or "")
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    return doc
        return None

    def on_complete(self, obj: dict[str, Any], job: dict[str, Any], key: str) -> Result:
        jname = job["metadata"]["name"]
        result = self.read_result(job, want_success=True)
        if result is None or "digest" not in result:
            first = self.completed_without_result.setdefault(jname, time.monotonic())
            if time.monotonic() - first < RESULT_GRACE:
                raise TemporaryError(f"Job {jname} is Complete but its result is not readable yet",
                                     reason="ResultPending")
            self.set_failed(obj, "ResultMissing",
                            f"Job {jname} succeeded but left no readable result", key=key)
            return Result()
        self.completed_without_result.pop(jname, None)
        res = self.apply_result(obj, result, key, jname)
        self.cleanup_secret_copy(jname)
        return res

    def apply_result(self, obj: dict[str, Any], result: dict[str, Any], key: str,
                     jname: str | None) -> Result:
        """A publish result (a Job's, or an upload session's) → Ready, with its event."""
        status = obj.get("status") or {}
        old_progress = status.get("progress") or {}
        total = int(old_progress.get("bytesTotal") or 0) or int(result.get("sizeBytes") or 0)
        resolved = {k: v for k, v in (result.get("resolved") or {}).items()
                    if k in RESOLVED_FIELDS and v is not None}
        digest = str(result["digest"])
        revision = str(result.get("resolvedRevision") or "")
        patch: dict[str, Any] = {
            "phase": c.READY,
            "progress": c.progress_done(total),
            "artifact": {"digest": digest, "sizeBytes": int(result.get("sizeBytes") or 0),
                         "reference": str(result.get("reference") or "")},
            "resolved": resolved,
            "source": {"resolvedRevision": revision},
            "publish": {"key": key, "jobName": jname},
            "upload": None,  # a finished session's URL and token are of no more use
            "conditions": [
                c.condition("SourceResolved", True, "Resolved", f"revision {revision}"),
                c.condition("Published", True, "Published", f"{digest} in the registry"),
                c.condition("Ready", True, "Published", "the model is ready to use")],
        }
        was_ready = status.get("phase") == c.READY and \
            (status.get("publish") or {}).get("key") == key
        obj = self.write_status(obj, patch)  # the schedule compares with this revision
        if not was_ready:
            self.metrics.publishes.labels(jobs.model_kind(obj), "ready").inc()
            self.recorder.record(obj, "Normal", "Published",
                                 f"{result.get('reference')} ({result.get('sizeBytes')} bytes)")
        return self.check_upstream(obj, first=True)

    def on_failed(self, obj: dict[str, Any], job: dict[str, Any], key: str) -> None:
        jname = job["metadata"]["name"]
        result = self.read_result(job, want_success=False) or {}
        err = result.get("error") or {}
        reason = str(err.get("reason") or _job_failure_reason(job))
        message = str(err.get("message") or f"publish Job {jname} failed")
        if err.get("retryable"):
            message = f"{message} (retries exhausted)"
        self.metrics.publishes.labels(jobs.model_kind(obj), "failed").inc()
        self.set_failed(obj, reason, message, key=key)
        self.cleanup_secret_copy(jname)

    # -- upload sessions (uploads.py) ------------------------------------------

    def ensure_uploaded(self, obj: dict[str, Any], p: jobs.Plan, key: str) -> Result:
        """``source.upload``: a gateway session for this publish key, polled until it publishes."""
        gw = self.uploads
        if gw is None:
            msg = "the manager has no upload gateway (--upload-gateway-url)"
            self.write_status(obj, {"phase": c.PENDING, "conditions": [
                c.condition("SourceResolved", False, "UploadGatewayNotConfigured", msg),
                c.condition("Ready", False, "UploadGatewayNotConfigured", msg)]})
            return Result()
        poll = gw.config.poll_interval
        status = obj.get("status") or {}
        sid = uploads.session_id((status.get("upload") or {}).get("url"))
        if not sid or (status.get("publish") or {}).get("key") != key:
            return self.new_upload_session(obj, key, renewed=False)
        session = gw.status(sid)
        if session is None:
            log.info("upload session gone", extra={"model": _id(obj), "session": sid})
            return self.new_upload_session(obj, key, renewed=True)
        phase = session.get("phase")
        if phase == "Ready" and isinstance(session.get("result"), dict) \
                and "digest" in session["result"]:
            res = self.apply_result(obj, session["result"], key, None)
            uploads.delete_secret(self.client, obj, self.settings)
            return res
        if phase == "Failed":
            err = session.get("error") or {}
            self.metrics.publishes.labels(jobs.model_kind(obj), "failed").inc()
            self.set_failed(obj, str(err.get("reason") or "UploadPublishFailed"),
                            str(err.get("message") or "the upload gateway failed to publish"),
                            key=key, job=None)
            uploads.delete_secret(self.client, obj, self.settings)
            return Result()
        if phase == "Publishing":
            self.mark_upload_publishing(obj, key, session)
            return Result(requeue_after=poll)
        left = float(session.get("expiresAt") or 0) - time.time()
        if left <= 0:
            return self.new_upload_session(obj, key, renewed=True)
        self.mark_wait_for_upload(obj, key, status.get("upload") or {}, session.get("error"))
        return Result(requeue_after=min(poll, left + 0.5))

    def new_upload_session(self, obj: dict[str, Any], key: str, renewed: bool) -> Result:
        assert self.uploads is not None
        session = self.uploads.create(uploads.model_name(obj), jobs.target(obj, self.settings))
        uploads.ensure_secret(self.client, uploads.token_secret(obj, self.settings, session))
        up = {"url": str(session["url"]),
              "tokenSecretRef": {"name": uploads.secret_name(obj)},
              "expiresAt": uploads.rfc3339(float(session["expiresAt"]))}
        log.info("upload session created", extra={"model": _id(obj), "session": session["id"],
                                                   "renewed": renewed})
        self.recorder.record(obj, "Normal",
                             "UploadSessionRenewed" if renewed else "UploadSessionCreated",
                             f"upload to {up['url']} with the token in Secret "
                             f"{uploads.secret_name(obj)} until {up['expiresAt']}")
        self.mark_wait_for_upload(obj, key, up, None)
        return Result(requeue_after=self.uploads.config.poll_interval)

    def mark_wait_for_upload(self, obj: dict[str, Any], key: str, up: dict[str, Any],
                             error: dict[str, Any] | None) -> None:
        msg = f"waiting for files at {up.get('url')} (token in Secret " \
              f"{(up.get('tokenSecretRef') or {}).get('name')})"
        if error:  # a retryable publish failure: the session takes "complete" again
            msg = f"{msg}; the last publish failed: {str(error.get('message'))[:300]}"
        ready = c.condition("Ready", False, "WaitForUpload", msg)
        if ((obj.get("status") or {}).get("artifact") or {}).get("digest"):
            ready = c.condition("Ready", True, "WaitForUpload",
                                "serving the previous artifact while waiting for an upload")
        self.write_status(obj, {"phase": c.WAIT_FOR_UPLOAD, "upload": up,
                                "publish": {"key": key, "jobName": None}, "conditions": [
            c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
            c.condition("Published", False, "WaitForUpload", msg), ready]})

    def mark_upload_publishing(self, obj: dict[str, Any], key: str,
                               session: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        msg = "the upload gateway is verifying and publishing the uploaded files"
        patch: dict[str, Any] = {"phase": c.PUBLISHING, "publish": {"key": key, "jobName": None},
                                 "conditions": [
            c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
            c.condition("Published", False, "Publishing", msg),
            c.condition("Ready", False, "Publishing", msg)]}
        progress = c.progress_from_event(session.get("progress") or {})
        if progress:
            patch["progress"] = progress
        if status.get("phase") != c.PUBLISHING:
            self.recorder.record(obj, "Normal", "PublishStarted",
                                 f"publishing the upload to {jobs.target(obj, self.settings)}")
        self.write_status(obj, patch)

    def cleanup_secret_copy(self, job: str) -> None:
        try:
            self.client.delete(kube.SECRETS, jobs.copied_secret_name(job), self.settings.namespace,
                               propagation=None)
        except kube.ApiError as e:
            log.info("copied secret not deleted", extra={"job": job, "error": str(e)[:200]})

    def check_upstream(self, obj: dict[str, Any], first: bool = False) -> Result:
        """``spec.updatePolicy.schedule``: probe the upstream when due (``upstream.py``).
        A move was marked (0): pass again now to publish it; the annotation's own watch
        event finds it already in the cache and brings no pass."""
        wait = upstream.ensure_checked(self, obj, first)
        return Result(follow_up=True) if wait == 0 else Result(requeue_after=wait)

    # -- deletion -----------------------------------------------------------

    def finalize(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        fins = list(meta.get("finalizers") or [])
        if jobs.FINALIZER not in fins:
            return
        obj = self.write_status(obj, {"phase": c.DELETING, "conditions": [
            c.condition("Ready", False, "Deleting", "the model is being deleted")]})
        uid = meta.get("uid")
        for job in self.jobs.items():
            if ((job["metadata"].get("labels") or {}).get(jobs.LABEL_UID)) == uid:
                jname = job["metadata"]["name"]
                self.client.delete(kube.JOBS, jname, self.settings.namespace)
                self.cleanup_secret_copy(jname)
        if "upload" in ((obj.get("spec") or {}).get("source") or {}):
            uploads.delete_secret(self.client, obj, self.settings)  # no GC without a kcm
        if "pvc" in ((obj.get("spec") or {}).get("source") or {}):
            pvcsource.cleanup(self.client, obj)  # a running reader would go on uploading
        known = [str(((obj.get("status") or {}).get("artifact") or {}).get("digest") or "")]
        deleted = artifacts.delete_all(self.registry(), jobs.repository(obj), known)
        self.metrics.artifacts_deleted.inc(len(deleted))
        if deleted:
            self.recorder.record(obj, "Normal", "ArtifactDeleted",
                                 f"deleted {len(deleted)} manifest(s) of {jobs.repository(obj)}")
        rest = [f for f in fins if f != jobs.FINALIZER]
        try:
            self.client.patch(self.res(obj), meta["name"], {"metadata": {
                "finalizers": rest or None, "resourceVersion": obj["metadata"]["resourceVersion"]}},
                self.ns(obj))
        except kube.NotFound:
            return
        log.info("finalized", extra={"model": _id(obj), "deleted": len(deleted)})


def _job_failure_reason(job: dict[str, Any]) -> str:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Failed" and cond.get("reason"):
            return str(cond["reason"])
    return "JobFailed"


def _id(obj: dict[str, Any]) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace') + '/' if meta.get('namespace') else ''}{meta['name']}"


__all__ = ["Reconciler", "Result", "conditions", "job_transform", "secret_transform"]
