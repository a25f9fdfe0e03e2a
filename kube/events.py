"""core/v1 Events about Models, written off the reconcile path.

``record`` only queues; one thread writes. An Event's name is derived from
(object uid, reason, message), so a repeat bumps ``count`` and
``lastTimestamp`` of the same Event instead of adding one (the aggregation
kubectl shows as "x3"). Under pressure the queue drops the oldest: events
are diagnostics, never state.

Writes are paced by a token bucket (``qps``, ``burst``), like client-go's
event spam filter: a burst of new Models queues one ``PublishStarted`` each,
and written at once they would take API server capacity from the Job
creations that are the point. A handful of events goes out at once; a
thousand trickle out after.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import threading
import time
from typing import Any

from api.conditions import now
from kube import client as kube

log = logging.getLogger(__name__)


class Recorder:
    def __init__(self, client: kube.Kube, component: str = "modelcache-controller",
                 max_pending: int = 2000, qps: float = 10.0, burst: int = 50) -> None:
        self.client = client
        self.component = component
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._refilled = time.monotonic()
        self._q: collections.deque[dict[str, Any]] = collections.deque(maxlen=max_pending)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="events")

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush_timeout: float = 2.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(flush_timeout)

    def record(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        with self._cond:
            self._q.append({"obj": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"),
                                    "name": meta.get("name"), "namespace": meta.get("namespace"),
                                    "uid": meta.get("uid"),
                                    "resourceVersion": meta.get("resourceVersion")},
                            "type": type_, "reason": reason, "message": message[:1000]})
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._q and not self._stop:
                    self._cond.wait()
                if not self._q:
                    return
                item = self._q.popleft()
            self._take_token()
            try:
                self._write(item)
            except kube.ApiError as e:
                log.info("event not written", extra={"reason": item["reason"],
                                                     "error": str(e)[:200]})

    def _take_token(self) -> None:
        """Wait for a write token (not while stopping: the last events flush at once)."""
        while True:
            now_ = time.monotonic()
            self._tokens = min(float(self.burst),
                               self._tokens + (now_ - self._refilled) * self.qps)
            self._refilled = now_
            if self._tokens >= 1.0 or self._stop:
                self._tokens -= 1.0
                return
            with self._cond:
                self._cond.wait((1.0 - self._tokens) / self.qps)

    def _write(self, item: dict[str, Any]) -> None:
        o = item["obj"]
        ns = o["namespace"] or "default"  # cluster-scoped objects' events live in default
        h = hashlib.sha256(f"{o['uid']}\0{item['reason']}\0{item['message']}".encode())
        name = f"{o['name']}.{h.hexdigest()[:16]}"
        ts = now()
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"name": name, "namespace": ns},
                "involvedObject": {k: o[k] for k in ("apiVersion", "kind", "name", "namespace",
                                                      "uid", "resourceVersion") if o.get(k)},
                "reason": item["reason"], "message": item["message"], "type": item["type"],
                "source": {"component": self.component}, "reportingComponent": self.component,
                "firstTimestamp": ts, "lastTimestamp": ts, "count": 1}
        try:
            self.client.create(kube.EVENTS, body, ns)
        except kube.Conflict:
            current = self.client.get(kube.EVENTS, name, ns)
            self.client.patch(kube.EVENTS, name, {
                "count": int(current.get("count") or 1) + 1, "lastTimestamp": ts}, ns)
