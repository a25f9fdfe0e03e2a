"""A large source file staged as several byte ranges at once, written in place.

Pipeline position: inside ``stage.stage_file``, for a file of a
``base.Ranged`` source (the Hugging Face source) whose sha256 and size the
source states, of at least ``RangePolicy.min_size`` bytes. Why: the Hub's
CDN, like an object store, caps each connection, so one 40 GB file on one
stream is the whole download.

The machinery is the registry client's, not a copy (``modelpack.oci.ranged``):
the ``.part`` in the store's ``ingest/`` is preallocated, each range's
thread writes its bytes at their offsets, one thread hashes the file in
order as the written prefix grows, how far each range got is recorded in
the ``.part``'s extended attribute for a resume, and ``BlobStore.commit``
checks the sha256 as for one stream: the digest stays the gate. This
module only says how a source file's range is opened and what its errors
are. A file with a weaker digest to check in order (a git blob id), or of
unknown size, goes in one stream.
"""

from __future__ import annotations

from collections.abc import Callable

from ingest.sources import base
from modelpack.errors import ModelPackError
from modelpack.oci import ranged
from modelpack.store.blobs import PartialBlob


def applies(source: base.Source, f: base.SourceFile, policy: ranged.RangePolicy | None) -> bool:
    """Whether ``f`` may come in ranges: a ranged source, a stated sha256 and size, no weaker
    digest that must see the bytes in order, and large enough for ``policy``."""
    return (policy is not None and isinstance(source, base.Ranged) and f.sha256 is not None
            and f.size is not None and f.check is None and policy.applies(f.size))


class _File:
    """One source file as a ``ranged.Remote``."""

    def __init__(self, source: base.Ranged, f: base.SourceFile, retries: int) -> None:
        self.source = source
        self.file = f
        self.retries = retries

    def open_range(self, start: int, end: int) -> ranged.Body | None:
        return self.source.open_range(self.file, start, end)

    def cut(self, message: str) -> ModelPackError:
        return base.SourceUnavailable(message)


def fill(source: base.Source, f: base.SourceFile, part: PartialBlob,
         policy: ranged.RangePolicy, progress: Callable[[int], None], retries: int) -> bool:
    """Fill ``part`` with ``f`` over ``policy.streams`` ranges; True when it is all there and
    hashed (the caller commits), False where the source ignores Range (one stream then)."""
    assert isinstance(source, base.Ranged) and f.size is not None
    try:
        return ranged.fill(_File(source, f, retries), f.path, f.size, part, policy, progress)
    except base.SourceError as e:
        if e.reason != "RangeNotSatisfiable":
            raise
        part.discard()  # a range past the file's real end: the listing lied about its size
        raise base.SourceIntegrityError(f"{f.path}: the source declared {f.size} bytes but "
                                        "has fewer", reason="SizeMismatch") from e
