"""Controller scale bench: 1,000 Models → 1,000 publish Jobs against a real API server.

No kubelet runs the Jobs (none is needed to measure the control plane):
the bench creates N Models, watches Jobs in the controller's namespace on
its own connection, and takes each Model's latency as (the bench seeing its
Job) − (the bench starting its create call), both on the bench's monotonic
clock. The manager runs as its own process (``modelcache-controller
manager``); its peak RSS is ``VmHWM`` from /proc. Also checked: every Model
reached Publishing and no Model got a second Job.

Two arrival patterns, to tell queueing from service time:

* burst (default): 4 client threads create as fast as the API server
  admits; when that exceeds what the manager can drain, the tail is
  queueing behind the burst;
* paced (``--rate R``): create *i* starts at ``i / R`` seconds (steady
  arrivals; 8 client threads so a slow answer does not delay the next
  start); below the drain rate, latency is the manager's service time.

One warm-up Model (its own namespace, not counted) goes first: a fresh API
server's first create of each kind is slow for reasons of its own.

    python3 -m bench.controller.run [--models 1000] [--rate 25]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import threading
import time
import urllib.request

from kube import client as k
from tests import kubeenv
from tests.integration.test_controller import SYSTEM_NS, ensure_namespace, install_crds

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--rate", type=float, default=0.0,
                    help="paced arrivals: creates per second (0: a burst, as fast as admitted)")
    args = ap.parse_args()
    n = args.models
    with kubeenv.running() as env:
        install_crds(env)
        client = k.Kube.from_config(env.kubeconfig, pool_size=16)
        ensure_namespace(client, SYSTEM_NS)
        ns = "bench"
        ensure_namespace(client, ns)
        port = kubeenv.free_port()
        log_path = os.path.join(env.dir, "manager.log")
        with open(log_path, "wb") as log:
            mgr = subprocess.Popen([
                sys.executable, "-m", "controller.main", "manager", "--kubeconfig",
                env.kubeconfig, "--namespace", SYSTEM_NS, "--registry", "127.0.0.1:5000",
                "--registry-insecure", "--listen", f"127.0.0.1:{port}",
                "--workers", str(args.workers), "--log-level", "WARNING"],
                cwd=REPO_ROOT, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).read()
                    break
                except OSError:
                    if time.monotonic() > deadline or mgr.poll() is not None:
                        raise RuntimeError(open(log_path).read()[-3000:]) from None
                    time.sleep(0.1)
            # warm-up, not counted: the API server's first Model create and first Job
            # create (cold caches, CEL programs) take ~2 s here, a cost of a fresh
            # server that would otherwise land on the first few measured Models
            ensure_namespace(client, "bench-warmup")
            client.create(k.MODELS, {
                "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                "metadata": {"name": "warmup", "namespace": "bench-warmup"},
                "spec": {"source": {"huggingFace": {"repo": "bench/warmup"}}}}, "bench-warmup")
            deadline = time.monotonic() + 30
            while not client.list(k.JOBS, SYSTEM_NS)[0]:
                if time.monotonic() > deadline:
                    raise RuntimeError("no warm-up Job: " + open(log_path).read()[-3000:])
                time.sleep(0.1)
            idle_rss = _hwm_kib(mgr.pid)

            seen: dict[str, float] = {}
            jobs_per_model: dict[str, int] = {}
            done = threading.Event()

            def watch() -> None:
                _, rv = client.list(k.JOBS, SYSTEM_NS)
                while not done.is_set():
                    for ev in client.watch(k.JOBS, rv, SYSTEM_NS, timeout_seconds=30):
                        obj = ev["object"]
                        rv = obj["metadata"].get("resourceVersion", rv)
                        if ev["type"] != "ADDED":
                            continue
                        name = (obj["metadata"].get("labels") or {}).get("modelcache.io/name")
                        if name:
                            seen.setdefault(name, time.monotonic())
                            jobs_per_model[name] = jobs_per_model.get(name, 0) + 1
                        if len(seen) >= n:
                            done.set()
                            return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            time.sleep(0.5)
            started: dict[str, float] = {}

            t0 = time.monotonic() + 0.1
            late: list[float] = []

            def create(i: int) -> None:
                name = f"m-{i:04d}"
                if args.rate > 0:
                    wait = t0 + i / args.rate - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    else:
                        late.append(-wait)  # the client, not the manager, fell behind
                started[name] = time.monotonic()
                client.create(k.MODELS, {
                    "apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"source": {"huggingFace": {"repo": f"bench/model-{i}"}}}}, ns)

            with cf.ThreadPoolExecutor(8 if args.rate > 0 else 4) as pool:
                list(pool.map(create, range(n)))
            created = time.monotonic() - t0
            done.wait(300)
            all_jobs = time.monotonic() - t0
            rss = _hwm_kib(mgr.pid)
            lat = sorted(seen[m] - started[m] for m in seen if m in started)
            # every Model reconciled to Publishing (status written) within a further minute
            deadline = time.monotonic() + 60
            publishing = 0
            while time.monotonic() < deadline:
                items, _ = client.list(k.MODELS, ns)
                publishing = sum(1 for m in items
                                 if (m.get("status") or {}).get("phase") == "Publishing")
                if publishing >= n:
                    break
                time.sleep(1)
            time.sleep(2)
            dupes = sum(1 for c in jobs_per_model.values() if c > 1)

            def pct(p: float) -> float:
                return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")

            if args.rate > 0:
                behind = max(late) if late else 0.0
                print(f"| arrivals | paced, {args.rate:g} creates/s ({len(late)} of {n} "
                      f"started late, at most {behind * 1000:.0f} ms) |")
            else:
                print("| arrivals | burst, 4 client threads as fast as admitted |")
            print(f"| models | {n} (created in {created:.1f} s, "
                  f"{n / created:.1f}/s) |")
            print(f"| Jobs seen | {len(seen)} of {n}; all within {all_jobs:.1f} s of the first create |")
            print(f"| create→Job p50 / p99 / max | {pct(0.5) * 1000:.0f} ms / {pct(0.99) * 1000:.0f} ms / {lat[-1] * 1000:.0f} ms |" if lat else "| no latencies |")
            slow = sorted(((seen[m] - started[m], m) for m in seen if m in started),
                          reverse=True)[:5]
            print("slowest: " + ", ".join(f"{m} {d * 1000:.0f} ms" for d, m in slow),
                  file=sys.stderr)
            print(f"| Models in Publishing | {publishing} of {n} |")
            print(f"| Models with more than one Job | {dupes} |")
            print(f"| manager peak RSS (VmHWM) | {rss / 1024:.0f} MiB (idle before the burst: {idle_rss / 1024:.0f} MiB) |")
            print(f"| manager workers | {args.workers} |")
        finally:
            mgr.terminate()
            mgr.wait(15)
            client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
