"""The Kubernetes resolver: a volume's Model/ClusterModel, read from the API server.

Sits behind the ``csi.resolvers.file.Resolver`` seam, beside ``FileResolver``.
``NodePublishVolume`` asks ``resolve(volume)`` on an executor thread for
every call, fifty at once when a Deployment scales: it must not GET the
API. So Models (all namespaces) and ClusterModels are kept in memory by a
list+watch ``Informer`` each (one thread, one connection), trimmed to what
a publish needs (``ModelEntry``), and ``resolve`` is a dict lookup.

Rules (the delivery contract, ``api/names.py``):
- ``model`` is looked up only in the pod's namespace (kubelet passes it as
  ``csi.storage.k8s.io/pod.namespace``; podInfoOnMount is set on the
  CSIDriver); ``clusterModel`` among ClusterModels. Absent: NOT_FOUND (a
  final answer), never a model of another namespace.
- Present but not ``Ready`` (or without ``status.artifact``): UNAVAILABLE,
  which kubelet retries; the watch brings the Ready status when it comes.
- The answer is always by digest (``<repository>@<status.artifact.digest>``),
  never a tag: the node pulls exactly what the controller verified.
- A volume may pin ``digest`` (the webhook pins the digest a workload was
  admitted with, so its pods keep one version while the Model moves on).
  It resolves to ``<the model's own repository>@<pinned digest>``, and a
  pinned digest other than the current one is first confirmed to be in that
  repository (one manifest GET per repository and digest, remembered):
  the node cache is keyed by digest alone, so without the check a pod could
  name the digest of another namespace's model and be shown that tree from
  the cache without the registry ever being asked.

The API server down: the watch's last state keeps answering for
``max_stale`` seconds after the connection broke (Models rarely change, and
a node must keep serving pods while the control plane restarts); after
that, and before the first list ever succeeded, every answer is
UNAVAILABLE. A name missing from the cache is confirmed by one GET (the
watch may lag a Model created a moment ago); a GET that fails is
UNAVAILABLE, not NOT_FOUND, since absence is then unknown.

Credentials come from ``--kubeconfig`` or the pod's service account; the
``kubernetes`` package refreshes the projected token itself. Neither a
token nor an object's spec beyond ``delivery.nodeCache`` is ever logged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

import grpc

from csi import errors, metrics
from csi.errors import CsiError
from csi.resolvers.file import Resolved, Volume
from modelpack import digest as dg
from modelpack.errors import ModelPackError, NotFoundError
from modelpack.oci import reference
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

GROUP, VERSION = "modelcache.io", "v1alpha1"
READY = "Ready"
Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)


def api_client(kubeconfig: str | None) -> Any:
    """A ``kubernetes.client.ApiClient``: from ``kubeconfig``, else in-cluster credentials."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=cfg)
    except (config.ConfigException, OSError) as e:
        # the message names the file or the missing env var, never a credential
        raise ValueError(f"no Kubernetes credentials: {e}") from e
    # two long watches (Models, ClusterModels), the Node watch, and short calls
    cfg.connection_pool_maxsize = 8
    return client.ApiClient(cfg)


def api_error(e: BaseException) -> str:
    """A short, credential-free description of a failed API call."""
    status = getattr(e, "status", None)
    if status:
        return f"HTTP {status} {getattr(e, 'reason', '') or ''}".strip()
    return f"{type(e).__name__}: {str(e)[:200]}"


# -- the in-memory copy of one resource ------------------------------------------------


class WatchError(Exception):
    """An ERROR event in a watch stream (``status`` 410: the history is gone)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"watch error {status} {reason}")
        self.status = status
        self.reason = reason


class Informer:
    """List, then watch, one resource into a dict of ``transform``-ed objects.

    One daemon thread. A broken stream is re-watched from the last
    resourceVersion after a backoff; a 410 (history compacted) re-lists.
    ``listeners`` are called (no arguments, must not block) after every
    change and after every list.
    """

    def __init__(self, name: str, list_fn: Callable[..., Any], transform: Callable[[Obj], Any],
                 *, watch_timeout: int = 300, **selector: str) -> None:
        self.name = name
        self.list_fn = list_fn
        self.transform = transform
        self.selector = selector  # list_fn's positional-free arguments, e.g. field_selector
        self.watch_timeout = watch_timeout
        self.listeners: list[Callable[[], None]] = []
        self.synced = threading.Event()  # the first list succeeded
        self._objects: dict[Key, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._broken_since: float | None = time.monotonic()  # None while connected
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def start(self) -> Informer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ends the thread at its next event or watch timeout (it is a daemon)."""
        self._stop.set()

    def get(self, key: Key) -> Any:
        with self._lock:
            return self._objects.get(key)

    def values(self) -> list[Any]:
        with self._lock:
            return list(self._objects.values())

    def stale_for(self) -> float:
        """Seconds since the connection broke (0 while it is up)."""
        since = self._broken_since
        return 0.0 if since is None else time.monotonic() - since

    def _notify(self) -> None:
        for fn in self.listeners:
            fn()

    def _connected(self, up: bool) -> None:
        if up and self._broken_since is not None:
            self._broken_since = None
        elif not up and self._broken_since is None:
            self._broken_since = time.monotonic()
        metrics.KUBE_WATCH_CONNECTED.labels(self.name).set(1 if up else 0)

    @staticmethod
    def _key(obj: Obj) -> Key:
        meta = obj.get("metadata") or {}
        return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))

    def _list(self) -> str:
        objects: dict[Key, Any] = {}
        cont: str | None = None
        while True:
            resp = self.list_fn(**self.selector, limit=500, _continue=cont,
                                _preload_content=False, _request_timeout=(10, 60))
            doc = json.loads(resp.data)
            for obj in doc.get("items") or []:
                objects[self._key(obj)] = self.transform(obj)
            cont = (doc.get("metadata") or {}).get("continue")
            if not cont:
                break
        with self._lock:
            self._objects = objects
        self._connected(True)
        self.synced.set()
        log.info("listed", extra={"resource": self.name, "objects": len(objects)})
        self._notify()
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def _watch_from(self, rv: str) -> str:
        """One watch request, until the server ends it; returns the last resourceVersion."""
        from kubernetes.watch.watch import iter_resp_lines

        # the read timeout outlives the server's own timeout, and notices a peer that
        # vanished without closing the connection (a partition) within that time
        resp = self.list_fn(**self.selector, watch=True, resource_version=rv,
                            timeout_seconds=self.watch_timeout, allow_watch_bookmarks=True,
                            _preload_content=False,
                            _request_timeout=(10, self.watch_timeout + 30))
        self._connected(True)  # the server answered: a quiet watch is a healthy one
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                if self._stop.is_set():
                    break
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # a Status object; 410 means list again
                    raise WatchError(int(obj.get("code") or 0), str(obj.get("reason") or ""))
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = str(new_rv)
                if kind == "BOOKMARK":
                    continue
                key = self._key(obj)
                with self._lock:
                    if kind == "DELETED":
                        self._objects.pop(key, None)
                    else:
                        self._objects[key] = self.transform(obj)
                self._notify()
        finally:
            resp.close()
            resp.release_conn()
        return rv

    def _run(self) -> None:
        backoff = 0.5
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list()
                rv = self._watch_from(rv)
                backoff = 0.5
            except Exception as e:  # every failure means: back off, then watch or list again
                if getattr(e, "status", None) == 410:
                    log.info("watch expired; listing again", extra={"resource": self.name})
                    rv = None
                    continue
                self._connected(False)
                log.warning("watch broken", extra={"resource": self.name, "error": api_error(e),
                                                   "retryIn": backoff})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)


class Debounced:
    """A daemon thread running ``round()`` soon after ``poke()``.

    A burst of pokes within ``debounce`` seconds is one round; a round also
    runs every ``period`` seconds (repairs, retries) and once at start; a
    failed round is retried after a backoff (1 s doubling to 60 s).
    """

    name = "debounced"

    def __init__(self, debounce: float, period: float) -> None:
        self.debounce = debounce
        self.period = period
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def poke(self) -> None:
        """Something changed: run a round soon (never blocks)."""
        self._wake.set()

    def start(self) -> Self:
        self._wake.set()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def round(self) -> None:
        raise NotImplementedError

    def failed(self, error: Exception, retry_in: float) -> None:
        log.warning("round failed", extra={"worker": self.name, "error": api_error(error),
                                           "retryIn": retry_in})

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self._wake.wait(self.period)
            if self._stop.wait(self.debounce):  # let the burst finish
                return
            self._wake.clear()
            try:
                self.round()
                backoff = 1.0
            except Exception as e:  # the API may be down or slow: try again later
                self.failed(e, backoff)
                self._wake.set()
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 60.0)


# -- Models and ClusterModels --------------------------------------------------------


@dataclass(frozen=True)
class ModelEntry:
    """What the node needs of a Model or ClusterModel."""

    kind: str  # Model | ClusterModel
    namespace: str  # "" for a ClusterModel
    name: str
    phase: str
    repository: Reference | None  # the artifact's repository (no tag, no digest)
    digest: str | None
    pin: bool
    prefetch: dict[str, str] | None  # spec.delivery.nodeCache.prefetch.nodeSelector
    problem: str  # why it cannot be served now; "" when it can

    @property
    def what(self) -> str:
        if self.kind == "Model":
            return f"Model {self.name!r} in namespace {self.namespace!r}"
        return f"ClusterModel {self.name!r}"

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
    """Trim a Model/ClusterModel to a ``ModelEntry`` (the informer's transform)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    node_cache = (spec.get("delivery") or {}).get("nodeCache") or {}
    prefetch = node_cache.get("prefetch")
    selector = None
    if isinstance(prefetch, dict) and isinstance(prefetch.get("nodeSelector"), dict):
        selector = {str(k): str(v) for k, v in prefetch["nodeSelector"].items()}
    artifact = status.get("artifact") or {}
    phase = str(status.get("phase") or "Pending")
    repo: Reference | None = None
    digest = artifact.get("digest") or None
    problem = ""
    if phase != READY:
        problem = f"phase is {phase}"
        for cond in status.get("conditions") or []:
            if cond.get("type") == READY and cond.get("message"):
                problem += f" ({str(cond['message'])[:200]})"
    elif not digest or not artifact.get("reference"):
        problem = "Ready but status.artifact has no reference or digest"
    else:
        try:
            parsed = reference.parse(str(artifact["reference"]))
            repo = Reference(parsed.host, parsed.repository)
            dg.validate(str(digest))
        except ModelPackError as e:
            problem = f"status.artifact is invalid: {e}"
    return ModelEntry(kind=str(obj.get("kind") or ("Model" if meta.get("namespace")
                                                   else "ClusterModel")),
                      namespace=str(meta.get("namespace") or ""), name=str(meta.get("name")),
                      phase=phase, repository=repo, digest=str(digest) if digest else None,
                      pin=bool(node_cache.get("pin", False)), prefetch=selector,
                      problem=problem)


def unavailable(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.UNAVAILABLE, message)


class KubeResolver:
    """Resolve volumes from the informers' copy of Models and ClusterModels."""

    def __init__(self, api: Any, client_for: Callable[[str], RegistryClient], *,
                 max_stale: float = 600.0, watch_timeout: int = 300) -> None:
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.client_for = client_for
        self.max_stale = max_stale
        self._confirmed: set[str] = set()  # "<repository>@<digest>" found in the registry
        self.models = Informer("models", self._list_fn("models"), model_entry,
                               watch_timeout=watch_timeout)
        self.cluster_models = Informer("clustermodels", self._list_fn("clustermodels"),
                                       model_entry, watch_timeout=watch_timeout)

    def _list_fn(self, plural: str) -> Callable[..., Any]:
        def list_objects(**kw: Any) -> Any:
            return self.custom.list_cluster_custom_object(GROUP, VERSION, plural, **kw)

        return list_objects

    def start(self) -> KubeResolver:
        self.models.start()
        self.cluster_models.start()
        return self

    def stop(self) -> None:
        self.models.stop()
        self.cluster_models.stop()

    def entries(self) -> list[ModelEntry]:
        """Every Model and ClusterModel known (for prefetch)."""
        return [*self.models.values(), *self.cluster_models.values()]

    def resolve(self, volume: Volume) -> Resolved:
        if volume.cluster_model:
            informer, key = self.cluster_models, ("", volume.cluster_model)
            what = f"ClusterModel {volume.cluster_model!r}"
        else:
            assert volume.namespace and volume.model  # Volume.from_context checked
            informer, key = self.models, (volume.namespace, volume.model)
            what = f"Model {volume.model!r} in namespace {volume.namespace!r}"
        if not informer.synced.is_set():
            raise unavailable(f"{what}: not yet synced with the API server")
        stale = informer.stale_for()
        if stale > self.max_stale:
            raise unavailable(f"{what}: the API server has been unreachable for {stale:.0f}s")
        entry: ModelEntry | None = informer.get(key)
        if entry is None:
            entry = self._confirm(key, what)
        if entry.problem:
            raise unavailable(f"{entry.what} is not ready: {entry.problem}")
        ref = entry.reference(volume.digest)
        if volume.digest and volume.digest != entry.digest:
            self._confirm_pinned(ref, entry)
        return Resolved(ref, entry.pin)

    def _confirm_pinned(self, ref: Reference, entry: ModelEntry) -> None:
        """Is a pinned (older) digest in the model's own repository? Raises if not."""
        if str(ref) in self._confirmed:
            return
        try:
            self.client_for(ref.host).get_manifest(ref)
        except NotFoundError:
            raise errors.not_found(f"{ref.digest} is not an artifact of {entry.what} (a "
                                   "pinned digest is looked up in the model's own "
                                   "repository)") from None
        self._confirmed.add(str(ref))  # other registry errors leave as their gRPC code

    def _confirm(self, key: Key, what: str) -> ModelEntry:
        """A miss in the cache: one GET decides between NOT_FOUND and a lagging watch."""
        namespace, name = key
        obj: Any
        try:
            if namespace:
                obj = self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, namespace, "models", name, _request_timeout=(3, 5))
            else:
                obj = self.custom.get_cluster_custom_object(
                    GROUP, VERSION, "clustermodels", name, _request_timeout=(3, 5))
        except Exception as e:  # 404 is the answer; anything else leaves absence unknown
            if getattr(e, "status", None) == 404:
                raise errors.not_found(f"{what} not found") from None
            raise unavailable(f"{what}: cannot ask the API server ({api_error(e)})") from None
        return model_entry(obj)
