"""bench/push: push a generated 2 GiB, 8-file model to a local registry.

``modelcache pack DIR --push`` (verifies the model, streams each file once
while hashing, parallel across files) against oras-py ``OrasClient.push``
(hashes each file, then uploads it), in one run, each into a fresh
repository so no blob is skipped as already present.

    python3 -m bench.push.run [--size-gib 2] [--files 8] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from bench import common

ORAS_PUSH = """
import os, sys, oras.client
c = oras.client.OrasClient(hostname=sys.argv[1], insecure=True)
os.chdir(sys.argv[3])
c.push(target=sys.argv[2], files=sorted(f for f in os.listdir(".") if not f.startswith(".")))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    s = common.Setup(int(args.size_gib * common.GiB), args.files)
    try:
        size = sum(os.path.getsize(f) for f in common.model_files(s.src))
        counter = iter(range(1000))

        def fresh(prefix: str) -> str:
            return f"{s.reg.host}/bench/{prefix}{next(counter)}:v1"

        ours = common.median(common.timed(lambda: subprocess.run(
            ["modelcache", "pack", s.src, "--push", fresh("ours"), "--no-progress"],
            check=True, capture_output=True), args.runs))
        theirs = common.median(common.timed(lambda: subprocess.run(
            [sys.executable, "-c", ORAS_PUSH, s.reg.host, fresh("oras"), s.src],
            check=True, capture_output=True), args.runs))
        sha_all = common.sha256_rate_parallel(os.cpu_count() or 1)
        print(f"\n### push: {size / common.GiB:.2f} GiB in {args.files} files, "
              f"median of {args.runs} runs\n")
        print("| tool | wall s | throughput | ours is ×faster |")
        print("|---|---:|---:|---:|")
        print(f"| modelcache pack --push | {ours:.2f} | {common.fmt_rate(size / ours)} | 1.00× |")
        print(f"| oras-py OrasClient.push | {theirs:.2f} | {common.fmt_rate(size / theirs)} | "
              f"{theirs / ours:.2f}× |")
        print(f"\nsha256 on all cores in the same run: {common.fmt_rate(sha_all)}")
    finally:
        s.close()


if __name__ == "__main__":
    main()
