"""``modelcache-controller publish``: the publish Job's entry point.

Where it sits: the manager (``controller/models/publishjob.py``) runs this
as a Job in the controller's namespace; it publishes one source to a
registry reference through the publish worker (``ingest.publish``), or, for
a ``catalog+…`` source, copies a remote catalog's artifact byte for byte
(``ingest.publish.catalog_import``). Progress goes out as JSON lines
(``--progress-file``, default stderr; to the manager's report endpoint too
when ``MODELCACHE_REPORT_URL`` is set), the result as one JSON document
(``--result-file``, default stdout), with the exit status of the Job
result protocol (``api/jobresult.py``): 0, 75 (retryable) or 1 (terminal).

Credentials come from the environment (``HF_TOKEN``, ``HF_ENDPOINT``,
``AWS_*``, ``MODELCACHE_HTTP_TOKEN`` (also an Ollama registry's bearer),
``MODELCACHE_SOURCE_USERNAME``/``_PASSWORD`` (an Ollama registry's Basic
auth), ``MODELCACHE_REGISTRY_USERNAME``/
``_PASSWORD``, ``MODELCACHE_CATALOG_TOKEN``/``_CA``), from files their
``VAR_FILE`` vars name (``jobs/secretfiles.py``: how the manager's Job
passes them) or files named by flags, never from flags' values, so they
stay out of process listings. The same for the source: the manager's Job
names it with ``--source-file`` (a URL may carry a presigned query or a
user:password).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from api import jobresult
from ingest.publish import Options, catalog_import, default_work_dir, json_lines, publish_uri
from ingest.publish.worker import PublishError, as_publish_error
from ingest.sources import netpolicy
from jobs import report_client, secretfiles
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient

WORK_DIR_WAIT = 300.0  # seconds an attempt waits for the one before it to let go


def read_secret(path: str | None) -> str | None:
    """A credential from a file (a mounted Secret), stripped; None without a path."""
    if not path:
        return None
    with open(path) as f:
        return f.read().strip()


def source_of(args: argparse.Namespace) -> str:
    """``--source``, or the one in ``--source-file`` (the manager's Jobs: kept off argv)."""
    if args.source_file:
        return read_secret(args.source_file) or ""
    return str(args.source)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("publish", help="publish one source to a registry reference")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--source",
                     help="hf://ORG/REPO[@REV], ollama://[HOST/]NS/MODEL[:TAG], http(s)://…, "
                          "s3://BUCKET/PREFIX or a directory")
    src.add_argument("--source-file",
                     help="a file holding --source (a URL with a presigned query stays "
                          "out of process listings)")
    p.add_argument("--to", required=True, help="registry reference HOST/REPO:TAG")
    p.add_argument("--insecure-registry", action="store_true", help="plain HTTP to the registry")
    p.add_argument("--registry-username")
    p.add_argument("--registry-password-file")
    p.add_argument("--work-dir", default=None, help="staging directory (kept for resume)")
    p.add_argument("--progress-file", default="-", help="JSON lines of progress ('-' = stderr)")
    p.add_argument("--result-file", default="-", help="the result JSON ('-' = stdout)")
    p.add_argument("--format", default="Auto",
                   choices=["Auto", "Safetensors", "GGUF", "Diffusers", "Raw"])
    p.add_argument("--allow-pickle", action="store_true")
    p.add_argument("--include", action="append", default=[], help="HF include glob (repeatable)")
    p.add_argument("--exclude", action="append", default=[], help="HF exclude glob (repeatable)")
    p.add_argument("--sha256", help="expected sha256 of an http(s) file")
    p.add_argument("--archive", default="Auto", choices=["Auto", "None", "Tar", "Zip"])
    p.add_argument("--token-file", help="a file holding the source's token (HF or HTTP bearer)")
    p.add_argument("--endpoint", help="HF endpoint or S3 endpoint URL")
    p.add_argument("--region", help="S3 region")
    p.add_argument("--insecure-source", action="store_true",
                   help="plain HTTP to an Ollama registry that is not on loopback")
    p.add_argument("--deny-source-cidr", action="append", default=[], metavar="CIDR",
                   help="a network sources may not reach (repeatable), besides link-local and "
                   "loopback (always denied) and $MODELCACHE_DENY_SOURCE_CIDRS (comma-separated)")
    p.add_argument("--allow-private-sources", action="store_true",
                   help="no source address deny list (development and tests; also "
                   "$MODELCACHE_ALLOW_PRIVATE_SOURCES=1)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--name", help="descriptor.name in the ModelPack config")
    p.add_argument("--catalog-wait", type=float, default=1800.0,
                   help="seconds a catalog import waits out source-side failures (a revoked "
                   "token, the catalog down) before failing retryably")


def _catalog_import(args: argparse.Namespace, client: Any, ref: Any, sink: Any) -> Any:
    """``catalog+…`` sources are copied byte for byte (same digest), not re-packed;
    token from $MODELCACHE_CATALOG_TOKEN or --token-file, CA from $MODELCACHE_CATALOG_CA."""
    return catalog_import.import_model(
        args.source, client, ref,
        token=os.environ.get("MODELCACHE_CATALOG_TOKEN") or read_secret(args.token_file),
        ca_pem=os.environ.get("MODELCACHE_CATALOG_CA"),
        work_dir=args.work_dir or default_work_dir(), sink=sink, wait=args.catalog_wait,
        workers=args.workers, allow_pickle=args.allow_pickle, expected_format=args.format)



@contextlib.contextmanager
def one_attempt(work_dir: str, wait: float = WORK_DIR_WAIT) -> Iterator[None]:
    """Hold the work dir for this attempt alone.

    A Job's next pod may start while the previous one still runs or
    terminates on the same work volume (``--publish-work-size``: the claim
    outlives pods; a replacement pod is not held back until the old one is
    gone). Two attempts on one staging area would remove each other's files,
    so the second waits on an exclusive ``flock`` (released by the kernel when
    the holder dies) and, after ``wait`` seconds, fails retryably.
    """
    os.makedirs(work_dir, exist_ok=True)
    fd = os.open(os.path.join(work_dir, ".attempt.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise PublishError(f"another attempt holds {work_dir} after {wait:.0f} s",
                                       reason="WorkDirBusy", retryable=True) from None
                time.sleep(0.25)
        yield
    finally:
        os.close(fd)

def main(args: argparse.Namespace) -> int:
    """Publish ``--source`` to ``--to``; the result to ``--result-file``, the exit status."""
    secretfiles.load()
    try:  # the source credential, lent by the manager at start (never copied to a Secret)
        secretfiles.borrow()
    except secretfiles.BorrowError as e:
        refused, status = jobresult.from_error(PublishError(
            str(e), reason="CredentialUnavailable", retryable=True))
        jobresult.write(refused, args.result_file, indent_stdout=True)
        return status
    creds: dict[str, Any] = {
        "include": args.include or None, "exclude": args.exclude or None,
        "sha256": args.sha256, "archive": args.archive, "endpoint": args.endpoint,
        "region": args.region,
        "token": read_secret(args.token_file) or os.environ.get("MODELCACHE_HTTP_TOKEN"),
    }
    if os.environ.get("MODELCACHE_SOURCE_USERNAME"):  # an Ollama registry's Basic auth
        creds["username"] = os.environ["MODELCACHE_SOURCE_USERNAME"]
        creds["password"] = os.environ.get("MODELCACHE_SOURCE_PASSWORD", "")
    if args.insecure_source:
        creds["insecure"] = True
    progress_out = sys.stderr if args.progress_file == "-" else open(
        args.progress_file, "a")
    sink = json_lines(progress_out)
    reporter = report_client.sink_from_env()
    if reporter is not None:
        sink = report_client.tee(sink, reporter)
    result: dict[str, Any]
    code = jobresult.OK
    try:
        args.source = source_of(args)  # an unreadable file: a terminal error, as a bad URI
        ref = reference.parse(args.to)
        # the guard covers the whole Job process; only its own endpoints are exempt
        netpolicy.install(netpolicy.from_settings(args.deny_source_cidr,
                                                  args.allow_private_sources, dict(os.environ)),
                          trusted=(f"{'http' if args.insecure_registry else 'https'}://{ref.host}",
                                   os.environ.get("MODELCACHE_REPORT_URL", "")))
        client = RegistryClient(ref.host, insecure=args.insecure_registry,
                                ca_bundle=secretfiles.ca_file(),
                                username=args.registry_username
                                or os.environ.get("MODELCACHE_REGISTRY_USERNAME"),
                                password=read_secret(args.registry_password_file)
                                or os.environ.get("MODELCACHE_REGISTRY_PASSWORD"))
        with one_attempt(args.work_dir or default_work_dir()):
            if args.source.startswith("catalog+"):
                res: Any = _catalog_import(args, client, ref, sink)
            else:
                res = publish_uri(args.source, push=args.to, client=client,
                                  progress=sink, work_dir=args.work_dir,
                                  options=Options(expected_format=args.format,
                                                  allow_pickle=args.allow_pickle,
                                                  workers=args.workers, name=args.name),
                                  **{k: v for k, v in creds.items() if v is not None})
        result = res.to_json()
    except Exception as e:  # a PublishError, or a bad URI or reference before any transfer
        result, code = jobresult.from_error(as_publish_error(e))
    finally:
        if reporter is not None:
            reporter.close()
        if progress_out is not sys.stderr:
            progress_out.close()
    # indented on stdout, for a person; compact as a termination message
    jobresult.write(result, args.result_file, indent_stdout=True)
    return code


__all__ = ["add_parser", "main", "read_secret"]
