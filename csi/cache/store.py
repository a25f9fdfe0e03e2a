"""The cache's state: model trees on disk, their state files, and the index that lists them.

The bottom of ``csi.cache``: every job (``pull``, ``evict``, ``scrub``,
``inventory``, ``recover``) reads and changes the cache through one
``ModelStore`` and under its one lock. It also answers the cheap questions
a publish asks without the network (``local_digest``, ``lease``,
``pack_of``) and measures space (``capacity``, ``usage``, ``mounted``).

The lock is re-entrant: eviction holds it while it measures usage and
reads mountinfo, and both take it again.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from csi import mounts
from modelpack import digest as dg
from modelpack.errors import StoreError
from modelpack.oci.manifest import ModelPack
from modelpack.oci.reference import Reference
from modelpack.store.blobs import BlobStore
from modelpack.store.placement import Method


@dataclass(frozen=True)
class Tree:
    """A cached model tree, leased for the duration of a publish."""

    digest: str
    path: str
    size: int
    files: int


@dataclass
class Entry:
    """One listed model: what ``state/<hex>.json`` holds, plus its pack and LRU clock."""

    pack: ModelPack
    references: list[str]
    pinned: bool
    method: str
    last_used: float


def blob_digests(pack: ModelPack) -> list[str]:
    """Every blob a model's tree is built from: manifest, config, layers."""
    return [pack.digest, pack.config_digest, *(layer.digest for layer in pack.layers)]


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise StoreError(f"cannot write {path}: {e}", retryable=True) from e


class ModelStore:
    """The shared state of the cache; every field below ``lock`` is guarded by it."""

    def __init__(self, root: str, *, capacity: int | None, tag_ttl: float) -> None:
        self.root = os.path.abspath(root)
        self.blobs = BlobStore(self.root)
        self.models_dir = os.path.join(self.root, "models")
        self.state_dir = os.path.join(self.root, "state")
        os.makedirs(self.models_dir, exist_ok=True)
        os.makedirs(self.state_dir, exist_ok=True)
        self.configured_capacity = capacity
        self.tag_ttl = tag_ttl
        self.lock = threading.RLock()
        self.index: dict[str, Entry] = {}  # manifest hex -> entry
        self.leases: Counter[str] = Counter()
        self.protected: Counter[str] = Counter()  # blob digests a running pull needs
        self.pulling: Counter[str] = Counter()  # manifest hexes being pulled
        self.inflight: dict[str, cf.Future[str]] = {}  # reference -> its shared pull
        self.refs: dict[str, dict[str, Any]] = {}

    # -- paths ---------------------------------------------------------------

    def tree_path(self, digest: str) -> str:
        return os.path.join(self.models_dir, dg.hex_of(digest))

    def state_path(self, hexd: str) -> str:
        return os.path.join(self.state_dir, hexd + ".json")

    @property
    def refs_path(self) -> str:
        return os.path.join(self.root, "refs.json")

    # -- lookup and leases -------------------------------------------------------

    def local_digest(self, ref: Reference, *, fresh_only: bool = True) -> str | None:
        """The digest ``ref`` names, without the network; tags only while fresh."""
        if ref.digest:
            return ref.digest
        with self.lock:
            known = self.refs.get(str(ref))
        if not known:
            return None
        if fresh_only and time.time() - float(known.get("resolvedAt", 0)) > self.tag_ttl:
            return None
        return str(known["digest"])

    def lease(self, digest: str) -> Tree | None:
        """Hold a cached tree against eviction until ``release``; None if not cached."""
        hexd = dg.hex_of(digest)
        with self.lock:
            entry = self.index.get(hexd)
            if entry is None:
                return None
            self.leases[hexd] += 1
            entry.last_used = time.time()
        try:
            os.utime(self.state_path(hexd))  # persist the LRU clock cheaply
        except OSError:
            pass
        return Tree(digest, self.tree_path(digest), entry.pack.size, len(entry.pack.layers))

    def release(self, digest: str) -> None:
        hexd = dg.hex_of(digest)
        with self.lock:
            self.leases[hexd] -= 1
            if self.leases[hexd] <= 0:
                del self.leases[hexd]

    def pack_of(self, digest: str) -> ModelPack | None:
        with self.lock:
            entry = self.index.get(dg.hex_of(digest))
        return entry.pack if entry else None

    def digests(self) -> list[str]:
        """Manifest digests of the complete trees in the cache."""
        with self.lock:
            return ["sha256:" + h for h in self.index]

    def remember(self, ref: Reference, digest: str, pin: bool) -> None:
        """Record that ``ref`` names ``digest`` (refs.json for tags) and add it to the
        model's state (its references, and the pin once asked for)."""
        hexd = dg.hex_of(digest)
        save_state = False
        with self.lock:
            if not ref.digest:
                self.refs[str(ref)] = {"digest": digest, "resolvedAt": time.time()}
                refs = dict(self.refs)
            else:
                refs = None
            entry = self.index.get(hexd)
            if entry is not None and (str(ref) not in entry.references or pin and not entry.pinned):
                if str(ref) not in entry.references:
                    entry.references.append(str(ref))
                entry.pinned = entry.pinned or pin
                save_state = True
                state = {"digest": digest, "references": list(entry.references),
                         "pinned": entry.pinned, "method": entry.method}
        if refs is not None:
            write_json(self.refs_path, refs)
        if save_state:
            write_json(self.state_path(hexd), state)

    # -- space ---------------------------------------------------------------------

    def capacity(self) -> int:
        st = os.statvfs(self.root)
        fs = st.f_blocks * st.f_frsize
        return min(self.configured_capacity, fs) if self.configured_capacity else fs

    def usage(self) -> int:
        """Bytes the cache holds: blobs, plus trees placed by copy (they share nothing)."""
        total = 0
        with os.scandir(self.blobs.blob_dir) as it:
            for e in it:
                try:
                    total += e.stat().st_size
                except FileNotFoundError:
                    pass
        with self.lock:
            total += sum(e.pack.size for e in self.index.values()
                         if e.method == Method.COPY.value)
        return total

    def free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def mounted(self) -> Counter[str]:
        """Manifest hexes of cached trees mounted anywhere (from mountinfo), with counts."""
        table = mounts.read_mounts()
        dev, inner = mounts.fs_path(self.models_dir, table)
        prefix = inner.rstrip("/") + "/"
        out: Counter[str] = Counter()
        for m in table:
            root = m.root.removesuffix("//deleted")
            if m.dev == dev and root.startswith(prefix):
                out[root[len(prefix):].split("/", 1)[0]] += 1
        return out
