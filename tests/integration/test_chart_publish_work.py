"""charts/modelcache: ``controller.publishWorkVolume`` turns into the manager's
``--publish-work-size``/``--publish-work-storage-class`` flags; unset, nothing
changes (publish Jobs keep their emptyDir, as daemonset/ ships them)."""

from __future__ import annotations

from typing import Any

from tests.integration.test_chart import helm as helm  # the fixture
from tests.integration.test_chart import render


def _manager_args(objs: list[dict[str, Any]]) -> list[str]:
    (dep,) = [o for o in objs if o["kind"] == "Deployment"
              and o["metadata"]["name"] == "modelcache-controller"]
    return list(dep["spec"]["template"]["spec"]["containers"][0]["args"])


def test_publish_work_volume_values(helm: str) -> None:
    off = _manager_args(render(helm, "ai"))
    assert not [a for a in off if a.startswith("--publish-work")]
    on = _manager_args(render(helm, "ai", "controller.publishWorkVolume.size=500Gi",
                              "controller.publishWorkVolume.storageClassName=fast"))
    assert "--publish-work-size=500Gi" in on and "--publish-work-storage-class=fast" in on
    default_class = _manager_args(render(helm, "ai", "controller.publishWorkVolume.size=1Ti"))
    assert "--publish-work-size=1Ti" in default_class
    assert not [a for a in default_class if a.startswith("--publish-work-storage-class")]


def test_denied_source_networks_values(helm: str) -> None:
    off = _manager_args(render(helm, "ai"))
    assert not [a for a in off if a.startswith("--deny-source-cidr")]
    on = _manager_args(render(helm, "ai", "controller.denySourceCIDRs={10.96.0.0/12,fd00::/108}"))
    assert "--deny-source-cidr=10.96.0.0/12" in on and "--deny-source-cidr=fd00::/108" in on
