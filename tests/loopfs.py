"""Real filesystems on loop devices for tests (needs root).

``loop_mount("xfs")`` makes a sparse image, formats it (XFS with
``reflink=1``, btrfs, ext4), attaches it with ``losetup`` and mounts it;
teardown unmounts and detaches even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator

MKFS = {
    "xfs": ["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
    "ext4": ["mkfs.ext4", "-q", "-F"],
}
SIZES = {"xfs": 512 << 20, "btrfs": 256 << 20, "ext4": 128 << 20}


def _run(args: list[str]) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def loop_mount(fstype: str, size: int | None = None) -> Iterator[str]:
    work = tempfile.mkdtemp(prefix=f"modelcache-{fstype}-")
    image = os.path.join(work, "fs.img")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt)
    with open(image, "wb") as f:
        f.truncate(size or SIZES[fstype])
    _run([*MKFS[fstype], image])
    dev = _run(["losetup", "--find", "--show", image])
    try:
        _run(["mount", dev, mnt])
        try:
            yield mnt
        finally:
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", work], check=False)


@contextlib.contextmanager
def tmpfs_mount(size: int = 64 << 20) -> Iterator[str]:
    mnt = tempfile.mkdtemp(prefix="modelcache-tmpfs-")
    _run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt])
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        os.rmdir(mnt)
