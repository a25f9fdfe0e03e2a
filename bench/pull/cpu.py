"""bench/pull's CPU budget: how many CPU-seconds each unavoidable part of a pull costs.

Wall time on a 2-core machine shared with other work is noisy; CPU-seconds
(user + system) much less so, since time spent waiting for a core is not
counted. ``budget`` measures, in the bench's own run and on its registry:

- the registry (distribution) serving every blob once, from ``/proc/<pid>/stat``
  while curl fetches them all at once to /dev/null;
- curl receiving them (the least any client pays to get the bytes into its
  own memory over loopback TCP);
- sha256 of the artifact's size in one thread (``time.thread_time``);
- an O_DIRECT write of that size plus fsync, in one thread;

and ``run_cpu`` the same split (client, registry) for any command, e.g.
``modelcache pull``. The floor for ANY verifying, durable client is then
(registry + receive + hash + write) / cores, whatever its language.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import resource
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")
BUF = 4 << 20


@dataclass(frozen=True)
class Cpu:
    """Wall seconds and CPU-seconds of one measured piece of work."""

    wall: float
    user: float
    sys: float
    registry: float = 0.0  # the registry's CPU-seconds during the same interval

    @property
    def total(self) -> float:
        return self.user + self.sys


def proc_cpu(pid: int) -> float:
    """utime + stime of a live process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        # the command name may hold spaces or parentheses: fields start after the last ')'
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _children() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime, r.ru_stime


def _self() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def children_cpu(fn: Callable[[], object], registry_pid: int) -> Cpu:
    """CPU of the child processes ``fn`` starts and waits for, and the registry's."""
    u0, s0 = _children()
    r0 = proc_cpu(registry_pid)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1 = proc_cpu(registry_pid)
    u1, s1 = _children()
    return Cpu(wall, u1 - u0, s1 - s0, r1 - r0)


def run_cpu(cmd: list[str], registry_pid: int) -> Cpu:
    return children_cpu(lambda: subprocess.run(cmd, check=True, capture_output=True),
                        registry_pid)


def sha256_cpu(size: int) -> Cpu:
    """Hash ``size`` bytes in this thread (4 MiB updates): its CPU-seconds."""
    buf = os.urandom(BUF)
    h = hashlib.sha256()
    c0 = time.thread_time()
    t0 = time.perf_counter()
    for _ in range(size // BUF):
        h.update(buf)
    wall = time.perf_counter() - t0
    # hashing is user time; thread_time does not split it, and the syscalls are none
    return Cpu(wall, time.thread_time() - c0, 0.0)


def odirect_write_cpu(directory: str, size: int) -> Cpu:
    """Write ``size`` bytes with O_DIRECT from an aligned buffer, fsync: this process's CPU.

    One thread, so RUSAGE_SELF (which splits user and system) sees only it.
    """
    buf = mmap.mmap(-1, BUF)
    buf.write(os.urandom(BUF))
    path = os.path.join(directory, ".odirect-cpu")
    subprocess.run(["sync"], check=True)
    u0, s0 = _self()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for _ in range(size // BUF):
            os.write(fd, buf)
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    u1, s1 = _self()
    os.unlink(path)
    return Cpu(wall, u1 - u0, s1 - s0)


def median_cpu(xs: list[Cpu]) -> Cpu:
    """The run with the median total CPU (one real run, not a mix of fields)."""
    return sorted(xs, key=lambda c: c.total)[len(xs) // 2]
