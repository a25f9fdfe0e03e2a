"""The pod-spec half of injection: one model's delivery into a pod, added or stripped.

Where it sits: ``inject.py`` decides which models a workload gets and where
its pod template lives, then calls ``strip_pod`` and ``inject_pod`` here on
that template's metadata and spec. A ``Planned`` delivery is a volume (the
node plugin's CSI volume, or the SharedPVC claim), a read-only mount at
``MOUNT_ROOT/<Ref.directory>`` in every container and init container, and an entry
of ``ENV_MODELS``; the pod (template) also gets the scheduling gate, its
label, the injection fingerprint and, for cached digests, a preferred node
affinity term. ``strip_pod`` removes exactly that, recognised by name and
driver, and nothing else. Pure: no I/O.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from api import names as c
from api.model import ModelView

Obj = dict[str, Any]
AFFINITY_WEIGHT = 50  # preferred, never required: a cold node is slower, not wrong
_CONTAINER_LISTS = ("initContainers", "containers")


class InjectError(Exception):
    """The request cannot be admitted; ``code`` is the HTTP status the API server shows."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.code = code



@dataclass(frozen=True)
class Ref:
    kind: str  # "Model" | "ClusterModel"
    name: str
    # a Model's owner namespace when another namespace shares it (api/sharing.py);
    # "" = the workload's own
    namespace: str = ""
    # ``name@sha256:<hex>``: this generation of the model (one of its status.history), not
    # the one it serves now; "" = the servable one
    pin: str = ""

    @property
    def shown(self) -> str:
        """As the workload wrote it: ``name`` or ``namespace/name``."""
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

    @property
    def directory(self) -> str:
        """Its directory under ``MOUNT_ROOT``: ``name``, or ``namespace.name`` for a shared
        Model, so ``team-a/llama`` and the workload's own ``llama`` both fit."""
        return f"{self.namespace}.{self.name}" if self.namespace else self.name



@dataclass(frozen=True)
class Model:
    """What injection needs to know of one Model or ClusterModel."""

    ref: Ref
    namespace: str  # "" for a ClusterModel
    phase: str
    digest: str  # the servable artifact's (ModelView.servable_digest), "" when none
    family: str
    format: str
    mode: str  # spec.delivery.mode, "" if unset
    deleting: bool = False
    reason: str = ""  # of the Ready condition, for a Failed model

    @classmethod
    def from_object(cls, ref: Ref, obj: Obj) -> Model:
        """Raises ``InjectError`` for a pin that is not one of the model's generations: a
        digest of another model (another namespace's, say) is never mounted by name."""
        view = ModelView.of(obj)
        phase = view.phase or "Pending"
        ready = view.condition("Ready") or {}
        if ref.pin and ref.pin not in view.generations:
            raise InjectError(f"{ref.kind} {ref.shown}@{ref.pin}: not one of the model's "
                              f"published generations (see its status.history)", code=403)
        return cls(ref=ref, namespace=view.namespace,
                   phase=phase, digest=ref.pin or view.servable_digest,
                   family=str(view.resolved.get("family") or ""),
                   format=str(view.resolved.get("format") or ""),
                   mode=str((view.spec.get("delivery") or {}).get("mode") or ""),
                   deleting=view.deleting, reason=str(ready.get("reason") or ""))


@dataclass(frozen=True)
class Planned:
    """One model's delivery into the pod."""

    model: Model
    mode: str
    volume: str
    path: str

    def volume_source(self) -> Obj:
        if self.mode == "SharedPVC":
            return {"name": self.volume, "persistentVolumeClaim": {
                "claimName": c.pvc_name(self.model.digest), "readOnly": True}}
        attr = c.ATTR_MODEL if self.model.ref.kind == "Model" else c.ATTR_CLUSTER_MODEL
        attrs = {attr: self.model.ref.name}
        if self.model.ref.namespace:
            attrs[c.ATTR_MODEL_NAMESPACE] = self.model.ref.namespace
        if self.model.digest:
            attrs[c.ATTR_DIGEST] = self.model.digest
        return {"name": self.volume, "csi": {"driver": c.CSI_DRIVER, "readOnly": True,
                                             "volumeAttributes": attrs}}

    def mount(self) -> Obj:
        m: Obj = {"name": self.volume, "mountPath": self.path, "readOnly": True}
        if self.mode == "SharedPVC":
            m["subPath"] = c.pvc_subpath(self.model.digest)
        return m

    def env_entry(self) -> Obj:
        return {"name": self.model.ref.shown, "path": self.path, "digest": self.model.digest,
                "family": self.model.family, "format": self.model.format}



def is_injected_volume(volume: Obj) -> bool:
    """A volume an injection added (our name prefix and our driver or PVC prefix)."""
    if not str(volume.get("name") or "").startswith(c.VOLUME_PREFIX):
        return False
    if (volume.get("csi") or {}).get("driver") == c.CSI_DRIVER:
        return True
    claim = str((volume.get("persistentVolumeClaim") or {}).get("claimName") or "")
    return claim.startswith(c.PVC_PREFIX)


def _our_term(term: Obj) -> bool:
    exprs = (term.get("preference") or {}).get("matchExpressions") or []
    return bool(exprs) and all(str(e.get("key", "")).startswith(c.NODE_LABEL_PREFIX)
                               and e.get("operator") == "Exists" for e in exprs) \
        and not (term.get("preference") or {}).get("matchFields")


def affinity_labels(spec: Obj) -> set[str]:
    terms = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
             .get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    return {e["key"] for t in terms if _our_term(t)
            for e in t["preference"]["matchExpressions"]}


def drop(d: Obj, key: str, *names: str) -> None:
    """Remove ``names`` from the map ``d[key]``, and the map if that leaves it empty."""
    m = d.get(key)
    if not isinstance(m, dict):
        return
    for n in names:
        m.pop(n, None)
    if not m:
        d.pop(key, None)


def strip_pod(meta: Obj, spec: Obj) -> None:
    """Remove from a pod (template) everything an injection adds, nothing else."""
    volumes = spec.get("volumes") or []
    gone = {v.get("name") for v in volumes if is_injected_volume(v)}
    if gone:
        spec["volumes"] = [v for v in volumes if v.get("name") not in gone]
        if not spec["volumes"]:
            del spec["volumes"]
    for lst in _CONTAINER_LISTS:
        for ctr in spec.get(lst) or []:
            if gone and ctr.get("volumeMounts"):
                ctr["volumeMounts"] = [m for m in ctr["volumeMounts"] if m.get("name") not in gone]
                if not ctr["volumeMounts"]:
                    del ctr["volumeMounts"]
            if ctr.get("env"):
                ctr["env"] = [e for e in ctr["env"] if e.get("name") not in (c.ENV_DIR,
                                                                            c.ENV_MODELS)]
                if not ctr["env"]:
                    del ctr["env"]
    gates = spec.get("schedulingGates")
    if gates and any(g.get("name") == c.GATE for g in gates):
        spec["schedulingGates"] = [g for g in gates if g.get("name") != c.GATE]
        if not spec["schedulingGates"]:
            del spec["schedulingGates"]
    affinity = spec.get("affinity") or {}
    node = affinity.get("nodeAffinity") or {}
    terms = node.get("preferredDuringSchedulingIgnoredDuringExecution")
    if terms and any(_our_term(t) for t in terms):
        rest = [t for t in terms if not _our_term(t)]
        if rest:
            node["preferredDuringSchedulingIgnoredDuringExecution"] = rest
        else:
            del node["preferredDuringSchedulingIgnoredDuringExecution"]
        if not node:
            del affinity["nodeAffinity"]
        if not affinity:
            del spec["affinity"]
    drop(meta, "labels", c.LABEL_GATED, c.LABEL_USES_SHARED_PVC)
    drop(meta, "annotations", c.ANN_INJECTED)


def inject_pod(meta: Obj, spec: Obj, planned: list[Planned], *, cached_labels: Container[str],
               keep_labels: set[str], fp: str) -> list[str]:
    """Add the planned models to a stripped pod (template); returns warnings."""
    warnings: list[str] = []
    spec.setdefault("volumes", []).extend(p.volume_source() for p in planned)
    env = [{"name": c.ENV_DIR, "value": c.MOUNT_ROOT},
           {"name": c.ENV_MODELS, "value": json.dumps([p.env_entry() for p in planned],
                                                      separators=(",", ":"))}]
    for lst in _CONTAINER_LISTS:
        for ctr in spec.get(lst) or []:
            taken = {m.get("mountPath", "").rstrip("/") for m in ctr.get("volumeMounts") or []}
            for p in planned:
                if p.path in taken:
                    raise InjectError(f"container {ctr.get('name')!r} already mounts something "
                                      f"at {p.path}, where model {p.model.ref.shown} goes")
            ctr.setdefault("volumeMounts", []).extend(p.mount() for p in planned)
            ctr.setdefault("env", []).extend(copy.deepcopy(env))
    if spec.get("nodeName"):
        # the API server refuses scheduling gates on a pod already bound to a node
        warnings.append("spec.nodeName is set: the pod is not gated and may start before "
                        "its models are Ready")
    else:
        spec.setdefault("schedulingGates", []).append({"name": c.GATE})
        meta.setdefault("labels", {})[c.LABEL_GATED] = "true"
    labels = [c.node_label(p.model.digest) for p in planned
              if p.mode == "NodeCache" and p.model.digest]
    labels = [lb for lb in dict.fromkeys(labels) if lb in cached_labels or lb in keep_labels]
    if labels:
        add_preferred(spec, labels)
    if any(p.mode == "SharedPVC" for p in planned):
        meta.setdefault("labels", {})[c.LABEL_USES_SHARED_PVC] = "true"
    meta.setdefault("annotations", {})[c.ANN_INJECTED] = fp
    return warnings


def add_preferred(spec: Obj, labels: list[str]) -> None:
    """Merge one preferred node affinity term per label into ``spec`` (user terms stay)."""
    terms = (spec.setdefault("affinity", {}).setdefault("nodeAffinity", {})
             .setdefault("preferredDuringSchedulingIgnoredDuringExecution", []))
    have = {e["key"] for t in terms if _our_term(t) for e in t["preference"]["matchExpressions"]}
    for lb in labels:
        if lb not in have:
            terms.append(preferred_term(lb))


def preferred_term(label: str) -> Obj:
    return {"weight": AFFINITY_WEIGHT,
            "preference": {"matchExpressions": [{"key": label, "operator": "Exists"}]}}

