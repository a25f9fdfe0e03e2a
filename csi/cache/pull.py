"""Pulling: one pull per reference, one fetch per digest, on the cache's own pool.

Sits on ``store.ModelStore`` and asks ``evict.Evictor.make_room`` before it
fetches. ``Cache.pull`` hands out one shared future per reference; a lock
per manifest digest makes two references to the same model fetch and place
it once. Blobs are single-flight below that, in the store itself
(``modelpack.store.partlock``): two models that share a layer, pulled at
once here or by another process on the same cache, write it once; the
second waits and finds it stored. Pulls run on
their own thread pool, so the gRPC event loop never blocks, and a pull goes
on after the publish that started it gives up at its deadline: the next
publish of the same model finds it cached or joins the same future.

A model is listed only once its blobs, manifest, config, tree and state are
on disk (``_fetch_and_place``), so a crash leaves nothing half-visible.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import logging
import os
import threading
import time
from collections.abc import Callable

from csi import metrics
from csi.cache.store import Entry, ModelStore, blob_digests, write_json
from modelpack import digest as dg
from modelpack import pull as mpull
from modelpack.errors import RegistryError, StoreError
from modelpack.oci.manifest import ModelPack
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.store.blobs import fsync_dir
from modelpack.store.placement import remove_tree

# one logger for the whole cache: its lines keep "logger": "csi.cache" after the split
log = logging.getLogger(__package__)

ClientFactory = Callable[[str], RegistryClient]


class Puller:
    """Fetches and places models into the store; thread-safe."""

    def __init__(self, store: ModelStore, client_for: ClientFactory, *,
                 make_room: Callable[[int, str], None], changed: Callable[[], None],
                 workers: int, blob_workers: int) -> None:
        self.store = store
        self.client_for = client_for
        self.make_room = make_room
        self.changed = changed  # gauges and inventory, after every fetch
        self.blob_workers = blob_workers
        self._digest_locks: dict[str, threading.Lock] = {}
        self._pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pull")

    def pull(self, ref: Reference, pin: bool = False) -> cf.Future[str]:
        """Ensure ``ref`` is cached; one shared future (of its digest) per reference."""
        key = str(ref)
        s = self.store
        with s.lock:
            fut = s.inflight.get(key)
            if fut is not None:
                return fut
            fut = self._pool.submit(self._pull, ref, pin)
            s.inflight[key] = fut

        def forget(f: cf.Future[str]) -> None:
            with s.lock:
                if s.inflight.get(key) is f:
                    del s.inflight[key]

        fut.add_done_callback(forget)
        return fut

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _digest_lock(self, hexd: str) -> threading.Lock:
        with self.store.lock:
            return self._digest_locks.setdefault(hexd, threading.Lock())

    def _resolve(self, client: RegistryClient, ref: Reference) -> ModelPack:
        """The ModelPack of ``ref``: from the store when pinned, else from the registry.

        A tag whose registry is unreachable falls back to its last known
        digest, so a node keeps publishing what it has while the registry is down.
        """
        s = self.store
        if ref.digest:
            with s.lock:
                entry = s.index.get(dg.hex_of(ref.digest))
            if entry is not None:
                return entry.pack
        try:
            return mpull.resolve(client, ref)
        except RegistryError as e:
            known = None if ref.digest or not e.retryable else s.local_digest(
                ref, fresh_only=False)
            if known:
                with s.lock:
                    entry = s.index.get(dg.hex_of(known))
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
                with self.store.lock:
                    cached = hexd in self.store.index
                if cached:
                    result = "cached"
                else:
                    self._fetch_and_place(client, ref, pack, pin)
                    result = "pulled"
            self.store.remember(ref, pack.digest, pin)
            return pack.digest
        finally:
            metrics.PULL_SECONDS.labels(result).observe(time.monotonic() - start)

    def _fetch_and_place(self, client: RegistryClient, ref: Reference, pack: ModelPack,
                         pin: bool) -> None:
        s = self.store
        hexd = dg.hex_of(pack.digest)
        needed = blob_digests(pack)
        with s.lock:
            s.protected.update(needed)
            s.pulling[hexd] += 1
        log.info("pulling", extra={"reference": str(ref), "digest": pack.digest,
                                   "bytes": pack.size, "files": len(pack.layers)})
        try:
            missing = sum({layer.digest: layer.size for layer in pack.layers
                           if not s.blobs.has(layer.digest, layer.size)}.values())
            self.make_room(missing, pack.digest)
            mpull.fetch_blobs(client, ref.repository, pack.layers, s.blobs,
                              progress=_count_bytes, workers=self.blob_workers)
            # manifest and config are stored as blobs too: the model can be
            # re-read (and re-placed) without the registry after a restart
            s.blobs.ingest_stream(io.BytesIO(pack.config_bytes), pack.config_digest,
                                  len(pack.config_bytes))
            s.blobs.ingest_stream(io.BytesIO(pack.manifest_bytes), pack.digest,
                                  len(pack.manifest_bytes))
            dest = s.tree_path(pack.digest)
            if os.path.exists(dest):  # unlisted leftover (e.g. evicted while listed)
                remove_tree(dest)
            method = mpull.place(pack, s.blobs, dest)
            state = {"digest": pack.digest, "references": [str(ref)], "pinned": pin,
                     "method": method.value, "created": time.time()}
            write_json(s.state_path(hexd), state)
            fsync_dir(s.state_dir)
            with s.lock:
                s.check_condemned(needed, hexd)  # scrub rejected a blob reused here: list nothing
                s.index[hexd] = Entry(pack, [str(ref)], pin, method.value, time.time())
            log.info("pulled", extra={"reference": str(ref), "digest": pack.digest,
                                      "method": method.value})
        except StoreError as e:
            if e.retryable:  # disk full: drop this pull's partial blobs, they cannot finish;
                # a part another pull is still writing (a shared layer) is locked and stays
                s.blobs.drop_parts(layer.digest for layer in pack.layers)
            raise
        finally:
            with s.lock:
                s.unprotect(needed)  # also deletes the blobs scrub condemned meanwhile
                s.pulling[hexd] -= 1
                if s.pulling[hexd] <= 0:
                    del s.pulling[hexd]
            self.changed()


def _count_bytes(n: int) -> None:
    if n > 0:
        metrics.PULL_BYTES.inc(n)
