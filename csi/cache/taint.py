"""Tainted trees: model trees scrub found corrupt while a pod had them mounted.

Sits on ``store.ModelStore``; ``scrub`` taints, and ``sweep`` removes what
no mount shows any more (``Cache.sweep_tainted``: after every unpublish, at
recovery and after each scrub round).

A mounted tree cannot be repaired or replaced in place: the pod's bind
mount shows that very directory. So ``taint`` moves it aside, to
``<root>/tainted/<hex>-<ns>`` on the same filesystem. A bind mount follows
the directory it was made of, so the pod keeps its view (mountinfo shows the
new name), while the model leaves the index: the next publish pulls a
fresh, verified tree at the usual ``models/<hex>``, a different directory.
Nothing can mount the tainted tree again (its old path is gone), and
``recover`` leaves ``tainted/`` alone, so a restart does not pull it from
under a pod either.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from csi import metrics
from csi.cache.evict import evict_one
from csi.cache.store import ModelStore, mounted_under
from modelpack.store.placement import remove_tree

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)


def taint(s: ModelStore, hexd: str) -> str | None:
    """Move the tree of ``hexd`` aside and unlist the model (its state and the blobs
    no other model needs go as in eviction); caller holds the lock. Returns the new
    path, or None if the tree could not be moved (it then stays listed)."""
    dest = os.path.join(s.tainted_dir, f"{hexd}-{time.time_ns()}")
    try:
        os.rename(s.tree_path("sha256:" + hexd), dest)
    except OSError as e:
        log.error("cannot move a tainted tree aside; it stays listed",
                  extra={"digest": "sha256:" + hexd, "error": str(e)[:200]})
        return None
    evict_one(s, hexd)  # finds no tree at the old path: it removes only state and blobs
    return dest


def sweep(s: ModelStore) -> int:
    """Remove the tainted trees no mount shows and no publish holds; return how many
    are left (also the ``modelcache_node_tainted_trees`` gauge)."""
    gone = []
    with s.lock:
        names = sorted(os.listdir(s.tainted_dir))
        busy = mounted_under(s.tainted_dir) if names else None
        for name in names:
            # a publish that leased the tree before it was tainted may be mounting it
            # right now: wait for its release (the next sweep)
            if busy is not None and (busy[name] or s.leases[name.split("-", 1)[0]]):
                continue
            gone.append(name)
        left = len(names) - len(gone)
    for name in gone:
        remove_tree(os.path.join(s.tainted_dir, name))
        log.info("tainted tree removed: its last mount is gone",
                 extra={"digest": "sha256:" + name.split("-", 1)[0], "tree": name})
    metrics.TAINTED_TREES.set(left)
    return left


def listing(s: ModelStore) -> list[dict[str, Any]]:
    """The tainted trees still on disk, with their mounts (for the inventory)."""
    names = sorted(os.listdir(s.tainted_dir))
    busy = mounted_under(s.tainted_dir) if names else None
    return [{"digest": "sha256:" + n.split("-", 1)[0], "tree": n,
             "mounts": busy[n] if busy is not None else 0} for n in names]
