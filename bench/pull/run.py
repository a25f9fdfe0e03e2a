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

Then a CPU budget (``bench/pull/cpu.py``): CPU-seconds of each tool and of
the registry while it serves it, of the registry serving and curl receiving
every blob once, of sha256 and of an O_DIRECT write of the artifact's size,
and from these the least wall time ANY verifying, durable client could take
on this machine's cores, against the wall time that 70 % of the raw limit
asks for. CPU-seconds barely move with other load; wall times do.

    python3 -m bench.pull.run [--size-gib 2] [--files 8] [--runs 3] [--no-peers]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

from bench import common
from bench.pull import cpu

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
    ap.add_argument("--no-peers", action="store_true",
                    help="skip oras-py and skopeo (quicker; for A/B runs of our own pull)")
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

        pid = s.reg.proc.pid
        cpus: dict[str, cpu.Cpu] = {}

        def durable(name: str, cmd: list[str]) -> tuple[str, tuple[float, float]]:
            """(command wall s, wall s until the bytes are on disk) per run, medians."""
            walls, synced, used = [], [], []
            for _ in range(args.runs):
                clean()
                t0 = time.perf_counter()
                used.append(cpu.run_cpu(cmd, pid))
                t1 = time.perf_counter()
                subprocess.run(["sync"], check=True)
                walls.append(t1 - t0)
                synced.append(time.perf_counter() - t0)
            cpus[name] = cpu.median_cpu(used)
            return name, (common.median(walls), common.median(synced))

        rows: list[tuple[str, tuple[float, float]]] = [
            durable("modelcache pull", ["modelcache", "pull", ref, dest, "--no-progress"])]
        if not args.no_peers:
            rows += [durable("oras-py OrasClient.pull",
                             [sys.executable, "-c", ORAS_PULL, s.reg.host, ref, dest]),
                     durable("skopeo copy (dir:)", ["skopeo", "copy", "--src-tls-verify=false",
                                                    f"docker://{ref}", f"dir:{dest}"])]
        clean()
        startup = cpu.median_cpu([cpu.run_cpu(["modelcache", "pull", "--help"], pid)
                                  for _ in range(args.runs)])
        curl_seq = common.median([common.curl_blobs(s.reg.host, s.repo, digests, False)
                                  for _ in range(args.runs)])
        curl_cpu = cpu.median_cpu([
            cpu.children_cpu(lambda: common.curl_blobs(s.reg.host, s.repo, digests, True), pid)
            for _ in range(args.runs)])
        curl_par = curl_cpu.wall
        curl_disk = common.median([common.curl_blobs(s.reg.host, s.repo, digests, True,
                                                     os.path.join(s.work, "curl"))
                                   for _ in range(args.runs)])
        sha1 = common.sha256_rate()
        sha_all = common.sha256_rate_parallel(os.cpu_count() or 1)
        disk = common.disk_write_rate(s.work)
        disk_direct = common.disk_write_rate(s.work, direct=True)
        sha_cpu = cpu.sha256_cpu(size)
        write_cpu = cpu.odirect_write_cpu(s.work, size)
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
        budget(size, raw_limit, disk_direct, cpus, startup, curl_cpu, sha_cpu, write_cpu)
    finally:
        s.close()


def budget(size: int, raw_limit: float, disk_direct: float, cpus: dict[str, cpu.Cpu],
           startup: cpu.Cpu, curl: cpu.Cpu, sha: cpu.Cpu, write: cpu.Cpu) -> None:
    """Print the CPU table and the floor it puts under any verifying, durable pull."""
    cores = os.cpu_count() or 1
    print(f"\n#### CPU budget (CPU-seconds = user + sys; of each, the run with the median CPU; {cores} cores)\n")
    print("| work | wall s | client user s | client sys s | client CPU s | registry CPU s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, c in cpus.items():
        print(f"| {name} | {c.wall:.2f} | {c.user:.2f} | {c.sys:.2f} | {c.total:.2f} | "
              f"{c.registry:.2f} |")
    print(f"| `modelcache pull --help` (start-up + imports) | {startup.wall:.2f} | "
          f"{startup.user:.2f} | {startup.sys:.2f} | {startup.total:.2f} | – |")
    print(f"| (a) curl, every blob at once → /dev/null | {curl.wall:.2f} | {curl.user:.2f} | "
          f"{curl.sys:.2f} | {curl.total:.2f} | {curl.registry:.2f} |")
    print(f"| (c) sha256 of {size / common.GiB:.2f} GiB, one thread | {sha.wall:.2f} | "
          f"{sha.user:.2f} | – | {sha.total:.2f} | – |")
    print(f"| (d) O_DIRECT write of {size / common.GiB:.2f} GiB + fsync, one thread | "
          f"{write.wall:.2f} | {write.user:.2f} | {write.sys:.2f} | {write.total:.2f} | – |")
    floor_cpu = curl.registry + curl.total + sha.total + write.total
    floor = floor_cpu / cores
    print(f"\nunavoidable CPU for any verifying, durable client = registry serving "
          f"{curl.registry:.2f} + receiving (curl) {curl.total:.2f} + sha256 {sha.total:.2f} "
          f"+ O_DIRECT write {write.total:.2f} = {floor_cpu:.2f} CPU-s; on {cores} cores "
          f"≥ {floor:.2f} s wall = at most {common.fmt_rate(size / floor)}.")
    # The raw limit's terms are wall-time rates, which other load drags down (and
    # with them the bar); its network and hash terms from CPU-seconds are what an
    # otherwise idle CPU would give (curl all at once is bound by registry + curl
    # CPU on these cores). The disk term stays as measured: it is I/O, not CPU.
    quiet = min(cores * size / (curl.registry + curl.total), cores * size / sha.total,
                max(disk_direct, size / write.wall))
    for label, limit in (("same run, wall-based", raw_limit),
                         ("network + hash from CPU-seconds, disk as measured", quiet)):
        target = size / (0.7 * limit)
        ok = floor <= target
        print(f"raw limit ({label}) = {common.fmt_rate(limit)}: 70 % of it asks for ≤ "
              f"{target:.2f} s wall; the floor is {floor:.2f} s = "
              f"{100 * size / floor / limit:.0f} % of it → 70 % "
              f"{'reachable' if ok else 'NOT reachable'} on this core count "
              f"(floor {100 * (floor - target) / target:+.0f} % against the target).")
    ours = cpus.get("modelcache pull")
    if ours is not None:
        ours_floor = (ours.total + ours.registry) / cores
        print(f"modelcache pull: {ours.total:.2f} CPU-s (of which start-up ≈ "
              f"{startup.total:.2f}) + registry {ours.registry:.2f} = "
              f"{ours.total + ours.registry:.2f} CPU-s → its own floor on {cores} cores "
              f"{ours_floor:.2f} s; measured {ours.wall:.2f} s wall.")


if __name__ == "__main__":
    main()
