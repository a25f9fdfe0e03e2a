"""``modelcache pack``: a model directory, or a remote source, into a ModelPack.

A directory is verified (``modelpack.formats``) and packed here; a remote
source (hf://, ollama://, http(s)://, s3://) goes through the publish worker
(``ingest.publish``): staged, verified, published, as a publish Job does it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cli import access
from cli.progress import bar, open_bar
from modelpack.formats import inspect_dir
from modelpack.oci.reference import parse as parse_ref
from modelpack.pack import pack_to_layout, pack_to_registry


def cmd_pack(args: argparse.Namespace) -> int:
    src = args.source
    if not os.path.isdir(src):
        return _pack_remote(args)
    info = inspect_dir(src, args.format, args.allow_pickle)
    t0 = time.monotonic()
    with bar(info.size, "pack", args.progress) as progress:
        if args.push:
            ref = parse_ref(args.push)
            res = pack_to_registry(info, access.client(args, ref), ref, progress=progress)
        else:
            res = pack_to_layout(info, args.output, args.tag, progress=progress)
    dt = time.monotonic() - t0
    where = res.reference or f"{args.output} (OCI layout, tag {args.tag})"
    print(f"packed {len(info.files)} files, {info.size} bytes in {dt:.2f}s")
    print(f"digest: {res.pack.digest}")
    print(f"stored: {where}")
    return 0


def _pack_remote(args: argparse.Namespace) -> int:
    """A remote source (hf://, ollama://, http(s)://, s3://): staged, verified, published."""
    # imported here for start-up time: the publish worker and its sources (~6 ms, a dozen
    # modules) are not for a local pack, a pull or an inspect
    from ingest.publish import Options, PublishError, delta_sink, publish_uri
    from ingest.sources import SourceError

    if "://" not in args.source:
        print(f"modelcache: InvalidSource: {args.source} is neither a directory nor a URI",
              file=sys.stderr)
        return 1
    options = Options(expected_format=args.format, allow_pickle=args.allow_pickle)
    creds = {k: v for k, v in (("include", args.include), ("exclude", args.exclude),
                               ("sha256", args.sha256)) if v}
    t0 = time.monotonic()
    try:
        with open_bar("pack", args.progress) as (update, set_total):
            sink = delta_sink(update, set_total)
            if args.push:
                ref = parse_ref(args.push)
                res = publish_uri(args.source, push=args.push, client=access.client(args, ref),
                                  progress=sink, options=options, **creds)
            else:
                res = publish_uri(args.source, output=args.output, progress=sink,
                                  options=options, **creds)
    except (PublishError, SourceError) as e:
        print(f"modelcache: {e.reason}: {e}", file=sys.stderr)
        return 1
    print(f"packed {res.resolved.get('files')} files, {res.size} bytes "
          f"in {time.monotonic() - t0:.2f}s from {args.source} (revision {res.revision})")
    print(f"digest: {res.digest}")
    print(f"stored: {res.reference or args.output}")
    return 0
