"""Placing a model tree from blobs: reflink, else hardlink, else copy.

A reflink (FICLONE) shares extents but gives the tree its own inode, so
it costs ~1 ms for gigabytes and nothing can write through it to the
blob. A hardlink shares the inode (blobs and trees are both read-only, so
that is safe) and costs ~20 us. A copy (``copy_file_range``, which the
kernel may still turn into a clone) is the fallback across filesystems.
The method is probed once per (blob filesystem, tree filesystem) pair.
A tree is assembled in a temp directory and renamed into place, so a
reader sees either no tree or a complete one.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable

from modelpack.errors import StoreError
from modelpack.paths import join_under
from modelpack.store.blobs import fsync_dir, store_error

FICLONE = 0x40049409


class Method(enum.Enum):
    REFLINK = "reflink"
    HARDLINK = "hardlink"
    COPY = "copy"


_probed: dict[tuple[int, int, int, int], Method] = {}


def _fs_key(path: str) -> tuple[int, int]:
    # st_dev alone is reused when a loop device is detached and attached
    # again; the filesystem id changes with the filesystem
    return os.stat(path).st_dev, os.statvfs(path).f_fsid


def reflink(src: str, dst: str) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        fcntl.ioctl(d.fileno(), FICLONE, s.fileno())


def copy(src: str, dst: str) -> None:
    with open(src, "rb") as s, open(dst, "wb") as d:
        left = os.fstat(s.fileno()).st_size
        try:
            while left > 0:
                n = os.copy_file_range(s.fileno(), d.fileno(), min(left, 1 << 30))
                if n == 0:
                    break
                left -= n
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            d.seek(0)
            d.truncate()
            s.seek(0)
            shutil.copyfileobj(s, d, 4 << 20)


def probe(blob_dir: str, tree_parent: str) -> Method:
    """The best method between two directories, tried for real once."""
    key = (*_fs_key(blob_dir), *_fs_key(tree_parent))
    if key in _probed:
        return _probed[key]
    fd, src = tempfile.mkstemp(dir=blob_dir, prefix=".probe-")
    dst = os.path.join(tree_parent, f".probe-{os.getpid()}-{os.path.basename(src)}")
    method = Method.COPY
    try:  # the probe files go whatever happens (a full disk fails the write)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
        try:
            reflink(src, dst)
            method = Method.REFLINK
        except OSError:
            if os.path.exists(dst):
                os.unlink(dst)
            try:
                os.link(src, dst)
                method = Method.HARDLINK
            except OSError:
                pass
    finally:
        for p in (src, dst):
            if os.path.exists(p):
                os.unlink(p)
    _probed[key] = method
    return method


def place_file(method: Method, src: str, dst: str) -> None:
    if method is Method.REFLINK:
        reflink(src, dst)
        os.chmod(dst, 0o444)
    elif method is Method.HARDLINK:
        os.link(src, dst)
    else:
        copy(src, dst)
        os.chmod(dst, 0o444)


def place_tree(files: Iterable[tuple[str, str]], dest: str,
               method: Method | None = None) -> Method:
    """Assemble ``dest`` from (relative path, blob path) pairs; read-only; atomic.

    Returns the method used. ``dest`` must not exist yet.
    """
    parent = os.path.dirname(os.path.abspath(dest))
    pairs = list(files)
    try:
        os.makedirs(parent, exist_ok=True)
        if method is None:
            method = probe(os.path.dirname(pairs[0][1]), parent) if pairs else Method.COPY
        tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(dest) + ".tmp-")
    except OSError as e:
        raise store_error(e, dest) from e
    try:
        dirs = {tmp}
        for rel, blob in pairs:
            target = join_under(tmp, rel)
            d = os.path.dirname(target)
            if d not in dirs:
                os.makedirs(d, exist_ok=True)
                dirs.add(d)
            place_file(method, blob, target)
        for d in sorted(dirs, key=len, reverse=True):
            os.chmod(d, 0o555)
        os.rename(tmp, dest)
        fsync_dir(parent)
    except OSError as e:
        remove_tree(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(f"no space left placing {dest}", retryable=True) from e
        # a blob evicted or scrubbed away under the placement may be fetched again
        raise StoreError(f"cannot place tree {dest}: {e}",
                         retryable=e.errno == errno.ENOENT) from e
    except BaseException:
        remove_tree(tmp)
        raise
    return method


def remove_tree(path: str) -> None:
    """Remove a read-only tree (directories are made writable first)."""
    if not os.path.lexists(path):
        return
    for dirpath, dirnames, _ in os.walk(path):
        os.chmod(dirpath, 0o755)
        for d in dirnames:
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                os.chmod(full, 0o755)
    shutil.rmtree(path, ignore_errors=True)
