"""charts/modelcache: ``controller.publishWorkVolume`` turns into the manager's
``--publish-work-size``/``--publish-work-storage-class`` flags; unset, nothing
changes (publish Jobs keep their emptyDir, as daemonset/ ships them)."""

from __future__ import annotations

import argparse
import subprocess
from typing import Any

import pytest

from controller import main
from controller.models import history
from tests.integration.test_chart import CHART, KUBE_VERSION, render
from tests.integration.test_chart import helm as helm  # the fixture


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


def test_history_keep_value(helm: str) -> None:
    """``controller.historyKeep`` is the manager's ``--history-keep``; the chart refuses
    what the manager would clamp (1 to 50, controller/models/history.py MAX_KEEP)."""
    assert "--history-keep=5" in _manager_args(render(helm, "ai"))
    assert "--history-keep=12" in _manager_args(render(helm, "ai", "controller.historyKeep=12"))
    for bad in ("0", str(history.MAX_KEEP + 1)):
        done = subprocess.run([helm, "template", "mc", CHART, "--kube-version", KUBE_VERSION,
                               "--set", f"controller.historyKeep={bad}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "controller.historyKeep: 1 to 50" in done.stderr, bad


def test_gate_workers_value(helm: str) -> None:
    """``controller.gateWorkers`` is the manager's ``--gate-workers``, which reaches the gate
    lifter and sizes the API connection pool; the chart refuses what the manager would."""
    assert "--gate-workers=16" in _manager_args(render(helm, "ai"))
    args = _manager_args(render(helm, "ai", "controller.gateWorkers=64"))
    assert "--gate-workers=64" in args
    parsed = _manager_cli().parse_args(["manager", "--registry", "dmcr:5000", "--webhook-url",
                                        "https://127.0.0.1:9443",
                                        "--gate-workers=64"])
    assert main._delivery_config(parsed).gate_workers == 64
    for bad in ("0", str(main.MAX_GATE_WORKERS + 1)):
        done = subprocess.run([helm, "template", "mc", CHART, "--kube-version", KUBE_VERSION,
                               "--set", f"controller.gateWorkers={bad}"],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode != 0 and "controller.gateWorkers: 1 to 256" in done.stderr, bad
        with pytest.raises(SystemExit):
            _manager_cli().parse_args(["manager", "--registry", "dmcr:5000",
                                       f"--gate-workers={bad}"])


def _manager_cli() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="modelcache-controller", exit_on_error=True)
    main._manager_parser(p.add_subparsers())
    return p
