"""The admin's policy for a namespaced Model's publish Job: where it may run, how big.

Where it sits: step 5 of the reconcile (``publish.ensure``), just before the
publish Job is created. That Job runs in the controller's namespace with the
registry push credential, so a tenant's ``spec.publish`` (``resources``,
``nodeSelector``, ``tolerations``, copied into it by ``jobspec.build``)
would otherwise pick nodes and spend quota that are the admin's: eight GPUs,
every taint tolerated, a node pool of the tenant's choosing.

What is checked, for Models only: every ``nodeSelector`` pair must be
listed (``key=value``, or ``key`` for any value); every toleration's key
must be listed (``key`` for any effect, ``key:Effect`` for that one effect;
an empty key, which tolerates every taint, never is); every request and
limit must name a listed resource and stay within its maximum (an extended
resource not listed is refused, ``resources.claims`` too). ClusterModels are
written by the admin and are not checked; nor is ``source.pvc``'s reader
Job, which runs in the Model's own namespace, on its quota.

``spec.publish.timeout`` (the Job's ``activeDeadlineSeconds``) and
``spec.publish.ttlAfterFinished`` (its ``ttlSecondsAfterFinished``) must
stay within the admin's maxima (``--job-max-timeout``,
``--job-max-ttl-after-finished``): a day-long deadline holds a node and
the push credential that long, a month-long TTL keeps finished Jobs and
their pods' logs around.

Outside the policy the Model is Failed with reason ``PublishPolicyDenied``
and a message naming the field and the limit; no Job is made. A resource
left unset is not given a default here: the Job gets what the namespace's
LimitRange (if any) gives it.

Pure: the manager's flags build a ``Policy`` (``from_flags``); ``refusal``
says why a Model may not have its Job, or None.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from api import model

REASON = "PublishPolicyDenied"

# the chart's defaults too (values.yaml ``controller.publishPolicy.maxResources``);
# ephemeral-storage: the upload gateway's staging sizeLimit, the same job's scratch
DEFAULT_MAX = {"cpu": "4", "memory": "16Gi", "ephemeral-storage": "100Gi", "nvidia.com/gpu": "0"}

_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)"
                       r"|[eE]([+-]?\d{1,3}))?")
_SUFFIX = {None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
           "k": Decimal(10) ** 3, "M": Decimal(10) ** 6, "G": Decimal(10) ** 9,
           "T": Decimal(10) ** 12, "P": Decimal(10) ** 15, "E": Decimal(10) ** 18,
           "Ki": Decimal(2) ** 10, "Mi": Decimal(2) ** 20, "Gi": Decimal(2) ** 30,
           "Ti": Decimal(2) ** 40, "Pi": Decimal(2) ** 50, "Ei": Decimal(2) ** 60}
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
# the chart's defaults too (values.yaml ``controller.publishPolicy``)
DEFAULT_MAX_TIMEOUT = 48 * 3600
DEFAULT_MAX_TTL = 7 * 24 * 3600
# the CRDs' pattern for both durations: whole hours, minutes, seconds, in that order
_DURATION = re.compile(r"(?:(\d{1,6})h)?(?:(\d{1,6})m)?(?:(\d{1,9})s)?")


def duration(text: Any) -> int:
    """``1h30m``, ``90s``, ``48h`` (the CRDs' duration format) as seconds; ValueError if not."""
    m = _DURATION.fullmatch(text) if isinstance(text, str) and text else None
    if m is None:
        raise ValueError(f"not a duration (like 1h30m, 45m, 90s): {str(text)[:40]!r}")
    h, mi, sec = (int(g or 0) for g in m.groups())
    return h * 3600 + mi * 60 + sec


def quantity(value: Any) -> Decimal:
    """A Kubernetes quantity (``500m``, ``16Gi``, ``1e9``, ``4``) as a number; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError(f"not a quantity: {value!r}")
    if isinstance(value, int | float):
        value = str(value)
    m = _QUANTITY.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"not a quantity: {str(value)[:40]!r}")
    try:
        number = Decimal(m.group(1))
        scale = Decimal(10) ** int(m.group(3)) if m.group(3) else _SUFFIX[m.group(2)]
    except (InvalidOperation, KeyError) as e:
        raise ValueError(f"not a quantity: {value!r}") from e
    return number * scale


@dataclass(frozen=True)
class Policy:
    """What a namespaced Model's ``spec.publish`` may ask for (see the module doc)."""

    node_selectors: frozenset[str] = frozenset()  # "key=value" (that pair) or "key" (any value)
    tolerations: frozenset[str] = frozenset()  # "key" (any effect) or "key:Effect"
    # resource name → (the quantity as the admin wrote it, its value)
    max_resources: tuple[tuple[str, str, Decimal], ...] = field(
        default_factory=lambda: tuple((n, q, quantity(q)) for n, q in sorted(DEFAULT_MAX.items())))
    max_timeout: int = DEFAULT_MAX_TIMEOUT  # seconds: spec.publish.timeout at most
    max_ttl: int = DEFAULT_MAX_TTL  # seconds: spec.publish.ttlAfterFinished at most

    def maximum(self, name: str) -> tuple[str, Decimal] | None:
        for n, text, value in self.max_resources:
            if n == name:
                return text, value
        return None


DEFAULT = Policy()


def from_flags(node_selectors: Iterable[str] = (), tolerations: Iterable[str] = (),
               max_resources: Iterable[str] = (), max_timeout: str | None = None,
               max_ttl: str | None = None) -> Policy:
    """The manager's ``--publish-allow-node-selector``, ``--publish-allow-toleration``,
    ``--publish-max-resource NAME=QUANTITY`` (each over ``DEFAULT_MAX``'s entry of that
    name), ``--job-max-timeout`` and ``--job-max-ttl-after-finished`` (durations);
    ValueError for one that does not parse."""
    try:
        timeout = DEFAULT_MAX_TIMEOUT if max_timeout is None else duration(max_timeout)
        ttl = DEFAULT_MAX_TTL if max_ttl is None else duration(max_ttl)
    except ValueError as e:
        raise ValueError(f"--job-max-timeout/--job-max-ttl-after-finished: {e}") from e
    maxima = dict(DEFAULT_MAX)
    for item in max_resources:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--publish-max-resource wants NAME=QUANTITY, got {item!r}")
        if quantity(text) < 0:
            raise ValueError(f"--publish-max-resource {item!r}: negative")
        maxima[name.strip()] = text.strip()
    tols = set()
    for item in tolerations:
        key, sep, effect = item.partition(":")
        if not key or (sep and effect not in _EFFECTS):
            raise ValueError(f"--publish-allow-toleration wants KEY or KEY:EFFECT (one of "
                             f"{', '.join(_EFFECTS)}), got {item!r}")
        tols.add(item)
    sels = set()
    for item in node_selectors:
        if not item.partition("=")[0]:
            raise ValueError(f"--publish-allow-node-selector wants KEY or KEY=VALUE, got {item!r}")
        sels.add(item)
    return Policy(frozenset(sels), frozenset(tols),
                  tuple((n, q, quantity(q)) for n, q in sorted(maxima.items())), timeout, ttl)


def _span(seconds: int) -> str:
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v) or "0s"


def _times(policy: Policy, placement: Mapping[str, Any]) -> str | None:
    for field_name, limit in (("timeout", policy.max_timeout),
                              ("ttlAfterFinished", policy.max_ttl)):
        text = placement.get(field_name)
        if text is None:
            continue
        try:
            asked = duration(text)
        except ValueError as e:
            return f"spec.publish.{field_name}: {e}"
        if field_name == "timeout" and asked == 0:
            return "spec.publish.timeout=0s: a Job needs more than no time"
        if asked > limit:
            return (f"spec.publish.{field_name}={text} exceeds the policy's maximum "
                    f"{_span(limit)}")
    return None


def job_times(obj: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``spec.publish``'s (timeout, ttlAfterFinished) in seconds, None where unset or
    unreadable (the CRD's pattern and ``refusal`` keep that from reaching a Job)."""
    placement = (obj.get("spec") or {}).get("publish") or {}
    out: list[int | None] = []
    for field_name in ("timeout", "ttlAfterFinished"):
        try:
            out.append(duration(placement[field_name]) if field_name in placement else None)
        except ValueError:
            out.append(None)
    return out[0], out[1]


def _listed(allowed: frozenset[str]) -> str:
    return ", ".join(sorted(allowed)) or "none"


def _node_selector(policy: Policy, selector: Mapping[str, Any]) -> str | None:
    for key, value in selector.items():
        if key not in policy.node_selectors and f"{key}={value}" not in policy.node_selectors:
            return (f"spec.publish.nodeSelector {key}={str(value)[:63]} is not allowed "
                    f"(allowed: {_listed(policy.node_selectors)})")
    return None


def _tolerations(policy: Policy, tolerations: list[Any]) -> str | None:
    for i, t in enumerate(tolerations):
        t = t if isinstance(t, dict) else {}
        key, effect = str(t.get("key") or ""), str(t.get("effect") or "")
        what = f"spec.publish.tolerations[{i}]"
        if not key:
            return (f"{what} has no key, so it tolerates every taint: not allowed "
                    f"(allowed: {_listed(policy.tolerations)})")
        if key in policy.tolerations or (effect and f"{key}:{effect}" in policy.tolerations):
            continue
        shown = f"{key}:{effect}" if effect else f"{key} (every effect)"
        return f"{what} {shown} is not allowed (allowed: {_listed(policy.tolerations)})"
    return None


def _resources(policy: Policy, resources: Mapping[str, Any]) -> str | None:
    for part in resources:
        if part not in ("requests", "limits"):
            return f"spec.publish.resources.{part} is not allowed (requests and limits only)"
    names = ", ".join(n for n, _, _ in policy.max_resources)
    for part in ("requests", "limits"):
        for name, value in (resources.get(part) or {}).items():
            where = f"spec.publish.resources.{part}[{name}]"
            limit = policy.maximum(name)
            if limit is None:
                return f"{where} is not allowed (resources the policy allows: {names})"
            try:
                asked = quantity(value)
            except ValueError:
                return f"{where}={str(value)[:40]} is not a quantity"
            if asked > limit[1]:
                return f"{where}={value} exceeds the policy's maximum {limit[0]}"
    return None


def refusal(policy: Policy, obj: Mapping[str, Any]) -> str | None:
    """Why ``obj``'s ``spec.publish`` may not have its Job; None when it may (or a ClusterModel)."""
    if model.model_kind(obj) == model.CLUSTER_MODEL:
        return None  # the admin's own
    placement = (obj.get("spec") or {}).get("publish") or {}
    return (_node_selector(policy, placement.get("nodeSelector") or {})
            or _tolerations(policy, list(placement.get("tolerations") or []))
            or _resources(policy, placement.get("resources") or {})
            or _times(policy, placement))


__all__ = ["DEFAULT", "DEFAULT_MAX", "DEFAULT_MAX_TIMEOUT", "DEFAULT_MAX_TTL", "REASON",
           "Policy", "duration", "from_flags", "job_times", "quantity", "refusal"]
