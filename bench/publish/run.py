"""Benchmark: NodeCache publish (warm and cold) against `cp -r` and oras-py.

Runs the real plugin (``python -m csi.main``) on a unix socket with a real
registry on loopback, and measures through a real gRPC channel:

- warm publish latency (model cached): p50/p99 at 1 and at 50 concurrent calls,
  each a NodePublishVolume to a fresh target (bind + remount ro), sent by
  ``bench.publish.load`` in its own process (one grpc.aio event loop, each
  call timed from its own start), with the plugin's CPU time per call and
  the latency of NodeGetInfo at the same concurrency (gRPC's own floor);
- ``cp -r`` of the same model directory (what a copy-based delivery costs);
- disk used by 50 published volumes of one model (statvfs before/after);
- cold publish throughput (empty cache: pull, verify, place, mount) beside
  oras-py's ``OrasClient.pull`` of the same artifact.

Needs root (mounts). Usage:
    python3 -m bench.publish.run [--size-mib 512] [--files 10] [--rounds 10]
Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import model_dir
from cli.local import registry as localregistry
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as fx


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def used_bytes(path: str) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mib", type=int, default=512, help="model size")
    ap.add_argument("--files", type=int, default=10, help="files in the model")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of 50 concurrent publishes")
    ap.add_argument("--serial", type=int, default=200, help="publishes at concurrency 1")
    ap.add_argument("--cache-dir", default=None, help="cache location (default: a temp dir)")
    args = ap.parse_args()
    size = args.size_mib << 20

    work = tempfile.mkdtemp(prefix="modelcache-bench-publish-", dir="/var/tmp")
    src = model_dir(size, args.files, seed=31)
    reg = localregistry.start(os.path.join(work, "registry"))
    plugin = None
    rows: list[tuple[str, str]] = []
    try:
        client = RegistryClient(reg.host, insecure=True)
        ref = parse(f"{reg.host}/bench/publish:v1")
        pack = pack_to_registry(src, client, ref).pack
        models = os.path.join(work, "models.json")
        fx.write_models_file(models, {"bench/m": str(ref)})
        cache = args.cache_dir or os.path.join(work, "cache")
        plugin = fx.PluginProcess(work, cache, models, [reg.host]).start()
        node = plugin.node()
        pods = os.path.join(work, "pods")
        n = 0

        def target() -> str:
            nonlocal n
            n += 1
            parent = os.path.join(pods, f"pod{n}")
            os.makedirs(parent)
            return os.path.join(parent, "mount")

        def publish(t: str) -> float:
            t0 = time.perf_counter()
            node.NodePublishVolume(fx.publish_request(t, t, model="m", namespace="bench"),
                                   timeout=600)
            return time.perf_counter() - t0

        def unpublish(t: str) -> None:
            node.NodeUnpublishVolume(fx.unpublish_request(t, t), timeout=60)

        # cold: empty cache -> pulled, verified, placed, mounted
        t = target()
        cold = publish(t)
        unpublish(t)

        # oras-py pull of the same artifact (sequential 8 KiB streaming, no verification)
        import oras.client

        out = os.path.join(work, "oras-out")
        oc = oras.client.OrasClient(hostname=reg.host, insecure=True)
        t0 = time.perf_counter()
        oc.pull(target=str(ref), outdir=out)
        oras_s = time.perf_counter() - t0
        shutil.rmtree(out, ignore_errors=True)

        # disk used by 50 volumes of one model (statvfs before/after, synced)
        tgts = [target() for _ in range(50)]
        os.sync()
        before = used_bytes(cache)
        for t in tgts:
            publish(t)
        os.sync()
        disk_delta = used_bytes(cache) - before
        for t in tgts:
            unpublish(t)

        # warm: 1 at a time, then rounds of 50 at once, from the load process
        assert plugin.proc is not None
        server_pid = plugin.proc.pid

        def load(concurrency: int, rounds: int, floor: bool = False) -> dict[str, Any]:
            argv = [sys.executable, "-m", "bench.publish.load", "--socket", plugin.socket,
                    "--pods-dir", pods, "--model", "m", "--namespace", "bench",
                    "--concurrency", str(concurrency), "--rounds", str(rounds),
                    "--server-pid", str(server_pid)] + (["--floor"] if floor else [])
            out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
            return dict(json.loads(out))

        serial = load(1, args.serial)
        per_round = [load(50, 1) for _ in range(args.rounds)]
        conc = [x for r in per_round for x in r["latencies"]]
        conc_cpu = sum(r["server_cpu"] for r in per_round) / len(conc)
        round_p99 = [pct(r["latencies"], 99) for r in per_round]
        floor = [x for _ in range(args.rounds) for x in load(50, 1, floor=True)["latencies"]]

        # cp -r of the same model directory
        cps = []
        for i in range(3):
            dest = os.path.join(work, f"cp{i}")
            t0 = time.perf_counter()
            subprocess.run(["cp", "-r", src, dest], check=True)
            cps.append(time.perf_counter() - t0)
            shutil.rmtree(dest)
        cp_s = statistics.median(cps)

        lat1 = serial["latencies"]
        p50_1, p99_1 = pct(lat1, 50), pct(lat1, 99)
        p50_50, p99_50 = pct(conc, 50), pct(conc, 99)
        mb = size / 1e6
        rows = [
            ("model", f"{args.files} files, {args.size_mib} MiB, placement "
                      f"{_method(cache)}"),
            ("warm publish p50 / p99, 1 at a time",
             f"{p50_1 * 1e3:.1f} ms / {p99_1 * 1e3:.1f} ms ({len(lat1)} calls)"),
            ("warm publish p50 / p99, 50 concurrent",
             f"{p50_50 * 1e3:.1f} ms / {p99_50 * 1e3:.1f} ms ({len(conc)} calls, "
             f"{args.rounds} rounds; per-round p99 {min(round_p99) * 1e3:.0f}"
             f"-{max(round_p99) * 1e3:.0f} ms)"),
            ("plugin CPU per warm publish (all threads), 1 / 50 concurrent",
             f"{serial['server_cpu'] / len(lat1) * 1e3:.2f} ms / {conc_cpu * 1e3:.2f} ms"),
            ("NodeGetInfo p50 / p99, 50 concurrent (gRPC floor, same run)",
             f"{pct(floor, 50) * 1e3:.1f} ms / {pct(floor, 99) * 1e3:.1f} ms"),
            ("load average (1 min) at the end, 2 cores", f"{os.getloadavg()[0]:.1f}"),
            ("`cp -r` of the model (median of 3)", f"{cp_s * 1e3:.0f} ms"),
            ("cp -r / warm publish p50 (1 at a time)", f"{cp_s / p50_1:.0f}x"),
            ("disk used by 50 volumes of one model", f"{disk_delta / 1024:.0f} KiB"),
            ("cold publish (pull+verify+place+mount)",
             f"{cold:.2f} s = {mb / cold:.0f} MB/s"),
            ("oras-py `OrasClient.pull` of the same artifact",
             f"{oras_s:.2f} s = {mb / oras_s:.0f} MB/s"),
        ]
        del pack
    finally:
        if plugin is not None:
            plugin.stop()
        fx.unmount_everything_under(work)
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\n`{' '.join(['python3', '-m', 'bench.publish.run', *sys.argv[1:]])}`\n")
    print("| measure | value |")
    print("|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


def _method(cache: str) -> str:
    import json

    try:
        with open(os.path.join(cache, "inventory.json")) as f:
            return str(json.load(f)["models"][0]["method"])
    except (OSError, KeyError, IndexError, ValueError):
        return "?"


if __name__ == "__main__":
    main()
