"""bench/catalog: a catalog import from cluster A into B's registry, against skopeo.

Cluster A: a real etcd + kube-apiserver (cli/local/cluster.py, CRDs from
crds/, the controller RBAC of daemonset/controller-rbac.yaml) and a real
docker-registry; a generated ~256 MiB, 4-shard model is published into it
with the publish worker and its ClusterModel written Ready, as A's manager
would (no manager runs: stated shortcut), beside 50 more Ready
ClusterModels so the listing has a realistic length. A's catalog API runs
in its own process (``bench.catalog.serve``: TLS, TokenReview + SAR with a
10 s decision cache, rate limit, read-only proxy to A's registry). B is a
second docker-registry (B's API server is not on the data path of an
import, so none runs). The importer's token is a real ServiceAccount token
of A bound to ``modelcache:catalog:reader``.

Per run, each from an empty registry B, order rotated, each its own process:

- ours: ``modelcache-controller publish --source catalog+https://A#MODEL@DIGEST``,
  the publish Job's entry (``ingest/publish/catalog_import.py``: every blob
  streamed from the catalog into B's upload, hashed in the same pass, the
  upload committed only when the digest and the safetensors header check
  pass; manifest last);
- ``skopeo copy docker://A/… docker://B/…`` straight between the two
  registries (no TLS, no token, no proxy: the cheapest possible copy);
- ``skopeo copy`` of the same model through A's catalog (same TLS, token
  and proxy as ours): separates what the catalog server costs from what
  our client costs.

Limits from the same run: curl of every blob all at once to /dev/null from
A's registry and through the catalog, curl PUT of every blob into B,
sha256 on one core, dd + fsync. Then ``GET /catalog/v1/models`` latency:
200 calls on one keep-alive connection, paced at 40/s (under the 50/s
limit), the token's decision cached; and the first call of 5 fresh tokens
(TokenReview + SubjectAccessReview on the API server).

    python3 -m bench.catalog.run [--size-mib 256] [--files 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import requests

from bench import common
from bench.bundle.run import curl_put_blobs, dd_rate
from bench.publish.run import pct
from cli.local import cluster as localcluster
from cli.local import registry as localregistry
from ingest.sources.catalog import LIST_PATH, build_uri
from kube import client as k
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pull import resolve
from tests.integration.test_catalog_api import (
    SYSTEM_NS,
    apply_controller_rbac,
    bind_reader,
    publish_ready,
    sa_token,
)
from tests.integration.test_controller import ensure_namespace
from tests.integration.test_crds import install_crds

NAME = "bench-catalog"
FILLER = 50


def filler(client: k.Kube, n: int) -> None:
    """``n`` Ready ClusterModels (status only, as a manager writes it) for the listing."""
    for i in range(n):
        name = f"filler-{i:03d}"
        client.create(k.CLUSTER_MODELS, {
            "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
            "metadata": {"name": name},
            "spec": {"source": {"http": {"url": f"https://models.example/{name}.tar"}}}})
        client.patch(k.CLUSTER_MODELS, name, {"status": {
            "phase": "Ready",
            "artifact": {"digest": "sha256:" + f"{i:064x}", "sizeBytes": 1 << 30},
            "resolved": {"format": "Safetensors", "family": "llama", "parameterCount": 8 << 30},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Published",
                            "message": "ready", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}},
            sub="status")


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=localcluster.REPO_ROOT, capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} … failed ({r.returncode}):\n"
                         f"{(r.stdout + r.stderr)[-3000:]}")
    return time.perf_counter() - t0


def curl_all(urls: list[str], extra: list[str]) -> float:
    """Seconds for curl to fetch every URL to /dev/null, all at once."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["curl", "-sfL", "-o", "/dev/null", *extra, u]) for u in urls]
    if any(p.wait() for p in procs):
        raise SystemExit("curl failed")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--lists", type=int, default=200, help="listing calls (cached decision)")
    args = ap.parse_args()
    src = common.model_dir(args.size_mib << 20, args.files, seed=51)
    work = tempfile.mkdtemp(prefix="modelcache-bench-catalog-", dir="/var/tmp")
    load0 = os.getloadavg()[0]
    serve: subprocess.Popen[str] | None = None
    try:
        with localcluster.running() as a, localregistry.running() as ra, \
                localregistry.running() as rb:
            install_crds(a)
            client = k.Kube.from_config(a.kubeconfig)
            ensure_namespace(client, SYSTEM_NS)
            apply_controller_rbac(a)
            ctrl_kc = a.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
            ensure_namespace(client, "importers")
            bind_reader(client, "bench-importers", "importer", "importers")
            token = sa_token(a, "importer", "importers")
            digest = publish_ready(client, ra, NAME, src)["artifact"]["digest"]
            pack = resolve(RegistryClient(ra.host, insecure=True),
                           parse(f"{ra.host}/cluster/{NAME}@{digest}"))
            size = pack.size
            filler(client, FILLER)

            serve = subprocess.Popen([sys.executable, "-m", "bench.catalog.serve", "--kubeconfig",
                                      ctrl_kc, "--registry", ra.host],
                                     cwd=localcluster.REPO_ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            assert serve.stdout is not None
            hello = json.loads(serve.stdout.readline())
            url, ca_pem = hello["url"], hello["ca"]
            certs = os.path.join(work, "certs")  # skopeo's --src-cert-dir wants ca.crt
            os.makedirs(certs)
            ca_path = os.path.join(certs, "ca.crt")
            with open(ca_path, "w") as f:
                f.write(ca_pem)
            # verify per request: a session's loses to $REQUESTS_CA_BUNDLE (requests' merge order)
            session = requests.Session()
            session.headers["Authorization"] = f"Bearer {token}"

            def listing() -> list[str]:
                r = session.get(url + LIST_PATH, timeout=10, verify=ca_path)
                r.raise_for_status()
                return [m["name"] for m in r.json()["models"]]
            deadline = time.monotonic() + 30
            while NAME not in listing() or len(listing()) < FILLER + 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the catalog does not list the models")
                time.sleep(0.1)

            def empty_b() -> None:
                shutil.rmtree(rb.storage, ignore_errors=True)

            ours_env = {"MODELCACHE_CATALOG_TOKEN": token, "MODELCACHE_CATALOG_CA": ca_pem}
            contenders = {
                "modelcache-controller publish --source catalog+… (via A's catalog)":
                    [sys.executable, "-m", "controller.main", "publish",
                     "--source", build_uri(url, NAME, digest), "--to",
                     f"{rb.host}/cluster/{NAME}:imported", "--insecure-registry",
                     "--work-dir", os.path.join(work, "import"), "--progress-file", os.devnull],
                "skopeo copy docker://A docker://B (registry to registry)":
                    ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                     f"docker://{ra.host}/cluster/{NAME}@{digest}",
                     f"docker://{rb.host}/bench/skopeo:v1"],
                "skopeo copy via A's catalog (same TLS, token, proxy)":
                    ["skopeo", "copy", "--src-cert-dir", certs, "--src-registry-token", token,
                     "--dest-tls-verify=false",
                     f"docker://{url.removeprefix('https://')}/{NAME}@{digest}",
                     f"docker://{rb.host}/bench/skopeo-catalog:v1"],
            }
            blob_paths = [f"/v2/{NAME}/blobs/{x.digest}" for x in pack.layers]
            curl_reg = common.median([curl_all([f"http://{ra.host}/v2/cluster/{NAME}/blobs/"
                                                f"{x.digest}" for x in pack.layers], [])
                                      for _ in range(args.runs)])  # also warms A's blobs
            times: dict[str, list[float]] = {n: [] for n in contenders}
            names = list(contenders)
            for r in range(args.runs):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    empty_b()
                    times[name].append(timed(contenders[name], ours_env))
            empty_b()

            # machine limits, same run
            curl_cat = common.median([curl_all([url + p for p in blob_paths], [
                "--cacert", ca_path, "-H", f"Authorization: Bearer {token}"])
                for _ in range(args.runs)])
            files = {os.path.join(src, x.path): x.digest for x in pack.layers}
            put = []
            for _ in range(args.runs):
                empty_b()
                put.append(curl_put_blobs(rb.host, "bench/put", files))
            put_s = common.median(put)
            sha1 = common.sha256_rate()
            dd_buf = dd_rate(os.path.join(work, "dd"), size, direct=False)

            # listing latency: cached decision, then fresh tokens
            listing()
            lat = []
            t_next = time.perf_counter()
            for _ in range(args.lists):
                t_next += 1 / 40
                time.sleep(max(0.0, t_next - time.perf_counter()))
                t0 = time.perf_counter()
                got = listing()
                lat.append(time.perf_counter() - t0)
                assert len(got) == FILLER + 1
            body_bytes = len(session.get(url + LIST_PATH, timeout=10, verify=ca_path).content)
            cold = []
            for _ in range(5):
                sa = f"reader-{uuid.uuid4().hex[:6]}"
                bind_reader(client, f"bench-{sa}", sa, "importers")
                fresh = requests.Session()
                fresh.headers["Authorization"] = f"Bearer {sa_token(a, sa, 'importers')}"
                fresh.get(url + "/healthz", timeout=10, verify=ca_path)  # TLS handshake first
                t0 = time.perf_counter()
                fresh.get(url + LIST_PATH, timeout=10, verify=ca_path).raise_for_status()
                cold.append(time.perf_counter() - t0)
            client.close()
            serve.stdin.close()  # type: ignore[union-attr]
            serve.wait(30)
    finally:
        if serve is not None and serve.poll() is None:
            serve.kill()
        shutil.rmtree(work, ignore_errors=True)

    med = {n: common.median(ts) for n, ts in times.items()}
    ours = med[names[0]]
    mib = size / (1 << 20)
    print(f"\n`{' '.join(['python3', '-m', 'bench.catalog.run', *sys.argv[1:]])}`\n")
    print(f"Run: {mib:.0f} MiB in {len(pack.layers)} files, median of {args.runs} runs, "
          f"{os.cpu_count()} cores, each into an empty registry B\n")
    print("| contender | median s | runs s | MiB/s | ours ×faster |")
    print("|---|---:|---|---:|---:|")
    for n, t in med.items():
        print(f"| {n} | {t:.2f} | {', '.join(f'{x:.2f}' for x in times[n])} | {mib / t:.0f} | "
              f"{t / ours:.2f}× |")
    print("\n| machine limit / latency (same run) | value |")
    print("|---|---:|")
    print(f"| curl every blob from A's registry → /dev/null, all at once | "
          f"{mib / curl_reg:.0f} MiB/s |")
    print(f"| curl every blob through A's catalog (TLS, token) → /dev/null, all at once | "
          f"{mib / curl_cat:.0f} MiB/s |")
    print(f"| curl PUT every blob into B, all at once (registry ingest) | "
          f"{mib / put_s:.0f} MiB/s |")
    print(f"| sha256, one core | {sha1 / (1 << 20):.0f} MiB/s |")
    print(f"| dd 4 MiB blocks + fsync, buffered | {dd_buf / (1 << 20):.0f} MiB/s |")
    print(f"| catalog list p50 / p99, decision cached ({len(lat)} calls at 40/s, "
          f"{FILLER + 1} models, {body_bytes} bytes) | {pct(lat, 50) * 1e3:.1f} / "
          f"{pct(lat, 99) * 1e3:.1f} ms |")
    print(f"| catalog list, first call of a fresh token (TokenReview + SAR), median of 5 | "
          f"{pct(cold, 50) * 1e3:.1f} ms |")
    print(f"| load average at start / end | {load0:.2f} / {os.getloadavg()[0]:.2f} |")


if __name__ == "__main__":
    main()
