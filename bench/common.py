"""Shared pieces of the benchmarks: a real registry, a generated model, the
machine's own limits measured in the same run, and a timer.

Benchmarks are scripts, not tests: they print a markdown table and the
command that produced it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable

from cli.local import registry as localregistry
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import PackResult, pack_to_registry
from tests import modelgen

CACHE = os.path.expanduser("~/.cache/modelcache-bench")
GiB = 1 << 30


def model_dir(total: int, files: int, seed: int = 11) -> str:
    path = os.path.join(CACHE, f"model-{total}-{files}-{seed}")
    if not os.path.exists(os.path.join(path, ".done")):
        shutil.rmtree(path, ignore_errors=True)
        modelgen.make_big_model(path, files=files, total=total, seed=seed)
        open(os.path.join(path, ".done"), "w").close()
    return path


def model_files(path: str) -> list[str]:
    return sorted(os.path.join(path, f) for f in os.listdir(path) if not f.startswith("."))


def timed(fn: Callable[[], object], runs: int, before: Callable[[], None] | None = None
          ) -> list[float]:
    out = []
    for _ in range(runs):
        if before:
            before()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def sha256_rate(seconds: float = 1.0) -> float:
    """One core's sha256 throughput, bytes/s (hashlib, 4 MiB buffers)."""
    buf = os.urandom(4 << 20)
    h = hashlib.sha256()
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        h.update(buf)
        n += len(buf)
    return n / (time.perf_counter() - t0)


def sha256_rate_parallel(threads: int, seconds: float = 1.0) -> float:
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda _: sha256_rate(seconds), range(threads)))


def disk_write_rate(path: str, size: int = 2 * GiB, streams: int = 4,
                    direct: bool = False) -> float:
    """Write ``size`` bytes as ``streams`` files in parallel, each fsynced: bytes/s.

    The same shape as a pull (4 files at a time, each fsynced), so it is the
    disk's limit for that work. ``direct`` writes with O_DIRECT (no page
    cache), the disk's own speed.
    """
    import concurrent.futures as cf
    import mmap

    buf = mmap.mmap(-1, 4 << 20)
    buf.write(os.urandom(4 << 20))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)

    def one(i: int) -> None:
        target = os.path.join(path, f".ddtest-{i}")
        fd = os.open(target, flags, 0o644)
        try:
            for _ in range(size // streams // len(buf)):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)

    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(streams) as pool:
        list(pool.map(one, range(streams)))
    dt = time.perf_counter() - t0
    for i in range(streams):
        os.unlink(os.path.join(path, f".ddtest-{i}"))
    return size / dt


def curl_blobs(host: str, repo: str, digests: list[str], parallel: bool,
               out_dir: str | None = None) -> float:
    """Seconds for curl to fetch every blob, sequentially or all at once.

    To /dev/null by default; with ``out_dir``, into files there followed by
    ``sync`` (the machine's limit for landing the bytes on disk, unverified).
    """
    urls = [f"http://{host}/v2/{repo}/blobs/{d}" for d in digests]
    outs = ([os.path.join(out_dir, d.split(":")[1]) for d in digests] if out_dir
            else ["/dev/null"] * len(urls))
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    if parallel:
        procs = [subprocess.Popen(["curl", "-sfL", "-o", o, u]) for u, o in zip(urls, outs, strict=True)]
        for p in procs:
            assert p.wait() == 0
    else:
        for u, o in zip(urls, outs, strict=True):
            subprocess.run(["curl", "-sfL", "-o", o, u], check=True)
    if out_dir:
        subprocess.run(["sync"], check=True)
    dt = time.perf_counter() - t0
    if out_dir:
        shutil.rmtree(out_dir)
    return dt


class Setup:
    """A registry with the model pushed under ``repo:v1``."""

    def __init__(self, total: int, files: int, repo: str = "bench/model") -> None:
        self.src = model_dir(total, files)
        self.work = os.path.join(CACHE, "work")
        shutil.rmtree(self.work, ignore_errors=True)
        os.makedirs(self.work)
        self.reg = localregistry.start(os.path.join(self.work, "registry"))
        self.client = RegistryClient(self.reg.host, insecure=True)
        self.repo = repo
        self.ref = parse(f"{self.reg.host}/{repo}:v1")
        self.pushed: PackResult | None = None

    def push(self) -> PackResult:
        self.pushed = pack_to_registry(self.src, self.client, self.ref)
        return self.pushed

    def close(self) -> None:
        self.reg.stop()
        shutil.rmtree(self.work, ignore_errors=True)


def fmt_rate(bps: float) -> str:
    return f"{bps / 1e9:.2f} GB/s"
