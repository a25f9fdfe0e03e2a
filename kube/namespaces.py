"""Namespace labels, read on demand and kept briefly: what ``api.sharing`` asks for.

Where it sits: the webhook, the gate lifter, the SharedPVC reconciler and
the node plugin's resolver check a Model's ``spec.sharing.namespaceSelector``
against the labels of the namespace that asks. Only a Model shared by
selector (and not already by its list) needs them, so one GET per
namespace, remembered ``ttl`` seconds, is cheaper than a watch of every
namespace on every node, and needs only ``get`` on namespaces. A relabel
(or a revoked selector match) is seen within ``ttl``. A GET that fails
raises ``kube.client.ApiError``: callers fail closed (a retryable refusal).
"""

from __future__ import annotations

import threading
import time

from kube import client as kube

NAMESPACES = kube.Resource("", "v1", "namespaces", False, "Namespace")
TTL = 10.0
TIMEOUT = (2.0, 3.0)


class NamespaceLabels:
    """``labels(name)``: the namespace's labels, None when it does not exist."""

    def __init__(self, client: kube.Kube, ttl: float = TTL) -> None:
        self.client = client
        self.ttl = ttl
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, dict[str, str] | None]] = {}

    def __call__(self, name: str) -> dict[str, str] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._seen.get(name)
        if hit is not None and now - hit[0] < self.ttl:
            return hit[1]
        try:
            obj = self.client.get(NAMESPACES, name, timeout=TIMEOUT)
            labels: dict[str, str] | None = {
                str(k): str(v) for k, v in ((obj.get("metadata") or {}).get("labels")
                                            or {}).items()}
        except kube.NotFound:
            labels = None
        with self._lock:
            self._seen[name] = (now, labels)
        return labels
