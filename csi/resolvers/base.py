"""The resolver seam: a volume's ``model`` / ``clusterModel`` becomes a registry reference.

Where it sits: the node service (``csi.node``) parses a publish's
volume_context into a ``Volume`` here, then asks its ``Resolver``
``resolve(volume)``. Two implement it: ``csi.resolvers.file.FileResolver``
(``--models-file``: standalone nodes, tests, csi-sanity) and
``csi.resolvers.kube.KubeResolver`` (Model/ClusterModel status from the API
server); ``NoResolver`` answers when neither is configured.

Rules every resolver keeps: a ``model`` is looked up in the pod's own
namespace, so a name that exists elsewhere is still NOT_FOUND, unless the
volume names its owner (``modelNamespace``): then only a Model that owner
shares with the pod's namespace is served (``api.sharing``; the kube
resolver checks, PERMISSION_DENIED otherwise; the file resolver serves no
shared Model); a pinned
``digest`` stays in the model's own repository. The volume attribute names
are the delivery contract's (``api.names``); the pod's namespace is
kubelet's (``podInfoOnMount``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from api import names
from csi import errors
from modelpack import digest as dg
from modelpack.errors import ModelPackError
from modelpack.oci.reference import Reference

NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"  # kubelet's, with podInfoOnMount
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"  # kubelet's, for an inline (pod) volume
POD_UID_KEY = "csi.storage.k8s.io/pod.uid"  # kubelet's, with podInfoOnMount
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def require_inline(ctx: dict[str, str]) -> None:
    """Only a pod's own inline volume gets a model: kubelet sets ``ephemeral=true`` and
    the pod's uid. A PersistentVolume naming this driver (its volumeAttributes written by
    whoever made the PV, not checked by the webhook) is refused, INVALID_ARGUMENT."""
    if ctx.get(EPHEMERAL_KEY, "").strip().lower() != "true":
        raise errors.invalid(f"only inline ephemeral volumes are served ({EPHEMERAL_KEY}="
                             "\"true\" from kubelet); a PersistentVolume gets no model")
    if not ctx.get(POD_UID_KEY, "").strip():
        raise errors.invalid(f"{POD_UID_KEY} is required; is podInfoOnMount set on the "
                             "CSIDriver?")


def describe(cluster: bool, name: str | None, namespace: str | None) -> str:
    """``ClusterModel 'x'`` / ``Model 'x' in namespace 'y'``: how answers name a model."""
    if cluster:
        return f"ClusterModel {name!r}"
    return f"Model {name!r} in namespace {namespace!r}"


@dataclass(frozen=True)
class Volume:
    """What a volume asks for, from its volume_context."""

    namespace: str | None  # the pod's (kubelet's)
    model: str | None = None
    cluster_model: str | None = None
    digest: str | None = None
    model_namespace: str | None = None  # a shared Model's owner; None = the pod's own

    @property
    def owner(self) -> str | None:
        """The namespace the Model is looked up in."""
        return self.model_namespace or self.namespace

    @property
    def key(self) -> str:
        """A stable name of the request (for idempotency checks and logs)."""
        if self.cluster_model:
            name = f"clusterModel/{self.cluster_model}"
        else:
            name = f"model/{self.owner}/{self.model}"
        return name + (f"@{self.digest}" if self.digest else "")

    @property
    def what(self) -> str:
        if self.cluster_model:
            return describe(True, self.cluster_model, None)
        return describe(False, self.model, self.owner)

    @classmethod
    def from_context(cls, ctx: dict[str, str]) -> Volume:
        model = ctx.get(names.ATTR_MODEL, "").strip() or None
        cluster = ctx.get(names.ATTR_CLUSTER_MODEL, "").strip() or None
        if bool(model) == bool(cluster):
            raise errors.invalid(f"volumeAttributes need exactly one of {names.ATTR_MODEL!r} "
                                 f"or {names.ATTR_CLUSTER_MODEL!r}")
        namespace = ctx.get(NAMESPACE_KEY, "").strip() or None
        if model and not namespace:
            raise errors.invalid(f"{names.ATTR_MODEL!r} needs the pod's namespace "
                                 f"({NAMESPACE_KEY}); is podInfoOnMount set on the CSIDriver?")
        owner = ctx.get(names.ATTR_MODEL_NAMESPACE, "").strip() or None
        if owner and (not model or len(owner) > 63 or not _DNS_LABEL.match(owner)):
            raise errors.invalid(f"{names.ATTR_MODEL_NAMESPACE!r} must be a namespace name, "
                                 f"with {names.ATTR_MODEL!r}")
        digest = ctx.get(names.ATTR_DIGEST, "").strip() or None
        if digest:
            try:
                dg.validate(digest)
            except ModelPackError as e:
                raise errors.invalid(f"invalid digest {digest!r}: {e}") from e
        return cls(namespace, model, cluster, digest,
                   owner if owner and owner != namespace else None)


@dataclass(frozen=True)
class Resolved:
    reference: Reference
    pin: bool = False


class Resolver(Protocol):
    def resolve(self, volume: Volume) -> Resolved: ...


class NoResolver:
    """Used when no --models-file is given: every model is NOT_FOUND."""

    def resolve(self, volume: Volume) -> Resolved:
        raise errors.not_found(f"{volume.key}: no model source configured on this node")
