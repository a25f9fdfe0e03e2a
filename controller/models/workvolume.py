"""A publish Job's work volume: the PVC its pods stage into, made with the Job, gone after it.

Where it sits: beside the publish Job (``publish.py`` calls ``ensure`` while
the Job is active and ``release`` once it has finished or is deleted); the
claim's body is ``publishjob.work_claim``. Only with ``--publish-work-size``
(``Settings.work_volume``); otherwise the Job mounts an ``emptyDir`` and
both calls return at once.

Why a PVC: the worker keys its staging by the pinned source (``ingest/publish``:
``stage-<uri, revision>/store/ingest/<file key>.part``), so a pod that finds the
``.part`` of the pod killed before it rehashes that prefix from local disk and
asks the source for the rest with ``Range``. An ``emptyDir`` dies with each pod
and makes every retry fetch everything again.

Order: the Job first, then its claim, owned by it (the Job's uid is only known
once it exists). A pod the Job controller starts in between waits in Pending
for the claim, as the scheduler makes it. ``ensure`` runs on every pass that
finds the Job active, until it has seen the claim once for that Job's uid
(remembered per process: a restarted manager looks once more), so a manager
killed between the two creates still makes the claim. A claim left by an
earlier Job of the same name (deleted and made again) is being collected: the
pass is retried until it is gone.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from controller.errors import TemporaryError
from controller.models import publishjob as jobs
from kube import client as kube

log = logging.getLogger(__name__)

_seen: dict[str, str] = {}  # Job name -> the Job uid whose claim is known to exist
_lock = threading.Lock()


def ensure(client: kube.Kube, settings: jobs.Settings, obj: dict[str, Any],
           job: dict[str, Any], key: str) -> None:
    """Make sure active ``job`` has its work claim; TemporaryError while an old one goes."""
    if settings.work_volume is None:
        return
    name, uid = str(job["metadata"]["name"]), str(job["metadata"].get("uid") or "")
    with _lock:
        if _seen.get(name) == uid:
            return
    body = jobs.work_claim(obj, job, key, settings)
    claim = body["metadata"]["name"]
    try:
        client.create(kube.PVCS, body, settings.namespace)
        log.info("publish work volume created", extra={"job": name, "claim": claim,
                                                       "size": settings.work_volume.size})
    except kube.Conflict:
        found = client.get(kube.PVCS, claim, settings.namespace)
        meta = found.get("metadata") or {}
        owners = {o.get("uid") for o in meta.get("ownerReferences") or []}
        if meta.get("deletionTimestamp") or (owners and uid not in owners):
            # an earlier Job's, being collected: its pod would mount a dying volume
            raise TemporaryError(f"the work volume {claim} of an earlier Job {name} is still "
                                 "being deleted", reason="WorkVolumePending", delay=5) from None
    with _lock:
        _seen[name] = uid


def release(client: kube.Kube, settings: jobs.Settings, job: str) -> None:
    """Delete ``job``'s work claim once the Job has finished (the staged bytes are of no
    more use: pushed, or failed for good); the garbage collector would only take it with
    the Job, a day later (``ttlSecondsAfterFinished``)."""
    with _lock:
        _seen.pop(job, None)
    if settings.work_volume is None:
        return
    try:
        client.delete(kube.PVCS, jobs.work_claim_name(job), settings.namespace,
                      propagation=None)
    except kube.NotFound:
        pass
    except kube.ApiError as e:
        log.info("work volume not deleted", extra={"job": job, "error": str(e)[:200]})
