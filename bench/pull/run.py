"""bench/pull: pull a generated 2 GiB, 8-file ModelPack from a local registry.

Contenders, in one run, same registry, same artifact, page cache warm for all:
``modelcache pull`` (CLI, verifies every byte), oras-py ``OrasClient.pull``
(no verification, no fsync), ``skopeo copy`` to a ``dir:`` (verifies). Each
is timed twice: the command's own wall time, and until its bytes are on
disk (the command, then ``sync``): modelcache fsyncs before it returns,
the others leave dirty pages behind, so the second column compares like
with like. The machine's
own limits are measured in the same run: curl fetching every blob to
/dev/null (one at a time and all at once), sha256 per core and on all
cores, and sequential disk write.

    python3 -m bench.pull.run [--size-gib 2] [--files 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from bench import common

ORAS_PULL = """
import sys, oras.client
c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
c.pull(target=sys.argv[2], outdir=sys.argv[3])
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    total = int(args.size_gib * common.GiB)
    s = common.Setup(total, args.files)
    try:
        pushed = s.push()
        size = pushed.pack.size
        digests = [x.digest for x in pushed.pack.layers]
        ref = str(s.ref)
        dest = os.path.join(s.work, "dest")

        def clean() -> None:
            shutil.rmtree(dest, ignore_errors=True)
            subprocess.run(["sync"], check=True)

        def durable(cmd: list[str]) -> tuple[float, float]:
            """(command wall s, wall s until the bytes are on disk) per run, medians."""
            walls, synced = [], []
            for _ in range(args.runs):
                clean()
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                t1 = time.perf_counter()
                subprocess.run(["sync"], check=True)
                walls.append(t1 - t0)
                synced.append(time.perf_counter() - t0)
            return common.median(walls), common.median(synced)

        rows: list[tuple[str, tuple[float, float]]] = [
            ("modelcache pull", durable(["modelcache", "pull", ref, dest, "--no-progress"])),
            ("oras-py OrasClient.pull",
             durable([sys.executable, "-c", ORAS_PULL, s.reg.host, ref, dest])),
            ("skopeo copy (dir:)", durable(["skopeo", "copy", "--src-tls-verify=false",
                                            f"docker://{ref}", f"dir:{dest}"])),
        ]
        clean()
        curl_seq = common.median([common.curl_blobs(s.reg.host, s.repo, digests, False)
                                  for _ in range(args.runs)])
        curl_par = common.median([common.curl_blobs(s.reg.host, s.repo, digests, True)
                                  for _ in range(args.runs)])
        curl_disk = common.median([common.curl_blobs(s.reg.host, s.repo, digests, True,
                                                     os.path.join(s.work, "curl"))
                                   for _ in range(args.runs)])
        sha1 = common.sha256_rate()
        sha_all = common.sha256_rate_parallel(os.cpu_count() or 1)
        disk = common.disk_write_rate(s.work)
        disk_direct = common.disk_write_rate(s.work, direct=True)
        net_hash = min(size / curl_par, sha_all)
        raw_limit = min(net_hash, max(disk_direct, size / curl_disk))
        ours, ours_synced = rows[0][1]
        print(f"\n### pull: {size / common.GiB:.2f} GiB in {args.files} files, "
              f"median of {args.runs} runs, {os.cpu_count()} cores\n")
        print("| tool | wall s | until on disk (+sync) s | throughput (on disk) | "
              "ours ×faster (wall) | ours ×faster (on disk) |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, (t, ts) in rows:
            print(f"| {name} | {t:.2f} | {ts:.2f} | {common.fmt_rate(size / ts)} | "
                  f"{t / ours:.2f}× | {ts / ours_synced:.2f}× |")
        print("\n| machine limit (same run) | throughput |")
        print("|---|---:|")
        print(f"| curl blobs → /dev/null, sequential | {common.fmt_rate(size / curl_seq)} |")
        print(f"| curl blobs → /dev/null, all at once | {common.fmt_rate(size / curl_par)} |")
        print(f"| curl blobs → files, all at once, + sync | {common.fmt_rate(size / curl_disk)} |")
        print(f"| sha256, one core | {common.fmt_rate(sha1)} |")
        print(f"| sha256, all cores | {common.fmt_rate(sha_all)} |")
        print(f"| disk: 4 files in parallel, buffered + fsync | {common.fmt_rate(disk)} |")
        print(f"| disk: 4 files in parallel, O_DIRECT + fsync | {common.fmt_rate(disk_direct)} |")
        print(f"| load average at the end | {os.getloadavg()[0]:.2f} |")
        print(f"\nnetwork + hash limit = min(curl all at once, sha256 all cores) = "
              f"{common.fmt_rate(net_hash)}; raw limit = min(that, the disk's best write rate) = "
              f"{common.fmt_rate(raw_limit)}.")
        print(f"modelcache pull (verified, on disk) = {common.fmt_rate(size / ours_synced)}: "
              f"{100 * size / ours_synced / raw_limit:.0f} % of the raw limit, "
              f"{100 * size / ours_synced / net_hash:.0f} % of the network + hash limit")
    finally:
        s.close()


if __name__ == "__main__":
    main()
