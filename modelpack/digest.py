"""Digests: parsing, validation and hashing in large chunks.

The digest is the identity of every blob and of the model itself. Hashing
happens in one thread per file with >= 1 MiB reads; hashlib releases the
GIL on large buffers, so files hash in parallel across threads.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Protocol

from modelpack.errors import FormatError


class Readable(Protocol):
    """Anything with ``readinto``: a raw file, a socket file, an HTTP body."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


CHUNK = 4 << 20
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def validate(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise."""
    if not _DIGEST_RE.match(digest):
        raise FormatError(f"not a sha256 digest: {digest[:80]!r}", reason="InvalidDigest")
    return digest


def hex_of(digest: str) -> str:
    """The hex part of a validated ``sha256:<hex>`` digest."""
    return validate(digest).split(":", 1)[1]


def of_bytes(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hash_stream(stream: Readable, hasher: hashlib._Hash | None = None) -> tuple[str, int]:
    """Hash a stream to its end; return (digest, size)."""
    h = hasher or hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = stream.readinto(view)
        if not n:
            break
        h.update(view[:n])
        size += n
    return "sha256:" + h.hexdigest(), size


def of_file(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(digest, size) of a file's content."""
    with open(path, "rb", buffering=0) as f:
        return hash_stream(f)
