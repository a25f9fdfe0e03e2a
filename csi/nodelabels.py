"""Node labels: this node's Node object says which models its cache holds.

For every complete tree in the cache the Node carries
``api.names.node_label(digest)``
(``nodecache.modelcache.io/sha256-<first 40 hex of the manifest digest>``)
set to ``"true"``, so a workload's preferred node affinity can lean toward
nodes that need no pull; the webhook and the gate lifter read the same
names. This module keeps only the patching of this node's labels, through
``kube.client``.

The cache calls ``poke`` whenever its trees may have changed (recovery,
pull, eviction, scrub); a burst of pokes within ``debounce`` seconds becomes
one reconcile: GET the Node, compare its labels of *our* exact shape with
the cache, and send one merge patch that adds the missing ones and deletes
(``null``) the stale ones. Labels of any other shape are never touched, and
a merge patch names only our keys, so it cannot race with other writers of
the Node's labels. The first reconcile after start is a full one (it also
removes labels of trees that vanished while the plugin was down), and one
runs every ``resync`` seconds to repair labels someone else removed. A
failed reconcile is retried with a backoff (1 s doubling to 60 s).

RBAC: get and patch on nodes. A ClusterRole cannot limit a DaemonSet pod to
its own Node (the NodeRestriction admission plugin does that only for
kubelet credentials), so any plugin pod may patch any Node; what bounds it
is that the plugin runs only as the node's own privileged DaemonSet.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from api.names import NODE_LABEL_PREFIX, node_label
from csi import metrics
from csi.debounced import Debounced
from kube import client as kube

log = logging.getLogger(__name__)

# the labels of node_label's shape: the only ones this module ever adds or removes
OURS = re.compile(rf"^{re.escape(NODE_LABEL_PREFIX)}sha256-[0-9a-f]{{40}}$")
TIMEOUT = (5.0, 15.0)  # connect, read

def label_patch(current: dict[str, str], digests: Iterable[str]) -> dict[str, str | None]:
    """The merge patch of ``metadata.labels`` taking ``current`` to the cache's state."""
    want = {node_label(d) for d in digests}
    patch: dict[str, str | None] = {k: "true" for k in want if current.get(k) != "true"}
    patch.update({k: None for k in current if OURS.match(k) and k not in want})
    return patch


class NodeLabeler(Debounced):
    """Keeps ``node``'s cache labels equal to ``digests()``, in a thread of its own."""

    name = "node-labels"

    def __init__(self, client: kube.Kube, node: str, digests: Callable[[], Iterable[str]], *,
                 debounce: float = 1.0, resync: float = 600.0) -> None:
        super().__init__(debounce, resync)
        self.client = client
        self.node = node
        self.digests = digests

    def round(self) -> None:
        self.reconcile()

    def reconcile(self) -> dict[str, str | None]:
        """One GET, at most one PATCH; returns the patch sent (empty: none was needed)."""
        node = self.client.get(kube.NODES, self.node, timeout=TIMEOUT)
        labels = (node.get("metadata") or {}).get("labels") or {}
        patch = label_patch(labels, self.digests())
        if patch:
            self.client.patch(kube.NODES, self.node, {"metadata": {"labels": patch}},
                              timeout=TIMEOUT)
            metrics.NODE_LABEL_PATCHES.labels("ok").inc()
            log.info("node labels updated", extra={
                "node": self.node, "added": sorted(k for k, v in patch.items() if v),
                "removed": sorted(k for k, v in patch.items() if v is None)})
        return patch

    def failed(self, error: Exception, retry_in: float) -> None:
        metrics.NODE_LABEL_PATCHES.labels("error").inc()
        log.warning("node labels not updated", extra={
            "node": self.node, "error": kube.brief(error), "retryIn": retry_in})
