"""``modelcache upload``: local files into a Model's upload session (``source.upload``).

The session (URL and token) comes from the Model's ``status.upload``; the
resumable protocol itself is ``jobs/upload_client.py``.
"""

from __future__ import annotations

import argparse
import os
import sys

from cli.progress import open_bar
from jobs.upload_client import UploadError, upload


def cmd_upload(args: argparse.Namespace) -> int:
    token = os.environ.get("MODELCACHE_UPLOAD_TOKEN")
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    if not args.url or not token:
        print("modelcache: MissingUploadSession: give --url and --token-file (or "
              "MODELCACHE_UPLOAD_TOKEN) from the Model's status.upload", file=sys.stderr)
        return 2
    try:
        with open_bar(f"upload {args.model}", args.progress) as (update, set_total):
            state = {"done": 0, "total": 0}

            def progress(done: int, total: int) -> None:
                if total != state["total"]:
                    state["total"] = total
                    set_total(total)
                update(done - state["done"])
                state["done"] = done

            status = upload(args.url, token, args.path, progress=progress)
    except UploadError as e:
        print(f"modelcache: {e.reason}: {e}", file=sys.stderr)
        return 1
    print(f"uploaded {args.path} to {args.model}: {status.get('phase')}")
    if status.get("result"):
        print(f"digest: {status['result'].get('digest')}")
    return 0
