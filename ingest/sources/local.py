"""Local directory source: a model already on disk (a mounted PVC, a CLI path).

The walk is ``modelpack.paths.walk_model_dir``: links out of the tree,
devices and hostile names are refused there. Nothing is known about the
digests up front; the worker hashes as it stages.
"""

from __future__ import annotations

import os
from typing import BinaryIO

from ingest.sources import base
from modelpack.errors import ModelPackError
from modelpack.paths import join_under, walk_model_dir


class _File:
    def __init__(self, f: BinaryIO, offset: int) -> None:
        self.f = f
        self.offset = offset

    def readinto(self, buf: memoryview) -> int:
        return self.f.readinto(buf) or 0  # type: ignore[attr-defined]

    def close(self) -> None:
        self.f.close()


class LocalDirSource:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.uri = self.root

    def resolve(self) -> base.Resolved:
        try:
            files = walk_model_dir(self.root)
        except ModelPackError as e:
            cls = base.UnsafeSourceError if e.reason == "UnsafePath" else base.SourceError
            raise cls(f"{self.root}: {e}", reason=e.reason) from e
        st = os.stat(self.root)
        out = tuple(base.SourceFile(f.path, f.size, None, version=f"{os.stat(f.abspath).st_mtime_ns}")
                    for f in files)
        return base.Resolved(f"dir:{st.st_ino}:{st.st_mtime_ns}", out, {"path": self.root})

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        f = open(join_under(self.root, file.path), "rb", buffering=0)
        f.seek(offset)
        return _File(f, offset)

    def close(self) -> None:
        pass
