"""The manager's HTTP side: health, readiness, metrics, and publish progress reports.

``POST /report/<job>`` takes a publish worker's progress event (JSON, the
worker's ``Tracker`` format) with ``Authorization: Bearer <token>``, where the
token is an HMAC of the Job's name under the manager's report key, so a Job
can report for its own model and nothing else. Progress goes into
``status.progress`` at most once per ``interval`` seconds per model (the
latest event wins), and only while the model is Publishing, so a late report
never overwrites a finished status. Every replica serves reports, leader
or not: a status merge-patch of ``progress`` needs no leadership.

Shortcut, stated: plain HTTP; behind the Service in a cluster this wants
TLS (the chart's job) or a projected service-account token with TokenReview.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from api import conditions, names
from api.model import ModelView
from controller.metrics import Metrics
from kube import client as kube
from kube.httpreply import reply
from kube.informer import Informer

log = logging.getLogger(__name__)
MAX_BODY = 64 << 10


class Progress:
    """Rate-limited writer of ``status.progress``."""

    def __init__(self, client: kube.Kube, models: Informer, cluster_models: Informer,
                 metrics: Metrics, interval: float = 1.0) -> None:
        self.client = client
        self.informers = {"Model": models, "ClusterModel": cluster_models}
        self.metrics = metrics
        self.interval = interval
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._last: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def offer(self, kind: str, namespace: str, name: str, event: dict[str, Any]) -> None:
        with self._lock:
            self._pending[(kind, namespace, name)] = event
        self.flush()

    def flush(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            for key, event in list(self._pending.items()):
                if now - self._last.get(key, 0.0) >= self.interval:
                    due.append((key, event))
                    del self._pending[key]
                    self._last[key] = now
        for key, event in due:
            self._write(key, event)

    def _write(self, key: tuple[str, str, str], event: dict[str, Any]) -> None:
        kind, namespace, name = key
        informer = self.informers[kind]
        obj = informer.get((namespace, name))
        if obj is None or ModelView.of(obj).phase != conditions.PUBLISHING:
            return
        res = kube.MODELS if kind == "Model" else kube.CLUSTER_MODELS
        try:
            self.client.patch(res, name, {"status": {
                "progress": conditions.progress_from_event(event)}},
                namespace or None, sub="status")
            self.metrics.status_patches.labels("progress").inc()
        except kube.ApiError as e:
            log.info("progress not written", extra={"model": f"{namespace}/{name}",
                                                    "error": str(e)[:200]})

    def _run(self) -> None:
        while not self._stop.wait(self.interval / 4):
            self.flush()
            with self._lock:
                cutoff = time.monotonic() - 600
                for k in [k for k, t in self._last.items() if t < cutoff]:
                    del self._last[k]


IDLE_TIMEOUT = 30.0  # seconds a connection may stay silent


def create_server(address: tuple[str, int], *, metrics: Metrics, healthy: Callable[[], bool],
                  ready: Callable[[], bool], job_lookup: Callable[[str], dict[str, Any] | None],
                  progress: Progress | None, report_key: bytes,
                  lender: Callable[[BaseHTTPRequestHandler], None] | None = None
                  ) -> ThreadingHTTPServer:
    """``lender``: ``GET /credentials/<job>`` (``credentials.Lender.serve``) over this plain
    listener; only a manager without the HTTPS token realm (the demo, tests) passes one."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    class Handler(BaseHTTPRequestHandler):
        timeout = IDLE_TIMEOUT  # a client that sends nothing loses its connection and thread

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
            reply(self, code, body, ctype)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                ok = healthy()
                self._send(200 if ok else 500, b"ok" if ok else b"unhealthy")
            elif self.path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ok" if ok else b"not ready")
            elif self.path == "/metrics":
                self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif lender is not None and self.path.startswith("/credentials/"):
                lender(self)
            else:
                self._send(404, b"not found")

        def do_POST(self) -> None:
            if not self.path.startswith("/report/") or progress is None:
                self._send(404, b"not found")
                return
            name = self.path[len("/report/"):]
            token = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            want = hmac.new(report_key, name.encode(), "sha256").hexdigest()
            if not hmac.compare_digest(token, want):
                metrics.progress_reports.labels("denied").inc()
                self._send(403, b"forbidden")
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length <= 0 or length > MAX_BODY:
                self._send(400, b"bad length")
                return
            try:
                event = json.loads(self.rfile.read(length))
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._send(400, b"bad json")
                return
            job = job_lookup(name)
            if job is None:
                metrics.progress_reports.labels("unknown").inc()
                self._send(404, b"unknown job")
                return
            lab = (job.get("metadata") or {}).get("labels") or {}
            progress.offer(lab.get(names.LABEL_KIND, "Model"), lab.get(names.LABEL_NAMESPACE, ""),
                           lab.get(names.LABEL_NAME, ""), event)
            metrics.progress_reports.labels("accepted").inc()
            self._send(204)

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server
