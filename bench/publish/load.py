"""The publish benchmark's load generator: one process, one grpc.aio event loop.

``bench.publish.run`` starts this as its own process so that the client is
light and measured apart from the plugin: N concurrent calls are N
coroutines on one channel (not N Python threads fighting over the GIL on a
2-core machine), and each call's latency runs from that call's own start.
Per round it creates fresh target parents (as kubelet would), publishes
``--concurrency`` volumes at once, then unpublishes them (not timed).

It also reads the plugin's CPU time (all threads, from /proc/<pid>/stat)
around the timed publishes, so CPU per call is reported beside wall time,
which other load on the machine distorts.

With ``--floor`` it sends NodeGetInfo instead (no work on the server beyond
gRPC itself): the latency floor of the same channel on the same machine at
that moment, to read the publish figures against.

Prints one JSON object: ``{"latencies": [...s], "server_cpu": s, "calls": n}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

import grpc

from csi.stubs import pb, rpc
from tests import csi_fixtures as fx


def process_cpu(pid: int) -> float:
    """User+system CPU seconds of every thread of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(args: argparse.Namespace) -> dict[str, object]:
    latencies: list[float] = []
    server_cpu = 0.0
    n = 0
    async with grpc.aio.insecure_channel(f"unix://{args.socket}") as channel:
        node = rpc.NodeStub(channel)
        await rpc.IdentityStub(channel).Probe(pb.ProbeRequest(), timeout=10)  # connect first

        # requests are built before the burst: the client's own work stays out of it
        async def publish(request: Any) -> float:
            t0 = time.perf_counter()
            await node.NodePublishVolume(request, timeout=600)
            return time.perf_counter() - t0

        async def floor(request: Any) -> float:
            t0 = time.perf_counter()
            await node.NodeGetInfo(request, timeout=60)
            return time.perf_counter() - t0

        call = floor if args.floor else publish

        for _ in range(args.rounds):
            targets = []
            for _ in range(args.concurrency):
                n += 1
                parent = os.path.join(args.pods_dir, f"load{os.getpid()}-{n}")
                if not args.floor:
                    os.makedirs(parent)
                targets.append(os.path.join(parent, "mount"))
            requests = [pb.NodeGetInfoRequest() if args.floor else fx.publish_request(
                t, t, model=args.model, namespace=args.namespace) for t in targets]
            cpu0 = process_cpu(args.server_pid) if args.server_pid else 0.0
            latencies += await asyncio.gather(*(call(r) for r in requests))
            if args.server_pid:
                server_cpu += process_cpu(args.server_pid) - cpu0
            if args.floor:
                continue
            await asyncio.gather(*(node.NodeUnpublishVolume(fx.unpublish_request(t, t),
                                                            timeout=60) for t in targets))
            for t in targets:
                os.rmdir(os.path.dirname(t))
    return {"latencies": latencies, "server_cpu": server_cpu, "calls": len(latencies)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="the plugin's unix socket path")
    ap.add_argument("--pods-dir", required=True, help="where target parents are created")
    ap.add_argument("--model", required=True)
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--concurrency", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--server-pid", type=int, default=0, help="measure this process's CPU")
    ap.add_argument("--floor", action="store_true",
                    help="send NodeGetInfo instead of publishing: gRPC's own latency floor")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
