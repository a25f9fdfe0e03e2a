"""Structured logging for the node plugin: one JSON object per line.

Fields passed with ``extra={...}`` become top-level keys. Volume contexts
go through ``redact`` before they reach a log record: the service-account
tokens kubelet may pass (``csi.storage.k8s.io/serviceAccount.tokens``) and
anything that looks like a secret are replaced.
"""

from __future__ import annotations

import json
import logging
import sys
import time

REDACTED = "<redacted>"
_SECRET_HINTS = ("token", "secret", "password", "credential")
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(ctx: dict[str, str]) -> dict[str, str]:
    return {k: (REDACTED if any(h in k.lower() for h in _SECRET_HINTS) else v)
            for k, v in ctx.items()}


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
        return json.dumps(out, default=str)


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
