"""Resolvers: a volume's ``model`` / ``clusterModel`` becomes a registry reference.

``Resolver`` is the seam: the node server only asks ``resolve(volume)``.
``FileResolver`` serves standalone nodes and tests from ``--models-file``
(JSON or YAML, re-read whenever its mtime, size or inode changes);
``csi.resolvers.kube.KubeResolver`` reads Model/ClusterModel status from the
API server. A ``model`` is looked up only in the pod's own namespace, so a
name that exists elsewhere is still NOT_FOUND.

The volume attribute names are the delivery contract's
(``api/names.py``), repeated because ``csi`` never
imports ``controller``; tests/unit/test_csi_contract.py keeps them equal.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import yaml

from csi import errors
from modelpack import digest as dg
from modelpack.errors import ModelPackError
from modelpack.oci import reference
from modelpack.oci.reference import Reference

log = logging.getLogger(__name__)

NAMESPACE_KEY = "csi.storage.k8s.io/pod.namespace"
ATTR_MODEL = "model"
ATTR_CLUSTER_MODEL = "clusterModel"
ATTR_DIGEST = "digest"


@dataclass(frozen=True)
class Volume:
    """What a volume asks for, from its volume_context."""

    namespace: str | None
    model: str | None = None
    cluster_model: str | None = None
    digest: str | None = None

    @property
    def key(self) -> str:
        """A stable name of the request (for idempotency checks and logs)."""
        if self.cluster_model:
            name = f"clusterModel/{self.cluster_model}"
        else:
            name = f"model/{self.namespace}/{self.model}"
        return name + (f"@{self.digest}" if self.digest else "")

    @classmethod
    def from_context(cls, ctx: dict[str, str]) -> Volume:
        model = ctx.get(ATTR_MODEL, "").strip() or None
        cluster = ctx.get(ATTR_CLUSTER_MODEL, "").strip() or None
        if bool(model) == bool(cluster):
            raise errors.invalid("volumeAttributes need exactly one of 'model' or 'clusterModel'")
        namespace = ctx.get(NAMESPACE_KEY, "").strip() or None
        if model and not namespace:
            raise errors.invalid(f"'model' needs the pod's namespace ({NAMESPACE_KEY}); "
                                 "is podInfoOnMount set on the CSIDriver?")
        digest = ctx.get(ATTR_DIGEST, "").strip() or None
        if digest:
            try:
                dg.validate(digest)
            except ModelPackError as e:
                raise errors.invalid(f"invalid digest {digest!r}: {e}") from e
        return cls(namespace, model, cluster, digest)


@dataclass(frozen=True)
class Resolved:
    reference: Reference
    pin: bool = False


class Resolver(Protocol):
    def resolve(self, volume: Volume) -> Resolved: ...


def _entry(name: str, value: Any) -> Resolved:
    pin = False
    if isinstance(value, dict):
        pin = bool(value.get("pin", False))
        value = value.get("reference") or value.get("ref")
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a reference string or {{reference, pin}}")
    return Resolved(reference.parse(value), pin)


class FileResolver:
    """Names to references from a JSON/YAML file; re-read when it changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._sig: tuple[int, int, int] | None = None
        self._models: dict[str, Resolved] = {}
        self._cluster: dict[str, Resolved] = {}

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise errors.CsiError(grpc.StatusCode.UNAVAILABLE,
                                  f"models file {self.path} does not exist") from None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return
        with open(self.path) as f:
            text = f.read()
        try:
            doc = yaml.safe_load(text) or {}  # YAML is a superset of JSON
            models = {str(k): _entry(str(k), v) for k, v in (doc.get("models") or {}).items()}
            cluster = {str(k): _entry(str(k), v)
                       for k, v in (doc.get("clusterModels") or {}).items()}
        except (yaml.YAMLError, ValueError, AttributeError, ModelPackError) as e:
            # keep serving the last good file; a half-edited file must not drop every model
            log.error("models file unreadable; keeping the previous one",
                      extra={"path": self.path, "error": str(e)[:300]})
            if self._sig is None:
                raise errors.CsiError(grpc.StatusCode.UNAVAILABLE,
                                      f"models file {self.path} is invalid: {e}") from e
            return
        self._models, self._cluster, self._sig = models, cluster, sig
        log.info("models file loaded", extra={"path": self.path, "models": len(models),
                                              "clusterModels": len(cluster)})

    def resolve(self, volume: Volume) -> Resolved:
        with self._lock:
            self._reload()
            if volume.cluster_model:
                found = self._cluster.get(volume.cluster_model)
                what = f"ClusterModel {volume.cluster_model!r}"
            else:
                found = self._models.get(f"{volume.namespace}/{volume.model}")
                what = f"Model {volume.model!r} in namespace {volume.namespace!r}"
        if found is None:
            raise errors.not_found(f"{what} not found")
        if volume.digest:
            return Resolved(found.reference.with_digest(volume.digest), found.pin)
        return found


class NoResolver:
    """Used when no --models-file is given: every model is NOT_FOUND."""

    def resolve(self, volume: Volume) -> Resolved:
        raise errors.not_found(f"{volume.key}: no model source configured on this node")
