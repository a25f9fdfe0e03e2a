"""The reconcile contract's error hierarchy: an error carries its retry decision.

``TemporaryError`` means "requeue" (after ``delay`` seconds, else with the
queue's per-key backoff); ``PermanentError`` means "do not requeue": the
reconciler has already written ``Failed`` with ``reason`` and only a change of
the object (or of a Secret it uses) brings it back. Anything else raised by a
reconcile is treated as temporary with backoff and logged as unexpected.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Base: a reconcile step could not finish."""

    def __init__(self, message: str, *, reason: str = "ReconcileError") -> None:
        super().__init__(message)
        self.reason = reason


class TemporaryError(ReconcileError):
    """Retry: after ``delay`` seconds if given, else with the per-key backoff."""

    def __init__(self, message: str, *, reason: str = "Temporary",
                 delay: float | None = None) -> None:
        super().__init__(message, reason=reason)
        self.delay = delay


class PermanentError(ReconcileError):
    """Do not retry until the object changes."""
