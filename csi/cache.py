"""The node cache: verified ModelPacks on node-local disk, one pull per digest.

Layout under ``--cache-dir`` (a ``BlobStore`` root plus trees and state)::

    blobs/sha256/<hex>     layers, configs and manifests, verified on write
    ingest/<hex>.part      a blob being downloaded (resumed after a crash)
    models/<hex>/          the read-only tree of manifest <hex>; what pods see
    state/<hex>.json       per model: references, pin, placement method;
                           its mtime is the model's last use (LRU)
    refs.json              tag -> digest, last resolved (publish offline)
    inventory.json         what the controller reads (also served on HTTP)

A tree appears only complete (``place_tree`` renames a finished temp dir),
and it is listed only once its manifest, config and state are on disk, so a
crash at any point leaves either nothing visible or a whole verified model.

Concurrency: ``pull`` returns one shared future per reference, and a lock
per digest makes two references to the same model fetch once. A publish
``lease``s a tree from before it mounts until the mount is made; eviction
skips leased, mounted (read from mountinfo), pinned and in-flight models.
Pulls run on their own thread pool so the gRPC event loop never blocks.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from csi import metrics, mounts
from modelpack import digest as dg
from modelpack import pull as mpull
from modelpack.errors import ModelPackError, RegistryError, StoreError
from modelpack.oci.manifest import ModelPack, assemble
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.store.blobs import BlobStore, fsync_dir
from modelpack.store.placement import Method, remove_tree

log = logging.getLogger(__name__)

ClientFactory = Callable[[str], RegistryClient]
PART_MAX_AGE = 24 * 3600.0


@dataclass(frozen=True)
class Tree:
    """A cached model tree, leased for the duration of a publish."""

    digest: str
    path: str
    size: int
    files: int


@dataclass
class _Entry:
    pack: ModelPack
    references: list[str]
    pinned: bool
    method: str
    last_used: float


def _write_json(path: str, obj: Any) -> None:
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


class Cache:
    """The node-local model cache; thread-safe."""

    def __init__(self, root: str, client_for: ClientFactory, *, capacity: int | None = None,
                 high_watermark: float = 0.85, low_watermark: float = 0.70,
                 pull_workers: int = 4, blob_workers: int = 4, tag_ttl: float = 60.0) -> None:
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError("watermarks need 0 < low <= high <= 1")
        self.root = os.path.abspath(root)
        self.store = BlobStore(self.root)
        self.models_dir = os.path.join(self.root, "models")
        self.state_dir = os.path.join(self.root, "state")
        os.makedirs(self.models_dir, exist_ok=True)
        os.makedirs(self.state_dir, exist_ok=True)
        self.client_for = client_for
        self.configured_capacity = capacity
        self.high = high_watermark
        self.low = low_watermark
        self.blob_workers = blob_workers
        self.tag_ttl = tag_ttl
        self._lock = threading.RLock()
        self._index: dict[str, _Entry] = {}  # manifest hex -> entry
        self._leases: Counter[str] = Counter()
        self._protected: Counter[str] = Counter()  # blob digests a running pull needs
        self._pulling: Counter[str] = Counter()  # manifest hexes being pulled
        self._inflight: dict[str, cf.Future[str]] = {}
        self._digest_locks: dict[str, threading.Lock] = {}
        self._refs: dict[str, dict[str, Any]] = {}
        self._pool = cf.ThreadPoolExecutor(max_workers=pull_workers, thread_name_prefix="pull")
        self._listeners: list[Callable[[], None]] = []

    # -- paths ---------------------------------------------------------------

    def tree_path(self, digest: str) -> str:
        return os.path.join(self.models_dir, dg.hex_of(digest))

    def _state_path(self, hexd: str) -> str:
        return os.path.join(self.state_dir, hexd + ".json")

    # -- startup ---------------------------------------------------------------

    def recover(self) -> None:
        """Make the cache consistent after a crash; load the index.

        Leftover temp trees are removed; a tree without its manifest, config
        or state is removed (it was never listed); partial blobs are kept for
        resume unless older than a day; refs.json is reloaded.
        """
        self.store.recover()
        now = time.time()
        for name in os.listdir(self.store.ingest_dir):
            full = os.path.join(self.store.ingest_dir, name)
            try:
                if now - os.stat(full).st_mtime > PART_MAX_AGE:
                    os.unlink(full)
            except FileNotFoundError:
                pass
        index: dict[str, _Entry] = {}
        for name in os.listdir(self.models_dir):
            full = os.path.join(self.models_dir, name)
            if name.startswith(".") or len(name) != 64:
                log.info("removing leftover", extra={"path": full})
                remove_tree(full)
                continue
            entry = self._load_entry(name)
            if entry is None:
                log.warning("removing unlisted tree", extra={"path": full})
                remove_tree(full)
                continue
            index[name] = entry
        for name in os.listdir(self.state_dir):
            hexd = name.removesuffix(".json")
            if hexd not in index:
                try:
                    os.unlink(os.path.join(self.state_dir, name))
                except FileNotFoundError:
                    pass
        try:
            with open(os.path.join(self.root, "refs.json")) as f:
                refs = json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            refs = {}
        with self._lock:
            self._index = index
            self._refs = {k: v for k, v in refs.items() if isinstance(v, dict)}
        self._update_gauges()
        self.write_inventory()
        log.info("cache recovered", extra={"models": len(index), "bytes": self.usage()})

    def _load_entry(self, hexd: str) -> _Entry | None:
        try:
            with open(self._state_path(hexd)) as f:
                state = json.load(f)
            mtime = os.stat(self._state_path(hexd)).st_mtime
            digest = "sha256:" + hexd
            with open(self.store.path(digest), "rb") as f:
                manifest = f.read()
            cfg_digest = dg.validate(str(json.loads(manifest)["config"]["digest"]))
            with open(self.store.path(cfg_digest), "rb") as f:
                config = f.read()
            pack = assemble(manifest, config, digest)
        except (OSError, ValueError, KeyError, TypeError, ModelPackError) as e:
            log.warning("cannot load cached model", extra={"digest": hexd, "error": str(e)[:200]})
            return None
        return _Entry(pack, list(state.get("references", [])), bool(state.get("pinned")),
                      str(state.get("method", "")), mtime)

    # -- lookup and leases -------------------------------------------------------

    def local_digest(self, ref: Reference, *, fresh_only: bool = True) -> str | None:
        """The digest ``ref`` names, without the network; tags only while fresh."""
        if ref.digest:
            return ref.digest
        with self._lock:
            known = self._refs.get(str(ref))
        if not known:
            return None
        if fresh_only and time.time() - float(known.get("resolvedAt", 0)) > self.tag_ttl:
            return None
        return str(known["digest"])

    def lease(self, digest: str) -> Tree | None:
        """Hold a cached tree against eviction until ``release``; None if not cached."""
        hexd = dg.hex_of(digest)
        with self._lock:
            entry = self._index.get(hexd)
            if entry is None:
                return None
            self._leases[hexd] += 1
            entry.last_used = time.time()
        try:
            os.utime(self._state_path(hexd))  # persist the LRU clock cheaply
        except OSError:
            pass
        return Tree(digest, self.tree_path(digest), entry.pack.size, len(entry.pack.layers))

    def release(self, digest: str) -> None:
        hexd = dg.hex_of(digest)
        with self._lock:
            self._leases[hexd] -= 1
            if self._leases[hexd] <= 0:
                del self._leases[hexd]

    def pack_of(self, digest: str) -> ModelPack | None:
        with self._lock:
            entry = self._index.get(dg.hex_of(digest))
        return entry.pack if entry else None

    # -- pulling -----------------------------------------------------------------

    def pull(self, ref: Reference, pin: bool = False) -> cf.Future[str]:
        """Ensure ``ref`` is cached; one shared future (of its digest) per reference."""
        key = str(ref)
        with self._lock:
            fut = self._inflight.get(key)
            if fut is not None:
                return fut
            fut = self._pool.submit(self._pull, ref, pin)
            self._inflight[key] = fut

        def forget(f: cf.Future[str]) -> None:
            with self._lock:
                if self._inflight.get(key) is f:
                    del self._inflight[key]

        fut.add_done_callback(forget)
        return fut

    def _digest_lock(self, hexd: str) -> threading.Lock:
        with self._lock:
            return self._digest_locks.setdefault(hexd, threading.Lock())

    def _resolve(self, client: RegistryClient, ref: Reference) -> ModelPack:
        """The ModelPack of ``ref``: from the store when pinned, else from the registry.

        A tag whose registry is unreachable falls back to its last known
        digest, so a node keeps publishing what it has while the registry is down.
        """
        if ref.digest:
            with self._lock:
                entry = self._index.get(dg.hex_of(ref.digest))
            if entry is not None:
                return entry.pack
        try:
            return mpull.resolve(client, ref)
        except RegistryError as e:
            known = None if ref.digest or not e.retryable else self.local_digest(
                ref, fresh_only=False)
            if known:
                with self._lock:
                    entry = self._index.get(dg.hex_of(known))
                if entry is not None:
                    log.warning("registry unreachable; using the last known digest",
                                extra={"reference": str(ref), "digest": known,
                                       "error": str(e)[:200]})
                    return entry.pack
            raise

    def _pull(self, ref: Reference, pin: bool) -> str:
        start = time.monotonic()
        result = "error"
        try:
            client = self.client_for(ref.host)
            pack = self._resolve(client, ref)
            hexd = dg.hex_of(pack.digest)
            with self._digest_lock(hexd):
                with self._lock:
                    cached = hexd in self._index
                if cached:
                    result = "cached"
                else:
                    self._fetch_and_place(client, ref, pack, pin)
                    result = "pulled"
            self._remember(ref, pack.digest, pin)
            return pack.digest
        finally:
            metrics.PULL_SECONDS.labels(result).observe(time.monotonic() - start)

    def _fetch_and_place(self, client: RegistryClient, ref: Reference, pack: ModelPack,
                         pin: bool) -> None:
        hexd = dg.hex_of(pack.digest)
        needed = [pack.digest, pack.config_digest, *(layer.digest for layer in pack.layers)]
        with self._lock:
            self._protected.update(needed)
            self._pulling[hexd] += 1
        log.info("pulling", extra={"reference": str(ref), "digest": pack.digest,
                                   "bytes": pack.size, "files": len(pack.layers)})
        try:
            missing = sum({layer.digest: layer.size for layer in pack.layers
                           if not self.store.has(layer.digest, layer.size)}.values())
            self._make_room(missing, pack.digest)
            mpull.fetch_blobs(client, ref.repository, pack.layers, self.store,
                              progress=self._count_bytes, workers=self.blob_workers)
            # manifest and config are stored as blobs too: the model can be
            # re-read (and re-placed) without the registry after a restart
            self.store.ingest_stream(io.BytesIO(pack.config_bytes), pack.config_digest,
                                     len(pack.config_bytes))
            self.store.ingest_stream(io.BytesIO(pack.manifest_bytes), pack.digest,
                                     len(pack.manifest_bytes))
            dest = self.tree_path(pack.digest)
            if os.path.exists(dest):  # unlisted leftover (e.g. evicted while listed)
                remove_tree(dest)
            method = mpull.place(pack, self.store, dest)
            state = {"digest": pack.digest, "references": [str(ref)], "pinned": pin,
                     "method": method.value, "created": time.time()}
            _write_json(self._state_path(hexd), state)
            fsync_dir(self.state_dir)
            with self._lock:
                self._index[hexd] = _Entry(pack, [str(ref)], pin, method.value, time.time())
            log.info("pulled", extra={"reference": str(ref), "digest": pack.digest,
                                      "method": method.value})
        except StoreError as e:
            if e.retryable:  # disk full: drop this pull's partial blobs, they cannot finish
                for layer in pack.layers:
                    part = os.path.join(self.store.ingest_dir, dg.hex_of(layer.digest) + ".part")
                    try:
                        os.unlink(part)
                    except FileNotFoundError:
                        pass
            raise
        finally:
            with self._lock:
                self._protected.subtract(needed)
                self._protected = +self._protected  # drop zero counts
                self._pulling[hexd] -= 1
                if self._pulling[hexd] <= 0:
                    del self._pulling[hexd]
            self._update_gauges()
            self.write_inventory()

    @staticmethod
    def _count_bytes(n: int) -> None:
        if n > 0:
            metrics.PULL_BYTES.inc(n)

    def _remember(self, ref: Reference, digest: str, pin: bool) -> None:
        hexd = dg.hex_of(digest)
        save_state = False
        with self._lock:
            if not ref.digest:
                self._refs[str(ref)] = {"digest": digest, "resolvedAt": time.time()}
                refs = dict(self._refs)
            else:
                refs = None
            entry = self._index.get(hexd)
            if entry is not None and (str(ref) not in entry.references or pin and not entry.pinned):
                if str(ref) not in entry.references:
                    entry.references.append(str(ref))
                entry.pinned = entry.pinned or pin
                save_state = True
                state = {"digest": digest, "references": list(entry.references),
                         "pinned": entry.pinned, "method": entry.method}
        if refs is not None:
            _write_json(os.path.join(self.root, "refs.json"), refs)
        if save_state:
            _write_json(self._state_path(hexd), state)

    # -- space and eviction --------------------------------------------------------

    def capacity(self) -> int:
        st = os.statvfs(self.root)
        fs = st.f_blocks * st.f_frsize
        return min(self.configured_capacity, fs) if self.configured_capacity else fs

    def usage(self) -> int:
        """Bytes the cache holds: blobs, plus trees placed by copy (they share nothing)."""
        total = 0
        with os.scandir(self.store.blob_dir) as it:
            for e in it:
                try:
                    total += e.stat().st_size
                except FileNotFoundError:
                    pass
        with self._lock:
            total += sum(e.pack.size for e in self._index.values()
                         if e.method == Method.COPY.value)
        return total

    def _free(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def _make_room(self, needed: int, digest: str) -> None:
        cap = self.capacity()
        if needed > cap:
            raise StoreError(f"model {digest} needs {needed} bytes; the cache holds {cap}",
                             retryable=True)
        if self.usage() + needed > self.high * cap or needed > self._free():
            self.evict(max(0, int(self.low * cap) - needed), need_free=needed)
        if needed > self._free():
            raise StoreError(f"no space left in the cache for {digest}: needs {needed} bytes, "
                             f"{self._free()} free and nothing else evictable", retryable=True)

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

    def evict(self, target_bytes: int, need_free: int = 0) -> list[str]:
        """Evict least-recently-used idle trees until usage <= target_bytes.

        Idle means: not mounted anywhere, not leased by a publish in progress,
        not pinned and not being pulled. Returns the evicted digests.
        """
        evicted: list[str] = []
        with self._lock:
            busy = self.mounted()
            candidates = sorted(
                (e.last_used, h) for h, e in self._index.items()
                if not busy[h] and not self._leases[h] and not e.pinned and not self._pulling[h])
            usage = self.usage()
            for _, hexd in candidates:
                if usage <= target_bytes and self._free() >= need_free:
                    break
                freed = self._evict_one(hexd)
                usage -= freed
                evicted.append("sha256:" + hexd)
        if evicted:
            self._update_gauges()
            self.write_inventory()
        return evicted

    def _evict_one(self, hexd: str) -> int:
        """Remove one tree and the blobs no other model needs; caller holds the lock."""
        entry = self._index.pop(hexd)
        digest = "sha256:" + hexd
        trash = os.path.join(self.models_dir, f".evict-{hexd}")
        try:
            os.rename(self.tree_path(digest), trash)
        except FileNotFoundError:
            trash = ""
        try:
            os.unlink(self._state_path(hexd))
        except FileNotFoundError:
            pass
        keep: set[str] = set(self._protected)
        for other in self._index.values():
            keep.update((other.pack.digest, other.pack.config_digest,
                         *(layer.digest for layer in other.pack.layers)))
        freed = 0
        mine = {digest, entry.pack.config_digest, *(layer.digest for layer in entry.pack.layers)}
        for d in mine - keep:
            try:
                freed += os.stat(self.store.path(d)).st_size
            except FileNotFoundError:
                continue
            self.store.delete(d)
        if entry.method == Method.COPY.value:
            freed += entry.pack.size
        if trash:
            remove_tree(trash)
        metrics.EVICTIONS.inc()
        metrics.EVICTED_BYTES.inc(freed)
        log.info("evicted", extra={"digest": digest, "freedBytes": freed,
                                   "references": entry.references})
        return freed

    def maybe_evict(self) -> list[str]:
        """Evict down to the low watermark if usage is above the high one."""
        cap = self.capacity()
        if self.usage() > self.high * cap:
            return self.evict(int(self.low * cap))
        return []

    # -- scrub -------------------------------------------------------------------

    def scrub(self) -> list[str]:
        """Rehash every blob; drop corrupt ones and the idle trees built from them.

        A hardlinked tree shares the corrupt inode, so the tree must go too;
        a mounted one cannot be replaced under a pod and is reported instead.
        """
        with self._lock:
            protected = set(self._protected)
        bad = []
        for d in self.store.digests():
            if d in protected:
                continue
            try:
                got, _ = dg.of_file(self.store.path(d))
            except FileNotFoundError:
                continue
            if got != d:
                self.store.delete(d)
                bad.append(d)
        if not bad:
            return []
        metrics.SCRUB_CORRUPT.inc(len(bad))
        badset = set(bad)
        with self._lock:
            busy = self.mounted()
            for hexd, entry in list(self._index.items()):
                uses = {entry.pack.digest, entry.pack.config_digest,
                        *(layer.digest for layer in entry.pack.layers)}
                if not uses & badset:
                    continue
                if busy[hexd] or self._leases[hexd]:
                    log.error("corrupt blob under a mounted model; it is re-pulled once "
                              "unmounted", extra={"digest": entry.pack.digest})
                    continue
                self._evict_one(hexd)
        log.warning("scrub dropped corrupt blobs", extra={"digests": bad})
        self._update_gauges()
        self.write_inventory()
        return bad

    # -- inventory -----------------------------------------------------------------

    def inventory(self) -> dict[str, Any]:
        busy = self.mounted()
        with self._lock:
            models = [{
                "digest": e.pack.digest,
                "references": list(e.references),
                "sizeBytes": e.pack.size,
                "files": len(e.pack.layers),
                "lastUsed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
                "pinned": e.pinned,
                "mounts": busy[h],
                "method": e.method,
                "format": e.pack.metadata().get("format"),
            } for h, e in sorted(self._index.items(), key=lambda kv: -kv[1].last_used)]
            pulling = sorted(self._inflight)
        return {"capacityBytes": self.capacity(), "usedBytes": self.usage(),
                "highWatermark": self.high, "lowWatermark": self.low,
                "models": models, "pulling": pulling}

    def write_inventory(self) -> None:
        try:
            _write_json(os.path.join(self.root, "inventory.json"), self.inventory())
        except (StoreError, OSError) as e:  # a full disk must not fail the caller
            log.warning("inventory not written", extra={"error": str(e)[:200]})
        for fn in self._listeners:  # the inventory is rewritten whenever the trees change
            fn()

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (no arguments; it must not block) whenever the set of cached trees
        may have changed: after recovery, a pull, an eviction, a scrub (node labels)."""
        self._listeners.append(fn)

    def digests(self) -> list[str]:
        """Manifest digests of the complete trees in the cache."""
        with self._lock:
            return ["sha256:" + h for h in self._index]

    def _update_gauges(self) -> None:
        metrics.CACHE_BYTES.set(self.usage())
        metrics.CACHE_CAPACITY.set(self.capacity())
        with self._lock:
            metrics.CACHE_MODELS.set(len(self._index))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
