"""bench/bundle: air-gap export and import of a generated ModelPack, against skopeo.

Two clusters on this machine, each a real etcd + kube-apiserver
(``cli/local/cluster.py``, as tests/kubeenv.py runs it; the project's CRDs
applied from ``crds/``) and a real docker-registry (``cli/local/registry.py``).
In cluster A the model is pushed with ``pack_to_registry`` and its
ClusterModel's status is written Ready, as A's manager would after a
publish (no manager runs: stated shortcut). Per run, every contender as its
own process, times include process start-up:

- export: ``modelcache export`` (the real CLI: reads the CR, pulls every
  blob by digest, verified, writes the tar, fsync) against ``skopeo copy
  docker://A/…@digest oci-archive:…`` (verifies digests, no fsync: timed
  until ``sync`` returns, so both have their bytes on disk);
- import: ``modelcache import`` (verifies the whole tar, dry-run apply,
  pushes every blob, manifest last, applies the CR in B) against ``skopeo
  copy oci-archive:… docker://B/…``. Each import starts from an empty
  registry B (its storage removed) and reads its archive cold (evicted from
  the page cache), as from removable media.

The machine's limits come from the same run: curl of every blob from A to
/dev/null (all at once), sha256 on one core, ``dd`` with fsync (buffered
and O_DIRECT) and a plain ``cp`` of the bundle, cold, plus ``sync``.

    python3 -m bench.bundle.run [--size-mib 512] [--files 4] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from bench import common
from cli.local import cluster as localcluster
from cli.local import registry as localregistry
from kube import client as k
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests.integration.test_crds import install_crds

NAME = "bench-bundle"
REPO = f"cluster/{NAME}"  # the controller's repository for a ClusterModel (model.repository)


def evict(path: str) -> None:
    """Drop ``path`` from the page cache (written back first): the next read is cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(argv: list[str], durable: bool = False) -> float:
    """Wall seconds of one command (and of ``sync`` after it when ``durable``)."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, cwd=localcluster.REPO_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])} … failed ({r.returncode}):\n{r.stderr[-3000:]}")
    if durable:
        subprocess.run(["sync"], check=True)
    return time.perf_counter() - t0


def dd_rate(path: str, size: int, direct: bool) -> float:
    """``dd`` of ``size`` bytes (4 MiB blocks) with fsync at the end: bytes/s."""
    flags = ["oflag=direct"] if direct else []
    secs = run(["dd", "if=/dev/zero", f"of={path}", "bs=4M", f"count={size >> 22}",
                "conv=fsync", *flags])
    os.unlink(path)
    return size / secs


def curl_put_blobs(host: str, repo: str, files: dict[str, str]) -> float:
    """Seconds for curl to upload every file (path -> digest) as a blob, all at once.

    One POST each for an upload URL, then one monolithic PUT each, in
    parallel: the registry's own ingest limit (it re-reads and hashes what it
    received before it links the blob), with no client work in the way.
    """
    t0 = time.perf_counter()
    urls = []
    for path, digest in files.items():
        head = subprocess.run(["curl", "-sfi", "-X", "POST",
                               f"http://{host}/v2/{repo}/blobs/uploads/"],
                              check=True, capture_output=True, text=True).stdout
        loc = next(line.split(":", 1)[1].strip() for line in head.splitlines()
                   if line.lower().startswith("location:"))
        urls.append((path, f"{loc}{'&' if '?' in loc else '?'}digest={digest}"))
    procs = [subprocess.Popen(["curl", "-sf", "-o", "/dev/null", "-H",
                               "Content-Type: application/octet-stream", "-T", path, url])
             for path, url in urls]
    if any(p.wait() for p in procs):
        raise SystemExit("curl upload failed")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    src = common.model_dir(args.size_mib << 20, args.files, seed=41)
    work = tempfile.mkdtemp(prefix="modelcache-bench-bundle-", dir="/var/tmp")
    py = [sys.executable, "-m", "cli.main"]
    load0 = os.getloadavg()[0]
    try:
        with localcluster.running() as a, localcluster.running() as b, \
                localregistry.running() as ra, localregistry.running() as rb:
            install_crds(a)
            install_crds(b)
            res = pack_to_registry(src, RegistryClient(ra.host, insecure=True),
                                   parse(f"{ra.host}/{REPO}:gen-1"))
            size, digest = res.pack.size, res.pack.digest
            ka, kb = k.Kube.from_config(a.kubeconfig), k.Kube.from_config(b.kubeconfig)
            ka.create(k.CLUSTER_MODELS, {
                "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
                "metadata": {"name": NAME},
                "spec": {"source": {"huggingFace": {"repo": "acme/bench-bundle"}}}})
            ka.patch(k.CLUSTER_MODELS, NAME, {"status": {"phase": "Ready", "artifact": {
                "digest": digest, "sizeBytes": size, "reference": res.reference}}},
                sub="status")

            ours_tar = os.path.join(work, "ours.tar")
            theirs_tar = os.path.join(work, "skopeo.tar")
            def empty_b() -> None:
                try:
                    kb.delete(k.CLUSTER_MODELS, NAME)
                except k.NotFound:
                    pass
                shutil.rmtree(rb.storage, ignore_errors=True)

            def ours_export() -> float:
                if os.path.exists(ours_tar):
                    os.unlink(ours_tar)
                return run([*py, "export", NAME, "-o", ours_tar, "--kubeconfig", a.kubeconfig,
                            "--registry", ra.host, "--insecure", "--no-progress"])

            def ours_import() -> float:
                empty_b()
                evict(ours_tar)
                return run([*py, "import", ours_tar, "--kubeconfig", b.kubeconfig,
                            "--registry", rb.host, "--insecure", "--no-progress"])

            def skopeo_export() -> float:
                if os.path.exists(theirs_tar):
                    os.unlink(theirs_tar)
                return run(["skopeo", "copy", "--src-tls-verify=false",
                            f"docker://{ra.host}/{REPO}@{digest}", f"oci-archive:{theirs_tar}"],
                           durable=True)

            def skopeo_import() -> float:
                empty_b()
                evict(theirs_tar)
                return run(["skopeo", "copy", "--dest-tls-verify=false",
                            f"oci-archive:{theirs_tar}", f"docker://{rb.host}/{REPO}:bench"])

            contenders: dict[str, Callable[[], float]] = {"export: modelcache export": ours_export,
                          "export: skopeo copy → oci-archive (+sync)": skopeo_export,
                          "import: modelcache import": ours_import,
                          "import: skopeo copy oci-archive → registry": skopeo_import}
            # the registry's blobs are read once first, so every export reads them warm
            digests = [x.digest for x in res.pack.layers]
            curl = common.median([common.curl_blobs(ra.host, REPO, digests, True)
                                  for _ in range(args.runs)])
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.runs):
                for name, fn in contenders.items():
                    times[name].append(fn())
            bundle_bytes = os.path.getsize(ours_tar)
            skopeo_bytes = os.path.getsize(theirs_tar)

            # machine limits, same run
            blobs = {os.path.join(src, x.path): x.digest for x in res.pack.layers}
            put = []
            for _ in range(args.runs):
                empty_b()
                put.append(curl_put_blobs(rb.host, REPO, blobs))
            put_s = common.median(put)
            sha1 = common.sha256_rate()
            dd_buf = dd_rate(os.path.join(work, "dd"), size, direct=False)
            dd_direct = dd_rate(os.path.join(work, "dd"), size, direct=True)

            def cp_cold() -> float:
                evict(ours_tar)
                secs = run(["cp", ours_tar, os.path.join(work, "cp.tar")], durable=True)
                os.unlink(os.path.join(work, "cp.tar"))
                return secs
            cp = common.median([cp_cold() for _ in range(args.runs)])
            startup = common.median([run([*py, "--help"]) for _ in range(3)])
            ka.close()
            kb.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = {name: common.median(ts) for name, ts in times.items()}
    mb = size / 1e6
    print(f"\n`{' '.join(['python3', '-m', 'bench.bundle.run', *sys.argv[1:]])}`\n")
    print(f"Run: {size / (1 << 20):.0f} MiB in {args.files} files, median of {args.runs} runs, "
          f"{os.cpu_count()} cores; bundle {bundle_bytes / (1 << 20):.1f} MiB, "
          f"skopeo's archive {skopeo_bytes / (1 << 20):.1f} MiB\n")
    print("| contender | median s | runs s | MB/s (model bytes) | ours ×faster |")
    print("|---|---:|---|---:|---:|")
    for name, t in med.items():
        verb = name.split(":")[0]
        ours = med[f"{verb}: modelcache {verb}"]
        print(f"| {name} | {t:.2f} | {', '.join(f'{x:.2f}' for x in times[name])} | "
              f"{mb / t:.0f} | {t / ours:.2f}× |")
    print("\n| machine limit (same run) | MB/s |")
    print("|---|---:|")
    print(f"| curl every blob from registry A → /dev/null, all at once | {mb / curl:.0f} |")
    print(f"| curl PUT every blob to registry B, all at once (registry ingest) | "
          f"{mb / put_s:.0f} |")
    print(f"| sha256, one core | {sha1 / 1e6:.0f} |")
    print(f"| dd 4 MiB blocks + fsync, buffered | {dd_buf / 1e6:.0f} |")
    print(f"| dd 4 MiB blocks + fsync, O_DIRECT | {dd_direct / 1e6:.0f} |")
    print(f"| cp of the bundle, cold, + sync | {bundle_bytes / 1e6 / cp:.0f} |")
    print(f"| `python -m cli.main --help` (start-up, s) | {startup:.2f} s |")
    print(f"| load average at start / end | {load0:.2f} / {os.getloadavg()[0]:.2f} |")


if __name__ == "__main__":
    main()
