"""Path safety for everything that names a file inside a model.

A model path comes from untrusted places: a Hugging Face listing, an
archive entry, an OCI annotation. It must be relative, normalized, free of
``..`` and of control characters, and it must not pass through a link or
name a device. ``safe_relpath`` checks the name; ``walk_model_dir`` checks
a real directory on disk.
"""

from __future__ import annotations

import os
import posixpath
import stat
from dataclasses import dataclass

from modelpack.errors import FormatError, UnsafePathError

MAX_PATH_LEN = 1024
MAX_FILES = 100_000


def safe_relpath(name: str) -> str:
    """Return ``name`` as a normalized relative POSIX path, or raise UnsafePathError."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError("empty file path")
    if len(name) > MAX_PATH_LEN:
        raise UnsafePathError(f"file path longer than {MAX_PATH_LEN} characters")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):  # C0, DEL and C1
        raise UnsafePathError(f"control character in file path {name[:80]!r}")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):  # os.fsdecode of non-UTF-8 bytes
        raise UnsafePathError(f"file path {name[:80]!r} is not valid UTF-8")
    if "\\" in name:
        raise UnsafePathError(f"backslash in file path {name[:80]!r}")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"absolute file path {name[:80]!r}")
    parts = name.split("/")
    if any(p == ".." for p in parts):
        raise UnsafePathError(f"file path {name[:80]!r} climbs out with '..'")
    norm = posixpath.normpath(name)
    if norm in (".", "") or norm.startswith("../"):
        raise UnsafePathError(f"file path {name[:80]!r} does not name a file")
    return norm


def join_under(root: str, relpath: str) -> str:
    """Join a checked relative path under ``root``; the result stays inside it."""
    rel = safe_relpath(relpath)
    full = os.path.join(root, *rel.split("/"))
    if os.path.commonpath([os.path.abspath(root), os.path.abspath(full)]) != os.path.abspath(root):
        raise UnsafePathError(f"file path {relpath[:80]!r} escapes its root")
    return full


@dataclass(frozen=True)
class LocalFile:
    """A regular file found inside a model directory."""

    path: str  # relative POSIX path
    abspath: str
    size: int


def walk_model_dir(root: str) -> list[LocalFile]:
    """List the regular files under ``root``, sorted by path.

    Symlinks are followed only when they stay inside ``root`` and point at a
    regular file (Hugging Face caches are built of such links); any link out
    of the tree, any device, FIFO or socket is refused.
    """
    if not os.path.isdir(root):
        raise FormatError(f"{root} is not a directory", reason="NotADirectory")
    real_root = os.path.realpath(root)
    out: list[LocalFile] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                raise UnsafePathError(f"directory symlink {os.path.relpath(full, root)!r} refused")
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            safe_relpath(rel)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                target = os.path.realpath(full)
                if os.path.commonpath([real_root, target]) != real_root:
                    raise UnsafePathError(f"symlink {rel!r} points outside the model directory")
                try:
                    st = os.stat(full)
                except OSError as e:  # dangling link or a loop of links
                    raise UnsafePathError(f"symlink {rel!r} does not resolve to a file") from e
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePathError(f"{rel!r} is not a regular file")
            out.append(LocalFile(rel, full, st.st_size))
            if len(out) > MAX_FILES:
                raise FormatError(f"more than {MAX_FILES} files", reason="TooManyFiles")
    out.sort(key=lambda f: f.path)
    return out
