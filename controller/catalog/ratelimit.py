"""Per-client token buckets for the catalog API.

Checked before authentication, keyed by the client's address: a flood of
requests with bad tokens must not turn into a flood of TokenReviews against
the API server. The table of buckets is bounded (least recently used
clients are forgotten first), so spoofed-looking churn cannot grow memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class RateLimiter:
    """``rate`` requests per second per key, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, max_keys: int = 4096) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1 (got {rate}, {burst})")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, t)
        self._lock = threading.Lock()

    def allow(self, key: str, now: float | None = None) -> float:
        """0.0 if a request may go now (and take a token), else seconds until one may."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return wait
