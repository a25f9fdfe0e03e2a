"""Structured logs for every process (node plugin, manager, gateway): one JSON object per line.

Where it sits: the toolkit's one log setup; ``csi.main`` and the
controller's entry points call ``setup`` once, before anything logs.

Fields passed with ``extra={...}`` become top-level keys (JSON values as
they are, anything else as its ``str``). Nothing here guesses which field
is secret: a caller that logs a map it did not build (a CSI volume
context, with the service-account tokens kubelet may pass in
``csi.storage.k8s.io/serviceAccount.tokens``) passes it through ``redact``
first.

Records are formatted and written by a writer thread (``QueueHandler`` and
``QueueListener``): the node plugin's gRPC event loop logs every publish,
and a write to stderr (a pipe the container runtime may be slow to drain,
or a file on a busy disk) must not stall every call, Probe included.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import re
import sys
import threading
import time
from collections.abc import Callable

REDACTED = "<redacted>"
_SECRET = re.compile("token|secret|password|credential", re.IGNORECASE)
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(ctx: dict[str, str]) -> dict[str, str]:
    """``ctx`` with the value of every key that names a secret replaced."""
    return {k: (REDACTED if _SECRET.search(k) else v) for k, v in ctx.items()}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:  # rendered before the record crossed to the writer thread
            out["exc"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


class _Enqueue(logging.handlers.QueueHandler):
    """Hand a record to the writer thread, rendering what cannot wait: the message's
    arguments and a live traceback (the stdlib's ``prepare`` would fold the
    traceback into the message, and the JSON keeps it apart, as ``exc``)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        exc = record.exc_info
        if exc:
            record = copy.copy(record)  # other handlers may still want the live traceback
            record.exc_text = logging.Formatter().formatException(exc)
            record.exc_info = None
        record.msg = record.getMessage()  # the same text for every handler
        record.args = None
        return record


def setup(level: str = "info", fmt: str = "json") -> Callable[[], None]:
    """Route the root logger through the writer thread to stderr, as JSON (or ``text``).

    Returns ``stop``: it writes what is queued and ends the writer thread (at
    most once; it also runs at exit), for a process that ends without the
    interpreter's teardown.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    writer = logging.handlers.QueueListener(records, handler)
    writer.start()
    stopped = threading.Lock()

    def stop() -> None:
        if stopped.acquire(blocking=False):
            writer.stop()

    atexit.register(stop)  # write what is queued before the process ends
    root = logging.getLogger()
    root.handlers[:] = [_Enqueue(records)]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "kubernetes"):  # connection-pool chatter at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Neither format prints the caller, thread or process, so do not collect them
    # per record (the logging HOWTO's "Optimization"): finding the caller walks the
    # stack, and a publish logs on the event loop every call.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return stop
