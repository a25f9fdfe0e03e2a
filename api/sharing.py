"""Who may use a namespaced Model: its own namespace, and those its owner shares it with.

Where it sits: a Model's owner grants it in the Model's own ``spec.sharing``
(``namespaces``, a list, and/or ``namespaceSelector``, a Kubernetes
LabelSelector over namespace labels), so consent is the owner's: only who
may edit that Model can grant it. A workload of a granted namespace names
it ``<namespace>/<name>`` in ``ANN_MODELS``. Every place that resolves a
Model for a workload asks ``granted`` here, so they cannot disagree: the
admission webhook, the gate lifter, the SharedPVC reconciler and the node
plugin's resolver (which re-checks at NodePublishVolume, since a pod spec
can name any volume attributes without passing the webhook).

Revoking a grant refuses what comes next (admission, a gate lift, a
NodePublishVolume); a mount already made stays until its pod goes.

A selector grants to every namespace whose labels match it, so it is as
narrow as the set of people who may label namespaces (usually cluster
admins); an empty selector (``{}``) matches every namespace, as in
Kubernetes. Pure: namespace labels come from the caller (``LabelsOf``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from api.model import ModelView

# a namespace's labels, None when it does not exist; may raise when they cannot be read
LabelsOf = Callable[[str], Mapping[str, str] | None]


def granted(model: Mapping[str, Any], namespace: str, labels_of: LabelsOf) -> bool:
    """Whether workloads of ``namespace`` may use the namespaced Model ``model``."""
    view = ModelView.of(model)
    if view.namespace == namespace:
        return True
    sharing = view.spec.get("sharing")
    if not isinstance(sharing, Mapping):
        return False
    if namespace in (sharing.get("namespaces") or []):
        return True
    selector = sharing.get("namespaceSelector")
    if not isinstance(selector, Mapping):
        return False
    labels = labels_of(namespace)  # read only when the list did not grant already
    return labels is not None and selects(selector, labels)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Kubernetes LabelSelector semantics: every ``matchLabels`` pair and every
    ``matchExpressions`` requirement holds; an unknown operator matches nothing."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for req in selector.get("matchExpressions") or []:
        key, op = req.get("key"), req.get("operator")
        values = req.get("values") or []
        if op == "In":
            ok = key in labels and labels[key] in values
        elif op == "NotIn":
            ok = key not in labels or labels[key] not in values
        elif op == "Exists":
            ok = key in labels
        elif op == "DoesNotExist":
            ok = key not in labels
        else:
            ok = False
        if not ok:
            return False
    return True


def refusal(owner: str, name: str, namespace: str) -> str:
    """The one message for "not shared" and "no such Model", so a refusal does not tell
    a namespace which Models exist elsewhere."""
    return (f"Model {owner}/{name} does not exist or is not shared with namespace "
            f"{namespace} (its owner grants it in the Model's spec.sharing)")
