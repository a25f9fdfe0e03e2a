"""The error hierarchy of the modelpack core.

Every error carries its retry decision: ``retryable`` errors (a registry
that is down, a dropped connection) may succeed on the next attempt;
terminal ones (a corrupt file, a hostile path) never will. Callers map
these to gRPC codes or ``status.conditions`` in exactly one place each.
"""

from __future__ import annotations


class ModelPackError(Exception):
    """Base of every modelpack error; ``reason`` is a short CamelCase tag."""

    retryable: bool = False
    reason: str = "Error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class FormatError(ModelPackError):
    """A model file is malformed, unsupported or hostile; terminal."""

    reason = "InvalidModel"


class UnsafePathError(FormatError):
    """A path escapes its root, is absolute, or names a link or device."""

    reason = "UnsafePath"


class PickleRefusedError(FormatError):
    """Pickle weights execute code on load; refused unless allowed."""

    reason = "PickleRefused"


class IntegrityError(ModelPackError):
    """Bytes do not match their digest or declared size; terminal for that blob."""

    reason = "DigestMismatch"


class RegistryError(ModelPackError):
    """The registry refused or failed a request."""

    reason = "RegistryError"

    def __init__(
        self, message: str, *, retryable: bool = False, status: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.retryable = retryable
        self.status = status


class NotFoundError(RegistryError):
    """A manifest, tag or blob is not in the registry."""

    reason = "NotFound"


class AuthError(RegistryError):
    """The registry denied access (401/403)."""

    reason = "Unauthorized"


class StoreError(ModelPackError):
    """The local content store cannot complete an operation (disk full, I/O)."""

    reason = "StoreError"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class BlobBusyError(StoreError):
    """Another writer holds a blob's ``.part`` and made no progress for too long; retryable."""

    reason = "BlobBusy"

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=True)
