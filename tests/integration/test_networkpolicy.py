"""The NetworkPolicies of the chart and of daemonset/ follow the pods they guard.

Rendered (``helm template``) and read from daemonset/, each policy is checked
against the objects it is about, not against a copy of its own text: its pod
selector must select the Deployment's pod template; every port it opens must
be a named container port there (a renamed port breaks this test); the
controller opens exactly its container ports; DMCR's push endpoint (the port
behind the controller's ``--registry``) admits only pods in its own namespace
carrying the controller's, the upload gateway's or a publish Job's labels (the
labels ``controller/models/publishjob.py`` really puts on them); the pull
endpoint (behind ``--pull-registry``) is open; the debug ports are not.
"""

from __future__ import annotations

from typing import Any

import pytest

from controller.models import publishjob
from tests.integration.test_chart import helm, manifests, render  # noqa: F401  (fixture)

NS = "modelcache-system"
Obj = dict[str, Any]


def by_id(objs: list[Obj]) -> dict[tuple[str, str], Obj]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objs}


def pod_labels(objs: dict[tuple[str, str], Obj], name: str) -> dict[str, str]:
    return dict(objs[("Deployment", name)]["spec"]["template"]["metadata"]["labels"])


def port_names(objs: dict[tuple[str, str], Obj], name: str) -> set[str]:
    spec = objs[("Deployment", name)]["spec"]["template"]["spec"]
    return {p["name"] for c in spec["containers"] for p in c.get("ports") or []}


def selects(selector: Obj, labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def rule_ports(rule: Obj) -> set[str]:
    return {str(p["port"]) for p in rule["ports"]}


def service_target(objs: dict[tuple[str, str], Obj], arg: str) -> str:
    """The named target port behind a controller flag ``--x=host.ns.svc:PORT``."""
    ctr = objs[("Deployment", "modelcache-controller")]["spec"]["template"]["spec"]["containers"][0]
    value = next(a for a in ctr["args"] if a.startswith(arg + "="))
    port = int(value.rpartition(":")[2])
    svc = objs[("Service", "dmcr")]
    return str(next(p["targetPort"] for p in svc["spec"]["ports"] if p["port"] == port))


def publish_pod_labels() -> dict[str, str]:
    model = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
             "metadata": {"name": "m", "namespace": "team-a", "uid": "u-1"}}
    return publishjob.labels(model, "k")


def check(objs_list: list[Obj], *, catalog: bool, gateway: bool) -> None:
    objs = by_id(objs_list)
    pols = {n: o for (k, n), o in objs.items() if k == "NetworkPolicy"}
    assert set(pols) == {"modelcache-controller", "dmcr"} | (
        {"modelcache-upload-gateway"} if gateway else set())
    for p in pols.values():
        assert p["spec"]["policyTypes"] == ["Ingress"]

    # the controller: exactly its container ports, from anywhere (the API server)
    ctl = pols["modelcache-controller"]["spec"]
    assert selects(ctl["podSelector"], pod_labels(objs, "modelcache-controller"))
    assert len(ctl["ingress"]) == 1 and "from" not in ctl["ingress"][0]
    assert rule_ports(ctl["ingress"][0]) == port_names(objs, "modelcache-controller")
    assert ("catalog" in rule_ports(ctl["ingress"][0])) == catalog

    # DMCR: push from the push credential's holders, pull from anywhere, debug closed
    dm = pols["dmcr"]["spec"]
    assert selects(dm["podSelector"], pod_labels(objs, "dmcr"))
    push, pull = service_target(objs, "--registry"), service_target(objs, "--pull-registry")
    assert {push, pull} <= port_names(objs, "dmcr")
    opened = set().union(*(rule_ports(r) for r in dm["ingress"]))
    assert opened == {push, pull}  # the debug ports (pprof, expvar) from no pod
    push_rule = next(r for r in dm["ingress"] if rule_ports(r) == {push})
    pull_rule = next(r for r in dm["ingress"] if rule_ports(r) == {pull})
    assert "from" not in pull_rule
    sources = push_rule["from"]
    for peer in sources:  # a bare podSelector: pods of this namespace only
        assert set(peer) == {"podSelector"}, peer
    allowed = [pod_labels(objs, "modelcache-controller"), publish_pod_labels()]
    if gateway:
        allowed.append(pod_labels(objs, "modelcache-upload-gateway"))
    for labels in allowed:
        assert any(selects(p["podSelector"], labels) for p in sources), labels
    for labels in (pod_labels(objs, "dmcr"),
                   {"app.kubernetes.io/managed-by": "modelcache-controller",
                    "app.kubernetes.io/component": "pvc-reader"},
                   {"app.kubernetes.io/name": "modelcache",
                    "app.kubernetes.io/component": "node"}):
        assert not any(selects(p["podSelector"], labels) for p in sources), labels

    if gateway:
        gw = pols["modelcache-upload-gateway"]["spec"]
        assert selects(gw["podSelector"], pod_labels(objs, "modelcache-upload-gateway"))
        assert len(gw["ingress"]) == 1 and "from" not in gw["ingress"][0]
        assert rule_ports(gw["ingress"][0]) == port_names(objs, "modelcache-upload-gateway")


def test_plain_manifests_policies_follow_the_pods() -> None:
    check(manifests(), catalog=False, gateway=True)


@pytest.mark.parametrize("sets,catalog,gateway", [
    ((), False, True),
    (("distribution.mode=PublicCatalog",), True, True),
    (("uploadGateway.enabled=false",), False, False),
])
def test_chart_policies_follow_the_pods(helm: str, sets: tuple[str, ...],  # noqa: F811
                                        catalog: bool, gateway: bool) -> None:
    check(render(helm, NS, *sets), catalog=catalog, gateway=gateway)


def test_chart_policies_can_be_turned_off(helm: str) -> None:  # noqa: F811
    assert not [o for o in render(helm, NS, "networkPolicy.enabled=false")
                if o["kind"] == "NetworkPolicy"]


def test_a_renamed_port_breaks_the_check(helm: str) -> None:  # noqa: F811
    """The check reads the Deployment: a policy naming a port the pod lost fails it."""
    objs = render(helm, NS)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "dmcr")
    dep["spec"]["template"]["spec"]["containers"][1]["ports"][0]["name"] = "pull-renamed"
    with pytest.raises(AssertionError):
        check(objs, catalog=False, gateway=True)
