"""bench/pull: pull a generated 2 GiB, 8-file ModelPack from a local registry.

Contenders, in one run, same registry, same artifact, page cache warm for all:
``modelcache pull`` (CLI, verifies every byte), oras-py ``OrasClient.pull``
(no verification), ``skopeo copy`` to a ``dir:`` (verifies). The machine's
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

        rows: list[tuple[str, float]] = []
        rows.append(("modelcache pull", common.median(common.timed(
            lambda: subprocess.run(["modelcache", "pull", ref, dest, "--no-progress"],
                                   check=True, capture_output=True), args.runs, clean))))
        rows.append(("oras-py OrasClient.pull", common.median(common.timed(
            lambda: subprocess.run([sys.executable, "-c", ORAS_PULL, s.reg.host, ref, dest],
                                   check=True, capture_output=True), args.runs, clean))))
        rows.append(("skopeo copy (dir:)", common.median(common.timed(
            lambda: subprocess.run(["skopeo", "copy", "--src-tls-verify=false",
                                    f"docker://{ref}", f"dir:{dest}"],
                                   check=True, capture_output=True), args.runs, clean))))
        clean()
        curl_seq = common.median([common.curl_blobs(s.reg.host, s.repo, digests, False)
                                  for _ in range(args.runs)])
        curl_par = common.median([common.curl_blobs(s.reg.host, s.repo, digests, True)
                                  for _ in range(args.runs)])
        sha1 = common.sha256_rate()
        sha_all = common.sha256_rate_parallel(os.cpu_count() or 1)
        disk = common.disk_write_rate(s.work)
        raw_limit = min(size / curl_par, sha_all, disk)
        ours = rows[0][1]
        print(f"\n### pull: {size / common.GiB:.2f} GiB in {args.files} files, "
              f"median of {args.runs} runs, {os.cpu_count()} cores\n")
        print("| tool | wall s | throughput | ours is ×faster |")
        print("|---|---:|---:|---:|")
        for name, t in rows:
            print(f"| {name} | {t:.2f} | {common.fmt_rate(size / t)} | {t / ours:.2f}× |")
        print("\n| machine limit (same run) | throughput |")
        print("|---|---:|")
        print(f"| curl blobs → /dev/null, sequential | {common.fmt_rate(size / curl_seq)} |")
        print(f"| curl blobs → /dev/null, all at once | {common.fmt_rate(size / curl_par)} |")
        print(f"| sha256, one core | {common.fmt_rate(sha1)} |")
        print(f"| sha256, all cores | {common.fmt_rate(sha_all)} |")
        print(f"| disk write + fsync | {common.fmt_rate(disk)} |")
        print(f"\nraw limit = min(curl all at once, sha256 all cores, disk) = "
              f"{common.fmt_rate(raw_limit)}; modelcache pull reaches "
              f"{100 * size / ours / raw_limit:.0f} % of it")
    finally:
        s.close()


if __name__ == "__main__":
    main()
