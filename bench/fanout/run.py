"""bench/fanout: N node caches cold-start the same model at once, with and without a mirror.

Each node is a separate process with its own cache directory
(``modelpack.pull.pull_to_store``, the node cache's path). The DMCR is a
real docker-registry behind a counting proxy (its egress is what the proxy
sends); the mirror is a second registry in pull-through-cache mode: Debian's
docker-registry (distribution 2.8, as the DMCR) or, with ``--mirror v3``,
distribution v3 (hack/install.d/distribution.sh), which fetches a missed blob
from upstream once instead of twice. Reports DMCR egress bytes and p50/p99
time-to-pulled per run.

    python3 -m bench.fanout.run --nodes 8 --size 256Mi --files 4 [--mirror v3]

Rows: no mirror; a cold pull-through mirror, all nodes at once; the same mirror
again, warm; a fresh mirror warmed by one node before the others start.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time

from cli.local import registry as localregistry
from kube.flags import binary_size_arg
from modelpack.oci import mirrors
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_store
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.flakyproxy import FlakyProxy


def _node(host: str, ref: str, root: str, mirror: str | None, go: float,
          out: mp.Queue[float]) -> None:
    client = RegistryClient(host, insecure=True)
    if mirror:
        mirrors.load(flags=[f"{host}={mirror}"]).attach(client)
    time.sleep(max(0.0, go - time.time()))
    t0 = time.time()
    pull_to_store(client, parse(ref), BlobStore(root))
    out.put(time.time() - t0)


def _round(proxy: FlakyProxy, ref: str, nodes: int, mirror: str | None,
           work: str) -> dict[str, float]:
    times, egress = _times(proxy, ref, nodes, mirror, work)
    return _row(times, egress)


def _staged(proxy: FlakyProxy, ref: str, nodes: int, mirror: str, work: str) -> dict[str, float]:
    """One node pulls through a cold mirror first, then the other nodes at once.

    distribution's pull-through cache does not coalesce concurrent misses: a blob
    requested while its first fetch is still in flight is streamed from upstream again
    for each such request (registry/proxy/proxyblobstore.go), so a cold stampede costs
    the DMCR more than no mirror at all. Warming it with one node (a prefetch to one
    node, or ``modelcache pull`` on any host) is what bounds the DMCR's egress
    whatever the number of nodes: each blob once with distribution v3, twice with 2.8
    (which fetches a miss once to store it and once to stream it). Each node's time
    counts from the first node's start."""
    first, e1 = _times(proxy, ref, 1, mirror, os.path.join(work, "first"))
    rest, e2 = _times(proxy, ref, nodes - 1, mirror, os.path.join(work, "rest"))
    return _row(first + [first[0] + t for t in rest], e1 + e2)


def _row(times: list[float], egress: int) -> dict[str, float]:
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return {"egress": egress, "p50": statistics.median(times), "p99": p99}


def _times(proxy: FlakyProxy, ref: str, nodes: int, mirror: str | None,
           work: str) -> tuple[list[float], int]:
    before = proxy.bytes_sent
    q: mp.Queue[float] = mp.Queue()
    go = time.time() + 1.0
    procs = [mp.Process(target=_node, args=(proxy.host, ref, os.path.join(work, f"n{i}"),
                                            mirror, go, q)) for i in range(nodes)]
    for p in procs:
        p.start()
    times = sorted(q.get(timeout=600) for _ in procs)
    for p in procs:
        p.join()
    shutil.rmtree(work, ignore_errors=True)
    return times, proxy.bytes_sent - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8, help="node caches (processes)")
    ap.add_argument("--size", type=binary_size_arg, default=256 << 20, help="model size")
    ap.add_argument("--files", type=int, default=4, help="files in the model")
    ap.add_argument("--mirror", choices=("debian-2.8", "v3"), default="debian-2.8",
                    help="the pull-through mirror's build of distribution")
    args = ap.parse_args()
    build = localregistry.distribution_v3() if args.mirror == "v3" else None
    tmp = tempfile.mkdtemp(prefix="fanout-")
    try:
        src = os.path.join(tmp, "model")
        modelgen.make_big_model(src, files=args.files, total=args.size)
        with localregistry.running() as dmcr:
            proxy = FlakyProxy(dmcr.host)
            res = pack_to_registry(src, RegistryClient(dmcr.host, insecure=True),
                                   parse(f"{dmcr.host}/bench/fanout:v1"))
            ref = f"{proxy.host}/bench/fanout@{res.pack.digest}"
            rows = [("no mirror", _round(proxy, ref, args.nodes, None, os.path.join(tmp, "a")))]

            def mirror() -> contextlib.AbstractContextManager[localregistry.LocalRegistry]:
                return localregistry.running(proxy={"remoteurl": f"http://{proxy.host}"},
                                             binary=build)

            with mirror() as m:
                rows.append(("pull-through mirror, cold",
                             _round(proxy, ref, args.nodes, f"http://{m.host}",
                                    os.path.join(tmp, "b"))))
                rows.append(("pull-through mirror, warm",
                             _round(proxy, ref, args.nodes, f"http://{m.host}",
                                    os.path.join(tmp, "c"))))
            with mirror() as m:
                rows.append(("pull-through mirror, cold, one node first",
                             _staged(proxy, ref, args.nodes, f"http://{m.host}",
                                     os.path.join(tmp, "d"))))
            proxy.close()
        size = res.pack.size
        print(f"{args.nodes} nodes, model {size} bytes in {args.files} files, "
              f"mirror: distribution {args.mirror}\n")
        print("| run | DMCR egress | × model | p50 s | p99 s |\n|---|---|---|---|---|")
        for name, r in rows:
            print(f"| {name} | {r['egress']} | {r['egress'] / size:.2f} | {r['p50']:.2f} "
                  f"| {r['p99']:.2f} |")
        print(f"\n`python3 -m bench.fanout.run --nodes {args.nodes} --size {args.size} "
              f"--files {args.files} --mirror {args.mirror}`")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
