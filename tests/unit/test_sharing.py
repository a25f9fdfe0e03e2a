"""The grant predicate every resolver shares (api/sharing.py): list, selector, own namespace."""

from __future__ import annotations

from typing import Any

import pytest

from api import sharing


def model(ns: str, spec_sharing: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": {"upload": {}}}
    if spec_sharing is not None:
        spec["sharing"] = spec_sharing
    return {"kind": "Model", "metadata": {"name": "m", "namespace": ns}, "spec": spec}


LABELS = {"team-b": {"tier": "ml", "env": "prod"}, "team-c": {"env": "dev"}}
asked: list[str] = []


def labels_of(ns: str) -> dict[str, str] | None:
    asked.append(ns)
    return LABELS.get(ns)


@pytest.mark.parametrize("grant,ns,expect", [
    (None, "team-a", True),  # the owner's own namespace
    (None, "team-b", False),
    ({"namespaces": ["team-b"]}, "team-b", True),
    ({"namespaces": ["team-b"]}, "team-c", False),
    ({"namespaceSelector": {"matchLabels": {"tier": "ml"}}}, "team-b", True),
    ({"namespaceSelector": {"matchLabels": {"tier": "ml"}}}, "team-c", False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "In", "values": ["prod", "staging"]}]}}, "team-b", True),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "env", "operator": "NotIn", "values": ["dev"]}]}}, "team-c", False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "tier", "operator": "DoesNotExist"}]}}, "team-c", True),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "tier", "operator": "Exists"}]}}, "team-c", False),
    ({"namespaceSelector": {"matchExpressions": [
        {"key": "tier", "operator": "Bogus"}]}}, "team-b", False),
    ({"namespaceSelector": {}}, "team-c", True),  # {} selects every namespace
    ({"namespaceSelector": {}}, "gone", False),  # a namespace that does not exist
])
def test_granted(grant, ns, expect):
    assert sharing.granted(model("team-a", grant), ns, labels_of) is expect


def test_labels_are_read_only_when_the_list_does_not_grant():
    asked.clear()
    grant = {"namespaces": ["team-b"], "namespaceSelector": {}}
    assert sharing.granted(model("team-a", grant), "team-b", labels_of)
    assert sharing.granted(model("team-a", None), "team-a", labels_of)
    assert asked == []
