"""Typed, frozen views of a Model / ClusterModel body: every status field named once.

Where it sits: the manager's reconcilers, the webhook, the gate lifter, the
SharedPVC reconciler, the catalog, the CLI and the node plugin's Kubernetes
resolver all read the same few fields of a model (its phase, the artifact's
digest, the resolved metadata). They read them through ``ModelView.of(obj)``
instead of walking ``obj["status"]["artifact"]["digest"]`` by hand, so a field
is spelled in one place and a missing or malformed one reads as empty, never
as a ``KeyError`` deep in a reconcile.

The *servable artifact* (``ModelView.servable_digest``) is the one answer
every consumer gives to "which artifact does a new pod get": the last
artifact that was published and verified. ``status.artifact`` stays that
artifact while a newer generation publishes and after a newer one fails (a
failed *first* publish has none); the phase says what the controller is
doing (Publishing, Failed…) and the Ready condition says whether the model
serves meanwhile (``ready_condition``). The node resolver, the gate lifter,
the webhook's digest pin and SharedPVC admission, the SharedPVC reconciler
and the catalog read it, never the phase.

A view is a snapshot: it never writes. Status documents are still written as
merge patches (``api.conditions``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from api import conditions, names

MODEL, CLUSTER_MODEL = "Model", "ClusterModel"

# ``status.resolved``: the metadata a publish (or an adoption, or an import)
# reports, with the names the ModelPack reader uses (modelpack.oci.manifest
# ``Pack.metadata``). The CRD schema lists the same keys.
RESOLVED_FIELDS = ("format", "family", "architecture", "parameterCount", "paramSize",
                   "precision", "quantization", "contextLength", "tensors", "files")

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

# Ready condition reasons while an earlier artifact keeps serving (``ready_condition``)
REPUBLISHING = "Republishing"  # a newer generation (or upstream, or Secret) is publishing
SERVING_PREVIOUS = "ServingPreviousArtifact"  # the newer one failed or cannot start


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def resolved_of(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The ``status.resolved`` document for ModelPack metadata: known keys, no nulls."""
    return {k: meta[k] for k in RESOLVED_FIELDS if meta.get(k) is not None}


def model_kind(obj: Mapping[str, Any]) -> str:
    return str(obj.get("kind") or MODEL)


def repository(obj: Mapping[str, Any]) -> str:
    """The DMCR repository of a model: ``cluster/<name>`` or ``models/<ns>/<name>``."""
    meta = _dict(obj.get("metadata"))
    if model_kind(obj) == CLUSTER_MODEL:
        return f"cluster/{meta['name']}"
    return f"models/{meta['namespace']}/{meta['name']}"


@dataclass(frozen=True)
class ModelView:
    """What the system reads of a Model or ClusterModel."""

    kind: str
    name: str
    namespace: str  # "" for a ClusterModel
    uid: str
    generation: int
    observed_generation: int  # status.observedGeneration, 0 before the first status write
    annotations: Mapping[str, str]
    deleting: bool
    spec: Mapping[str, Any]
    phase: str  # "" until the controller has written one
    digest: str  # status.artifact.digest, "" when none
    size: int  # status.artifact.sizeBytes
    reference: str  # status.artifact.reference
    resolved: Mapping[str, Any]
    resolved_revision: str  # status.source.resolvedRevision
    publish_key: str  # status.publish.key
    progress_total: int  # status.progress.bytesTotal
    upload: Mapping[str, Any]  # status.upload: the session's url, tokenSecretRef, expiresAt
    catalog_digest: str  # status.catalog.digest: the remote digest an import is pinned to
    catalog_key: str  # status.catalog.key: what that pin is valid for (generation, reimport)
    conditions: tuple[Mapping[str, Any], ...] = field(default=())
    # status.history: the generations published and still in the registry, newest first
    # ({generation, digest, revision, publishedAt, sizeBytes, reference})
    history: tuple[Mapping[str, Any], ...] = field(default=())

    @classmethod
    def of(cls, obj: Mapping[str, Any] | None) -> ModelView:
        obj = _dict(obj)
        meta = _dict(obj.get("metadata"))
        status = _dict(obj.get("status"))
        art = _dict(status.get("artifact"))
        conds, hist = status.get("conditions"), status.get("history")
        return cls(
            kind=model_kind(obj),
            name=str(meta.get("name") or ""),
            namespace=str(meta.get("namespace") or ""),
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 1),
            observed_generation=int(status.get("observedGeneration") or 0),
            annotations=_dict(meta.get("annotations")),
            deleting=bool(meta.get("deletionTimestamp")),
            spec=_dict(obj.get("spec")),
            phase=str(status.get("phase") or ""),
            digest=str(art.get("digest") or ""),
            size=int(art.get("sizeBytes") or 0),
            reference=str(art.get("reference") or ""),
            resolved=_dict(status.get("resolved")),
            resolved_revision=str(_dict(status.get("source")).get("resolvedRevision") or ""),
            publish_key=str(_dict(status.get("publish")).get("key") or ""),
            progress_total=int(_dict(status.get("progress")).get("bytesTotal") or 0),
            upload=_dict(status.get("upload")),
            catalog_digest=str(_dict(status.get("catalog")).get("digest") or ""),
            catalog_key=str(_dict(status.get("catalog")).get("key") or ""),
            conditions=tuple(x for x in conds if isinstance(x, Mapping))
            if isinstance(conds, list) else (),
            history=tuple(x for x in hist if isinstance(x, Mapping))
            if isinstance(hist, list) else (),
        )

    @property
    def cluster_scoped(self) -> bool:
        return self.kind == CLUSTER_MODEL

    @property
    def full_name(self) -> str:
        """``namespace/name``, or ``name`` for a ClusterModel: how logs name a model."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def has_artifact(self) -> bool:
        """An artifact digest that is well formed (what a pull could use)."""
        return bool(_DIGEST.match(self.digest))

    def condition(self, type_: str) -> Mapping[str, Any] | None:
        for cond in self.conditions:
            if cond.get("type") == type_:
                return cond
        return None

    def condition_true(self, type_: str) -> bool:
        cond = self.condition(type_)
        return cond is not None and cond.get("status") == "True"

    @property
    def servable_digest(self) -> str:
        """The digest a new pod gets: the servable artifact's, "" when there is none.

        ``status.artifact`` (the last artifact published and verified) when the
        controller says the model serves it, and the model is not being
        deleted: the phase is Ready (the current spec's artifact), or the
        Ready condition is True while the phase is not (``REPUBLISHING``,
        ``SERVING_PREVIOUS``: a newer publish runs, failed or waits). A Failed
        or Pending model whose Ready condition is False serves nothing: a
        failed first publish, or a status written before this rule (the
        reconciler rewrites that one).

        The owner's pin (``modelcache.io/pin``) replaces the artifact by an
        older (or newer) generation of ``status.history`` under the same rule;
        a pin naming anything else is ignored (the controller says
        ``PinNotFound``), so a pin can never make a model serve a digest it
        did not publish.
        """
        if self.deleting or self.phase == conditions.DELETING or not self.has_artifact:
            return ""
        if self.phase == conditions.READY or self.condition_true("Ready"):
            return self.pinned or self.digest
        return ""

    @property
    def generations(self) -> tuple[str, ...]:
        """The digests this model published that are still in its repository: its
        ``status.history``, and the current artifact (a status from before history)."""
        digests = [str(h.get("digest") or "") for h in self.history]
        return tuple(dict.fromkeys(d for d in (*digests, self.digest) if _DIGEST.match(d)))

    @property
    def pin_requested(self) -> str:
        """The owner's ``modelcache.io/pin`` annotation, "" when none."""
        return str(self.annotations.get(names.PIN) or "").strip()

    @property
    def pinned(self) -> str:
        """The pinned generation's digest when the pin names one of ``generations``;
        "" when there is no pin or it names something else (``PinNotFound``)."""
        pin = self.pin_requested
        return pin if pin and pin in self.generations else ""

    @property
    def serving(self) -> bool:
        """There is a servable artifact (``servable_digest``)."""
        return bool(self.servable_digest)


def ready_condition(view: ModelView, reason: str, message: str, *,
                    serving_reason: str = SERVING_PREVIOUS) -> dict[str, Any]:
    """The Ready condition while the current spec has no artifact (publishing, failed,
    waiting for a Secret…): True with ``serving_reason`` while an earlier artifact is
    servable, naming its digest and why the current spec is not published; else False
    with ``reason``. Written with every phase but Ready, so the condition and
    ``servable_digest`` never disagree."""
    if view.has_artifact and not view.deleting and view.phase != conditions.DELETING:
        return conditions.condition(
            "Ready", True, serving_reason,
            f"serving the last published artifact {view.digest}; {message}")
    return conditions.condition("Ready", False, reason, message)
