"""Benchmark: the cold path on one node against the floor of any verifying, durable client.

In one run, on one registry and one artifact (default 2 GiB in 8 files):

- a cold NodePublish: a fresh ``modelcache-node`` (the real plugin, over its
  gRPC socket) with an empty cache publishes the model (pull, verify, store
  durably, place, mount), timed from the call; the plugin's CPU during the
  call (all its threads) and the registry's;
- ``modelcache pull`` of the same reference into an empty directory, its own
  process (start-up included), and the registry's CPU meanwhile;
- the floor (``bench/pull/cpu.py``): registry serving every blob once to
  curl + curl receiving them + sha256 of the bytes + an O_DIRECT write and
  fsync, in CPU-seconds, divided by the cores: the least wall time ANY
  client that verifies and lands the bytes durably needs on this machine.

Ratios against that CPU floor are reported two ways, as before: wall /
floor, and "CPU" = (client + registry CPU-seconds) / cores / floor, which
does not count time spent waiting for a core (the machine may be shared).
The goal is each within 1.2× of the floor.

The CPU floor ignores the disk's own time, so two wall floors are measured
in the same run too (``bench/pull/wallfloor.py``), and both wall times are
given against each:

- the device floor: ``dd oflag=direct conv=fsync`` of the same file sizes,
  4 at a time, alone: no durable client finishes before it;
- the pipeline floor: per blob ``curl | tee FIFO | dd oflag=direct
  conv=fsync`` with ``sha256sum FIFO`` checked against the digest, 4 blobs at
  a time: an ordinary verifying, durable client of standard tools, in wall
  time.

Needs root (mounts). Usage:
    python3 -m bench.publish.cold [--size-mib 2048] [--files 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from bench import common
from bench.pull import cpu, wallfloor
from cli.local import registry as localregistry
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as fx


def cold_publish(work: str, ref: str, host: str, registry_pid: int, n: int) -> cpu.Cpu:
    """One NodePublish into an empty cache on a freshly started plugin."""
    root = os.path.join(work, f"publish{n}")
    os.makedirs(root)
    models = os.path.join(root, "models.json")
    fx.write_models_file(models, {"bench/m": ref})
    plugin = fx.PluginProcess(root, os.path.join(root, "cache"), models, [host]).start()
    try:
        assert plugin.proc is not None
        node = plugin.node()
        target = os.path.join(root, "pod", "mount")
        os.makedirs(os.path.dirname(target))
        subprocess.run(["sync"], check=True)
        p0, r0 = cpu.proc_cpu(plugin.proc.pid), cpu.proc_cpu(registry_pid)
        t0 = time.perf_counter()
        node.NodePublishVolume(fx.publish_request(target, target, model="m", namespace="bench"),
                               timeout=600)
        wall = time.perf_counter() - t0
        p1, r1 = cpu.proc_cpu(plugin.proc.pid), cpu.proc_cpu(registry_pid)
        node.NodeUnpublishVolume(fx.unpublish_request(target, target), timeout=60)
    finally:
        plugin.stop()
        fx.unmount_everything_under(root)
        shutil.rmtree(root, ignore_errors=True)
    return cpu.Cpu(wall, p1 - p0, 0.0, r1 - r0)  # /proc/stat's sum: user + sys together


def cli_pull(work: str, ref: str, registry_pid: int) -> cpu.Cpu:
    dest = os.path.join(work, "pulled")
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    try:
        # this tree's CLI (python -m, from the repo root), as `modelcache pull` runs it
        return cpu.children_cpu(lambda: subprocess.run(
            [sys.executable, "-m", "cli.main", "pull", ref, dest, "--no-progress"],
            check=True, capture_output=True, cwd=fx.REPO_ROOT), registry_pid)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def floor_of(work: str, host: str, repo: str, digests: list[str], size: int,
             registry_pid: int) -> tuple[float, cpu.Cpu, cpu.Cpu, cpu.Cpu]:
    curl = cpu.children_cpu(lambda: common.curl_blobs(host, repo, digests, True), registry_pid)
    sha = cpu.sha256_cpu(size)
    write = cpu.odirect_write_cpu(work, size)
    total = curl.registry + curl.total + sha.total + write.total
    return total / (os.cpu_count() or 1), curl, sha, write


@dataclass(frozen=True)
class Row:
    """One interleaved run: the three floors, then the two clients."""

    floor: float  # the CPU floor, seconds (CPU-seconds / cores)
    curl: cpu.Cpu
    sha: cpu.Cpu
    write: cpu.Cpu
    device: cpu.Cpu
    pipe: cpu.Cpu
    pub: cpu.Cpu
    pull: cpu.Cpu
    load: float

    def against(self, c: cpu.Cpu, cores: int) -> str:
        """A client's wall / CPU against the CPU floor (as before), then wall against the
        device and pipeline floors."""
        return (f"{c.wall / self.floor:.2f}× / {(c.total + c.registry) / cores / self.floor:.2f}× "
                f"| {c.wall / self.device.wall:.2f}× | {c.wall / self.pipe.wall:.2f}×")


def print_table(rows: list[Row], cores: int) -> None:
    print("| run | CPU floor: CPU-s (registry + curl + sha256 + O_DIRECT) = s | "
          "device floor s | pipeline floor s / CPU-s (tools + registry) | "
          "NodePublish wall s / CPU-s (plugin + registry) | "
          "pull wall s / CPU-s (client + registry) | "
          "NodePublish ×CPU floor wall / CPU | ×device | ×pipeline | "
          "pull ×CPU floor wall / CPU | ×device | ×pipeline | load |")
    print("|---|---|---:|---|---|---|---|---:|---:|---|---:|---:|---:|")
    for i, r in enumerate(rows, 1):
        print(f"| {i} | {r.curl.registry:.2f} + {r.curl.total:.2f} + {r.sha.total:.2f} + "
              f"{r.write.total:.2f} = {r.floor * cores:.2f} / {r.floor:.2f} | "
              f"{r.device.wall:.2f} | {r.pipe.wall:.2f} / {r.pipe.total:.2f} + "
              f"{r.pipe.registry:.2f} | "
              f"{r.pub.wall:.2f} / {r.pub.total:.2f} + {r.pub.registry:.2f} | "
              f"{r.pull.wall:.2f} / {r.pull.total:.2f} + {r.pull.registry:.2f} | "
              f"{r.against(r.pub, cores)} | {r.against(r.pull, cores)} | {r.load:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    cores = os.cpu_count() or 1
    work = tempfile.mkdtemp(prefix="modelcache-bench-cold-", dir="/var/tmp")
    src = common.model_dir(size, args.files)
    reg = localregistry.start(os.path.join(work, "registry"))
    try:
        client = RegistryClient(reg.host, insecure=True)
        pack = pack_to_registry(src, client, parse(f"{reg.host}/bench/cold:v1")).pack
        ref = f"{reg.host}/bench/cold@{pack.digest}"
        digests = [layer.digest for layer in pack.layers]
        sizes = [layer.size for layer in pack.layers]
        pid = reg.proc.pid
        rows = []
        for n in range(args.runs):  # interleaved, so load drifts hit all of them alike
            floor, curl, sha, write = floor_of(work, reg.host, "bench/cold", digests, size, pid)
            device = wallfloor.device_floor(work, sizes, pid)
            pipe = wallfloor.pipeline_floor(work, reg.host, "bench/cold", digests, pid)
            pub = cold_publish(work, ref, reg.host, pid, n)
            pull = cli_pull(work, ref, pid)
            rows.append(Row(floor, curl, sha, write, device, pipe, pub, pull,
                            os.getloadavg()[0]))
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n`python3 -m bench.publish.cold {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(f"{size / common.GiB:.2f} GiB in {args.files} files, {cores} cores; each run: "
          "CPU floor, device floor, pipeline floor, cold NodePublish, `modelcache pull`, "
          "in that order\n")
    print_table(rows, cores)


if __name__ == "__main__":
    main()
