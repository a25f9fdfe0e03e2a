"""``modelcache-controller pvc-upload``: the PVC reader Job's entrypoint (``source.pvc``).

Where it sits: for a Model with ``source.pvc`` the manager
(``controller/models/pvcsource.py``) opens an upload session on the upload
gateway and runs this as a Job *in the Model's namespace* (a PVC can only be
mounted there), with the claim mounted read-only at ``--mount`` and the
session token in ``$MODELCACHE_UPLOAD_TOKEN`` (the manager's Job: a file
named by ``$MODELCACHE_UPLOAD_TOKEN_FILE``, ``jobs/secretfiles.py``). It sends the files under
``--path`` to the session exactly as ``modelcache upload`` does
(``jobs/upload_client.py``: resumable pieces, then "complete") and
waits while the gateway verifies and publishes them from the controller's
namespace. So this pod never holds a registry credential or a
service-account token: only a token good for one session of one model.

The tree is untrusted: ``--path`` must stay inside the claim once symlinks
are resolved, and ``walk_model_dir`` refuses links out of it, devices and
unsafe names before a byte is sent. Result and exit status by the Job result
protocol (``api/jobresult.py``): the result JSON (``--result-file``, the
termination message), 0 on success, 75 (retryable: the gateway or the
network was down) or 1 (terminal: a path missing or unsafe, a model the
gateway refused), with ``{"error": {"reason", "message", "retryable"}}``.
Progress of the upload goes to the manager's report endpoint when
``MODELCACHE_REPORT_URL`` is set.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from api import jobresult
from ingest.publish.progress import Sink, Tracker, null_sink
from jobs import report_client, secretfiles, upload_client
from modelpack.errors import ModelPackError, UnsafePathError
from modelpack.paths import join_under, safe_relpath, walk_model_dir

TOKEN_ENV = "MODELCACHE_UPLOAD_TOKEN"


class ReaderError(jobresult.JobError):
    """The claim cannot be read as a model (``retryable``: it may, later)."""


def source_dir(mount: str, path: str) -> str:
    """``path`` inside the claim mounted at ``mount``, symlinks resolved, checked to stay in."""
    rel = path.strip().strip("/")
    try:
        target = join_under(mount, safe_relpath(rel)) if rel not in ("", ".") else mount
    except UnsafePathError as e:
        raise ReaderError(f"path {path!r}: {e}", reason="UnsafePath", retryable=False) from e
    if not os.path.lexists(target):
        raise ReaderError(f"path {path!r} does not exist in the claim", reason="PathNotFound",
                          retryable=False)
    root, real = os.path.realpath(mount), os.path.realpath(target)
    if os.path.commonpath([root, real]) != root:
        # a symlink on the way (``llama -> /etc``) would make the pod read its own image
        raise ReaderError(f"path {path!r} leads out of the claim through a symlink",
                          reason="UnsafePath", retryable=False)
    if not os.path.isdir(real) and not os.path.isfile(real):
        raise ReaderError(f"path {path!r} is neither a directory nor a file",
                          reason="NotADirectory", retryable=False)
    return real


def read_and_upload(mount: str, path: str, url: str, token: str,
                    sink: Sink = null_sink) -> dict[str, Any]:
    """Upload the files at ``path`` to the session at ``url``; the gateway's publish result."""
    src = source_dir(mount, path)
    if os.path.isdir(src):
        files = walk_model_dir(src)  # refuses links out, devices, unsafe names: before any byte
        if not files:
            raise ReaderError(f"path {path!r} holds no files", reason="EmptySource",
                              retryable=False)
    tracker = Tracker(sink)
    tracker.set_phase("upload")
    sent = 0

    def progress(done: int, total: int) -> None:
        nonlocal sent
        if total != tracker.total:
            tracker.set_phase("upload", total=total)
        tracker.add(done - sent)  # negative when a piece is sent again
        sent = done

    status = upload_client.upload(url, token, src, progress=progress)
    tracker.set_phase("done")
    result: dict[str, Any] = status.get("result") or {}
    return result


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pvc-upload", help="send a mounted PVC's files to an upload session "
                       "(the source.pvc reader Job); token from $MODELCACHE_UPLOAD_TOKEN")
    p.add_argument("--mount", required=True, help="where the claim is mounted (read-only)")
    p.add_argument("--path", default="", help="the directory (or file) inside the claim")
    p.add_argument("--url", required=True, help="the upload session URL")
    p.add_argument("--result-file", default="-", help="the result JSON ('-' = stdout)")


def main(args: argparse.Namespace) -> int:
    """The ``pvc-upload`` subcommand: the result JSON to ``--result-file``, the exit status."""
    secretfiles.load()
    token = os.environ.get(TOKEN_ENV, "")
    reporter = report_client.sink_from_env()
    code = jobresult.OK
    try:
        if not token:
            raise ReaderError(f"${TOKEN_ENV} is not set", reason="InvalidToken", retryable=False)
        result = read_and_upload(args.mount, args.path, args.url, token,
                                 reporter if reporter is not None else null_sink)
    except (ReaderError, upload_client.UploadError, ModelPackError) as e:
        # ModelPackError: walk_model_dir's UnsafePathError, TooManyFiles, …
        result, code = jobresult.from_error(e)
    except PermissionError as e:
        result, code = jobresult.error("PermissionDenied", f"reading the claim: {e}", False)
    except OSError as e:  # an I/O error of the volume may pass; the Job retries
        result, code = jobresult.error("ReadError", f"reading the claim: {e}", True)
    finally:
        if reporter is not None:
            reporter.close()
    jobresult.write(result, args.result_file)
    return code


__all__ = ["ReaderError", "add_parser", "main", "read_and_upload", "source_dir"]
