"""Wall-time floors of a verifying, durable client: the disk's, and standard tools'.

``bench/pull/cpu.py``'s floor counts CPU-seconds only: it assumes the
cores are the limit and ignores the disk's own time. A durable client cannot
finish before the device holds the bytes, nor before its own pieces have run
one after another where they must. Measured here, in the bench's run, on the
same filesystem and registry:

- ``device_floor``: the disk alone. ``dd oflag=direct conv=fsync`` writes the
  artifact's files (same sizes, ``streams`` at a time, as the client writes
  them), from /dev/zero, nothing else running in the bench: the least wall
  time in which these bytes reach the device.
- ``pipeline_floor``: every piece at once, as a pipeline of standard tools per
  blob (``curl | tee FIFO | dd oflag=direct conv=fsync``, ``sha256sum FIFO``
  checked against the digest), ``streams`` blobs at a time: what an ordinary
  verifying, durable client built from curl, sha256sum and dd takes here, in
  wall time, receive, hash and device overlapping as well as the kernel's
  pipes let them.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable

from bench.pull import cpu

STREAMS = 4  # blobs at once: the client's default workers
_DD = ["dd", "bs=4M", "iflag=fullblock", "oflag=direct", "conv=fsync", "status=none"]


def _in_pool(jobs: list[Callable[[], object]], streams: int) -> None:
    with cf.ThreadPoolExecutor(streams) as pool:
        for f in [pool.submit(job) for job in jobs]:
            f.result()


def _timed_children(directory: str, fn: Callable[[str], None], registry_pid: int) -> cpu.Cpu:
    """Wall, children's and registry's CPU of ``fn`` run in a fresh directory under
    ``directory``, after a ``sync`` (nothing of earlier runs left to write back)."""
    out = tempfile.mkdtemp(prefix=".wallfloor-", dir=directory)
    try:
        subprocess.run(["sync"], check=True)
        return cpu.children_cpu(lambda: fn(out), registry_pid)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def device_floor(directory: str, sizes: list[int], registry_pid: int,
                 streams: int = STREAMS) -> cpu.Cpu:
    """O_DIRECT write + fsync of files of ``sizes`` (multiples of 4 MiB), ``streams`` at once."""
    def run(out: str) -> None:
        def one(i: int, size: int) -> Callable[[], object]:
            return lambda: subprocess.run(
                [*_DD, "if=/dev/zero", f"of={out}/{i}", f"count={size >> 22}"], check=True)
        _in_pool([one(i, s) for i, s in enumerate(sizes)], streams)
    return _timed_children(directory, run, registry_pid)


def _verified_blob(url: str, digest: str, path: str) -> None:
    """curl | tee FIFO | dd O_DIRECT+fsync, with sha256sum reading the FIFO; checks the digest."""
    fifo = path + ".fifo"
    os.mkfifo(fifo)
    try:
        sha = subprocess.Popen(["sha256sum", fifo], stdout=subprocess.PIPE)
        curl = subprocess.Popen(["curl", "-sfL", url], stdout=subprocess.PIPE)
        tee = subprocess.Popen(["tee", fifo], stdin=curl.stdout, stdout=subprocess.PIPE)
        dd = subprocess.Popen([*_DD, f"of={path}"], stdin=tee.stdout)
        assert curl.stdout is not None and tee.stdout is not None
        curl.stdout.close()  # the children hold the pipes now
        tee.stdout.close()
        got, _ = sha.communicate()
        codes = [p.wait() for p in (curl, tee, dd)] + [sha.returncode]
    finally:
        os.unlink(fifo)
    if any(codes):
        raise RuntimeError(f"pipeline for {digest} exited {codes}")
    if "sha256:" + got.split()[0].decode() != digest:
        raise RuntimeError(f"pipeline for {digest} hashed to {got!r}")


def pipeline_floor(directory: str, host: str, repo: str, digests: list[str],
                   registry_pid: int, streams: int = STREAMS) -> cpu.Cpu:
    """Fetch, verify and durably write every blob with standard tools, ``streams`` at once."""
    def run(out: str) -> None:
        def one(d: str) -> Callable[[], object]:
            return lambda: _verified_blob(f"http://{host}/v2/{repo}/blobs/{d}", d,
                                          os.path.join(out, d.split(":")[1]))
        _in_pool([one(d) for d in digests], streams)
    return _timed_children(directory, run, registry_pid)
