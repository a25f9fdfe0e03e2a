"""Phases, conditions and the status documents the reconciler writes.

Condition types: ``SourceResolved`` (the source is valid and its credentials
exist), ``Published`` (an artifact for the current spec is in the registry),
``Ready`` (a workload can use the model), and ``Validated`` for a Model with
``spec.validation`` (``controller/models/validation.py``: its user-given check
passed, failed or timed out on the candidate artifact). ``lastTransitionTime``
changes only when a condition's status does, as the API conventions ask.
"""

from __future__ import annotations

import datetime
from typing import Any

PENDING, WAIT_FOR_UPLOAD, PUBLISHING = "Pending", "WaitForUpload", "Publishing"
READY, FAILED, DELETING = "Ready", "Failed", "Deleting"
VALIDATING = "Validating"  # published; the user's validation Job runs on the candidate
# the Validated condition's reasons
VALIDATION_RUNNING, VALIDATION_PASSED = "ValidationRunning", "ValidationPassed"
VALIDATION_FAILED, VALIDATION_TIMEOUT = "ValidationFailed", "ValidationTimeout"


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, ok: bool, reason: str, message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True" if ok else "False", "reason": reason,
            "message": message[:1000]}


def merge(current: list[dict[str, Any]] | None, wanted: list[dict[str, Any]],
          generation: int) -> list[dict[str, Any]]:
    """``wanted`` conditions over ``current``, keeping transition times of unchanged statuses."""
    by_type = {c.get("type"): c for c in current or []}
    out = []
    for w in wanted:
        old = by_type.pop(w["type"], None)
        c = dict(w, observedGeneration=generation)
        if old is not None and old.get("status") == w["status"] and old.get("lastTransitionTime"):
            c["lastTransitionTime"] = old["lastTransitionTime"]
        else:
            c["lastTransitionTime"] = now()
        out.append(c)
    out.extend(by_type.values())
    return out


def same(current: dict[str, Any], patch: dict[str, Any]) -> bool:
    """Whether applying merge-patch ``patch`` to ``current`` changes nothing."""
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(current.get(k), dict):
            if not same(current[k], v):
                return False
        elif k == "conditions" and isinstance(v, list):
            strip = [{kk: vv for kk, vv in c.items() if kk != "lastTransitionTime"} for c in v]
            cur = [{kk: vv for kk, vv in c.items() if kk != "lastTransitionTime"}
                   for c in current.get(k) or []]
            if strip != cur:
                return False
        elif current.get(k) != v:
            return False
    return True


def progress_done(total: int) -> dict[str, Any]:
    return {"bytesDone": total, "bytesTotal": total, "percent": 100, "bytesPerSecond": 0,
            "etaSeconds": 0}


def progress_from_event(event: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in ("bytesDone", "bytesTotal", "bytesPerSecond", "etaSeconds"):
        if isinstance(event.get(k), int | float):
            out[k] = int(event[k])
    if isinstance(event.get("percent"), int | float):
        out["percent"] = int(min(max(float(event["percent"]), 0.0), 100.0))
    return out
