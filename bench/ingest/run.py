"""Ingest benchmark: a Hugging Face-compatible server → the registry.

Ours: ``ingest.publish`` (stream each file once into a staging store
while hashing, verify, push blobs as they finish). Theirs:
``huggingface_hub.snapshot_download`` followed by an oras-py push of the
snapshot. Same generated model (8 safetensors shards, 2 GiB by default),
same local Hub server, a fresh docker-registry per run. Each contender
runs in its own process; wall time and peak RSS (``ru_maxrss`` from
``wait4``) are measured from outside.

    python3 -m bench.ingest.run [--size-mib 2048] [--files 8] [--runs 2]
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

from bench import common
from cli.local import registry as localregistry
from tests.servers.hfhub import HubServer

REPO = "bench/big-model"
HEADING = "## ingest"


def child_ours(endpoint: str, registry: str, work: str) -> None:
    from ingest.publish import publish_uri

    res = publish_uri(f"hf://{REPO}", push=f"{registry}/bench/ours:v1", endpoint=endpoint,
                      insecure_registry=True, work_dir=work)
    print(json.dumps({"digest": res.digest, "size": res.size}))


def child_theirs(endpoint: str, registry: str, work: str) -> None:
    import oras.client
    from huggingface_hub import snapshot_download

    path = snapshot_download(REPO, cache_dir=os.path.join(work, "hf-cache"), endpoint=endpoint)
    os.chdir(path)
    files = sorted(f for f in os.listdir(".") if os.path.isfile(f))
    client = oras.client.OrasClient(hostname=registry, insecure=True)
    client.push(target=f"{registry}/bench/theirs:v1", files=files, quiet=True)
    print(json.dumps({"files": len(files)}))


def run_child(kind: str, endpoint: str, registry: str, work: str) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one contender in its own process."""
    out_path = os.path.join(work, f"{kind}.out")
    with open(out_path, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.ingest.run", "--child", kind, "--endpoint", endpoint,
             "--registry", registry, "--work", work],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
    with open(out_path) as f:
        text = f.read()
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed ({proc.returncode}):\n{text[-3000:]}")
    return wall, usage.ru_maxrss * 1024, text.strip().splitlines()[-1]


def write_results(section: str, path: str) -> None:
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(HEADING + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(HEADING))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", choices=["ours", "theirs"])
    ap.add_argument("--endpoint")
    ap.add_argument("--registry")
    ap.add_argument("--work")
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "..",
                                                      "RESULTS.md"))
    args = ap.parse_args()
    if args.child:
        fn = child_ours if args.child == "ours" else child_theirs
        fn(args.endpoint, args.registry, args.work)
        return

    size = args.size_mib << 20
    src = common.model_dir(size, args.files)
    served = tempfile.mkdtemp(prefix="modelcache-bench-hub-")
    for name in os.listdir(src):
        if not name.startswith("."):
            os.link(os.path.join(src, name), os.path.join(served, name))
    results: dict[str, list[tuple[float, int]]] = {"theirs": [], "ours": []}
    try:
        with HubServer() as hub:
            hub.add_repo(REPO, served)
            for i in range(args.runs):
                for kind in ("theirs", "ours"):
                    work = tempfile.mkdtemp(prefix=f"modelcache-bench-{kind}-")
                    try:
                        with localregistry.running() as reg:
                            wall, rss, out = run_child(kind, hub.url, reg.host, work)
                    finally:
                        shutil.rmtree(work, ignore_errors=True)
                    results[kind].append((wall, rss))
                    print(f"run {i + 1} {kind}: {wall:.2f} s, peak RSS {rss / 2**20:.0f} MiB  {out}",
                          flush=True)
    finally:
        shutil.rmtree(served, ignore_errors=True)

    def med(kind: str, idx: int) -> float:
        return statistics.median(r[idx] for r in results[kind])

    t_ours, t_theirs = med("ours", 0), med("theirs", 0)
    rss_ours, rss_theirs = med("ours", 1), med("theirs", 1)
    ratio = t_ours / t_theirs
    cmd = "python3 -m bench.ingest.run" + (
        f" --size-mib {args.size_mib}" if args.size_mib != 2048 else "") + (
        f" --files {args.files}" if args.files != 8 else "") + (
        f" --runs {args.runs}" if args.runs != 2 else "")
    section = f"""{HEADING}

Hugging Face-compatible server (`tests/servers/hfhub.py`, loopback) → docker-registry
(fresh per run), {args.files} safetensors shards, {size / 2**30:.2f} GiB in total
(`tests/modelgen.make_big_model`). Each contender in its own process; wall time and
peak RSS (`ru_maxrss` via `wait4`), median of {args.runs} alternating runs; {os.cpu_count()} cores.

| contender | wall time | peak RSS |
|---|---|---|
| theirs: `huggingface_hub.snapshot_download` + oras-py `push` | {t_theirs:.2f} s | {rss_theirs / 2**20:.0f} MiB |
| ours: `ingest.publish` (stage+hash once, verify, push) | {t_ours:.2f} s | {rss_ours / 2**20:.0f} MiB |

ours / theirs wall time: **{ratio:.2f}×** (goal ≤ 0.6×); our peak RSS
{rss_ours / 2**20:.0f} MiB (goal ≤ 300 MiB). Ours also verifies what theirs does not:
every file's sha256 against the Hub's LFS oid (git blob id for small files) and the
safetensors headers, before the manifest is pushed.

Command: `{cmd}`
"""
    print(section)
    write_results(section, os.path.abspath(args.results))


if __name__ == "__main__":
    main()
