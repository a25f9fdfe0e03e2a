"""tests/e2e: opt-in. The full-node test builds and runs a real kubelet,
containerd and control plane (minutes on a 2-core machine), so a plain
``pytest`` (hack/test.sh) deselects it; ``hack/e2e.sh`` runs it with
``-m e2e`` (or set MODELCACHE_NODE_E2E=1)."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = "e2e" in (config.option.markexpr or "") or os.environ.get("MODELCACHE_NODE_E2E") == "1"
    if wanted:
        return
    keep = [i for i in items if not i.get_closest_marker("e2e")]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i.get_closest_marker("e2e")])
        items[:] = keep
