"""The publish worker's side of progress reporting: JSON events to the manager.

``sink_from_env`` returns a progress sink when ``MODELCACHE_REPORT_URL`` and
``MODELCACHE_REPORT_TOKEN`` are set, else ``None``; the manager's Jobs give the
token as a file, ``MODELCACHE_REPORT_TOKEN_FILE`` (``jobs/secretfiles.py``).
Posting happens on a background thread that only ever sends the latest
event, at most once a second; a manager that does not answer costs the
worker nothing (progress is best effort; the result travels in the pod's
termination message).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from jobs import secretfiles

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, url: str, token: str, interval: float = 1.0,
                 timeout: float = 3.0) -> None:
        self.url = url
        self.token = token
        self.interval = interval
        self.timeout = timeout
        self._latest: dict[str, Any] | None = None
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="progress-report")
        self._thread.start()

    def __call__(self, event: dict[str, Any]) -> None:
        with self._cond:
            self._latest = dict(event)
            self._cond.notify()

    def _post(self, event: dict[str, Any]) -> None:
        req = urllib.request.Request(self.url, data=json.dumps(event).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                resp.read()
        except Exception as e:  # best effort by design
            log.debug("progress report failed", extra={"error": str(e)[:200]})

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                while self._latest is None and not self._closed:
                    self._cond.wait()
                if self._latest is None:
                    return
                wait = last + self.interval - time.monotonic()
                final = self._closed or self._latest.get("phase") == "done"
                if wait > 0 and not final:
                    self._cond.wait(wait)
                    continue
                event, self._latest = self._latest, None
            self._post(event)
            last = time.monotonic()

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)


def sink_from_env() -> Reporter | None:
    url = os.environ.get("MODELCACHE_REPORT_URL")
    token = (secretfiles.read(os.environ.get("MODELCACHE_REPORT_TOKEN_FILE"))
             or os.environ.get("MODELCACHE_REPORT_TOKEN"))
    if not url or not token:
        return None
    return Reporter(url, token)


def tee(*sinks: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
    def sink(event: dict[str, Any]) -> None:
        for s in sinks:
            s(event)

    return sink
