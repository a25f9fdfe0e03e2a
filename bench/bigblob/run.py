"""bench/bigblob: one large file, one stream against N byte ranges, on a capped link.

A generated single-file ModelPack (``--size-gib``, 1 by default) is pushed
to a real docker-registry on loopback; blob GETs then go through
``bench/bigblob/throttle.py``, a TCP proxy that caps each connection at
``--rate-mb`` MB/s (20 by default), as object-storage-backed registries do.
The weight blob is pulled into a fresh store with the registry client
(``modelpack.pull.fetch_blobs``: verified, fsynced, committed) twice: one
stream (``--range-streams 1``), then ``--streams`` ranges (8 by default)
under the shipped policy: one stream first, split after its 32 MiB probe
shows it slow and waiting for bytes (``modelpack.oci.ranged.Probe``), so
its connections are one more than the ranges.

The Hugging Face case (``--case hf``; both by default) serves the same file
as a one-file repo from the hub test server (``tests/servers/hfhub.py``):
the hub and the CDN its LFS redirects point at each sit behind a throttle
of the same cap. Side by side, each into a fresh directory:
``huggingface_hub.snapshot_download`` (endpoint = the throttled hub; this
version has no hf_transfer, and the server offers no Xet, so it reads the
file as one HTTP stream; it does not hash or fsync), then our HF source
staged by the publish worker's ``stage_file`` (sha256 checked, fsynced,
committed) in one stream, then under the shipped policy with ``--streams``
ranges.

The machine's own limits are measured in the same run: sha256 on one core
and sequential disk write with fsync. Prints markdown tables and the
command.

    python3 -m bench.bigblob.run [--size-gib 1] [--streams 8] [--rate-mb 20] [--case all]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

import huggingface_hub

from bench import common
from bench.bigblob.throttle import Throttle
from cli.local import registry as localregistry
from ingest.publish.stage import stage_file
from ingest.sources.huggingface import HuggingFaceSource
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import fetch_blobs
from modelpack.store.blobs import BlobStore
from tests.servers.hfhub import RoutedHub

HF_REPO = "bench/one-big-file"


Row = tuple[str, int, float]  # what, connections, seconds


def _registry(src: str, work: str, rate: float, streams: int) -> tuple[int, list[Row]]:
    """The weight blob pulled with the registry client: one stream, then ``streams`` ranges."""
    rows: list[Row] = []
    with localregistry.running() as reg:
        direct = RegistryClient(reg.host, insecure=True)
        pack = pack_to_registry(src, direct, parse(f"{reg.host}/bench/bigblob:v1")).pack
        layer = max(pack.layers, key=lambda x: x.size)
        throttle = Throttle(reg.host, rate)
        try:
            for n in (1, streams):
                store = BlobStore(f"{work}/s{n}")
                client = RegistryClient(throttle.host, insecure=True,
                                        ranges=RangePolicy(streams=n, min_size=0))
                before = throttle.connections
                t0 = time.monotonic()
                fetch_blobs(client, "bench/bigblob", (layer,), store)
                rows.append((f"registry client, {n} stream{'s' if n > 1 else ''}",
                             throttle.connections - before, time.monotonic() - t0))
                shutil.rmtree(f"{work}/s{n}")
        finally:
            throttle.close()
    return layer.size, rows


def _hf(src: str, work: str, rate: float, streams: int) -> tuple[int, list[Row]]:
    """The same file from a throttled hub: ``snapshot_download``, our source, one stream
    and ``streams`` ranges."""
    rows: list[Row] = []
    hub = RoutedHub()
    with hub:
        hub.add_repo(HF_REPO, src)
        cdn = Throttle(hub.cdn_host, rate, bind="127.0.0.2")
        hub.cdn_via = cdn.host
        front = Throttle(hub.url.split("://", 1)[1], rate)
        endpoint = f"http://{front.host}"
        weight = max(hub.repos[HF_REPO].files.values(), key=lambda x: x.size)

        def conns() -> int:
            return cdn.connections + front.connections

        try:
            before, t0 = conns(), time.monotonic()
            huggingface_hub.snapshot_download(HF_REPO, cache_dir=f"{work}/hf",
                                              allow_patterns=[weight.path], endpoint=endpoint,
                                              token=False)
            rows.append(("huggingface_hub.snapshot_download", conns() - before,
                         time.monotonic() - t0))
            shutil.rmtree(f"{work}/hf")
            for n in (1, streams):
                source = HuggingFaceSource(HF_REPO, endpoint=endpoint)
                try:
                    f = next(x for x in source.resolve().files if x.path == weight.path)
                    before, t0 = conns(), time.monotonic()
                    stage_file(source, str(source.sha), f, BlobStore(f"{work}/s{n}"),
                               lambda _: None, policy=RangePolicy(streams=n, min_size=0))
                    rows.append((f"modelcache HF source, {n} stream{'s' if n > 1 else ''}",
                                 conns() - before, time.monotonic() - t0))
                finally:
                    source.close()
                shutil.rmtree(f"{work}/s{n}")
        finally:
            cdn.close()
            front.close()
    return weight.size, rows


def _table(title: str, size: int, rows: list[Row]) -> None:
    one = rows[0][2]
    print(f"\n{title}: one {size / common.GiB:.2f} GiB file\n")
    print("| client | connections | time | throughput | vs first row |")
    print("|---|---|---|---|---|")
    for what, conns, dt in rows:
        print(f"| {what} | {conns} | {dt:.1f} s | {_mb(size / dt)} | {one / dt:.2f}x |")


def _mb(bps: float) -> str:
    return f"{bps / 1e6:.0f} MB/s"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rate-mb", type=float, default=20.0, help="cap per connection, MB/s")
    ap.add_argument("--case", choices=("all", "registry", "hf"), default="all")
    args = ap.parse_args()
    size = int(args.size_gib * common.GiB)
    rate = args.rate_mb * 1e6
    src = common.model_dir(size, 1, seed=23)
    work = tempfile.mkdtemp(prefix="bigblob-", dir=common.CACHE)
    tables = []
    try:
        if args.case in ("all", "registry"):
            tables.append(("registry (docker-registry)", *_registry(src, work, rate, args.streams)))
        if args.case in ("all", "hf"):
            tables.append(("Hugging Face (hub test server, CDN redirect)",
                           *_hf(src, work, rate, args.streams)))
        sha = common.sha256_rate()
        disk = common.disk_write_rate(work, size=min(size, common.GiB), streams=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"\n`python3 -m bench.bigblob.run --size-gib {args.size_gib:g} --streams {args.streams} "
          f"--rate-mb {args.rate_mb:g} --case {args.case}`: {args.rate_mb:g} MB/s per "
          f"connection, load average at the end {load}")
    for title, blob, rows in tables:
        _table(title, blob, rows)
    print(f"\nmachine limits, same run: sha256 one core {_mb(sha)}, "
          f"disk write + fsync {_mb(disk)}; "
          f"cap × streams = {_mb(rate * args.streams)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
