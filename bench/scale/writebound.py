"""Benchmark: how many gate lifts per second the API server and etcd can write, by cores.

``bench/scale/run.py`` shows that a burst of lifts (10,000 pods whose Models
turn Ready within seconds) is bound by the API server, not the lifter: a pod's
gate can only be removed by a write to that pod. This bench measures that
bound alone and how it grows with the cores the API server and etcd get:

1. the real kube-apiserver + etcd (``cli.local.cluster``), nothing else;
2. N pods created gated (``names.GATE``) and labelled ``names.LABEL_GATED``,
   as the webhook leaves them;
3. lifted in blocks, W in flight, each with the lifter's own request
   (``controller.delivery.gates``): one conditional JSON patch that tests
   the resourceVersion, removes the gate, sets the label to "false" and, with
   ``--affinity``, adds the preferred node-affinity term for a cached digest;
4. per block: lifts per second and the CPU-seconds the API server, etcd and
   this client spent per lift (from /proc, every thread).

``--cpus`` pins the API server and etcd (every thread) to those CPUs and this
client to the rest, so a run with ``--cpus 0`` against one with ``--cpus 0,1``
(the client then shares both) shows how the rate scales with the control
plane's cores. Needs the kube tools (``hack/install.d/kube.sh``); no root.

    python3 -m bench.scale.writebound [--pods 4000] [--block 500] [--inflight 16]
                                      [--cpus 0] [--affinity] [--admin]
                                      [--profile FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import os
import shutil
import ssl
import statistics
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api import names
from bench.scale import run as scale
from cli.local import cluster as localcluster
from controller.delivery import gates
from kube import client as k


@dataclass
class Block:
    lifts: int
    seconds: float
    apiserver_cpu: float
    etcd_cpu: float
    client_cpu: float

    @property
    def rate(self) -> float:
        return self.lifts / self.seconds

    def per_lift_ms(self, cpu: float) -> float:
        return 1000 * cpu / self.lifts


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (a Go program's threads do not inherit later)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), cpus)


def gated_pod(i: int) -> dict[str, Any]:
    pod = scale._pod(i, "m")
    pod["metadata"]["labels"] = {names.LABEL_GATED: "true"}
    pod["spec"]["schedulingGates"] = [{"name": names.GATE}]
    return pod


CACHED = names.node_label("sha256:" + "ab" * 32)  # --affinity: a digest some node caches


def lift_patch(pod: dict[str, Any], affinity: bool) -> list[dict[str, Any]]:
    """The lifter's request for a pod that waits on our gate only (GateLifter.lift)."""
    return gates.conditional(pod, gates.lift_ops(pod) + (
        gates.affinity_ops(pod, [CACHED]) if affinity else []))


def lift_block(client: k.Kube, pods: list[dict[str, Any]], inflight: int, affinity: bool,
               env: localcluster.LocalCluster) -> Block:
    def lift(pod: dict[str, Any]) -> None:
        got = client.patch(k.PODS, pod["metadata"]["name"], lift_patch(pod, affinity), scale.NS,
                           content_type=k.JSON_PATCH)
        if got["spec"].get("schedulingGates") or \
                got["metadata"]["labels"].get(names.LABEL_GATED) != "false":
            raise RuntimeError(f"pod {pod['metadata']['name']} not lifted: {got['spec']}")

    a0, e0 = scale.proc_cpu(env.apiserver.pid), scale.proc_cpu(env.etcd.pid)
    c0, t0 = time.process_time(), time.perf_counter()
    with cf.ThreadPoolExecutor(inflight) as pool:
        list(pool.map(lift, pods))
    seconds = time.perf_counter() - t0
    return Block(len(pods), seconds, scale.proc_cpu(env.apiserver.pid) - a0,
                 scale.proc_cpu(env.etcd.pid) - e0, time.process_time() - c0)


def run(pods: int, block: int, inflight: int, cpus: set[int] | None, affinity: bool,
        admin: bool = False, profile: str = "", say: Any = print) -> list[Block]:
    env = localcluster.start()
    setup = k.Kube.from_config(env.kubeconfig, pool_size=inflight + 4)
    client = setup
    try:
        if not admin:
            client = k.Kube.from_config(manager_kubeconfig(env, setup), pool_size=inflight + 4)
        if cpus:
            rest = set(range(os.cpu_count() or 1)) - cpus or cpus
            os.sched_setaffinity(0, rest)
            say(f"API server and etcd on CPUs {sorted(cpus)}, this client on {sorted(rest)}")
        setup.create(scale.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                        "metadata": {"name": scale.NS}})
        setup.create(scale.SERVICE_ACCOUNTS, {"apiVersion": "v1", "kind": "ServiceAccount",
                                              "metadata": {"name": "default"}}, scale.NS)

        def gated(first: int, n: int) -> list[dict[str, Any]]:
            with cf.ThreadPoolExecutor(inflight) as pool:
                made = list(pool.map(lambda i: setup.create(k.PODS, gated_pod(i), scale.NS),
                                     range(first, first + n)))
            if cpus:  # every thread the servers have by now
                pin(env.apiserver.pid, cpus)
                pin(env.etcd.pid, cpus)
            return made

        blocks: list[Block] = []
        for first in range(0, pods, block):
            b = lift_block(client, gated(first, min(block, pods - first)), inflight, affinity,
                           env)
            say(f"block {len(blocks) + 1}: {b.lifts} lifts in {b.seconds:.2f} s = "
                f"{b.rate:.0f}/s; CPU ms per lift: API server {b.per_lift_ms(b.apiserver_cpu):.2f}"
                f", etcd {b.per_lift_ms(b.etcd_cpu):.2f}, client {b.per_lift_ms(b.client_cpu):.2f}")
            blocks.append(b)
        if profile:
            made = gated(pods, PROFILE_LIFTS)
            profiled(env, lambda: lift_block(client, made, inflight, affinity, env), profile)
            say(f"API server CPU profile of {PROFILE_LIFTS} lifts: {profile} "
                f"(go tool pprof -top -cum {profile})")
        return blocks
    finally:
        if client is not setup:
            client.close()
        setup.close()
        env.stop()
        shutil.rmtree(env.dir, ignore_errors=True)


PROFILE_LIFTS = 3000  # ~4 s of lifts: the profile takes the middle PROFILE_SECONDS
PROFILE_SECONDS = 3


def profiled(env: localcluster.LocalCluster, work: Callable[[], Any], path: str) -> None:
    """Run ``work`` while the API server's /debug/pprof takes a CPU profile into ``path``."""
    tls = ssl.create_default_context(cafile=env.pki.ca)
    tls.load_cert_chain(env.pki.path("admin.crt"), env.pki.path("admin.key"))
    url = f"{env.server}/debug/pprof/profile?seconds={PROFILE_SECONDS}"
    with cf.ThreadPoolExecutor(1) as pool:
        taken = pool.submit(lambda: urllib.request.urlopen(url, context=tls, timeout=60).read())
        work()
        data = taken.result()
    with open(path, "wb") as f:
        f.write(data)


def manager_kubeconfig(env: localcluster.LocalCluster, setup: k.Kube) -> str:
    """The manager's ServiceAccount token, holding what its RBAC grants (as deployed)."""
    setup.create(scale.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": scale.SYSTEM_NS}})
    env.kubectl("apply", "-f", os.path.join(scale.REPO_ROOT, "daemonset", "controller-rbac.yaml"))
    return env.serviceaccount_kubeconfig(scale.MANAGER_SA, scale.SYSTEM_NS)


def summary(blocks: list[Block], cpus: set[int] | None) -> str:
    rates = [b.rate for b in blocks]
    server = [b.per_lift_ms(b.apiserver_cpu + b.etcd_cpu) for b in blocks]
    cores = len(cpus) if cpus else os.cpu_count() or 1
    med = statistics.median(server)
    return (f"control plane on {cores} core(s): {min(rates):.0f}–{max(rates):.0f} lifts/s "
            f"(median {statistics.median(rates):.0f}); API server + etcd {min(server):.2f}–"
            f"{max(server):.2f} CPU-ms per lift (median {med:.2f}): a burst of 10,000 lifts "
            f"is ≥ {10_000 * med / 1000 / cores:.1f} s on {cores} core(s), and a p99 ≤ 2 s "
            f"for it needs ≥ {10_000 * med / 1000 / 2:.0f} cores")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--pods", type=int, default=4000, help="pods in all (default 4000)")
    ap.add_argument("--block", type=int, default=500, help="lifts per timed block (default 500)")
    ap.add_argument("--inflight", type=int, default=16,
                    help="lifts in flight, as the lifter's --gate-workers (default 16)")
    ap.add_argument("--cpus", default="",
                    help="pin the API server and etcd to these CPUs, e.g. 0 (default: unpinned)")
    ap.add_argument("--affinity", action="store_true",
                    help="add the preferred node-affinity term, as when a node caches the model")
    ap.add_argument("--admin", action="store_true",
                    help="lift with the admin's client certificate instead of the manager's "
                         "ServiceAccount token")
    ap.add_argument("--profile", metavar="FILE", default="",
                    help=f"also take the API server's CPU profile over {PROFILE_LIFTS} more lifts")
    a = ap.parse_args()
    cpus = {int(c) for c in a.cpus.split(",") if c} or None
    blocks = run(a.pods, a.block, a.inflight, cpus, a.affinity, a.admin, a.profile)
    print(summary(blocks, cpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
