"""Adoption of an imported artifact: ``modelcache.io/imported-digest`` → Ready, no Job.

Where it sits: ``modelcache import`` (cli/bundle.py) pushes a bundle's
ModelPack to this cluster's registry at the repository the controller uses
for the model (``api.model.repository``) and applies the CR with this
annotation. The reconciler then calls ``ensure`` *instead of* the publish
path: an air-gapped cluster cannot reach the original source, so no Job is
ever made for such a model. ``ensure`` checks that the manifest with that
digest is in the registry (verified, with its config), reads the metadata a
publish would have reported (format, family, parameter count…) and writes
Ready with ``status.artifact``. A manifest not (yet) there is Pending with
reason ``ImportedArtifactMissing`` and looked for again every few seconds; a manifest that
is there but corrupt or not a ModelPack is Failed (terminal until the
annotation or the registry changes).

``spec.updatePolicy`` does not apply to an adopted model: there is no
upstream to re-resolve; a new version arrives as a new bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from api import conditions as c
from api import model, names
from api.model import ModelView
from controller.errors import PermanentError, TemporaryError
from controller.models import publishjob as jobs
from kube.events import Recorder
from modelpack import digest as dg
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pull import resolve

log = logging.getLogger(__name__)

# a missing manifest is looked for again this often (one GET), not with the growing
# per-key backoff: a push may land at any time and should be adopted soon after
MISSING_RETRY = 10.0


class Host(Protocol):
    """What adoption needs of the reconciler."""

    settings: jobs.Settings
    recorder: Recorder
    registry: Callable[[], RegistryClient]

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...


def imported_digest(obj: dict[str, Any]) -> str | None:
    value = ModelView.of(obj).annotations.get(names.IMPORTED)
    return str(value) if value is not None else None


def ensure(host: Host, obj: dict[str, Any]) -> float | None:
    """Ready from the imported manifest, or Pending while it is missing.
    Returns a requeue delay (None: nothing owed)."""
    view = ModelView.of(obj)
    digest = imported_digest(obj) or ""
    # the same digest is Ready already, for this generation
    was_ready = view.phase == c.READY and view.digest == digest
    if was_ready and view.observed_generation == view.generation:
        return None
    try:
        dg.validate(digest)
    except ModelPackError as e:
        raise PermanentError(f"annotation {names.IMPORTED}: {e}", reason="InvalidImportedDigest",
                             condition="Published") from e
    repo = model.repository(obj)
    ref = Reference(host.settings.registry, repo, None, digest)
    try:
        pack = resolve(host.registry(), ref)
    except NotFoundError as e:
        msg = f"{ref} is not in the registry; push it with `modelcache import`"
        if view.phase != c.PENDING:
            host.recorder.record(obj, "Warning", "ImportedArtifactMissing", msg)
        host.write_status(obj, {"phase": c.PENDING, "conditions": [
            c.condition("SourceResolved", True, "Imported", "imported from a bundle"),
            c.condition("Published", False, "ImportedArtifactMissing", msg),
            model.ready_condition(view, "ImportedArtifactMissing", msg)]})
        raise TemporaryError(msg, reason="ImportedArtifactMissing", delay=MISSING_RETRY) from e
    except ModelPackError as e:
        if e.retryable:
            raise TemporaryError(f"reading {ref}: {e}", reason=e.reason) from e
        raise PermanentError(f"imported artifact {ref}: {e}", reason=e.reason,
                             condition="Published") from e
    reference = f"{host.settings.registry}/{repo}:{names.imported_tag(digest)}@{digest}"
    revision = str(view.annotations.get(names.IMPORTED_REVISION) or "")
    host.write_status(obj, {
        "phase": c.READY,
        "progress": c.progress_done(pack.size),
        "artifact": {"digest": digest, "sizeBytes": pack.size, "reference": reference},
        "resolved": model.resolved_of(pack.metadata()),
        "source": {"resolvedRevision": revision},
        "publish": None,  # no Job: dropping the annotation later means "publish from source"
        "conditions": [
            c.condition("SourceResolved", True, "Imported",
                        "imported from a bundle; the source is not contacted"),
            c.condition("Published", True, "Imported", f"{digest} in the registry"),
            c.condition("Ready", True, "Imported", "the model is ready to use")]})
    if not was_ready:
        host.recorder.record(obj, "Normal", "Imported", f"adopted {reference} ({pack.size} bytes)")
        log.info("imported artifact adopted", extra={"model": view.name,
                                                     "digest": digest, "bytes": pack.size})
    return None
