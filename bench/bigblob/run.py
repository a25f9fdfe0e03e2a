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
The machine's own limits are measured in the same run: sha256 on one core
and sequential disk write with fsync. Prints a markdown table and the
command.

    python3 -m bench.bigblob.run [--size-gib 1] [--streams 8] [--rate-mb 20]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time

from bench import common
from bench.bigblob.throttle import Throttle
from cli.local import registry as localregistry
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import fetch_blobs
from modelpack.store.blobs import BlobStore


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--rate-mb", type=float, default=20.0, help="cap per connection, MB/s")
    args = ap.parse_args()
    size = int(args.size_gib * common.GiB)
    src = common.model_dir(size, 1, seed=23)
    work = tempfile.mkdtemp(prefix="bigblob-", dir=common.CACHE)
    rows = []
    try:
        with localregistry.running() as reg:
            direct = RegistryClient(reg.host, insecure=True)
            pack = pack_to_registry(src, direct, parse(f"{reg.host}/bench/bigblob:v1")).pack
            layer = max(pack.layers, key=lambda x: x.size)
            throttle = Throttle(reg.host, args.rate_mb * 1e6)
            try:
                for streams in (1, args.streams):
                    store = BlobStore(f"{work}/s{streams}")
                    client = RegistryClient(throttle.host, insecure=True,
                                            ranges=RangePolicy(streams=streams, min_size=0))
                    before = throttle.connections
                    t0 = time.monotonic()
                    fetch_blobs(client, "bench/bigblob", (layer,), store)
                    dt = time.monotonic() - t0
                    rows.append((streams, dt, throttle.connections - before))
                    shutil.rmtree(f"{work}/s{streams}")
            finally:
                throttle.close()
        sha = common.sha256_rate()
        disk = common.disk_write_rate(work, size=min(size, common.GiB), streams=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = rows[0][1]

    def mb(bps: float) -> str:
        return f"{bps / 1e6:.0f} MB/s"

    print(f"\n`python3 -m bench.bigblob.run --size-gib {args.size_gib:g} --streams {args.streams} "
          f"--rate-mb {args.rate_mb:g}`: one {layer.size / common.GiB:.2f} GiB blob, "
          f"{args.rate_mb:g} MB/s per connection\n")
    print("| streams | connections | time | throughput | vs one stream |")
    print("|---|---|---|---|---|")
    for streams, dt, conns in rows:
        print(f"| {streams} | {conns} | {dt:.1f} s | {mb(layer.size / dt)} | "
              f"{one / dt:.2f}x |")
    print(f"\nmachine limits, same run: sha256 one core {mb(sha)}, "
          f"disk write + fsync {mb(disk)}; "
          f"cap × streams = {mb(args.rate_mb * 1e6 * args.streams)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
