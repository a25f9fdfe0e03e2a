"""The reconcile contract: what a pass asks of the queue, and the errors that carry
their retry decision (controller-runtime's ``Result`` and error, side by side).

A pass that finishes returns a ``Result``: nothing owed, a re-check after
``requeue_after`` seconds, or (``follow_up``) another pass in the normal lane.

``TemporaryError`` means "requeue" (after ``delay`` seconds, else with the
queue's per-key backoff); ``PermanentError`` means "do not requeue": the
reconciler writes ``Failed`` with its ``reason`` (``Reconciler.reconcile``,
the one place a reconcile error becomes status) and only a change of the
object (or of a Secret it uses) brings it back. Anything else raised by a
reconcile is treated as temporary with backoff and logged as unexpected.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Result:
    """What a reconcile asks of the queue: nothing, a re-check after ``requeue_after``,
    or (``follow_up``) another pass in the normal lane, for work deferred behind
    other models' urgent Job creations."""

    requeue_after: float | None = None
    follow_up: bool = False


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
    """Do not retry until the object changes.

    ``condition`` is the status condition the failure sets False (with
    ``reason``; Ready goes False beside it): ``SourceResolved`` for a spec
    whose source cannot be published, ``Published`` for an artifact that
    cannot be used.
    """

    def __init__(self, message: str, *, reason: str = "ReconcileError",
                 condition: str = "SourceResolved") -> None:
        super().__init__(message, reason=reason)
        self.condition = condition
