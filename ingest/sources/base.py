"""The one interface every model source implements, and its errors.

Pipeline position: the publish worker asks a source to ``resolve()`` (pin
the revision, list the files with sizes and digests when the source knows
them), then ``open()``s each file at an offset to stream it into the
staging store. The manager's upstream check asks a source that can move
(``Tracked``) for its ``latest()`` revision: the string ``resolve()`` would
pin, from one metadata call.

Errors: every source maps its transport's failures here, with the retry
decision made once, so no ``requests``/``botocore``/``huggingface_hub``
exception leaks past it. There is one hierarchy for the whole publishing
boundary, modelpack's: a ``SourceError`` is a ``ModelPackError`` (``reason``
and ``retryable``), and a source failure that is the same thing as a core
one *is* that core class too: a missing repository is a ``NotFoundError``,
a refused token an ``AuthError``, bytes unlike their stated digest an
``IntegrityError``, a hostile name a ``FormatError``. So ``except
NotFoundError`` holds for a registry and a source alike, and the worker
maps one root to its result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from modelpack.errors import AuthError, FormatError, IntegrityError, ModelPackError, NotFoundError


class SourceError(ModelPackError):
    """Base of every source error; the source states ``retryable`` per error, as a
    registry error does (``status``: the HTTP status, when there was one)."""

    reason = "SourceError"

    def __init__(self, message: str, *, reason: str | None = None,
                 retryable: bool | None = None, status: int | None = None) -> None:
        # ModelPackError's, not the next in line: RegistryError's (for the classes below
        # that are registry errors too) would reset a class's ``retryable``
        ModelPackError.__init__(self, message, reason=reason)
        if retryable is not None:
            self.retryable = retryable
        self.status = status


class SourceUnavailable(SourceError):
    """The source is down, slow, or dropped the connection; retry later."""

    retryable = True
    reason = "SourceUnavailable"


class SourceNotFound(SourceError, NotFoundError):
    """The repository, revision, object or file does not exist."""

    reason = "NotFound"


class SourceAuthError(SourceError, AuthError):
    """Credentials are missing, wrong, or do not grant access (gated repos too)."""

    reason = "Unauthorized"


class SourceIntegrityError(SourceError, IntegrityError):
    """Bytes do not match what the source promised (digest or size)."""

    reason = "ChecksumMismatch"


class UnsafeSourceError(SourceError, FormatError):
    """The source names a hostile path, a link, or exceeds a safety bound."""

    reason = "UnsafeSource"


class InvalidSourceError(SourceError):
    """The source description itself is wrong (a bad URI, a bad option)."""

    reason = "InvalidSource"


@dataclass(frozen=True)
class SourceFile:
    """One file of a model as the source lists it."""

    path: str  # safe relative POSIX path (checked by the source)
    size: int | None  # None when the source cannot tell before reading
    sha256: str | None = None  # "sha256:<hex>" when the source states it
    # a weaker digest the source states (("md5", hex) from an S3 ETag,
    # ("git-sha1", hex) from a git blob id), checked in the same pass
    check: tuple[str, str] | None = None
    archive: bool = False  # a tar/zip to expand into model files after staging
    # how to re-validate a resumed .part across restarts (an ETag); part of its key
    version: str = ""


@dataclass(frozen=True)
class Resolved:
    """A source pinned to one revision: what will be published."""

    revision: str  # commit sha, manifest digest, ETag or listing digest
    files: tuple[SourceFile, ...]
    metadata: dict[str, Any] = field(default_factory=dict)  # source-specific facts

    @property
    def size(self) -> int:
        return sum(f.size or 0 for f in self.files)


class Stream(Protocol):
    """A file's bytes from some offset; ``offset`` is where it really starts."""

    offset: int

    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Source(Protocol):
    """A model source; implementations are thread-safe for concurrent ``open``."""

    uri: str

    def resolve(self) -> Resolved: ...

    def open(self, file: SourceFile, offset: int = 0) -> Stream: ...

    def close(self) -> None: ...


@runtime_checkable
class Ranged(Protocol):
    """A source that serves a byte range of a file: the staging then fetches a large
    file with a stated sha256 in several ranges at once (``ingest.publish.ranges``).

    ``open_range`` answers a stream of exactly the bytes ``[start, end)``, or
    None where the server answered the Range with other bytes (it ignores Range)."""

    def open_range(self, file: SourceFile, start: int, end: int) -> Stream | None: ...


@dataclass(frozen=True)
class Latest:
    """Where a source's upstream points now: the revision ``resolve()`` would pin, or
    None and why it cannot tell (a pinned commit never moves; a server that sends no
    validator cannot say)."""

    revision: str | None
    note: str = ""


@runtime_checkable
class Tracked(Protocol):
    """A source whose upstream can move (a branch, a tag, a URL, a prefix, a listing).

    ``latest`` downloads nothing: one metadata call, each under ``timeout``
    seconds (None: the source's own timeouts)."""

    uri: str

    def latest(self, timeout: float | None = None) -> Latest: ...

    def close(self) -> None: ...
