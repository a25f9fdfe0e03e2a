"""The Kubernetes resolver: a volume's Model/ClusterModel, read from the API server.

Implements ``csi.resolvers.base.Resolver``, beside ``FileResolver``.
``NodePublishVolume`` asks ``resolve(volume)`` on an executor thread for
every call, fifty at once when a Deployment scales: it must not GET the
API. So Models (all namespaces) and ClusterModels are kept in memory by the
toolkit's list+watch ``kube.informer.Informer``, one each (one thread, one
connection), trimmed to what a publish needs (``trim``), and ``resolve`` is
a dict lookup read through ``api.model.ModelView`` (``model_entry``).

Rules (the delivery contract, ``api/names.py``):
- ``model`` is looked up in the pod's namespace (kubelet passes it as
  ``csi.storage.k8s.io/pod.namespace``; podInfoOnMount is set on the
  CSIDriver); ``clusterModel`` among ClusterModels. Absent: NOT_FOUND (a
  final answer), never a model of another namespace.
- ``modelNamespace`` names another namespace's Model (``team-a/llama`` in
  the workload's annotation): served only if its owner shares it with the
  pod's namespace (``api.sharing.granted``), checked here at every publish,
  since a pod spec can carry any volume attributes without the webhook's
  say. Not shared, or absent: PERMISSION_DENIED, one message for both.
  Namespace labels (for a selector grant) by a cached GET; unreadable:
  UNAVAILABLE. A revoked grant refuses new publishes; a mount already made
  is answered from the node's records without asking (``csi.node``).
- Present but without a servable artifact (``ModelView.servable_digest``:
  a first publish running or failed, the model being deleted): UNAVAILABLE,
  which kubelet retries; the watch brings the artifact when it comes. Not
  the phase: a model whose newer generation is publishing, or failed to,
  keeps serving its last published artifact.
- A Model being validated (phase Validating, ``controller/models/validation.py``)
  also resolves a volume that pins the candidate its status names
  (``status.validation.digest``): the validation Job's pod, in the model's
  own namespace, mounts the tree before it is servable. Any other pod of that
  namespace could name it too: its own model's artifact, nothing more; a pod
  of a namespace the model is shared with never gets an unvalidated candidate.
- The answer is always by digest (``<repository>@<servable digest>``),
  never a tag: the node pulls exactly what the controller verified.
- A volume may pin ``digest`` (the webhook pins the digest a workload was
  admitted with, so its pods keep one version while the Model moves on).
  It resolves to ``<the model's own repository>@<pinned digest>``, and a
  pinned digest other than the current one must be one of the model's
  generations (``status.history``; a status from before it lists none), and
  is first confirmed to be in that
  repository (one manifest GET per repository and digest, remembered):
  the node cache is keyed by digest alone, so without the check a pod could
  name the digest of another namespace's model and be shown that tree from
  the cache without the registry ever being asked. The registry unreachable
  (a retryable error), the check passes only if this node's cache already
  pulled that very ``<repository>@<digest>`` (``verified``: the cache
  records each reference it pulled, after this same check or from the
  model's status), so a pod of the model keeps starting from the node cache
  while the registry is down, and a digest the repository was never seen
  to hold is still refused.

The API server down: the watch's last state keeps answering for
``max_stale`` seconds after the connection broke (Models rarely change, and
a node must keep serving pods while the control plane restarts); after
that, and before the first list ever succeeded, every answer is
UNAVAILABLE. A name missing from the cache is confirmed by one GET (the
watch may lag a Model created a moment ago); a GET that fails is
UNAVAILABLE, not NOT_FOUND, since absence is then unknown.

Credentials come from ``--kubeconfig`` or the pod's service account
(``kube.client.Kube.from_config``; the ``kubernetes`` package underneath
refreshes the projected token itself). Neither a
token nor an object's spec beyond ``delivery.nodeCache`` is ever logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from api import conditions, names, sharing
from api.model import CLUSTER_MODEL, MODEL, ModelView
from api.model import repository as model_repository
from csi import errors, metrics
from csi.resolvers.base import Resolved, Volume, describe
from kube import client as kube
from kube.informer import Informer, Key, Obj
from kube.namespaces import NamespaceLabels
from modelpack import digest as dg
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import reference
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)


def connection_gauge(resource: str) -> Callable[[bool], None]:
    """An informer's ``on_connection``: ``modelcache_node_kube_watch_connected{resource}``."""
    gauge = metrics.KUBE_WATCH_CONNECTED.labels(resource)
    return lambda up: gauge.set(1 if up else 0)


def trim(obj: Obj) -> Obj:
    """What a publish or a prefetch reads of a Model/ClusterModel (the informers'
    transform): names, ``spec.delivery.nodeCache``, the phase, the artifact and the
    Ready condition (what ``ModelView.servable_digest`` reads), and ``spec.sharing``
    (``api.sharing``). Nothing else of the spec is kept, nor ever logged."""
    view = ModelView.of(obj)
    meta = obj.get("metadata") or {}
    node_cache = (view.spec.get("delivery") or {}).get("nodeCache")
    artifact = {k: v for k, v in (("digest", view.digest), ("reference", view.reference)) if v}
    spec: Obj = {"delivery": {"nodeCache": node_cache}} if node_cache is not None else {}
    if view.spec.get("sharing") is not None:
        spec["sharing"] = view.spec["sharing"]
    candidate = (obj.get("status") or {}).get("validation") or {}
    return {
        "kind": obj.get("kind") or (MODEL if meta.get("namespace") else CLUSTER_MODEL),
        "metadata": {**{k: meta[k] for k in ("name", "namespace", "resourceVersion",
                                             "deletionTimestamp") if k in meta},
                     # the owner's pin and the history it may name (ModelView.pinned)
                     "annotations": {names.PIN: view.pin_requested} if view.pin_requested
                     else {}},
        "spec": spec,
        "status": {"phase": view.phase or None, "artifact": artifact,
                   "history": [{"digest": h.get("digest")} for h in view.history],
                   "conditions": [dict(c) for c in view.conditions
                                  if c.get("type") == conditions.READY],
                   "validation": {k: candidate.get(k) for k in ("digest", "reference")}
                   if view.phase == conditions.VALIDATING and isinstance(candidate, dict)
                   else None},
    }


@dataclass(frozen=True)
class ModelEntry:
    """What the node needs of a Model or ClusterModel."""

    kind: str  # Model | ClusterModel
    namespace: str  # "" for a ClusterModel
    name: str
    phase: str
    repository: Reference | None  # the artifact's repository (no tag, no digest)
    digest: str | None  # the servable artifact's
    pin: bool
    prefetch: dict[str, str] | None  # spec.delivery.nodeCache.prefetch.nodeSelector
    problem: str  # why it cannot be served now; "" when it can
    candidate: Reference | None = None  # a Validating model's candidate, by digest
    # status.history's digests (ModelView.generations); () for a status from before it
    generations: tuple[str, ...] = ()

    @property
    def what(self) -> str:
        return describe(self.kind == CLUSTER_MODEL, self.name, self.namespace)

    def reference(self, pinned: str | None = None) -> Reference:
        """``<repository>@<digest>``, the volume's pinned digest first.

        A pinned digest is looked up in *this* model's repository only, so a
        volume cannot name a digest and reach another namespace's artifact:
        the registry answers "manifest unknown" for a digest the repository
        does not hold.
        """
        assert self.repository is not None and self.digest is not None
        return Reference(self.repository.host, self.repository.repository, None,
                         pinned or self.digest)


def model_entry(obj: Obj) -> ModelEntry:
    """What the node makes of a (trimmed) Model or ClusterModel: the reference to pull,
    or the problem that makes it unservable now."""
    view = ModelView.of(obj)
    node_cache = (view.spec.get("delivery") or {}).get("nodeCache") or {}
    prefetch = node_cache.get("prefetch")
    selector = None
    if isinstance(prefetch, dict) and isinstance(prefetch.get("nodeSelector"), dict):
        selector = {str(k): str(v) for k, v in prefetch["nodeSelector"].items()}
    phase = view.phase or conditions.PENDING
    digest = view.servable_digest  # not the phase: a re-publish keeps serving the last one
    repo: Reference | None = None
    problem = ""
    if view.digest and not view.has_artifact:
        problem = f"status.artifact is invalid: digest {view.digest[:100]!r}"
    elif not digest:
        problem = f"phase is {phase}"
        ready = view.condition(conditions.READY)
        if ready is not None and ready.get("message"):
            problem += f" ({str(ready['message'])[:200]})"
    elif not view.reference:
        problem = "status.artifact has no reference"
    else:
        try:
            parsed = reference.parse(view.reference)
            repo = Reference(parsed.host, parsed.repository)
        except ModelPackError as e:
            problem = f"status.artifact is invalid: {e}"
    return ModelEntry(kind=view.kind, namespace=view.namespace, name=view.name, phase=phase,
                      repository=repo, digest=digest or None,
                      pin=bool(node_cache.get("pin", False)), prefetch=selector,
                      problem=problem, candidate=_candidate(obj),
                      generations=view.generations if view.history else ())


def _candidate(obj: Obj) -> Reference | None:
    """A Validating model's candidate (``status.validation``) as ``<its repository>@<digest>``;
    None otherwise, or when the reference is not in the model's own repository."""
    found = ((obj.get("status") or {}).get("validation") or {})
    if (obj.get("status") or {}).get("phase") != conditions.VALIDATING or not found:
        return None
    digest, ref = str(found.get("digest") or ""), str(found.get("reference") or "")
    try:
        parsed = reference.parse(ref)
        dg.validate(digest)
    except ModelPackError:
        return None
    if parsed.repository != model_repository(obj):
        return None
    return Reference(parsed.host, parsed.repository, None, digest)


class KubeResolver:
    """Resolve volumes from the informers' copy of Models and ClusterModels."""

    def __init__(self, client: kube.Kube, client_for: Callable[[str], RegistryClient], *,
                 max_stale: float = 600.0, watch_timeout: int = 300,
                 verified: Callable[[Reference], bool] | None = None) -> None:
        self.client = client
        self.client_for = client_for
        # the node cache: has it pulled this <repository>@<digest> before? (registry down)
        self.verified = verified
        self.max_stale = max_stale
        self._confirmed: set[str] = set()  # "<repository>@<digest>" found in the registry
        self.namespace_labels = NamespaceLabels(client)  # for spec.sharing.namespaceSelector
        self.models = Informer(client, kube.MODELS, transform=trim, watch_timeout=watch_timeout,
                               on_connection=connection_gauge("models"))
        self.cluster_models = Informer(client, kube.CLUSTER_MODELS, transform=trim,
                                       watch_timeout=watch_timeout,
                                       on_connection=connection_gauge("clustermodels"))

    def start(self) -> KubeResolver:
        self.models.start()
        self.cluster_models.start()
        return self

    def stop(self) -> None:
        self.models.stop()
        self.cluster_models.stop()

    def entries(self) -> list[ModelEntry]:
        """Every Model and ClusterModel known (for prefetch)."""
        return [model_entry(o) for o in (*self.models.items(), *self.cluster_models.items())]

    def resolve(self, volume: Volume) -> Resolved:
        if volume.cluster_model:
            informer, key = self.cluster_models, ("", volume.cluster_model)
        else:
            assert volume.owner and volume.model  # Volume.from_context checked
            informer, key = self.models, (volume.owner, volume.model)
        what = volume.what
        if not informer.synced.is_set():
            raise errors.unavailable(f"{what}: not yet synced with the API server")
        stale = informer.stale_for()
        if stale > self.max_stale:
            raise errors.unavailable(
                f"{what}: the API server has been unreachable for {stale:.0f}s")
        obj = informer.get(key)
        if obj is None:
            obj = self._fetch(key, volume)
        if volume.model_namespace:
            self._check_shared(volume, obj)
        entry = model_entry(obj)
        if volume.digest and entry.candidate is not None and volume.owner == volume.namespace \
                and volume.digest == entry.candidate.digest:
            return Resolved(entry.candidate, entry.pin)  # a validation Job's pod
        if entry.problem:
            raise errors.unavailable(f"{entry.what} is not ready: {entry.problem}")
        ref = entry.reference(volume.digest)
        if volume.digest and volume.digest != entry.digest:
            self._confirm_pinned(ref, entry)
        return Resolved(ref, entry.pin)

    def _confirm_pinned(self, ref: Reference, entry: ModelEntry) -> None:
        """Is a pinned (older) digest one of the model's generations, and in its own
        repository? Raises if not."""
        if entry.generations and ref.digest not in entry.generations:
            raise errors.not_found(f"{ref.digest} is not one of the generations of "
                                   f"{entry.what} (its status.history)")
        if str(ref) in self._confirmed:
            return
        try:
            self.client_for(ref.host).get_manifest(ref)
        except NotFoundError:
            raise errors.not_found(f"{ref.digest} is not an artifact of {entry.what} (a "
                                   "pinned digest is looked up in the model's own "
                                   "repository)") from None
        except ModelPackError as e:
            # the registry away: what this node pulled from this very repository before
            # still holds (the manifest's digest names its bytes); anything else does not
            if not (e.retryable and self.verified is not None and self.verified(ref)):
                raise  # leaves as its gRPC code (csi.errors)
            log.info("registry unreachable; pinned digest confirmed by the node cache",
                     extra={"reference": str(ref), "error": str(e)[:200]})
            return
        self._confirmed.add(str(ref))

    def _check_shared(self, volume: Volume, obj: Obj) -> None:
        """Another namespace's Model: raises PERMISSION_DENIED unless its owner shares it
        with the pod's namespace."""
        assert volume.namespace
        try:
            ok = sharing.granted(obj, volume.namespace, self.namespace_labels)
        except kube.ApiError as e:
            raise errors.unavailable(f"cannot read the labels of namespace "
                                     f"{volume.namespace!r} ({kube.brief(e)})") from None
        if not ok:
            raise _not_shared(volume)

    def _fetch(self, key: Key, volume: Volume) -> Obj:
        """A miss in the cache: one GET decides between NOT_FOUND and a lagging watch."""
        namespace, name = key
        res = kube.MODELS if namespace else kube.CLUSTER_MODELS
        try:
            obj: Any = self.client.get(res, name, namespace or None, timeout=(3, 5))
        except kube.NotFound:  # the answer
            if volume.model_namespace:  # as a refusal: absence elsewhere is not told
                raise _not_shared(volume) from None
            raise errors.not_found(f"{volume.what} not found") from None
        except kube.ApiError as e:  # absence is unknown
            raise errors.unavailable(
                f"{volume.what}: cannot ask the API server ({kube.brief(e)})") from None
        return trim(obj)


def _not_shared(volume: Volume) -> errors.CsiError:
    return errors.CsiError(grpc.StatusCode.PERMISSION_DENIED, sharing.refusal(
        str(volume.model_namespace), str(volume.model), str(volume.namespace)))
