"""Restart recovery: make the cache consistent after a crash and load its index.

Sits on ``store.ModelStore``; ``csi.server`` runs it once, after the socket
is up and before publishes are served. What a crash can leave, and what
happens to it: a temp tree (``place_tree`` renames only finished ones) is
removed; a tree without its manifest, config or state was never listed and
is removed; a state file without a tree is removed; a partial blob is kept
for resume unless older than a day, empty, already stored or unnamed, and
one that a writer (another process on the same cache) holds is never touched. ``refs.json`` (tag -> last digest) is
reloaded so tags publish offline.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable

from csi.cache.store import Entry, ModelStore
from modelpack import digest as dg
from modelpack.errors import ModelPackError
from modelpack.oci.manifest import assemble
from modelpack.store.placement import remove_tree

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)

PART_MAX_AGE = 24 * 3600.0


def recover(s: ModelStore, changed: Callable[[], None]) -> None:
    """Clean up what a crash left, load the index and refs, then run ``changed``."""
    removed = s.blobs.recover(max_age=PART_MAX_AGE)  # skips parts a live writer holds
    if removed:
        log.info("removed partial blobs no one can resume", extra={"files": len(removed)})
    index: dict[str, Entry] = {}
    for name in os.listdir(s.models_dir):
        full = os.path.join(s.models_dir, name)
        if name.startswith(".") or len(name) != 64:
            log.info("removing leftover", extra={"path": full})
            remove_tree(full)
            continue
        entry = load_entry(s, name)
        if entry is None:
            log.warning("removing unlisted tree", extra={"path": full})
            remove_tree(full)
            continue
        index[name] = entry
    for name in os.listdir(s.state_dir):
        hexd = name.removesuffix(".json")
        if hexd not in index:
            try:
                os.unlink(os.path.join(s.state_dir, name))
            except FileNotFoundError:
                pass
    try:
        with open(s.refs_path) as f:
            refs = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        refs = {}
    with s.lock:
        s.index = index
        s.refs = {k: v for k, v in refs.items() if isinstance(v, dict)}
    changed()
    log.info("cache recovered", extra={"models": len(index), "bytes": s.usage()})


def load_entry(s: ModelStore, hexd: str) -> Entry | None:
    """The index entry of tree ``hexd`` from its state file and stored blobs; None
    (logged) if any of them is missing or unreadable."""
    try:
        with open(s.state_path(hexd)) as f:
            state = json.load(f)
        mtime = os.stat(s.state_path(hexd)).st_mtime
        digest = "sha256:" + hexd
        with open(s.blobs.path(digest), "rb") as f:
            manifest = f.read()
        cfg_digest = dg.validate(str(json.loads(manifest)["config"]["digest"]))
        with open(s.blobs.path(cfg_digest), "rb") as f:
            config = f.read()
        pack = assemble(manifest, config, digest)
    except (OSError, ValueError, KeyError, TypeError, ModelPackError) as e:
        log.warning("cannot load cached model", extra={"digest": hexd, "error": str(e)[:200]})
        return None
    return Entry(pack, list(state.get("references", [])), bool(state.get("pinned")),
                 str(state.get("method", "")), mtime)
