"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go does it.

A candidate takes the Lease when it is free or its holder has not renewed
within ``leaseDurationSeconds``; the leader renews every ``renew`` seconds
with the Lease's resourceVersion as a precondition, so two candidates can
never both win a round. A leader that fails to renew before its lease
would expire calls ``on_lost`` (the manager exits: a fresh process starts
from the informers' view, as controller-runtime does). ``release`` empties
the holder on a clean shutdown so the next leader need not wait.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kube import client as kube

log = logging.getLogger(__name__)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str | None) -> float:
    if not ts:
        return 0.0
    ts = ts.replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(ts).timestamp()


class LeaderElector:
    def __init__(self, client: kube.Kube, namespace: str, name: str, identity: str, *,
                 lease_duration: float = 15.0, renew: float = 5.0,
                 on_lost: Callable[[], None] | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew = renew
        self.on_lost = on_lost or (lambda: None)
        self.is_leader = threading.Event()
        self._stop = threading.Event()
        self._last_renew = 0.0

    def _spec(self, acquire: bool, transitions: int) -> dict[str, Any]:
        spec: dict[str, Any] = {"holderIdentity": self.identity,
                                "leaseDurationSeconds": max(1, int(self.lease_duration)),
                                "renewTime": _now(), "leaseTransitions": transitions}
        if acquire:
            spec["acquireTime"] = _now()
        return spec

    def try_acquire_or_renew(self) -> bool:
        try:
            lease = self.client.get(kube.LEASES, self.name, self.namespace)
        except kube.NotFound:
            try:
                self.client.create(kube.LEASES, {
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._spec(True, 0)}, self.namespace)
                return True
            except kube.Conflict:
                return False
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        transitions = int(spec.get("leaseTransitions") or 0)
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        expired = time.time() > _parse(spec.get("renewTime")) + duration
        if holder and holder != self.identity and not expired:
            return False
        ours = holder == self.identity
        new = dict(spec)
        new.update(self._spec(not ours, transitions if ours else transitions + 1))
        if ours:
            new["acquireTime"] = spec.get("acquireTime") or _now()
        lease["spec"] = new
        try:
            self.client.replace(kube.LEASES, self.name, lease, self.namespace)
        except kube.Conflict:
            return False
        return True

    def run(self) -> None:
        """Campaign until stopped; sets ``is_leader`` while leading."""
        while not self._stop.is_set():
            try:
                ok = self.try_acquire_or_renew()
            except kube.ApiError as e:
                log.warning("lease update failed", extra={"error": str(e)[:200]})
                ok = False
            now = time.monotonic()
            if ok:
                self._last_renew = now
                if not self.is_leader.is_set():
                    log.info("became leader", extra={"identity": self.identity,
                                                     "lease": f"{self.namespace}/{self.name}"})
                    self.is_leader.set()
            elif self.is_leader.is_set() and now - self._last_renew > self.lease_duration * 0.8:
                log.error("lost the lease", extra={"identity": self.identity})
                self.is_leader.clear()
                self.on_lost()
                return
            self._stop.wait(self.renew if self.is_leader.is_set() else min(self.renew, 1.0))

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, daemon=True, name="leader-election")
        t.start()
        return t

    def release(self) -> None:
        self._stop.set()
        if not self.is_leader.is_set():
            return
        try:
            lease = self.client.get(kube.LEASES, self.name, self.namespace)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                spec["holderIdentity"] = ""
                spec["leaseDurationSeconds"] = 1
                spec["renewTime"] = _now()
                lease["spec"] = spec
                self.client.replace(kube.LEASES, self.name, lease, self.namespace)
        except kube.ApiError as e:
            log.info("lease not released", extra={"error": str(e)[:200]})
        self.is_leader.clear()
