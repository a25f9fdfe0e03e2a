"""``modelcache pull`` and ``modelcache inspect``: reading a ModelPack back.

Pull writes a verified copy of a ModelPack into a directory
(``modelpack.pull``); inspect describes a model directory, an OCI layout or
a registry reference without writing anything.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from api.model import RESOLVED_FIELDS
from cli import access
from cli.progress import bar
from modelpack.formats import inspect_dir
from modelpack.oci import layout as oci_layout
from modelpack.oci import mirrors
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.reference import parse as parse_ref
from modelpack.pull import pull_to_dir, resolve

# the text summary: the resolved metadata and the size; paramSize (parameterCount rounded,
# "22.7M") is left to --json
SUMMARY_FIELDS = (*(k for k in RESOLVED_FIELDS if k != "paramSize"), "sizeBytes")


def _summary(meta: dict[str, Any]) -> str:
    return "\n".join(f"  {k:<15} {meta.get(k)}" for k in SUMMARY_FIELDS
                     if meta.get(k) is not None)


def cmd_pull(args: argparse.Namespace) -> int:
    ref = parse_ref(args.ref)
    client = access.client(args, ref)
    client.ranges = RangePolicy(streams=args.range_streams)
    mirrors.load(args.registry_hosts_dir, args.registry_mirror).attach(client, ref.host)
    pack = resolve(client, ref)
    t0 = time.monotonic()
    with bar(pack.size, "pull", args.progress) as progress:
        pull_to_dir(client, ref.with_digest(pack.digest), args.dest, progress=progress,
                    workers=args.jobs, pack=pack)
    dt = time.monotonic() - t0
    rate = pack.size / dt / 1e6 if dt > 0 else 0.0
    print(f"pulled {len(pack.layers)} files, {pack.size} bytes in {dt:.2f}s ({rate:.0f} MB/s)")
    print(f"digest: {pack.digest}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    target = args.target
    out: dict[str, Any]
    if os.path.isdir(target) and oci_layout.is_layout(target):
        pack, _ = oci_layout.read(target, args.tag)
        out = {"source": "oci-layout", "digest": pack.digest, **pack.metadata(),
               "layers": [{"path": x.path, "digest": x.digest, "size": x.size,
                           "mediaType": x.media_type} for x in pack.layers]}
    elif os.path.isdir(target):
        info = inspect_dir(target, args.format, args.allow_pickle)
        meta = info.summary()
        # not RESOLVED_FIELDS: a directory has no paramSize yet (packing computes it), and
        # these keys are what --json prints for a directory
        out = {"source": "directory", "format": meta["format"], "family": meta["family"],
               "architecture": meta["architecture"], "parameterCount": meta["parameter_count"],
               "precision": meta["precision"], "quantization": meta["quantization"],
               "contextLength": meta["context_length"], "tensors": meta["tensors"],
               "files": len(info.files), "sizeBytes": info.size,
               "layers": [{"path": f.path, "size": f.size, "kind": f.kind} for f in info.files]}
    else:
        ref = parse_ref(target)
        pack = resolve(access.client(args, ref), ref)
        out = {"source": "registry", "reference": str(ref.with_digest(pack.digest)),
               "digest": pack.digest, **pack.metadata(),
               "layers": [{"path": x.path, "digest": x.digest, "size": x.size,
                           "mediaType": x.media_type} for x in pack.layers]}
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0
    if out.get("digest"):
        print(f"digest: {out['digest']}")
    print(_summary(out))
    print("files:")
    for layer in out["layers"]:
        print(f"  {layer['size']:>14}  {layer['path']}")
    return 0
