"""Progress of one publish: bytes, rate and ETA, reported to a sink.

The worker counts source bytes as they are staged (the slow, remote part)
and registry bytes as they are pushed. ``bytesDone``/``bytesTotal`` are
source bytes; ``percent`` holds at 99 until the manifest is in the
registry, so status never reads 100 for a model that is not there yet.
Events are rate-limited and go to a sink: JSON lines on a stream now, the
status patcher of the control plane later (any callable taking a dict).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

Sink = Callable[[dict[str, Any]], None]
INTERVAL = 0.5


def json_lines(stream: TextIO) -> Sink:
    lock = threading.Lock()

    def sink(event: dict[str, Any]) -> None:
        with lock:
            stream.write(json.dumps(event, sort_keys=True) + "\n")
            stream.flush()

    return sink


def null_sink(_: dict[str, Any]) -> None:
    pass


def delta_sink(update: Callable[[int], None],
               set_total: Callable[[int], None] | None = None) -> Sink:
    """Adapt events to a byte-delta callback (a tqdm ``update``), e.g. for a CLI bar.

    ``set_total`` is told the total once the source is resolved.
    """
    lock = threading.Lock()
    state = {"done": 0, "total": -1}

    def sink(event: dict[str, Any]) -> None:
        with lock:
            total, done = int(event["bytesTotal"]), int(event["bytesDone"])
            if set_total is not None and total != state["total"] and total:
                state["total"] = total
                set_total(total)
            delta, state["done"] = done - state["done"], done
        if delta:
            update(delta)

    return sink


class Tracker:
    """Thread-safe byte counters; emits an event at most every ``interval`` seconds."""

    def __init__(self, sink: Sink = null_sink, interval: float = INTERVAL) -> None:
        self.sink = sink
        self.interval = interval
        self.lock = threading.Lock()
        self.phase = "resolve"
        self.total = 0
        self.done = 0
        self.pushed = 0
        self.push_total = 0
        self.started = time.monotonic()
        self.last_emit = 0.0
        self.window: list[tuple[float, int]] = []  # (time, done) samples for the rate

    def set_phase(self, phase: str, *, total: int | None = None) -> None:
        with self.lock:
            self.phase = phase
            if total is not None:
                self.total = total
        self.emit(force=True)

    def add(self, n: int) -> None:
        """``n`` more source bytes staged (negative when a transfer restarts from 0)."""
        with self.lock:
            self.done += n
        self.emit()

    def add_pushed(self, n: int) -> None:
        with self.lock:
            self.pushed += n
        self.emit()

    def event(self, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        with self.lock:
            done, total = max(self.done, 0), self.total
            self.window.append((now, done))
            while len(self.window) > 2 and now - self.window[0][0] > 10.0:
                self.window.pop(0)
            t0, d0 = self.window[0]
            rate = (done - d0) / (now - t0) if now - t0 > 0.05 else 0.0
            if rate <= 0 and now - self.started > 0.05:
                rate = done / (now - self.started)
            percent = 100.0 * done / total if total else 0.0
            if self.phase != "done":
                percent = min(percent, 99.0)
            else:
                percent = 100.0
            eta = (total - done) / rate if rate > 0 and total > done else 0.0
            return {
                "phase": self.phase,
                "bytesDone": done,
                "bytesTotal": total,
                "percent": round(percent, 1),
                "bytesPerSecond": int(rate),
                "etaSeconds": int(eta + 0.999) if eta else 0,
                "bytesPushed": self.pushed,
            }

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        with self.lock:
            if not force and now - self.last_emit < self.interval:
                return
            self.last_emit = now
        self.sink(self.event(now))
