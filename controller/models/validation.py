"""``spec.validation``: a user's check of a published artifact before it becomes servable.

Where it sits: ``publish.on_complete`` hands a Model with ``spec.validation``
its publish result here instead of to ``apply_result``. The artifact is in
the registry, but not yet ``status.artifact``: that field is what every
consumer serves (``ModelView.servable_digest``), so the previous artifact, if
any, keeps serving until the check passes, and a failed check never moves it.

The check is a Job in the Model's own namespace (it runs the tenant's image
and command, so it gets the tenant's quota and none of the controller's
credentials: no Secret, no service-account token, no Service links; owned by
the Model, so it goes with it). The candidate tree is mounted read-only by
the node plugin, the way a workload gets it: a CSI ephemeral volume of our
driver naming the Model and pinning the candidate digest. Until the model
is Ready that digest is not servable, so the node resolver accepts it only
while the Model's own status names it as the candidate of a running
validation (``status.validation``, phase ``Validating``;
``csi/resolvers/kube.py``); the volume is resolved in the pod's namespace,
so a pod can reach only its own namespace's candidates.

One pass, level-triggered (the Job's name is a function of the publish key,
the candidate digest and ``spec.validation``, so a restarted manager finds
it again):

* the admin's bounds (``--publish-max-resource``, ``--job-max-timeout``)
  refuse a ``spec.validation`` asking more: Failed, ``ValidationPolicyDenied``;
* no Job → phase Validating (``status.validation`` first: the resolver must
  know the candidate before the pod asks for it), then the Job is created;
* running → Validating, looked at again every ``POLL`` seconds;
* Complete → ``Validated`` True (``ValidationPassed``), then Ready through
  ``apply_result`` like any publish;
* Failed → ``Validated`` False, ``ValidationTimeout`` when the Job ran past
  its ``activeDeadlineSeconds`` else ``ValidationFailed``, the message the
  tail of the container's log (``FallbackToLogsOnError``: the kubelet's
  termination message of a failed container that wrote none), phase Failed
  under this publish key (so the next pass owes nothing until the spec
  moves), the previous artifact still served (``model.ready_condition``).

Every source validates the same way: a publish Job's result, and an upload
or PVC session's (``finish``: the session and its token stay until the
verdict, so the passes that follow the check find its result again).

Each finished validation counts once in ``modelcache_validation_total{result}``
and ``modelcache_validation_duration_seconds``.

An owner who removes ``spec.validation`` asks for no check: ``forget`` drops
the ``Validated`` condition and ``status.validation`` at once (a condition
about a check nobody asks for would read as a verdict on the next artifact).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from api import conditions as c
from api import jobresult, model, names
from api.model import ModelView
from controller import jobspec
from controller.errors import Result
from controller.metrics import Metrics
from controller.models import policy
from controller.models import publishjob as jobs
from kube import client as kube
from kube.events import Recorder

log = logging.getLogger(__name__)

COMPONENT = "validation"
CONTAINER = "validate"
VOLUME = "model"
DEFAULT_MOUNT = "/model"
DEFAULT_TIMEOUT = 600  # seconds: spec.validation.timeout unset
PATH_ENV = "MODELCACHE_MODEL_PATH"  # the mount path, for a command that does not hard-code it
DIGEST_ENV = "MODELCACHE_MODEL_DIGEST"
POLL = 2.0  # seconds between looks at a running validation Job
LOG_TAIL = 1024  # bytes of the log kept, at most
MESSAGE_LIMIT = 1000  # a condition's message as api.conditions.condition keeps it
POLICY_REASON = "ValidationPolicyDenied"


class Host(Protocol):
    """What the validation step needs of the reconciler."""

    client: kube.Kube
    settings: jobs.Settings
    recorder: Recorder
    metrics: Metrics

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...

    def set_failed(self, obj: dict[str, Any], reason: str, message: str,
                   cond: str = "Published", key: str | None = None,
                   job: str | None = "") -> None: ...

    def apply_result(self, obj: dict[str, Any], result: dict[str, Any], key: str,
                     jname: str | None) -> Result: ...


class Owner(Protocol):
    """What ``forget`` needs: a status write that may remove a condition."""

    client: kube.Kube

    def res(self, obj: dict[str, Any]) -> kube.Resource: ...

    def ns(self, obj: dict[str, Any]) -> str | None: ...

    def observe(self, obj: dict[str, Any], answer: dict[str, Any]) -> dict[str, Any]: ...


def wanted(obj: Mapping[str, Any]) -> bool:
    """A namespaced Model with ``spec.validation`` (a ClusterModel has no namespace to run in)."""
    return model.model_kind(obj) == model.MODEL and bool(
        (obj.get("spec") or {}).get("validation"))


def spec_of(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return dict((obj.get("spec") or {}).get("validation") or {})


def job_name(obj: Mapping[str, Any], key: str, digest: str) -> str:
    """``mcv-<name>-<hash>``: the hash of the publish key, the candidate and the check."""
    text = json.dumps([key, digest, spec_of(obj)], sort_keys=True)
    tag = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"mcv-{jobs._short(str(obj['metadata']['name']), 40)}-{tag}"


def timeout_of(spec: Mapping[str, Any]) -> int:
    """``spec.validation.timeout`` in seconds (``DEFAULT_TIMEOUT`` unset); ValueError if bad."""
    return policy.duration(spec["timeout"]) if spec.get("timeout") else DEFAULT_TIMEOUT


def refusal(pol: policy.Policy, spec: Mapping[str, Any]) -> str | None:
    """Why ``spec.validation`` may not have its Job (beyond the admin's maxima), or None."""
    try:
        seconds = timeout_of(spec)
    except ValueError as e:
        return f"spec.validation.timeout: {e}"
    if seconds <= 0 or seconds > pol.max_timeout:
        return (f"spec.validation.timeout={spec.get('timeout')} must be within 1s and the "
                f"policy's maximum {pol.max_timeout}s")
    resources = spec.get("resources") or {}
    for part in resources:
        if part not in ("requests", "limits"):
            return f"spec.validation.resources.{part} is not allowed (requests and limits only)"
    for part in ("requests", "limits"):
        for name, value in (resources.get(part) or {}).items():
            where = f"spec.validation.resources.{part}[{name}]"
            limit = pol.maximum(name)
            if limit is None:
                return f"{where} is not allowed"
            try:
                asked = policy.quantity(value)
            except ValueError:
                return f"{where}={str(value)[:40]} is not a quantity"
            if asked > limit[1]:
                return f"{where}={value} exceeds the policy's maximum {limit[0]}"
    return None


def build_job(obj: dict[str, Any], key: str, digest: str,
              settings: jobs.Settings) -> dict[str, Any]:
    """The validation Job: the user's container, the candidate tree read-only, nothing else.

    One attempt (a check that failed once is a verdict, not bad luck), the
    user's timeout as ``activeDeadlineSeconds``, and the log's tail as the
    termination message of a failed container."""
    meta, spec = obj["metadata"], spec_of(obj)
    name = job_name(obj, key, digest)
    mount = str(spec.get("mountPath") or DEFAULT_MOUNT)
    owner = {"apiVersion": str(obj.get("apiVersion") or kube.MODELS.api_version),
             "kind": "Model", "name": meta["name"], "uid": meta["uid"], "controller": True}
    volume = {"name": VOLUME, "csi": {"driver": names.CSI_DRIVER, "readOnly": True,
                                      "volumeAttributes": {names.ATTR_MODEL: str(meta["name"]),
                                                           names.ATTR_DIGEST: digest}}}
    return jobspec.build(
        name=name, namespace=str(meta["namespace"]),
        labels=dict(jobs.labels(obj, key), **{"app.kubernetes.io/component": COMPONENT}),
        annotations={names.ANN_TARGET: digest}, owners=[owner],
        container=CONTAINER, image=str(spec["image"]),
        command=[str(a) for a in spec.get("command") or []],
        args=[str(a) for a in spec.get("args") or []],
        env=[{"name": PATH_ENV, "value": mount}, {"name": DIGEST_ENV, "value": digest}],
        mounts=[{"name": VOLUME, "mountPath": mount, "readOnly": True}], volumes=[volume],
        backoff_limit=0, placement={"resources": spec.get("resources") or {}},
        active_deadline=timeout_of(spec), ttl_after_finished=settings.ttl_after_finished,
        service_links=False, message_policy="FallbackToLogsOnError")


def finish(host: Host, obj: dict[str, Any], result: dict[str, Any], key: str,
           publish_job: str | None) -> tuple[Result, bool]:
    """A finished publish of any source: its check first when ``spec.validation`` asks
    one, else Ready. Also whether the publish is decided (Ready or Failed), after which
    a session's token and reader may go; before, the next pass needs its result."""
    if not wanted(obj):
        return host.apply_result(obj, result, key, publish_job), True
    return _run(host, obj, result, key, publish_job)


def forget(host: Owner, obj: dict[str, Any]) -> dict[str, Any]:
    """No ``spec.validation`` (any more): no ``Validated`` condition, no ``status.validation``.

    A direct patch, not ``write_status``: its condition merge keeps every type it
    is not given, and a JSON merge patch replaces the whole list."""
    st = obj.get("status") or {}
    conds = st.get("conditions") or []
    if wanted(obj) or not (st.get("validation") or any(
            x.get("type") == "Validated" for x in conds)):
        return obj
    keep = [x for x in conds if x.get("type") != "Validated"]
    answer = host.client.patch(host.res(obj), obj["metadata"]["name"], {"status": {
        "validation": None, "conditions": keep}}, host.ns(obj), sub="status")
    log.info("validation removed from the spec", extra={"model": ModelView.of(obj).full_name})
    return host.observe(obj, answer)


def ensure(host: Host, obj: dict[str, Any], result: dict[str, Any], key: str,
           publish_job: str | None) -> Result:
    """One pass of the validation of ``result`` (a finished publish) under ``key``."""
    return _run(host, obj, result, key, publish_job)[0]


def _run(host: Host, obj: dict[str, Any], result: dict[str, Any], key: str,
         publish_job: str | None) -> tuple[Result, bool]:
    """``ensure``, and whether the publish is decided (False while the Job runs)."""
    spec, ns = spec_of(obj), str(obj["metadata"]["namespace"])
    digest = str(result["digest"])
    why = refusal(host.settings.publish_policy, spec)
    if why is not None:
        host.set_failed(obj, POLICY_REASON, why, cond="Validated", key=key, job=publish_job)
        return Result(), True
    name = job_name(obj, key, digest)
    try:
        job: dict[str, Any] | None = host.client.get(kube.JOBS, name, ns)
    except kube.NotFound:
        job = None
    if job is None:
        obj = mark_validating(host, obj, result, key, publish_job, name)
        try:
            job = host.client.create(kube.JOBS, build_job(obj, key, digest, host.settings), ns)
            log.info("validation job created", extra={
                "model": ModelView.of(obj).full_name, "job": name, "digest": digest})
        except kube.Conflict:
            job = host.client.get(kube.JOBS, name, ns)
    st = jobresult.state(job)
    if st == jobresult.ACTIVE:
        mark_validating(host, obj, result, key, publish_job, name)
        return Result(requeue_after=POLL), False
    seconds = _seconds(job)
    if st == jobresult.COMPLETE:
        passed = f"validation Job {name} passed on {digest}"
        before = ModelView.of(obj).condition("Validated") or {}
        if (before.get("status"), before.get("message")) != ("True", passed):  # counted once
            host.metrics.validations.labels("passed").inc()
            host.metrics.validation_seconds.observe(seconds)
            obj = host.write_status(obj, {"conditions": [
                c.condition("Validated", True, c.VALIDATION_PASSED, passed)]})
            host.recorder.record(obj, "Normal", c.VALIDATION_PASSED, passed)
        return host.apply_result(obj, result, key, publish_job), True
    reason, message = verdict(host.client, job)
    host.metrics.validations.labels(
        "timeout" if reason == c.VALIDATION_TIMEOUT else "failed").inc()
    host.metrics.validation_seconds.observe(seconds)
    host.set_failed(obj, reason, message, cond="Validated", key=key, job=publish_job)
    return Result(), True


def mark_validating(host: Host, obj: dict[str, Any], result: Mapping[str, Any], key: str,
                    publish_job: str | None, name: str) -> dict[str, Any]:
    """Phase Validating, the candidate in ``status.validation``; the last artifact serves."""
    view, digest = ModelView.of(obj), str(result["digest"])
    running = f"validation Job {name} is checking {digest}"
    if view.phase != c.VALIDATING:
        host.recorder.record(obj, "Normal", "ValidationStarted", running)
    return host.write_status(obj, {
        "phase": c.VALIDATING,
        "publish": {"key": key, "jobName": publish_job},
        "validation": {"digest": digest, "reference": str(result.get("reference") or ""),
                       "jobName": name},
        "conditions": [
            c.condition("SourceResolved", True, "SourceValid", "the source is valid"),
            c.condition("Published", True, "Published", f"{digest} in the registry"),
            {"type": "Validated", "status": "Unknown", "reason": c.VALIDATION_RUNNING,
             "message": running},
            model.ready_condition(view, c.VALIDATING, running,
                                  serving_reason=model.REPUBLISHING)]})


def verdict(client: kube.Kube, job: dict[str, Any]) -> tuple[str, str]:
    """(reason, message) of a failed validation Job: timeout or failure, with the log tail."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    pods, _ = client.list(kube.PODS, ns, label_selector=jobresult.pod_selector(job))
    tail, code = "", None
    for pod in sorted(pods, key=lambda p: str(p["metadata"].get("creationTimestamp", "")),
                      reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
            if term:
                tail, code = str(term.get("message") or ""), term.get("exitCode")
                break
        if code is not None:
            break
    reasons = {str(x.get("reason")) for x in (job.get("status") or {}).get("conditions") or []
               if x.get("type") == jobresult.FAILED and x.get("status") == "True"}
    if "DeadlineExceeded" in reasons:
        return c.VALIDATION_TIMEOUT, _with_tail(
            f"validation Job {name} ran past its timeout", tail)
    return c.VALIDATION_FAILED, _with_tail(
        f"validation Job {name} failed" + (f" (exit code {code})" if code is not None else ""),
        tail)


def _with_tail(head: str, log: str) -> str:
    """``head; log tail: …``, the tail cut from the front so the whole fits a condition's
    message (``MESSAGE_LIMIT`` characters): the end of a log is where it says why."""
    if not log.strip():
        return head
    return f"{head}; log tail: " + log_tail(log, MESSAGE_LIMIT - len(head) - 12)


def log_tail(text: str, limit: int = LOG_TAIL) -> str:
    """The last ``limit`` bytes of a log, on a character boundary."""
    raw = text.strip().encode()[-max(0, limit):]
    return raw.decode(errors="ignore")


def _seconds(job: Mapping[str, Any]) -> float:
    """startTime to completionTime (or the Complete/Failed condition's time); 0 when unknown."""
    st = job.get("status") or {}
    end = st.get("completionTime") or next(
        (x.get("lastTransitionTime") for x in st.get("conditions") or []
         if x.get("type") in (jobresult.COMPLETE, jobresult.FAILED)), None)
    if not st.get("startTime") or not end:
        return 0.0
    start_t, end_t = (datetime.datetime.fromisoformat(str(v).replace("Z", "+00:00"))
                      for v in (st["startTime"], end))
    return max(0.0, (end_t - start_t).total_seconds())
