"""A work queue with client-go's semantics, for threads.

* A key is queued at most once, however often it is added (dedup).
* A key being processed is never handed to a second worker; added again
  meanwhile, it is queued once more when ``done`` is called, so the change
  that arrived mid-reconcile is not lost.
* ``add_rate_limited`` requeues after a per-key exponential backoff
  (``base * 2**failures``, capped); ``forget`` resets it after a success.
* ``add_after`` schedules an add (``RequeueAfter``); an earlier scheduled
  time for the same key wins.
* Two lanes: ``add(key, urgent=True)`` puts a key in the urgent lane, which
  ``get`` empties first (a queued key added again as urgent is promoted).
  The manager marks new objects urgent, so under a burst a Model's first
  Job is not queued behind status writes for models that already have one.
  The guarantees above hold across lanes: a key is handed out only while it
  is dirty and not being processed, so a promoted key's stale entry in the
  normal lane is skipped.
"""

from __future__ import annotations

import collections
import heapq
import threading
import time
from collections.abc import Callable, Hashable


class ShutDown(Exception):
    """The queue was shut down; the worker should return."""


class WorkQueue:
    def __init__(self, base_delay: float = 0.05, max_delay: float = 300.0,
                 name: str = "queue") -> None:
        self.name = name
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._cond = threading.Condition()  # the queue proper; workers wait on it
        self._timer_cond = threading.Condition()  # delayed adds; only the timer waits on it
        self._urgent_lane: collections.deque[Hashable] = collections.deque()
        self._queue: collections.deque[Hashable] = collections.deque()  # the normal lane
        self._dirty: set[Hashable] = set()
        self._urgent: set[Hashable] = set()  # dirty keys that go to the urgent lane
        self._processing: set[Hashable] = set()
        self._failures: dict[Hashable, int] = {}
        self._waiting: list[tuple[float, int, Hashable]] = []  # heap of (when, seq, key)
        self._waiting_at: dict[Hashable, float] = {}
        self._seq = 0
        self._shutdown = False
        self.adds = 0
        self.retries = 0
        self._timer = threading.Thread(target=self._run_timer, daemon=True,
                                       name=f"{name}-delays")
        self._timer.start()

    # -- adding -----------------------------------------------------------

    def add(self, key: Hashable, urgent: bool = False) -> None:
        with self._cond:
            if self._shutdown:
                return
            if key in self._dirty:
                if urgent and key not in self._urgent:
                    self._urgent.add(key)  # promote; the normal-lane entry goes stale
                    if key not in self._processing:
                        self._urgent_lane.append(key)
                        self._cond.notify()
                return
            self.adds += 1
            self._dirty.add(key)
            if urgent:
                self._urgent.add(key)
            if key not in self._processing:
                (self._urgent_lane if urgent else self._queue).append(key)
                self._cond.notify()

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        when = time.monotonic() + delay
        with self._timer_cond:
            if self._shutdown:
                return
            if self._waiting_at.get(key, float("inf")) <= when:
                return
            self._waiting_at[key] = when
            self._seq += 1
            heapq.heappush(self._waiting, (when, self._seq, key))
            self._timer_cond.notify()

    def add_rate_limited(self, key: Hashable) -> float:
        """Requeue ``key`` after its backoff; returns the delay chosen."""
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
            self.retries += 1
        delay = float(min(self.base_delay * (2 ** n), self.max_delay))
        self.add_after(key, delay)
        return delay

    def forget(self, key: Hashable) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: Hashable) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    # -- taking -----------------------------------------------------------

    def get(self, timeout: float | None = None) -> Hashable:
        """The next key; raises ``ShutDown`` when the queue is shut down, or
        ``TimeoutError`` after ``timeout`` seconds with nothing to do."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                key = self._pop()
                if key is not None:
                    break
                if self._shutdown:
                    raise ShutDown()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError()
                self._cond.wait(remaining)
            self._dirty.discard(key)
            self._urgent.discard(key)
            self._processing.add(key)
            return key

    def _pop(self) -> Hashable | None:
        """The next live entry, urgent lane first; stale entries (a key promoted, or
        already handed out through its other lane) are dropped. Holds ``_cond``."""
        for lane in (self._urgent_lane, self._queue):
            while lane:
                key = lane.popleft()
                if key in self._dirty and key not in self._processing:
                    return key
        return None

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                (self._urgent_lane if key in self._urgent else self._queue).append(key)
                self._cond.notify()

    def __len__(self) -> int:
        """Keys waiting to be handed out (both lanes, stale entries not counted)."""
        with self._cond:
            return len(self._dirty - self._processing)

    def urgent_len(self) -> int:
        with self._cond:
            return len(self._urgent - self._processing)

    def shutdown(self) -> None:
        with self._cond:
            self._shutdown = True
            self._cond.notify_all()
        with self._timer_cond:
            self._timer_cond.notify_all()

    # -- delays -----------------------------------------------------------

    def _run_timer(self) -> None:
        while True:
            with self._timer_cond:
                if self._shutdown:
                    return
                now = time.monotonic()
                due: list[Hashable] = []
                while self._waiting and self._waiting[0][0] <= now:
                    when, _, key = heapq.heappop(self._waiting)
                    if self._waiting_at.get(key) == when:
                        del self._waiting_at[key]
                        due.append(key)
                wait = self._waiting[0][0] - now if self._waiting else None
                if not due:
                    self._timer_cond.wait(wait)
                    continue
            for key in due:
                self.add(key)


class WorkerPool:
    """``n`` threads taking keys from ``queue`` and handing each to ``handle``.

    ``handle`` owns the retry decision (``forget``, ``add_after``,
    ``add_rate_limited``) and must not raise; the pool only guarantees
    ``done`` after every key and a stop that waits for the threads.
    """

    def __init__(self, queue: WorkQueue, handle: Callable[[Hashable], None], *, workers: int,
                 name: str) -> None:
        self.queue = queue
        self.handle = handle
        self.workers = workers
        self.name = name
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.workers):
            t = threading.Thread(target=self._run, daemon=True, name=f"{self.name}-{n}")
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self.queue.shutdown()
        for t in self._threads:
            t.join(timeout)

    def _run(self) -> None:
        while True:
            try:
                key = self.queue.get()
            except ShutDown:
                return
            try:
                self.handle(key)
            finally:
                self.queue.done(key)
