"""Errors of the node plugin, each carrying its gRPC status code.

This is the one place where failures become gRPC codes. Kubelet retries
ABORTED, UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED and CANCELLED
as "operation still in progress"; any other code is final for that call
(kubelet removes the target directory and backs off), so a retryable
modelpack error must map to one of the former and a terminal one to a
precise final code.
"""

from __future__ import annotations

import errno

import grpc

from modelpack import errors as mp


class CsiError(Exception):
    """An RPC failure with its code; raised anywhere, answered by the servicer."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def not_found(message: str) -> CsiError:
    return CsiError(grpc.StatusCode.NOT_FOUND, message)


def unavailable(message: str) -> CsiError:
    """Not now: kubelet retries the call."""
    return CsiError(grpc.StatusCode.UNAVAILABLE, message)


def to_csi(e: BaseException) -> CsiError:
    """Map any exception from the cache, the registry or the mounts to a CsiError."""
    if isinstance(e, CsiError):
        return e
    msg = str(e)[:500]
    if isinstance(e, mp.BlobBusyError):  # another writer holds the blob: try again later
        return CsiError(grpc.StatusCode.ABORTED, msg)
    if isinstance(e, mp.StoreError):
        if e.retryable:  # no space left (after eviction): the node may free some later
            return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
        return CsiError(grpc.StatusCode.INTERNAL, msg)
    if isinstance(e, mp.NotFoundError):
        return CsiError(grpc.StatusCode.NOT_FOUND, msg)
    if isinstance(e, mp.AuthError):
        return CsiError(grpc.StatusCode.PERMISSION_DENIED, msg)
    if isinstance(e, mp.RegistryError):
        code = grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.FAILED_PRECONDITION
        return CsiError(code, msg)
    if isinstance(e, mp.IntegrityError):
        # the bad bytes were discarded; a retry downloads them again
        return CsiError(grpc.StatusCode.ABORTED, msg)
    if isinstance(e, mp.FormatError):
        return CsiError(grpc.StatusCode.FAILED_PRECONDITION, msg)
    if isinstance(e, mp.ModelPackError):
        return CsiError(grpc.StatusCode.UNAVAILABLE if e.retryable else grpc.StatusCode.INTERNAL,
                        msg)
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return CsiError(grpc.StatusCode.RESOURCE_EXHAUSTED, msg)
    return CsiError(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {msg}")
