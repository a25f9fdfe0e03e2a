"""A Model's deletion: the finalizer's work, done before the object may go.

Where it sits: step 1 of ``reconciler.py``, for a model with a
``deletionTimestamp``. Phase Deleting; its publish Jobs and their copied
Secrets deleted; an upload token Secret or a PVC reader Job removed (nothing
else would: they live in the model's namespace, without an owner there);
every manifest of the model's repository deleted from the registry
(``artifacts``); then the finalizer dropped, compare-and-swap on the
resourceVersion. A registry error leaves the finalizer for a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from api import conditions as c
from api import model, names
from api.model import ModelView
from controller.metrics import Metrics
from controller.models import artifacts, publish, pvcsource
from controller.models import publishjob as jobs
from controller.upload import client as uploads
from kube import client as kube
from kube.events import Recorder
from kube.informer import Informer
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


class Host(Protocol):
    """What deletion needs of the reconciler."""

    client: kube.Kube
    settings: jobs.Settings
    jobs: Informer
    recorder: Recorder
    metrics: Metrics
    registry: Callable[[], RegistryClient]

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...

    def res(self, obj: dict[str, Any]) -> kube.Resource: ...

    def ns(self, obj: dict[str, Any]) -> str | None: ...


def finalize(host: Host, obj: dict[str, Any]) -> None:
    meta = obj["metadata"]
    fins = list(meta.get("finalizers") or [])
    if names.FINALIZER not in fins:
        return
    obj = host.write_status(obj, {"phase": c.DELETING, "conditions": [
        c.condition("Ready", False, "Deleting", "the model is being deleted")]})
    view = ModelView.of(obj)
    for job in host.jobs.items():
        if ((job["metadata"].get("labels") or {}).get(names.LABEL_UID)) == view.uid:
            jname = job["metadata"]["name"]
            host.client.delete(kube.JOBS, jname, host.settings.namespace)
            publish.cleanup_secret_copy(host.client, host.settings, jname)
    source = view.spec.get("source") or {}
    if "upload" in source:
        uploads.delete_secret(host.client, obj, host.settings)  # no GC without a kcm
    if "pvc" in source:
        pvcsource.cleanup(host.client, obj)  # a running reader would go on uploading
    repo = model.repository(obj)
    # the history's too: a re-publish of one generation re-tags gen-N, untagging the last
    deleted = artifacts.delete_all(host.registry(), repo, list(view.generations))
    host.metrics.artifacts_deleted.inc(len(deleted))
    if deleted:
        host.recorder.record(obj, "Normal", "ArtifactDeleted",
                             f"deleted {len(deleted)} manifest(s) of {repo}")
    rest = [f for f in fins if f != names.FINALIZER]
    try:
        host.client.patch(host.res(obj), meta["name"], {"metadata": {
            "finalizers": rest or None, "resourceVersion": obj["metadata"]["resourceVersion"]}},
            host.ns(obj))
    except kube.NotFound:
        return
    log.info("finalized", extra={"model": view.full_name, "deleted": len(deleted)})
