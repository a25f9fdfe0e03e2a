"""A worker thread that runs a round soon after something changed: the node plugin's
background loops (``csi.nodelabels``, ``csi.prefetch``).

Where it sits: the node plugin's counterpart of the controller's work queue,
for loops with one job each and no per-object keys: the cache or a watch
``poke``s, a burst of pokes becomes one round, and a round also runs on a
period (repairs, retries) and once at start.
"""

from __future__ import annotations

import logging
import threading
from typing import Self

from kube.client import brief

log = logging.getLogger(__name__)


class Debounced:
    """A daemon thread running ``round()`` soon after ``poke()``.

    A burst of pokes within ``debounce`` seconds is one round; a round also
    runs every ``period`` seconds (repairs, retries) and once at start; a
    failed round is retried after a backoff (1 s doubling to 60 s).
    """

    name = "debounced"

    def __init__(self, debounce: float, period: float) -> None:
        self.debounce = debounce
        self.period = period
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def poke(self) -> None:
        """Something changed: run a round soon (never blocks)."""
        self._wake.set()

    def start(self) -> Self:
        self._wake.set()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def round(self) -> None:
        raise NotImplementedError

    def failed(self, error: Exception, retry_in: float) -> None:
        log.warning("round failed", extra={"worker": self.name, "error": brief(error),
                                           "retryIn": retry_in})

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            self._wake.wait(self.period)
            if self._stop.wait(self.debounce):  # let the burst finish
                return
            self._wake.clear()
            try:
                self.round()
                backoff = 1.0
            except Exception as e:  # the API may be down or slow: try again later
                self.failed(e, backoff)
                self._wake.set()
                if self._stop.wait(backoff):
                    return
                backoff = min(backoff * 2, 60.0)
