"""A model's generations: ``status.history``, the owner's pin, and their garbage collection.

Where it sits: ``publish.apply_result`` records each artifact published
(``record``) in the same status write that makes it current, then calls
``ensure``, as does the reconciler's steady state (a Ready or Failed model
whose publish key is current: an annotation such as the pin changed, or a
retry came due). ``ensure`` says whether the owner's pin holds (the
``Pinned`` condition) and collects the generations that fell out of
retention.

Why a status list and not the registry's ``gen-N`` tags: a re-publish of the
same generation (a reimport, an upstream move, a Secret rotation) pushes to
the same tag, so tags forget what served before; the status keeps every
digest with its source revision and time, and survives controller restarts.

Retention (``Settings.history_keep``, the manager's ``--history-keep``): the
newest ``keep`` generations stay. An older one is deleted from the registry
(by digest: its manifest, and the tags that point at it; the registry's own
garbage collector reclaims the blobs) and leaves the history, unless it is
*held*: the current artifact, the pinned one, or a digest some live pod
mounts (an injected CSI volume's pinned ``digest`` attribute, or a SharedPVC
claim's sub-path). A live pod that mounts the model without a digest (admitted
before its first artifact) may hold any of them, so the model's collection
waits. Held generations stay listed and are retried every ``RETRY`` seconds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from api import conditions as c
from api import model, podspec
from api import names as n
from api.model import ModelView
from controller.errors import Result, TemporaryError
from controller.models import publishjob as jobs
from kube import client as kube
from kube.events import Recorder
from modelpack.errors import ModelPackError
from modelpack.oci.registry import RegistryClient

log = logging.getLogger(__name__)

MAX_KEEP = 50  # the most --history-keep may ask
LISTED_MAX = 100  # the CRD's maxItems: retention plus generations pods hold
RETRY = 300.0  # seconds between collections while a pod holds an old generation
PINNED = "Pinned"  # the condition type; reasons below
PIN_NOT_FOUND, NOT_PINNED = "PinNotFound", "NotPinned"
_LIVE = ("Pending", "Running", "Unknown", "")  # pod phases whose volumes may be mounted
_NOT_DONE = "status.phase!=Succeeded,status.phase!=Failed"  # the API server filters first

Entry = dict[str, Any]


def entry(generation: int, result: Mapping[str, Any], published_at: str) -> Entry:
    """One ``status.history`` item for a publish result (the worker's, an upload's)."""
    return {"generation": generation, "digest": str(result["digest"]),
            "revision": str(result.get("resolvedRevision") or ""),
            "publishedAt": published_at, "sizeBytes": int(result.get("sizeBytes") or 0),
            "reference": str(result.get("reference") or "")}


def record(history: Iterable[Mapping[str, Any]], new: Entry) -> list[Entry]:
    """``new`` first, then the rest without its digest: a digest published again moves
    up (a reimport of unchanged files). The same result recorded twice changes nothing."""
    old = [dict(h) for h in history]
    if old and old[0].get("digest") == new["digest"] \
            and old[0].get("generation") == new["generation"]:
        return old
    return [new, *(h for h in old if h.get("digest") != new["digest"])][:LISTED_MAX]


def clamp(keep: int) -> int:
    return max(1, min(MAX_KEEP, keep))


@dataclass(frozen=True)
class Plan:
    """What a collection does: the history that stays, the digests to delete."""

    keep: list[Entry]
    collect: list[str]
    held: list[str]  # older than retention, but held (mounted, current or pinned)


def plan(history: Iterable[Mapping[str, Any]], keep: int, held: set[str]) -> Plan:
    """The newest ``keep`` entries stay; older ones go unless ``held``."""
    stay: list[Entry] = []
    collect: list[str] = []
    kept_held: list[str] = []
    for i, h in enumerate(history):
        digest = str(h.get("digest") or "")
        if i < clamp(keep):
            stay.append(dict(h))
        elif digest in held:
            stay.append(dict(h))
            kept_held.append(digest)
        else:
            collect.append(digest)
    return Plan(stay, collect, kept_held)


@dataclass(frozen=True)
class Mounts:
    """What live pods mount: pinned digests, and models mounted without a digest."""

    digests: frozenset[str]
    unpinned: frozenset[tuple[str, str, str]]  # (kind, namespace, name); namespace "" for CM


def mounts(pods: Iterable[Mapping[str, Any]]) -> Mounts:
    """Read the injected volumes of live pods (``api.podspec``): each CSI volume's
    ``digest`` attribute (the webhook pins the digest admitted), else its model; each
    SharedPVC claim's sub-path (the manifest hex)."""
    digests: set[str] = set()
    unpinned: set[tuple[str, str, str]] = set()
    for pod in pods:
        if str((pod.get("status") or {}).get("phase") or "") not in _LIVE:
            continue
        meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
        for v in spec.get("volumes") or []:
            if not podspec.is_injected_volume(v):
                continue
            if "csi" in v:
                attrs = v["csi"].get("volumeAttributes") or {}
                if attrs.get(n.ATTR_DIGEST):
                    digests.add(str(attrs[n.ATTR_DIGEST]))
                elif attrs.get(n.ATTR_CLUSTER_MODEL):
                    unpinned.add((model.CLUSTER_MODEL, "", str(attrs[n.ATTR_CLUSTER_MODEL])))
                else:
                    ns = attrs.get(n.ATTR_MODEL_NAMESPACE) or meta.get("namespace") or ""
                    unpinned.add((model.MODEL, str(ns), str(attrs.get(n.ATTR_MODEL) or "")))
        for lst in ("initContainers", "containers"):
            for ctr in spec.get(lst) or []:
                for m in ctr.get("volumeMounts") or []:
                    if str(m.get("name") or "").startswith(n.VOLUME_PREFIX) and m.get("subPath"):
                        digests.add(f"sha256:{m['subPath']}")
    return Mounts(frozenset(digests), frozenset(unpinned))


def pin_condition(view: ModelView) -> dict[str, Any] | None:
    """The ``Pinned`` condition for the owner's pin; None when there never was one."""
    pin = view.pin_requested
    if not pin:
        if view.condition(PINNED) is None:
            return None
        return c.condition(PINNED, False, NOT_PINNED, "serving the latest published "
                           f"artifact {view.digest}")
    if not view.pinned:
        return c.condition(PINNED, False, PIN_NOT_FOUND,
                           f"{n.PIN} {pin[:80]!r} is not one of this model's generations "
                           f"(status.history); serving {view.digest}")
    gen = next((h for h in view.history if h.get("digest") == pin), {})
    return c.condition(PINNED, True, PINNED, f"serving generation {gen.get('generation', '?')} "
                       f"({pin}, revision {gen.get('revision') or '?'}) instead of the latest "
                       f"{view.digest}")


# -- the controller's half -------------------------------------------------------------


class Host(Protocol):
    client: kube.Kube
    settings: jobs.Settings
    recorder: Recorder
    registry: Callable[[], RegistryClient]

    def write_status(self, obj: dict[str, Any], patch: dict[str, Any],
                     what: str = "status") -> dict[str, Any]: ...


def ensure(host: Host, obj: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    """The pin's condition, then a collection when the history is over retention.
    Returns the object as written, and seconds until the next try when a pod holds an
    old generation."""
    view = ModelView.of(obj)
    cond = pin_condition(view)
    if cond is not None:
        if cond["reason"] == PIN_NOT_FOUND and (view.condition(PINNED) or {}).get(
                "reason") != PIN_NOT_FOUND:
            host.recorder.record(obj, "Warning", PIN_NOT_FOUND, cond["message"])
        obj = host.write_status(obj, {"conditions": [cond]}, what="pin")
    if len(view.history) <= clamp(host.settings.history_keep):
        return obj, None
    return collect(host, obj)


def sooner(res: Result, wait: float | None) -> Result:
    """``res``, asking for a pass after ``wait`` seconds if that comes first."""
    if wait is None or (res.requeue_after is not None and res.requeue_after <= wait):
        return res
    return Result(requeue_after=wait, follow_up=res.follow_up)


def collect(host: Host, obj: dict[str, Any]) -> tuple[dict[str, Any], float | None]:
    view = ModelView.of(obj)
    pods, _ = host.client.list(kube.PODS, None, field_selector=_NOT_DONE)
    live = mounts(pods)
    me = (view.kind, view.namespace, view.name)
    if me in live.unpinned:
        log.info("history collection waits: a pod mounts the model without a digest",
                 extra={"model": view.full_name})
        return obj, RETRY
    held = set(live.digests) | {view.digest, view.pinned} - {""}
    p = plan(view.history, host.settings.history_keep, held)
    repository = model.repository(obj)
    client = host.registry()
    try:
        for digest in p.collect:
            client.delete_manifest(repository, digest)
    except ModelPackError as e:
        raise TemporaryError(f"deleting an old generation of {repository}: {e}",
                             reason="RegistryError") from e
    if p.collect:
        obj = host.write_status(obj, {"history": p.keep}, what="history")
        host.recorder.record(obj, "Normal", "GenerationsCollected",
                             f"deleted {len(p.collect)} old generation(s) from the registry: "
                             f"{', '.join(p.collect)}"[:1000])
        log.info("old generations collected", extra={"model": view.full_name,
                                                     "digests": p.collect})
    return obj, RETRY if p.held else None
