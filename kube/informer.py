"""List + watch one resource into an in-memory cache and tell handlers of changes.

Each informer runs in its own thread: list (paged) → replace the cache →
handlers see every object as ADDED (or DELETED for what vanished while the
watch was down) → watch from the list's resourceVersion; bookmarks keep the
resourceVersion fresh, a 410 or a broken stream leads back to the list
after a short backoff. ``transform`` trims objects before they are cached
(Jobs keep their metadata and status, Secrets only a hash of their data,
the node plugin's Models what a publish reads), which is what keeps 1,000s
of objects in a few MB; the cache key is read before the transform, so a
transform may keep as little as it likes.

Used by the controller (every resource it reconciles or reads) and by the
node plugin (Models, ClusterModels, its own Node), so both see the same
list/watch/backoff behaviour. ``stale_for`` says how long the connection
has been down, for readers that serve from the cache only while it is
fresh (the node plugin's ``--kube-max-stale``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kube import client as kube

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace or "", name)
Handler = Callable[[str, Obj, Obj | None], None]


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta["name"]))


def _rv(obj: Obj) -> int:
    # resourceVersions are opaque by contract; etcd's are integers, and this only
    # orders our own writes against the watch
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion") or 0)
    except ValueError:
        return 0


class Informer:
    def __init__(self, client: kube.Kube, res: kube.Resource, *, namespace: str | None = None,
                 label_selector: str | None = None, field_selector: str | None = None,
                 transform: Callable[[Obj], Obj] | None = None,
                 watch_timeout: int = 300,
                 on_connection: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.res = res
        self.namespace = namespace
        self.label_selector = label_selector
        self.field_selector = field_selector
        self.transform = transform or (lambda o: o)
        self.watch_timeout = watch_timeout
        self.on_connection = on_connection  # told after every list or failure (a gauge)
        self.handlers: list[Handler] = []
        self.synced = threading.Event()
        self._broken_since: float | None = time.monotonic()  # None while connected
        self._cache: dict[Key, Obj] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str = ""

    # -- cache reads --------------------------------------------------------

    def get(self, key: Key) -> Obj | None:
        with self._lock:
            return self._cache.get(key)

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._cache.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)

    def observe(self, obj: Obj) -> None:
        """Take an object we just wrote (an API answer) if it is newer than the cached one,
        so the next reconcile does not act on what we already changed (client-go's
        mutation cache). Handlers are not called: the watch event still comes."""
        key = key_of(obj)
        obj = self.transform(obj)
        new_rv = _rv(obj)
        with self._lock:
            old = self._cache.get(key)
            if old is None or _rv(old) < new_rv:
                self._cache[key] = obj

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"informer-{self.res.plural}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stale_for(self) -> float:
        """Seconds since the connection broke (0 while it is up)."""
        since = self._broken_since
        return 0.0 if since is None else time.monotonic() - since

    def _connected(self, up: bool) -> None:
        if up:
            self._broken_since = None
        elif self._broken_since is None:
            self._broken_since = time.monotonic()
        if self.on_connection is not None:
            self.on_connection(up)

    def _notify(self, kind: str, obj: Obj, old: Obj | None) -> None:
        for h in self.handlers:
            try:
                h(kind, obj, old)
            except Exception:  # a handler's bug must not stop the watch
                log.exception("informer handler failed", extra={"resource": self.res.plural})

    def _relist(self) -> str:
        items, rv = self.client.list(self.res, self.namespace, label_selector=self.label_selector,
                                     field_selector=self.field_selector)
        fresh = {key_of(o): self.transform(o) for o in items}
        with self._lock:
            old, self._cache = self._cache, fresh
        self._connected(True)
        log.info("listed", extra={"resource": self.res.plural, "objects": len(fresh)})
        for k, o in old.items():
            if k not in fresh:
                self._notify("DELETED", o, None)
        for k, o in fresh.items():
            self._notify("ADDED" if k not in old else "MODIFIED", o, old.get(k))
        self.synced.set()
        return rv

    def _apply(self, event: Obj) -> str | None:
        kind, raw = event.get("type"), event.get("object") or {}
        rv = (raw.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return str(rv) if rv else None
        key = key_of(raw)
        obj = self.transform(raw)
        with self._lock:
            old = self._cache.get(key)
            if kind == "DELETED":
                self._cache.pop(key, None)
            elif old is None or _rv(old) <= _rv(obj):  # never behind an observed write
                self._cache[key] = obj
        self._notify(str(kind), obj, old)
        return str(rv) if rv else None

    def _run(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                rv = self._relist()
                delay = 0.2
                while not self._stop.is_set():
                    for event in self.client.watch(self.res, rv, self.namespace,
                                                   label_selector=self.label_selector,
                                                   field_selector=self.field_selector,
                                                   timeout_seconds=self.watch_timeout):
                        rv = self._apply(event) or rv
                        if self._stop.is_set():
                            return
            except kube.Gone:
                log.info("watch expired; listing again", extra={"resource": self.res.plural})
                continue
            except Exception as e:
                self._connected(False)
                self.last_error = str(e)[:300]
                log.warning("watch failed; listing again",
                            extra={"resource": self.res.plural, "error": str(e)[:300],
                                   "retryIn": delay})
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)
