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

Ratios are reported two ways: wall / floor, and "CPU" = (client + registry
CPU-seconds) / cores / floor, which does not count time spent waiting for a
core (the machine may be shared). The goal is each within 1.2× of the floor.

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

from bench import common
from bench.pull import cpu
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
        pid = reg.proc.pid
        rows = []
        for n in range(args.runs):  # interleaved, so load drifts hit all three alike
            floor, curl, sha, write = floor_of(work, reg.host, "bench/cold", digests, size, pid)
            pub = cold_publish(work, ref, reg.host, pid, n)
            pull = cli_pull(work, ref, pid)
            rows.append((floor, curl, sha, write, pub, pull, os.getloadavg()[0]))
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n`python3 -m bench.publish.cold {' '.join(sys.argv[1:])}`".rstrip() + "\n")
    print(f"{size / common.GiB:.2f} GiB in {args.files} files, {cores} cores; each run: "
          "floor, cold NodePublish, `modelcache pull`, in that order\n")
    print("| run | floor CPU-s (registry + curl + sha256 + O_DIRECT) | floor s | "
          "NodePublish wall s / CPU-s (plugin + registry) | pull wall s / CPU-s "
          "(client + registry) | NodePublish ×floor wall / CPU | pull ×floor wall / CPU | "
          "load |")
    print("|---|---|---:|---|---|---|---|---:|")
    for i, (floor, curl, sha, write, pub, pull, load) in enumerate(rows, 1):
        pub_cpu, pull_cpu = pub.total + pub.registry, pull.total + pull.registry
        print(f"| {i} | {curl.registry:.2f} + {curl.total:.2f} + {sha.total:.2f} + "
              f"{write.total:.2f} = {floor * cores:.2f} | {floor:.2f} | "
              f"{pub.wall:.2f} / {pub.total:.2f} + {pub.registry:.2f} | "
              f"{pull.wall:.2f} / {pull.total:.2f} + {pull.registry:.2f} | "
              f"{pub.wall / floor:.2f}× / {pub_cpu / cores / floor:.2f}× | "
              f"{pull.wall / floor:.2f}× / {pull_cpu / cores / floor:.2f}× | {load:.1f} |")


if __name__ == "__main__":
    main()
