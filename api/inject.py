"""What the admission webhook does to a workload: the pure half of delivery.

Where it sits: ``webhook.py`` decodes an AdmissionReview, binds a lookup to
the manager's informer caches and calls ``mutate`` here; the ``Result`` is
the JSON patch (and the warnings) it sends back. No I/O: every input is an
argument, so unit tests assert the result field by field. This module reads
the request, looks the models up and knows where each kind keeps its pod
template (``TEMPLATE_PATH``); the edit of the pod (template) itself, and its
exact undoing, is ``podspec.py``.

The rules, in one place:

* The request lives in the workload's TOP-LEVEL annotations (``ANN_MODELS``,
  ``ANN_CLUSTER_MODELS``, optional ``ANN_DELIVERY``). The injection goes
  into the pod template (``spec.template``; a CronJob's
  ``spec.jobTemplate.spec.template``) or, for a bare Pod, the pod itself.
* Every container and init container gets every model read-only at
  ``MOUNT_ROOT/<name>`` and the env ``ENV_DIR``/``ENV_MODELS`` (an init
  container may want to warm up or check the files; a read-only mount costs
  nothing). Ephemeral containers are not touched (they are added later by
  a subresource the webhook is not registered for).
* The pod (template) gets the scheduling gate ``GATE``, the label
  ``LABEL_GATED=true`` and the annotation ``ANN_INJECTED`` (a fingerprint of
  what was injected); the workload's top level gets ``ANN_INJECTED`` too and,
  with SharedPVC, ``LABEL_USES_SHARED_PVC=true`` (template as well).
* Idempotence: an injection is ``inject(strip(obj))``; ``strip`` removes
  exactly what an injection adds (recognised by name and driver), so a
  re-apply yields the same object and removing the annotations removes the
  injection and nothing else. An UPDATE that changes neither the model
  annotations nor the user's part of the pod template keeps the injection
  it had, without looking models up (a label or a finalizer change must not
  roll pods to a new digest, nor fail because a model was deleted); an
  update of an object being deleted passes through.
* A Pod is mutated only on CREATE (pods are immutable where it matters), and
  a pod that already carries ``ANN_INJECTED`` and has an owner was made from
  an injected template: it passes through untouched. A Job's pod template is
  immutable after creation, so a Job's UPDATE passes through too (with a
  warning when its model annotations changed).
* Sharing: ``ANN_MODELS`` may name ``<namespace>/<name>``, a Model another
  namespace's owner shares with this one (``api/sharing.py``). It mounts at
  ``MOUNT_ROOT/<namespace>.<name>`` (``Ref.directory``), so it never meets
  the workload's own ``<name>``; two refs with one directory are refused.
  One not shared (or absent) is a 403 with one message for both.
* Delivery mode: ``ANN_DELIVERY`` on the workload, else the model's
  ``spec.delivery.mode``, else the controller default. The digest pinned is
  the model's servable artifact (``ModelView.servable_digest``): while a
  newer generation publishes, and after it failed, the last artifact
  published, with a warning that says so; ``name@sha256:<hex>`` asks for
  that generation instead, refused unless it is one of the model's own
  (``ModelView.generations``). SharedPVC needs the digest at
  admission (it names the PVC): a model with no servable artifact yet is
  refused for SharedPVC. One with none (even Failed) is admitted for
  NodeCache: the gate holds the pods until it has one, with a warning.
* Cache-aware scheduling: a NodeCache model with a known digest that some
  node already caches (``node_label(digest)`` in ``cached_labels``) gets a
  *preferred* node affinity term; user affinity is merged with, never
  replaced. A term already there for the same digest is kept even if no
  node carries the label any more, so a re-apply does not flip it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

from api import names as c
from api import sharing
from api.podspec import (
    InjectError,
    Model,
    Planned,
    Ref,
    affinity_labels,
    drop,
    inject_pod,
    strip_pod,
)

Obj = dict[str, Any]

# where the pod template of each kind lives; () is the object itself (a Pod)
TEMPLATE_PATH: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
KINDS = ("Pod", "Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PIN = re.compile(r"^sha256:[0-9a-f]{64}$")  # name@<digest>: one generation of the model
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

@dataclass
class Result:
    obj: Obj  # the object after mutation (the input itself when nothing changed)
    patch: list[Obj]  # RFC 6902 operations from the input to ``obj``; [] = unchanged
    warnings: list[str] = field(default_factory=list)
    planned: list[Planned] = field(default_factory=list)


# bound to the workload's namespace by the caller: None for a Model that is absent, or is
# another namespace's and not shared with this one (``api.sharing.granted``)
Lookup = Callable[[Ref], Obj | None]

# -- the request ----------------------------------------------------------------


def parse_refs(annotations: dict[str, str] | None) -> list[Ref]:
    """The models a workload asks for, in annotation order, duplicates dropped."""
    ann = annotations or {}
    out: list[Ref] = []
    for key, kind in ((c.ANN_MODELS, "Model"), (c.ANN_CLUSTER_MODELS, "ClusterModel")):
        for raw in str(ann.get(key) or "").split(","):
            name = raw.strip()
            if not name:
                continue
            name, at, pin = name.partition("@")
            if at and not _PIN.match(pin):
                raise InjectError(f"{key}: {raw.strip()!r}: a pin is @sha256:<64 hex digits>")
            owner, slash, name = name.rpartition("/")
            if slash and kind == "ClusterModel":
                raise InjectError(f"{key}: {raw.strip()!r}: a ClusterModel has no namespace")
            if slash and (len(owner) > 63 or not _DNS_LABEL.match(owner)):
                raise InjectError(f"{key}: {raw.strip()!r}: {owner!r} is not a namespace name")
            if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
                raise InjectError(f"{key}: {name!r} is not a valid {kind} name")
            ref = Ref(kind, name, owner, pin)
            if ref not in out:
                out.append(ref)
    dirs = [r.directory for r in out]
    clash = sorted({d for d in dirs if dirs.count(d) > 1})
    if clash:
        who = " and ".join(f"{r.kind} {r.shown}" for r in out if r.directory == clash[0])
        raise InjectError(f"{who} would both mount at {c.MOUNT_ROOT}/{clash[0]}")
    return out


def requested_mode(annotations: dict[str, str] | None) -> str:
    mode = str((annotations or {}).get(c.ANN_DELIVERY) or "").strip()
    if mode and mode not in c.MODES:
        raise InjectError(f"{c.ANN_DELIVERY}: {mode!r} is not one of {', '.join(c.MODES)}")
    return mode


def volume_name(ref: Ref) -> str:
    """``modelcache-m-<name>`` / ``modelcache-c-<name>``, a DNS label of ≤ 63 chars; a name
    that does not fit (too long, or with dots, as a shared Model's ``<ns>.<name>`` has) is
    shortened and suffixed with a hash."""
    prefix = f"{c.VOLUME_PREFIX}{'m' if ref.kind == 'Model' else 'c'}-"
    plain = prefix + ref.directory
    if len(plain) <= 63 and _DNS_LABEL.match(plain):
        return plain
    h = hashlib.sha256(ref.directory.encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9-]", "-", ref.directory)[:63 - len(prefix) - 9].strip("-")
    return f"{prefix}{base}-{h}" if base else f"{prefix}{h}"


def plan(refs: list[Ref], namespace: str, lookup: Lookup, *, workload_mode: str,
         default_mode: str) -> tuple[list[Planned], list[str]]:
    """Resolve every ref; raises ``InjectError`` for what cannot be admitted."""
    out: list[Planned] = []
    warnings: list[str] = []
    for ref in _own_as_own(refs, namespace):
        obj = lookup(ref)
        if obj is None and ref.namespace:  # absent, or not shared with this namespace
            raise InjectError(sharing.refusal(ref.namespace, ref.name, namespace), code=403)
        if obj is None:
            where = f" in namespace {namespace}" if ref.kind == "Model" else ""
            raise InjectError(f"{ref.kind} {ref.name} not found{where}", code=404)
        m = Model.from_object(ref, obj)
        what = f"{ref.kind} {ref.shown}"
        if m.deleting:
            raise InjectError(f"{what} is being deleted", code=409)
        mode = workload_mode or m.mode or default_mode
        if mode == "SharedPVC" and not m.digest:
            raise InjectError(
                f"{what} is not Ready yet (phase {m.phase}): SharedPVC delivery "
                f"needs the model's digest at admission; apply again once it is Ready, or use "
                f"{c.ANN_DELIVERY}: NodeCache", code=409)
        if m.digest and m.phase != "Ready":
            warnings.append(f"{what} is {m.phase}: pods get its last "
                            f"published artifact {m.digest} (see its Ready condition)")
        elif m.phase == "Failed":
            warnings.append(f"{what} is Failed ({m.reason or 'see its status'}): "
                            f"pods wait at the scheduling gate {c.GATE} until it is Ready")
        elif m.phase != "Ready":
            warnings.append(f"{what} is {m.phase}: pods wait at the scheduling "
                            f"gate {c.GATE} until it is Ready")
        out.append(Planned(m, mode, volume_name(ref), f"{c.MOUNT_ROOT}/{ref.directory}"))
    return out, warnings


def _own_as_own(refs: list[Ref], namespace: str) -> list[Ref]:
    """``<own namespace>/<name>`` is the workload's own Model: one volume at ``<name>``."""
    out: list[Ref] = []
    for ref in refs:
        ref = dataclasses.replace(ref, namespace="") if ref.namespace == namespace else ref
        if ref not in out:
            out.append(ref)
    return out


def fingerprint(planned: list[Planned]) -> str:
    doc = [[p.model.ref.kind, p.model.ref.shown, p.mode, p.model.digest, p.volume]
           for p in planned]
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]



# -- the whole object -------------------------------------------------------------


def _at(obj: Obj, path: tuple[str, ...]) -> Obj | None:
    cur = obj
    for p in path:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            return None
        cur = nxt
    return cur


def injected(obj: Obj, kind: str) -> bool:
    """Whether ``obj`` (top level or pod template) carries an injection."""
    tpl = _at(obj, TEMPLATE_PATH.get(kind, ())) or {}
    return any(c.ANN_INJECTED in ((o.get("metadata") or {}).get("annotations") or {})
               for o in (obj, tpl))


def mutate(kind: str, obj: Obj, *, operation: str, namespace: str, lookup: Lookup,
           default_mode: str = "NodeCache", cached_labels: Container[str] = frozenset(),
           old: Obj | None = None) -> Result:
    """The admission decision for one object: the patch, or ``InjectError``."""
    if kind not in KINDS:
        return Result(obj, [])
    meta = obj.get("metadata") or {}
    ann = meta.get("annotations") or {}
    if kind == "Pod":
        if operation != "CREATE" or not (ann.get(c.ANN_MODELS) or ann.get(c.ANN_CLUSTER_MODELS)):
            return Result(obj, [])
        if c.ANN_INJECTED in ann and meta.get("ownerReferences"):
            return Result(obj, [])  # made by a controller from an injected template
    if kind == "Job" and operation == "UPDATE":
        keys = (c.ANN_MODELS, c.ANN_CLUSTER_MODELS, c.ANN_DELIVERY)
        before = ((old or {}).get("metadata") or {}).get("annotations") or {}
        if any(before.get(k) != ann.get(k) for k in keys):
            return Result(obj, [], [f"a Job's pod template cannot change after creation: the "
                                    f"new {c.ANN_MODELS}/{c.ANN_CLUSTER_MODELS} apply only to "
                                    f"new Jobs"])
        return Result(obj, [])
    if operation == "UPDATE" and kind != "Pod":
        if meta.get("deletionTimestamp"):
            return Result(obj, [])  # finalizers going: never block a deletion on a model
        kept = _keep_injection(kind, obj, old)
        if kept is not None:
            return Result(kept, json_patch(obj, kept))
    refs = parse_refs(ann)
    if not refs and not injected(obj, kind):
        return Result(obj, [])
    tpl_path = TEMPLATE_PATH[kind]
    new = copy.deepcopy(obj)
    tpl = _at(new, tpl_path)
    if tpl is None or not isinstance(tpl.get("spec"), dict):
        raise InjectError(f"{kind} has no pod template at {'.'.join(tpl_path)}")
    tmeta, tspec = tpl.setdefault("metadata", {}), tpl["spec"]
    keep = affinity_labels(tspec)
    strip_pod(tmeta, tspec)
    top = new.setdefault("metadata", {})
    if tpl_path:
        drop(top, "labels", c.LABEL_USES_SHARED_PVC)
        drop(top, "annotations", c.ANN_INJECTED)
    warnings: list[str] = []
    planned: list[Planned] = []
    if refs:
        planned, warnings = plan(refs, namespace, lookup, workload_mode=requested_mode(ann),
                                 default_mode=default_mode)
        fp = fingerprint(planned)
        warnings += inject_pod(tmeta, tspec, planned, cached_labels=cached_labels,
                               keep_labels=keep, fp=fp)
        if tpl_path:
            top.setdefault("annotations", {})[c.ANN_INJECTED] = fp
            if any(p.mode == "SharedPVC" for p in planned):
                top.setdefault("labels", {})[c.LABEL_USES_SHARED_PVC] = "true"
    if tpl_path and not tmeta:
        del tpl["metadata"]  # it was absent before the strip
    return Result(new, json_patch(obj, new), warnings, planned)


def _request_of(obj: Obj) -> tuple[Any, ...]:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return tuple(ann.get(k) for k in (c.ANN_MODELS, c.ANN_CLUSTER_MODELS, c.ANN_DELIVERY))


def _user_template(tpl: Obj) -> Obj:
    out = copy.deepcopy(tpl)
    strip_pod(out.setdefault("metadata", {}), out.setdefault("spec", {}))
    return out


def _keep_injection(kind: str, obj: Obj, old: Obj | None) -> Obj | None:
    """An UPDATE that changes neither the model annotations nor the user's part of the pod
    template (a label, a finalizer, a replica count) keeps the injection the object already
    had: the models are not looked up again, so it neither rolls the pods to a digest
    published since nor fails because a model went away. ``None``: inject afresh."""
    if old is None or _request_of(old) != _request_of(obj) or not injected(old, kind):
        return None
    path = TEMPLATE_PATH[kind]
    old_tpl, new_tpl = _at(old, path), _at(obj, path)
    if old_tpl is None or new_tpl is None or _user_template(old_tpl) != _user_template(new_tpl):
        return None
    new = copy.deepcopy(obj)
    parent = _at(new, path[:-1])
    assert parent is not None
    parent[path[-1]] = copy.deepcopy(old_tpl)  # the user's template, with the old injection
    top, old_top = new.setdefault("metadata", {}), old.get("metadata") or {}
    for key, name in (("annotations", c.ANN_INJECTED), ("labels", c.LABEL_USES_SHARED_PVC)):
        value = (old_top.get(key) or {}).get(name)
        if value is not None:
            top.setdefault(key, {})[name] = value
        else:
            drop(top, key, name)
    return new

# -- RFC 6902 ---------------------------------------------------------------------


def _pointer(parts: list[str]) -> str:
    return "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in parts)


def json_patch(a: Any, b: Any, path: list[str] | None = None) -> list[Obj]:
    """Operations turning ``a`` into ``b``: maps are walked, lists replaced whole (the
    webhook's lists are small, and index arithmetic on them invites mistakes)."""
    path = path or []
    if isinstance(a, dict) and isinstance(b, dict):
        ops: list[Obj] = []
        for k in a:
            if k not in b:
                ops.append({"op": "remove", "path": _pointer([*path, k])})
        for k, v in b.items():
            if k not in a:
                ops.append({"op": "add", "path": _pointer([*path, k]), "value": v})
            elif a[k] != v:
                ops.extend(json_patch(a[k], v, [*path, k]))
        return ops
    if a == b:
        return []
    return [{"op": "replace", "path": _pointer(path), "value": b}]


# the webhook's whole vocabulary, the request types (defined with the pod-spec edit) included
__all__ = ["KINDS", "TEMPLATE_PATH", "InjectError", "Lookup", "Model", "Planned", "Ref", "Result",
           "fingerprint", "injected", "json_patch", "mutate", "parse_refs", "plan",
           "requested_mode", "volume_name"]
