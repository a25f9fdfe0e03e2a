"""The Secrets the reconciler reads, without a cluster-wide list or watch of Secrets.

The manager holds no list/watch of Secrets outside its own namespace
(``controller-rbac.yaml``): it reads only Secrets it is pointed at.

* Its own namespace (ClusterModels' and catalog sources' Secrets, opted in
  by label, ``controller.secretrefs``; a Model living there): a watch of that
  namespace only (an ``Informer`` the caller owns), so a change there
  re-publishes at once.
* Any other namespace (a namespaced Model's ``authSecretRef``, always in the
  Model's own namespace): one ``get`` of that Secret at reconcile time, kept
  ``ttl`` seconds. Change detection is a periodic re-check (``recheck``,
  every ``--secret-recheck-interval``, 60 s by default): each Secret some
  Model names is read again and compared, as its per-key hashes, with what
  the last read saw; the Models whose Secret changed (appeared, went away,
  a value changed) are handed back to be queued.

What is kept is ``secret_transform``'s form: the identity and a hash per key,
never a value.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from api import names
from kube import client as kube

Key = tuple[str, str]  # (namespace, name)


class SecretSource(Protocol):
    """What the reconciler asks: a Secret as ``secret_transform`` keeps it, or None."""

    def get(self, key: Key) -> dict[str, Any] | None: ...


def secret_transform(obj: dict[str, Any]) -> dict[str, Any]:
    """Cache a Secret as its identity and a hash per key: values never stay in memory.

    Of its labels only the two that say whether a ClusterModel may use it
    (``controller.secretrefs``) are kept."""
    meta = obj.get("metadata") or {}
    labels = {k: v for k, v in (meta.get("labels") or {}).items()
              if k in (names.LABEL_SECRET_USABLE, names.LABEL_MANAGED)}
    return {"metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "resourceVersion": meta.get("resourceVersion"), "labels": labels},
            "hashes": {k: hashlib.sha256(str(v).encode()).hexdigest()[:16]
                       for k, v in (obj.get("data") or {}).items()}}


class SecretReader:
    """``get`` for the reconciler: ``own`` (a watch of ``namespace``) or a per-request get."""

    def __init__(self, client: kube.Kube, namespace: str, own: SecretSource, *,
                 ttl: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.namespace = namespace
        self.own = own
        self.ttl = ttl
        self.clock = clock
        self._lock = threading.Lock()
        self._read: dict[Key, tuple[float, dict[str, Any] | None]] = {}

    def get(self, key: Key) -> dict[str, Any] | None:
        if key[0] == self.namespace:
            return self.own.get(key)
        with self._lock:
            seen = self._read.get(key)
        if seen is not None and self.clock() - seen[0] < self.ttl:
            return seen[1]
        return self._fetch(key)

    def _fetch(self, key: Key) -> dict[str, Any] | None:
        ns, name = key
        try:
            obj: dict[str, Any] | None = secret_transform(
                self.client.get(kube.SECRETS, name, ns, timeout=(5.0, 15.0)))
        except kube.NotFound:
            obj = None
        with self._lock:
            self._read[key] = (self.clock(), obj)
        return obj

    def recheck(self, keys: Iterable[Key]) -> list[Key]:
        """Read each Secret of ``keys`` outside the own namespace again; those that
        changed since the last read (a Secret never read yet is not "changed":
        its first reconcile reads it). Secrets no longer named are forgotten."""
        wanted = {k for k in keys if k[0] != self.namespace}
        with self._lock:
            for gone in set(self._read) - wanted:
                del self._read[gone]
            before = {k: self._read[k][1] for k in wanted if k in self._read}
        changed = []
        for key, old in before.items():
            try:
                new = self._fetch(key)
            except kube.ApiError:
                continue  # the next round tries again; a reconcile's own get reports it
            if _fingerprint(old) != _fingerprint(new):
                changed.append(key)
        return changed


def _fingerprint(obj: dict[str, Any] | None) -> Any:
    return None if obj is None else sorted((obj.get("hashes") or {}).items())


__all__ = ["Key", "SecretReader", "SecretSource", "secret_transform"]
