"""``source.pvc``: a reader Job in the Model's namespace streams the claim to the upload gateway.

Where it sits: the reconciler calls ``ensure`` for a Model whose plan is
``pvc`` (``jobs.plan``), in place of the publish-Job path. Why not a publish
Job: those run in the controller's namespace, where the registry push
credential lives, and a pod can mount only a claim of its own namespace. So
the bytes travel the way ``source.upload``'s do (uploads.py): the manager
opens a gateway session for the model's usual registry target, keeps the
session token in a Secret beside the Model (``uploads.token_secret``, key
``token``, and the reader's report token; owned by the Model, labelled with
the publish key; mounted into the reader as files), and runs
``modelcache-controller pvc-upload`` (jobs/pvc_reader.py) as a Job in
the Model's namespace with the claim mounted read-only. The reader sends
the files; the gateway verifies and publishes them from the controller's
namespace. The user's namespace holds no push credential and no
service-account token, only a token good for this one session, deleted
with the reader Job once the result is in.

One pass (level-triggered; every name deterministic, so a restarted manager
finds the Secret, its session and the Job again):

1. no token Secret for this publish key → the claim must exist (else
   Pending, ``PVCNotFound``, looked at again every poll interval); old
   readers of this model are deleted, a session is opened and its token
   stored;
2. the session (``GET`` with the admin token): Ready → the model is Ready
   with the gateway's result (after ``spec.validation``'s check when it has
   one: ``validation.finish``, the session kept until the verdict), Job and
   Secret deleted; Failed → Failed with
   the gateway's reason (a refused model); Publishing → Publishing with the
   gateway's progress; unknown or expired before publishing → Job and
   Secret deleted, a new session next pass;
3. waiting for files: the reader Job (``reader_job_name``) absent → created;
   running → Publishing (its upload progress comes to the report endpoint);
   Failed → Failed with the reader's reason from its termination message
   (``PathNotFound``, ``UnsafePath`` for a symlink out of the claim, …).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any, Protocol

from api import conditions as c
from api import jobresult, names
from controller import jobspec
from controller.errors import TemporaryError
from controller.metrics import Metrics
from controller.models import publishjob as jobs
from controller.models import validation
from controller.upload import client as uploads
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer

log = logging.getLogger(__name__)

COMPONENT = "pvc-reader"
# the manager's informer over reader Jobs, in every namespace
SELECTOR = f"{names.LABEL_MANAGED}={names.MANAGER},app.kubernetes.io/component={COMPONENT}"
MOUNT = "/var/lib/modelcache/source"
CONTAINER = "reader"
TOKEN_ENV = "MODELCACHE_UPLOAD_TOKEN"  # read by jobs/pvc_reader.py
GONE_RETRY = 1.0  # a Job or session being replaced: look again soon


class Host(Protocol):
    """What the PVC source needs of the reconciler."""

    client: kube.Kube
    settings: jobs.Settings
    uploads: uploads.Gateway | None
    recorder: Recorder
    metrics: Metrics

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...

    def set_failed(self, obj: dict[str, Any], reason: str, message: str,
                   cond: str = "Published", key: str | None = None,
                   job: str | None = "") -> None: ...

    def apply_result(self, obj: dict[str, Any], result: dict[str, Any], key: str,
                     jname: str | None) -> Any: ...

    def mark_publishing(self, obj: dict[str, Any], key: str, job: str) -> None: ...

    def mark_upload_publishing(self, obj: dict[str, Any], key: str,
                               session: dict[str, Any]) -> None: ...


def source_of(obj: dict[str, Any]) -> tuple[str, str]:
    s = ((obj.get("spec") or {}).get("source") or {}).get("pvc") or {}
    return str(s.get("claimName") or ""), str(s.get("path") or "")


def reader_job_name(obj: dict[str, Any], key: str) -> str:
    # the key carries the model's uid: unique across namespaces too (report lookups)
    return f"mc-pvc-{jobs._short(str(obj['metadata']['name']), 40)}-{key}"[:63].strip("-")


def find(readers: Informer, name: str) -> dict[str, Any] | None:
    """A reader Job by name, in whatever namespace (the report endpoint knows the name only)."""
    for job in readers.items():
        if job["metadata"].get("name") == name:
            return job
    return None


def build_job(obj: dict[str, Any], key: str, url: str, settings: jobs.Settings
              ) -> dict[str, Any]:
    """The reader Job: the claim read-only, the session token, and nothing else.

    No registry credential, no service-account token, no Secret but the
    token's; an ownerReference to the Model (same namespace), so the
    garbage collector takes it with the Model too."""
    meta = obj["metadata"]
    name = reader_job_name(obj, key)
    claim, path = source_of(obj)
    # the token Secret holds the report token too (``ensure``): the Job's one Secret
    keys = [(TOKEN_ENV, uploads.TOKEN_KEY)]
    if settings.report_url:
        keys.append((jobs.REPORT_TOKEN, jobs.REPORT_TOKEN))
    owner = {"apiVersion": str(obj.get("apiVersion") or kube.MODELS.api_version),
             "kind": "Model", "name": meta["name"], "uid": meta["uid"], "controller": True}
    return jobspec.build(
        name=name, namespace=meta["namespace"],
        labels=dict(jobs.labels(obj, key), **{"app.kubernetes.io/component": COMPONENT}),
        annotations={names.ANN_TARGET: jobs.target(obj, settings)}, owners=[owner],
        container=CONTAINER, image=settings.image,
        command=["modelcache-controller", "pvc-upload", "--mount", MOUNT, "--path", path,
                 "--url", url, "--result-file", jobresult.TERMINATION_LOG],
        env=jobs.report_env(settings, name),
        secret=jobspec.SecretFiles(uploads.secret_name(obj), tuple(keys)),
        mounts=[{"name": "source", "mountPath": MOUNT, "readOnly": True}],
        volumes=[{"name": "source", "persistentVolumeClaim": {
            "claimName": claim, "readOnly": True}}],
        backoff_limit=settings.backoff_limit, placement=(obj.get("spec") or {}).get("publish"),
        active_deadline=settings.active_deadline,
        ttl_after_finished=settings.ttl_after_finished,
        # in a user's namespace: no writable root, no other Services' addresses
        read_only_root=True, service_links=False)


def ensure(host: Host, obj: dict[str, Any], key: str) -> float | None:
    """One pass for ``source.pvc`` under publish key ``key``; seconds until the next look."""
    gw = host.uploads
    if gw is None:
        return _pending(host, obj, "UploadGatewayNotConfigured",
                        "source.pvc publishes through the upload gateway: the manager has none "
                        "(--upload-gateway-url)", None)
    poll = gw.config.poll_interval
    ns = str(obj["metadata"]["namespace"])
    jname = reader_job_name(obj, key)
    secret_meta = (_get(host.client, kube.SECRETS, uploads.secret_name(obj), ns) or {}
                   ).get("metadata") or {}
    ann = secret_meta.get("annotations") or {}
    sid, url = str(ann.get(names.ANN_SESSION) or ""), str(ann.get(names.ANN_URL) or "")
    if (secret_meta.get("labels") or {}).get(names.LABEL_KEY) != key or not sid or not url:
        claim, _ = source_of(obj)
        if _get(host.client, kube.PVCS, claim, ns) is None:
            return _pending(host, obj, "PVCNotFound",
                            f"PersistentVolumeClaim {ns}/{claim} not found", poll)
        delete_readers(host.client, obj)  # a reader of an older session has a stale token
        created = gw.create(uploads.model_name(obj), jobs.target(obj, host.settings),
                            uploads.expected_format(obj))
        body = uploads.token_secret(obj, host.settings, created)
        body["metadata"]["labels"].update({names.LABEL_KEY: key,
                                           "app.kubernetes.io/component": COMPONENT})
        body["metadata"]["annotations"][names.ANN_URL] = str(created["url"])  # for the reader
        if host.settings.report_url:  # the reader's bearer, a file beside the session token
            body["data"][jobs.REPORT_TOKEN] = base64.b64encode(
                jobs.report_token(host.settings, jname).encode()).decode()
        uploads.ensure_secret(host.client, body)
        sid, url = str(created["id"]), str(created["url"])
        log.info("pvc upload session created", extra={"model": uploads.model_name(obj),
                                                       "session": sid})
    session = gw.status(sid)
    if session is None or (session.get("phase") == "WaitForUpload"
                           and float(session.get("expiresAt") or 0) <= time.time()):
        # reaped, the gateway's root lost, or expired before anything was published:
        # start over with a new session (and so a new token and a new reader)
        log.info("pvc upload session replaced", extra={"model": uploads.model_name(obj),
                                                        "session": sid})
        cleanup(host.client, obj)
        return GONE_RETRY
    phase, result = session.get("phase"), session.get("result")
    if phase == "Ready" and isinstance(result, dict) and "digest" in result:
        # spec.validation's check first: the session (and its result) stays until the verdict
        res, decided = validation.finish(host, obj, dict(result), key, jname)
        if not decided:
            return res.requeue_after
        cleanup(host.client, obj)
        return None
    if phase == "Failed":
        err = session.get("error") or {}
        host.metrics.publishes.labels("Model", "failed").inc()
        host.set_failed(obj, str(err.get("reason") or "UploadPublishFailed"),
                        str(err.get("message") or "the upload gateway failed to publish"),
                        key=key, job=jname)
        cleanup(host.client, obj)
        return None
    if phase == "Publishing":
        host.mark_upload_publishing(obj, key, session)
        return poll
    return _ensure_reader(host, obj, key, sid, url, poll)


def _ensure_reader(host: Host, obj: dict[str, Any], key: str, sid: str, url: str,
                   poll: float) -> float | None:
    ns = str(obj["metadata"]["namespace"])
    jname = reader_job_name(obj, key)
    job = _get(host.client, kube.JOBS, jname, ns)
    if job is not None and (job.get("metadata") or {}).get("deletionTimestamp"):
        return GONE_RETRY
    if job is None:
        body = build_job(obj, key, url, host.settings)
        try:
            job = host.client.create(kube.JOBS, body, ns)
            host.metrics.jobs_created.labels("Model").inc()
            log.info("pvc reader job created", extra={"model": uploads.model_name(obj),
                                                       "job": jname})
        except kube.Conflict:
            job = host.client.get(kube.JOBS, jname, ns)
    st = jobresult.state(job)
    if st == jobresult.FAILED:
        reason, message = reader_failure(host.client, job)
        host.metrics.publishes.labels("Model", "failed").inc()
        host.set_failed(obj, reason, message, key=key, job=jname)
        cleanup(host.client, obj)
        return None
    if st == jobresult.COMPLETE:
        # the reader exits 0 only once the session is Ready; the next look reads the result
        raise TemporaryError(f"reader Job {jname} is Complete, session {sid} not Ready yet",
                             reason="ResultPending")
    host.mark_publishing(obj, key, jname)
    return poll


def reader_failure(client: kube.Kube, job: dict[str, Any]) -> tuple[str, str]:
    """The reader's reason and message, by the Job result protocol (its pods' messages)."""
    pods, _ = client.list(kube.PODS, job["metadata"]["namespace"],
                          label_selector=jobresult.pod_selector(job))
    return jobresult.read(job, pods).explain(f"PVC reader Job {job['metadata']['name']}")


def delete_readers(client: kube.Kube, obj: dict[str, Any]) -> None:
    """Delete this model's reader Jobs, their pods with them."""
    meta = obj["metadata"]
    items, _ = client.list(kube.JOBS, meta["namespace"], label_selector=(
        f"{names.LABEL_UID}={meta['uid']},app.kubernetes.io/component={COMPONENT}"))
    for job in items:
        if not job["metadata"].get("deletionTimestamp"):
            client.delete(kube.JOBS, job["metadata"]["name"], meta["namespace"])


def cleanup(client: kube.Kube, obj: dict[str, Any]) -> None:
    """Done (or deleted): the reader Jobs and the token Secret go; nothing is left behind."""
    delete_readers(client, obj)
    try:
        client.delete(kube.SECRETS, uploads.secret_name(obj), str(obj["metadata"]["namespace"]),
                      propagation=None)
    except kube.ApiError as e:
        log.info("pvc token secret not deleted", extra={"model": uploads.model_name(obj),
                                                         "error": str(e)[:200]})


def _pending(host: Host, obj: dict[str, Any], reason: str, message: str,
             retry: float | None) -> float | None:
    if (obj.get("status") or {}).get("phase") != c.PENDING or \
            _ready_reason(obj) != reason:
        host.recorder.record(obj, "Warning", reason, message)
    host.write_status(obj, {"phase": c.PENDING, "conditions": [
        c.condition("SourceResolved", False, reason, message),
        c.condition("Ready", False, reason, message)]})
    return retry


def _ready_reason(obj: dict[str, Any]) -> str:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return str(cond.get("reason") or "")
    return ""


def _get(client: kube.Kube, res: kube.Resource, name: str, ns: str) -> dict[str, Any] | None:
    try:
        return client.get(res, name, ns)
    except kube.NotFound:
        return None
