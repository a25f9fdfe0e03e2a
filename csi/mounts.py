"""Mount state and read-only bind mounts, for NodePublish/NodeUnpublish.

State always comes from ``/proc/self/mountinfo``: ``os.path.ismount``
misses a bind mount from the same filesystem, which is exactly what a
publish makes. A publish is two mount(2) calls (through ctypes: no fork in
a threaded server, ~20 us each): ``MS_BIND``, then
``MS_BIND|MS_REMOUNT|MS_RDONLY|MS_NOSUID|MS_NODEV`` (a bind mount ignores
flags on its first call). Unmount removes every stacked layer at a path.

Which cache tree a mount shows is read from mountinfo's ``root`` field
(the path inside the source filesystem) and the device number, so it
works for mounts made before a restart and for mounts kubelet sees.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

MOUNTINFO = "/proc/self/mountinfo"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class MountError(OSError):
    """A mount(2) or umount2(2) call failed."""


@dataclass(frozen=True)
class Mount:
    mount_id: int
    parent_id: int
    dev: int  # os.makedev(major, minor), comparable with st_dev
    root: str  # the path inside the source filesystem that is mounted here
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    if "\\" not in field:
        return field
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts[6:]:
            continue
        sep = parts.index("-", 6)
        major, minor = parts[2].split(":")
        mounts.append(Mount(
            mount_id=int(parts[0]), parent_id=int(parts[1]),
            dev=os.makedev(int(major), int(minor)), root=_unescape(parts[3]),
            mount_point=_unescape(parts[4]), options=frozenset(parts[5].split(",")),
            fstype=parts[sep + 1], source=_unescape(parts[sep + 2])))
    return mounts


def read_mounts(path: str = MOUNTINFO) -> list[Mount]:
    with open(path) as f:
        return parse_mountinfo(f.read())


def _escape(path: str) -> str:
    # the kernel's escaping of mountinfo path fields (seq_path's " \t\n\\")
    if not any(c in path for c in " \t\n\\"):
        return path
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def mounts_at(path: str, mounts: list[Mount] | None = None) -> list[Mount]:
    """Every mount layer whose mount point is ``path``, bottom first."""
    path = os.path.normpath(path)
    if mounts is None:
        # Parse only the lines that can name ``path``: a node has hundreds of
        # mounts (every pod's tokens and configmaps) and parsing a line costs
        # ~3 us of GIL-holding work; the substring test costs next to nothing.
        needle = f" {_escape(path)} "
        with open(MOUNTINFO) as f:
            mounts = parse_mountinfo("\n".join(
                line for line in f.read().splitlines() if needle in line))
    return [m for m in mounts if m.mount_point == path]


def containing_mount(path: str, mounts: list[Mount]) -> Mount:
    """The mount a (real) path lives on: the last-mounted longest mount-point prefix."""
    path = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point
        if path == mp or path.startswith(mp.rstrip("/") + "/") or mp == "/":
            if best is None or len(mp) >= len(best.mount_point):
                best = m
    if best is None:
        raise MountError(errno.ENOENT, f"no mount contains {path}")
    return best


def fs_path(path: str, mounts: list[Mount]) -> tuple[int, str]:
    """(device, path inside its filesystem) of ``path``: what a bind of it shows as root."""
    real = os.path.realpath(path)
    m = containing_mount(real, mounts)
    rel = os.path.relpath(real, m.mount_point)
    inner = m.root if rel == "." else os.path.join(m.root, rel)
    return m.dev, os.path.normpath(inner)


def shows(m: Mount, dev: int, inner: str) -> bool:
    """Does mount ``m`` show the directory ``inner`` of device ``dev`` (or inside it)?"""
    if m.dev != dev:
        return False
    root = m.root.removesuffix("//deleted")
    return root == inner or root.startswith(inner.rstrip("/") + "/")


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise MountError(e, f"{what} {path}: {os.strerror(e)}")


def bind_read_only(source: str, target: str) -> None:
    """Bind ``source`` at ``target``, then make that mount ro,nosuid,nodev.

    If the remount fails the bind is undone, so a writable view never stays.
    """
    src = os.fsencode(source)
    dst = os.fsencode(target)
    _check(_libc.mount(src, dst, None, MS_BIND, None), "bind", target)
    flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV
    rc = _libc.mount(None, dst, None, flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        _libc.umount2(dst, MNT_DETACH)
        raise MountError(err, f"remount read-only {target}: {os.strerror(err)}")


def unmount(target: str) -> None:
    _check(_libc.umount2(os.fsencode(target), UMOUNT_NOFOLLOW), "unmount", target)


def unmount_all(target: str, limit: int = 64) -> int:
    """Unmount every layer stacked at ``target``; returns how many were removed."""
    n = 0
    while mounts_at(target) and n < limit:
        try:
            unmount(target)
        except MountError as e:
            if e.errno == errno.EINVAL and not mounts_at(target):
                break  # raced with another unmount: nothing left
            raise
        n += 1
    return n
