"""The publish worker: a source becomes a verified ModelPack in the registry.

Pipeline: ``resolve`` (pin the revision, list files) → ``stage`` (each file
streamed once into a local BlobStore, hashed and checked in the same pass,
resumable across restarts) → expand archives safely → place a tree of
hardlinks to the staged blobs → ``verify`` (``modelpack.formats`` on the
staged files: safetensors/GGUF/diffusers, pickle refused) → ``push`` (blobs
the registry lacks, then config and manifest). The bytes are on disk once,
in the staging store; the tree shares their inodes.

A file's blob may be pushed as soon as that file is staged, its digest
checked and its own format verified, overlapping the remaining downloads;
the manifest, the only thing a tag points at, goes last and only after
the whole model verified. So any failure leaves nothing under the tag.

Errors leave as ``PublishError`` with ``reason`` and ``retryable``: a
retryable failure keeps the staging store so the next attempt resumes; a
terminal one removes it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from api import jobresult
from ingest.publish import push as pushing
from ingest.publish.progress import Sink, Tracker, null_sink
from ingest.publish.stage import stage_file
from ingest.sources import archive, base
from modelpack.errors import ModelPackError
from modelpack.formats import ModelInfo, classify, gguf, inspect_files, raw, safetensors
from modelpack.oci import reference
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_layout
from modelpack.parallel import run_all
from modelpack.paths import LocalFile
from modelpack.store.blobs import BlobStore
from modelpack.store.placement import place_tree, remove_tree

log = logging.getLogger(__name__)
T = TypeVar("T")


class PublishError(jobresult.JobError):
    """A publish failed; ``reason`` goes to the condition, ``retryable`` to the Job."""


class _Cancelled(Exception):
    pass


def as_publish_error(e: BaseException) -> PublishError:
    """The one place where source, core and OS errors become the worker's error."""
    if isinstance(e, PublishError):
        return e
    if isinstance(e, ModelPackError):  # the sources' errors included (``base``)
        return PublishError(str(e), reason=e.reason, retryable=e.retryable)
    if isinstance(e, OSError):
        return PublishError(f"local I/O: {e}", reason="StagingError", retryable=True)
    return PublishError(f"{type(e).__name__}: {e}", reason="InternalError", retryable=False)


@dataclass(frozen=True)
class Options:
    expected_format: str = "Auto"
    allow_pickle: bool = False
    workers: int = 4
    early_push: bool = True  # push a file's blob once it is staged and checked
    archive_limits: archive.Limits = field(default_factory=archive.Limits)
    keep_staging: bool = False
    resolve_attempts: int = 4
    name: str | None = None  # descriptor.name in the config
    backoff: float = 0.2  # first retry delay of a broken transfer, doubled per stall
    # how a large file of a ranged source (Hugging Face) is split (``ranges``)
    ranges: RangePolicy = field(default_factory=RangePolicy)


@dataclass(frozen=True)
class PublishResult:
    digest: str
    size: int
    reference: str
    revision: str
    resolved: dict[str, Any]
    source: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "sizeBytes": self.size, "reference": self.reference,
                "resolvedRevision": self.revision, "resolved": self.resolved,
                "source": self.source}


def _retry(fn: Callable[[], Any], attempts: int, what: str) -> Any:
    delay = 0.5
    for i in range(attempts):
        try:
            return fn()
        except base.SourceError as e:
            if not e.retryable or i == attempts - 1:
                raise
            log.info("retrying", extra={"what": what, "error": str(e)[:200]})
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
    raise AssertionError("unreachable")


def _verify_one(path: str, blob: str, options: Options) -> None:
    """One file's own format check, before its blob may leave the machine."""
    if classify(path, options.allow_pickle) != "weight" or options.expected_format == raw.NAME:
        return  # a declared Raw model is not parsed (pickle is still refused above)
    if path.endswith(".safetensors"):
        safetensors.verify(blob)
    elif path.endswith(".gguf"):
        gguf.verify(blob)


class _Run:
    """The state of one publish: staged digests, pushed blobs, progress."""

    def __init__(self, source: base.Source, store: BlobStore, tracker: Tracker,
                 options: Options, client: RegistryClient | None, ref: Reference | None) -> None:
        self.source = source
        self.store = store
        self.tracker = tracker
        self.options = options
        self.client = client
        self.ref = ref
        self.lock = threading.Lock()
        self.files: dict[str, tuple[str, int]] = {}  # path -> (digest, size)
        self.pushed: set[str] = set()
        self.cancel = threading.Event()
        self.key_locks: dict[str, threading.Lock] = {}
        # pushes run in their own pool, so a download worker moves on to the next file
        # while the registry takes the last one: downloads and pushes overlap throughout
        self.push_pool = cf.ThreadPoolExecutor(max_workers=max(1, options.workers))
        self.push_futures: list[cf.Future[None]] = []

    def key_lock(self, f: base.SourceFile) -> threading.Lock:
        """Files with the same stated digest share one .part: stage them one at a time."""
        with self.lock:
            return self.key_locks.setdefault(f.sha256 or f.path, threading.Lock())

    def progress(self, n: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled()
        self.tracker.add(n)

    def pushed_progress(self, n: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled()
        self.tracker.add_pushed(n)

    def _add(self, path: str, digest: str, size: int) -> None:
        with self.lock:
            if path in self.files:
                raise base.UnsafeSourceError(f"{path!r} appears twice in the model",
                                             reason="UnsafePath")
            self.files[path] = (digest, size)

    def stage(self, revision: str, f: base.SourceFile) -> None:
        with self.key_lock(f):
            digest = stage_file(self.source, revision, f, self.store, self.progress,
                                backoff=self.options.backoff, policy=self.options.ranges)
        if f.archive:
            entries = archive.expand(self.store.path(digest), self.store,
                                     self.options.archive_limits)
            self.store.delete(digest)  # the archive itself is not part of the model
            for e in entries:
                self._add(e.path, e.digest, e.size)
            return
        size = os.path.getsize(self.store.path(digest))
        self._add(f.path, digest, size)
        if self.options.early_push and self.client is not None:
            _verify_one(f.path, self.store.path(digest), self.options)
            with self.lock:
                self.push_futures.append(self.push_pool.submit(self.push_one, digest, size))

    def wait_pushes(self) -> None:
        """Wait for the early pushes; the first failure cancels the rest and is raised."""
        try:
            for fut in cf.as_completed(list(self.push_futures)):
                fut.result()
        except BaseException:
            self.cancel.set()
            raise
        finally:
            self.push_pool.shutdown(wait=True, cancel_futures=True)

    def push_one(self, digest: str, size: int) -> None:
        assert self.client is not None and self.ref is not None
        with self.lock:
            if digest in self.pushed:
                return
            self.pushed.add(digest)
        self.client.upload_file(self.ref.repository, self.store.path(digest), size,
                                digest, self.pushed_progress)

    def parallel(self, items: Iterable[T], fn: Callable[[T], None],
                 size: Callable[[T], int] | None = None) -> None:
        """``fn`` over ``items`` on the worker's bound; the first failure stops the rest
        (``cancel`` tells the transfers in flight to stop at their next chunk)."""
        run_all(fn, items, self.options.workers, size=size, name="publish",
                on_error=self.cancel.set)


def _staging_dir(work_dir: str, uri: str, revision: str) -> str:
    key = hashlib.sha256(f"{uri}\0{revision}".encode()).hexdigest()[:24]
    return os.path.join(work_dir, f"stage-{key}")


def _prepare(source: base.Source, tracker: Tracker, options: Options, work_dir: str,
             store: BlobStore | None) -> tuple[base.Resolved, BlobStore, str]:
    tracker.set_phase("resolve")
    resolved: base.Resolved = _retry(source.resolve, options.resolve_attempts, source.uri)
    root = _staging_dir(work_dir, source.uri, resolved.revision)
    if store is None:
        os.makedirs(root, exist_ok=True)
        store = BlobStore(os.path.join(root, "store"))
    else:
        os.makedirs(root, exist_ok=True)
    return resolved, store, root


def _stage_and_verify(run: _Run, resolved: base.Resolved, root: str) -> ModelInfo:
    run.tracker.set_phase("download", total=resolved.size)
    try:
        # largest first, so the long transfers start early and overlap the small ones
        run.parallel(resolved.files, lambda f: run.stage(resolved.revision, f),
                     size=lambda f: f.size or 0)
    except BaseException:
        run.cancel.set()  # the pushes in flight stop at their next chunk
        run.push_pool.shutdown(wait=True, cancel_futures=True)
        raise
    run.wait_pushes()
    run.tracker.set_phase("verify")
    tree = os.path.join(root, "tree")
    if os.path.exists(tree):
        remove_tree(tree)
    place_tree(((p, run.store.path(d)) for p, (d, _) in sorted(run.files.items())), tree)
    local = [LocalFile(p, os.path.join(tree, *p.split("/")), size)
             for p, (_, size) in sorted(run.files.items())]
    return inspect_files(tree, local, run.options.expected_format, run.options.allow_pickle)


def _finish(root: str, store_given: bool, options: Options, error: PublishError | None) -> None:
    tree = os.path.join(root, "tree")
    if os.path.exists(tree):
        remove_tree(tree)
    if options.keep_staging or (error is not None and error.retryable and not store_given):
        return  # kept: the next attempt resumes from the staged blobs and .part files
    # a caller's own store (the upload gateway's) lives elsewhere and stays
    shutil.rmtree(root, ignore_errors=True)


def default_work_dir() -> str:
    """Where staging lives unless told: ``$MODELCACHE_WORK_DIR`` or a temp dir."""
    return os.environ.get("MODELCACHE_WORK_DIR") or os.path.join(
        tempfile.gettempdir(), "modelcache-publish")


@contextlib.contextmanager
def _staged(source: base.Source, options: Options, work_dir: str,
            client: RegistryClient | None, ref: Reference | None, store: BlobStore | None,
            tracker: Tracker) -> Iterator[tuple[base.Resolved, _Run, ModelInfo]]:
    """Resolve, stage and verify ``source``; map any failure to ``PublishError``.

    The staging area is finished (kept for resume or removed) on the way out,
    whatever the body that pushes the result does.
    """
    root = ""
    error: PublishError | None = None
    try:
        resolved, staged, root = _prepare(source, tracker, options, work_dir, store)
        run = _Run(source, staged, tracker, options, client, ref)
        info = _stage_and_verify(run, resolved, root)
        tracker.set_phase("push")
        yield resolved, run, info
        tracker.set_phase("done")
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        error = as_publish_error(e)
        raise error from e
    finally:
        if root:
            _finish(root, store is not None, options, error)


def publish(source: base.Source, client: RegistryClient, ref: Reference | str, *,
            work_dir: str | None = None, sink: Sink = null_sink, options: Options | None = None,
            store: BlobStore | None = None) -> PublishResult:
    """Publish ``source`` as a ModelPack at ``ref``; raise ``PublishError`` on failure.

    ``sink`` receives progress events (dicts); staging goes under ``work_dir``
    and is kept after a retryable failure, so the next call resumes.
    """
    options = options or Options()
    ref = reference.parse(ref) if isinstance(ref, str) else ref
    with _staged(source, options, work_dir or default_work_dir(), client, ref, store,
                 Tracker(sink)) as (resolved, run, info):
        digests = {p: d for p, (d, _) in run.files.items()}
        run.parallel([(d, s) for d, s in {run.files[p] for p in run.files}],
                     lambda ds: run.push_one(*ds))
        pack = pushing.push_manifest(client, ref, info, digests, options.name)
    return PublishResult(pack.digest, pack.size, str(ref.with_digest(pack.digest)),
                         resolved.revision, pack.metadata(),
                         {"uri": source.uri, **resolved.metadata})


def publish_to_layout(source: base.Source, out_dir: str, tag: str | None = "latest", *,
                      work_dir: str | None = None, sink: Sink = null_sink,
                      options: Options | None = None) -> PublishResult:
    """Like ``publish``, into an OCI image layout directory instead of a registry."""
    options = options or Options()
    tracker = Tracker(sink)
    with _staged(source, options, work_dir or default_work_dir(), None, None, None,
                 tracker) as (resolved, _, info):
        result = pack_to_layout(info, out_dir, tag, name=options.name,
                                progress=tracker.add_pushed)
    return PublishResult(result.pack.digest, result.pack.size, out_dir, resolved.revision,
                         result.pack.metadata(), {"uri": source.uri, **resolved.metadata})
