"""The cache's state: model trees on disk, their state files, and the index that lists them.

The bottom of ``csi.cache``: every job (``pull``, ``evict``, ``scrub``,
``inventory``, ``recover``) reads and changes the cache through one
``ModelStore`` and under its one lock. It also answers the cheap questions
a publish asks without the network (``local_digest``, ``lease``,
``pack_of``) and measures space (``capacity``, ``usage``, ``mounted``).

The lock is re-entrant: eviction holds it while it measures usage and
reads mountinfo, and both take it again.

Scrub and pulls meet here too: a pull ``protected`` its blobs before it
checks which are present, so scrub, deciding under the lock, never deletes
a blob a running pull may have chosen to reuse; it ``condemn``s it instead,
the pull refuses to list a tree built on it (``check_condemned``), and the
last pull to let go deletes it (``unprotect``).
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
from modelpack.errors import IntegrityError, StoreError
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
        self.tainted_dir = os.path.join(self.root, "tainted")  # csi.cache.taint
        for d in (self.models_dir, self.state_dir, self.tainted_dir):
            os.makedirs(d, exist_ok=True)
        self.configured_capacity = capacity
        self.tag_ttl = tag_ttl
        self.lock = threading.RLock()
        self.index: dict[str, Entry] = {}  # manifest hex -> entry
        self.leases: Counter[str] = Counter()
        self.protected: Counter[str] = Counter()  # blob digests a running pull needs
        self.pulling: Counter[str] = Counter()  # manifest hexes being pulled
        self.inflight: dict[str, cf.Future[str]] = {}  # reference -> its shared pull
        self.refs: dict[str, dict[str, Any]] = {}
        # blob digest -> (st_dev, st_ino) of a file scrub found corrupt while a pull
        # protected it: deleted once unprotected, unless replaced by a fresh commit
        self.condemned: dict[str, tuple[int, int]] = {}

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

    def pulled_as(self, ref: Reference) -> bool:
        """Whether a cached tree was pulled as ``ref`` (``<repository>@<digest>``, as
        its state file records): the node's own proof that the repository holds the
        digest, for the resolver while the registry is away."""
        if not ref.digest:
            return False
        with self.lock:
            entry = self.index.get(dg.hex_of(ref.digest))
            return entry is not None and str(ref) in entry.references

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
        return mounted_under(self.models_dir)

    # -- scrub meets pulls ----------------------------------------------------------

    def condemn(self, digest: str, ident: tuple[int, int]) -> bool:
        """Scrub found blob ``digest`` (the file ``ident``) corrupt: delete it now, or,
        while a pull needs it, once that pull lets go. False if the file is no longer
        the one scrub read (a pull committed a fresh, verified copy since)."""
        with self.lock:
            if file_ident(self.blobs.path(digest)) != ident:
                return False
            if self.protected[digest]:
                self.condemned[digest] = ident
            else:
                # no pull protects it, so no writer can be replacing it: safe under the lock
                self.blobs.delete(digest)
            return True

    def check_condemned(self, needed: list[str], hexd: str) -> None:
        """Raise IntegrityError if a blob the pull of ``hexd`` reused was found corrupt by
        scrub while the pull ran (the caller lists nothing then; a retry fetches the
        blob afresh). Its state file goes, so a restart does not list its tree either."""
        for d in needed:
            ident = self.condemned.get(d)
            if ident is not None and file_ident(self.blobs.path(d)) == ident:
                try:
                    os.unlink(self.state_path(hexd))
                except FileNotFoundError:
                    pass
                raise IntegrityError(f"blob {d} failed the integrity scrub while this pull "
                                     "reused it; pull again", reason="ScrubCorrupt")

    def unprotect(self, needed: list[str]) -> None:
        """A pull is done with ``needed``; delete the condemned blobs no pull needs now."""
        with self.lock:
            self.protected.subtract(needed)
            self.protected = +self.protected  # drop zero counts
            for d in set(needed) & set(self.condemned):
                if not self.protected[d]:
                    if file_ident(self.blobs.path(d)) == self.condemned.pop(d):
                        self.blobs.delete(d)


def file_ident(path: str) -> tuple[int, int] | None:
    """(st_dev, st_ino) of ``path``; None if it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def mounted_under(directory: str) -> Counter[str]:
    """Names of the entries of ``directory`` that are mounted anywhere (a bind shows
    the entry or a path inside it, per mountinfo), with counts."""
    table = mounts.read_mounts()
    dev, inner = mounts.fs_path(directory, table)
    prefix = inner.rstrip("/") + "/"
    out: Counter[str] = Counter()
    for m in table:
        root = m.root.removesuffix("//deleted")
        if m.dev == dev and root.startswith(prefix):
            out[root[len(prefix):].split("/", 1)[0]] += 1
    return out
