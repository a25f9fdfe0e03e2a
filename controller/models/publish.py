"""The publish path of a Model reconcile: the Job named by the publish key, and its result.

Where it sits: step 5 of ``reconciler.py``. ``ensure`` finds the Job the publish
key names; absent → it is created (its own Secret beside it: no source credential,
which the Job borrows at start, ``credentials.py``) and the
pass stops, asking for a follow-up; active → Publishing; Complete → the result
the worker left in its pod's termination message → Ready (``apply_result``,
which the upload and PVC sources use too; a Model with ``spec.validation``
passes its check first, ``validation.py``); Failed → Failed with the worker's
reason, and an event (the previous artifact, if any, still served:
``api.model.ready_condition``). The Job's Secret (its source URI and the registry
login, ``jobs.job_secret``) goes once
the Job has finished.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from api import conditions as c
from api import jobresult, model
from api.model import ModelView
from controller import dmcrtls
from controller.errors import Result, TemporaryError
from controller.metrics import Metrics
from controller.models import history, policy, validation, workvolume
from controller.models import publishjob as jobs
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

RESULT_GRACE = 60.0  # seconds a Complete Job may lack a readable result before we give up


class Host(Protocol):
    """What the publish path needs of the reconciler."""

    client: kube.Kube
    settings: jobs.Settings
    informers: dict[str, Informer]
    jobs: Informer
    recorder: Recorder
    metrics: Metrics
    completed_without_result: dict[str, float]
    registry: Callable[[], RegistryClient]  # old generations are deleted (history.py)

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...

    def set_failed(self, obj: dict[str, Any], reason: str, message: str,
                   cond: str = "Published", key: str | None = None,
                   job: str | None = "") -> None: ...

    def check_upstream(self, obj: dict[str, Any], first: bool = False) -> Result: ...

    def apply_result(self, obj: dict[str, Any], result: dict[str, Any], key: str,
                     jname: str | None) -> Result: ...


def job_transform(obj: dict[str, Any]) -> dict[str, Any]:
    """Cache a Job as metadata and status: the pod template is ours and not needed back."""
    meta = obj.get("metadata") or {}
    return {"metadata": {k: meta.get(k) for k in (
        "name", "namespace", "uid", "labels", "annotations", "creationTimestamp",
        "resourceVersion", "deletionTimestamp")}, "status": obj.get("status") or {}}


def ensure(host: Host, obj: dict[str, Any], p: jobs.Plan, key: str) -> Result:
    name = jobs.job_name(obj, key)
    job = host.jobs.get((host.settings.namespace, name))
    if job is None:
        why = policy.refusal(host.settings.publish_policy, obj)
        if why is not None:  # terminal: the next pass finds this key Failed, until the spec moves
            host.set_failed(obj, policy.REASON, why, key=key, job=None)
            return Result()
        job = create_job(host, obj, p, key)
        if jobs.state(job) == "Active":
            workvolume.ensure(host.client, host.settings, obj, job, key)
            return Result(follow_up=True)  # Publishing is written by the next pass
    st = jobs.state(job)
    if st == "Active":
        workvolume.ensure(host.client, host.settings, obj, job, key)  # once per Job
        mark_publishing(host, obj, key, name)
        return Result()
    if st == "Complete":
        return on_complete(host, obj, job, key)
    on_failed(host, obj, job, key)
    # the schedule goes on (from the status just written): a later upstream revision
    # may repair what this one broke
    view = ModelView.of(obj)
    fresh = host.informers[view.kind].get((view.namespace, view.name))
    return host.check_upstream(dict(fresh, kind=view.kind)) if fresh else Result()


def create_job(host: Host, obj: dict[str, Any], p: jobs.Plan, key: str) -> dict[str, Any]:
    body = jobs.build(obj, p, key, host.settings)
    name = body["metadata"]["name"]
    ensure_job_secret(host, obj, p, name)
    try:
        answer = host.client.create(kube.JOBS, body, host.settings.namespace)
        host.metrics.jobs_created.labels(model.model_kind(obj)).inc()
        log.info("publish job created", extra={
            "model": ModelView.of(obj).full_name, "job": name,
            "target": jobs.target(obj, host.settings)})
    except kube.Conflict:
        # ours from before (a restart, or a cache that had not seen it yet): found, not made
        answer = host.client.get(kube.JOBS, name, host.settings.namespace)
    job = job_transform(answer)
    host.jobs.observe(job)
    return job


def _secret_data(host: Host, name: str, namespace: str) -> dict[str, str]:
    try:
        secret = host.client.get(kube.SECRETS, name, namespace)
    except kube.NotFound as e:
        raise TemporaryError(f"Secret {namespace}/{name} vanished",
                             reason="SecretNotFound") from e
    return dict(secret.get("data") or {})


def ensure_job_secret(host: Host, obj: dict[str, Any], p: jobs.Plan, job: str) -> None:
    """The Job's one Secret (``jobs.job_secret``): its source URI and the controller's own
    credentials, mounted as files; made before the Job, deleted once it has finished.

    The source credential is not copied: its Secret is read here only to refuse a
    missing key before the Job exists (nothing of it is kept); the Job asks the manager
    for it at start (``controller/models/credentials.py``)."""
    use, settings = p.secret, host.settings
    if use is not None:
        jobs.check_keys(use, _secret_data(host, use.name, use.namespace))
    registry = _secret_data(host, settings.registry_secret, settings.namespace) \
        if settings.registry_secret else None
    body = jobs.job_secret(obj, job, p, settings, registry,
                           dmcrtls.read_ca(settings.registry_ca))
    try:
        host.client.create(kube.SECRETS, body, host.settings.namespace)
    except kube.Conflict:
        pass  # made by an earlier pass for this very Job name, so for these very values


def mark_publishing(host: Host, obj: dict[str, Any], key: str, job: str) -> None:
    view = ModelView.of(obj)
    # a republish: the last published artifact keeps serving meanwhile
    ready = model.ready_condition(view, "Publishing", f"publish Job {job} is running",
                                  serving_reason=model.REPUBLISHING)
    patch: dict[str, Any] = {"phase": c.PUBLISHING, "conditions": [
        c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
        c.condition("Published", False, "Publishing", f"publish Job {job} is running"),
        ready], "publish": {"key": key, "jobName": job}}
    if view.publish_key != key:
        patch["progress"] = {"bytesDone": 0, "bytesTotal": 0, "percent": 0,
                             "bytesPerSecond": 0, "etaSeconds": 0}
    if view.phase != c.PUBLISHING or view.publish_key != key:
        host.recorder.record(obj, "Normal", "PublishStarted",
                             f"publishing {jobs.target(obj, host.settings)} (Job {job})")
    host.write_status(obj, patch)


def outcome(host: Host, job: dict[str, Any]) -> jobresult.Outcome:
    """How the Job ended, by the Job result protocol: its pods' termination messages."""
    pods, _ = host.client.list(kube.PODS, host.settings.namespace,
                               label_selector=jobresult.pod_selector(job))
    return jobresult.read(job, pods)


def on_complete(host: Host, obj: dict[str, Any], job: dict[str, Any], key: str) -> Result:
    jname = job["metadata"]["name"]
    result = outcome(host, job).result
    if result is None or "digest" not in result:
        first = host.completed_without_result.setdefault(jname, time.monotonic())
        if time.monotonic() - first < RESULT_GRACE:
            raise TemporaryError(f"Job {jname} is Complete but its result is not readable yet",
                                 reason="ResultPending")
        host.set_failed(obj, "ResultMissing",
                        f"Job {jname} succeeded but left no readable result", key=key)
        return Result()
    host.completed_without_result.pop(jname, None)
    seconds, view = job_seconds(job), ModelView.of(obj)
    # the passes that follow a validation's progress find this Job again: counted once
    first = not (view.phase in (c.READY, c.VALIDATING) and view.publish_key == key)
    if seconds is not None and first:
        host.metrics.publish_seconds.labels(model.model_kind(obj)).observe(seconds)
    if validation.wanted(obj):  # published, not yet servable: the user's check first
        res = validation.ensure(host, obj, dict(result), key, jname)
    else:
        res = apply_result(host, obj, dict(result), key, jname)
    if first:
        cleanup_secret_copy(host.client, host.settings, jname)
    return res


def job_seconds(job: dict[str, Any]) -> float | None:
    """A finished Job's startTime to completionTime, None when either is missing."""
    st = job.get("status") or {}
    if not st.get("startTime") or not st.get("completionTime"):
        return None
    start, end = (datetime.datetime.fromisoformat(str(st[k]).replace("Z", "+00:00"))
                  for k in ("startTime", "completionTime"))
    return max(0.0, (end - start).total_seconds())


def apply_result(host: Host, obj: dict[str, Any], result: dict[str, Any], key: str,
                 jname: str | None) -> Result:
    """A publish result (a Job's, or an upload session's) → Ready, with its event."""
    view = ModelView.of(obj)
    total = view.progress_total or int(result.get("sizeBytes") or 0)
    resolved = model.resolved_of(result.get("resolved") or {})
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
        # newest first; older generations are collected by the steady-state pass (history.py)
        "history": history.record(view.history, history.entry(view.generation, result,
                                                              c.now())),
        "upload": None,  # a finished session's URL and token are of no more use
        "conditions": [
            c.condition("SourceResolved", True, "Resolved", f"revision {revision}"),
            c.condition("Published", True, "Published", f"{digest} in the registry"),
            c.condition("Ready", True, "Published", "the model is ready to use")],
    }
    was_ready = view.phase == c.READY and view.publish_key == key
    obj = host.write_status(obj, patch)  # the schedule compares with this revision
    if not was_ready:
        host.metrics.publishes.labels(model.model_kind(obj), "ready").inc()
        host.metrics.publish_bytes.labels(model.model_kind(obj)).inc(
            int(result.get("sizeBytes") or 0))
        host.recorder.record(obj, "Normal", "Published",
                             f"{result.get('reference')} ({result.get('sizeBytes')} bytes)")
    # our own status write brings no pass: the pin and retention are seen to now
    obj, wait = history.ensure(host, obj)
    return history.sooner(host.check_upstream(obj, first=True), wait)


def on_failed(host: Host, obj: dict[str, Any], job: dict[str, Any], key: str) -> None:
    jname = job["metadata"]["name"]
    reason, message = outcome(host, job).explain(f"publish Job {jname}")
    host.metrics.publishes.labels(model.model_kind(obj), "failed").inc()
    host.set_failed(obj, reason, message, key=key)
    cleanup_secret_copy(host.client, host.settings, jname)


def cleanup_secret_copy(client: kube.Kube, settings: jobs.Settings, job: str) -> None:
    """The credential copied for ``job`` and its work volume, once the Job has finished
    (or is being deleted)."""
    workvolume.release(client, settings, job)
    try:
        client.delete(kube.SECRETS, jobs.copied_secret_name(job), settings.namespace,
                      propagation=None)
    except kube.ApiError as e:
        log.info("copied secret not deleted", extra={"job": job, "error": str(e)[:200]})

