"""The SharedPVC materializer: a ModelPack becomes a verified, read-only tree on a PVC.

Runs as ``modelcache-controller materialize`` inside the materializer Job
(``controller/delivery/materializer.py`` makes it), with the PVC mounted
read-write at ``--dest``. Layout on the volume::

    <dest>/<manifest hex>/…                the tree pods mount (subPath), read-only
    <dest>/.<manifest hex>.manifest.json   the manifest it was built from
    <dest>/.staging-<random>/              one attempt's blobs and tree
    <dest>/.materialize.lock               one writer at a time

Steps: take the lock (POSIX ``lockf``, which NFSv4 and CephFS honour, so a
replacement pod on another node waits for a stale one) → if the tree is
already there and matches its manifest record, exit 0 at once (no registry
call) → fetch the manifest (pinned by digest) → remove leftover staging
dirs of crashed attempts, keeping their verified blobs (renamed, then
rehashed) so a retry resumes → download every other layer into a fresh
staging store (hashed while written, renamed only when the digest matches)
→ place the tree from the blobs (hardlink on the same volume: no second
copy) → write the manifest record → rename the tree to its final path, the
commit point. Whatever fails, nothing appears at the final path.

Errors leave as ``MaterializeError`` with ``reason`` and ``retryable``,
which the entry point (``main``) turns into the Job result protocol's
document and exit status (``api/jobresult.py``): 75 (retry) or 1 (terminal).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from api import jobresult
from api import names as contract
from jobs import secretfiles
from modelpack import digest as dg
from modelpack import pull
from modelpack.errors import ModelPackError
from modelpack.oci import mirrors, reference
from modelpack.oci.manifest import Layer, layers_of, parse_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.paths import join_under
from modelpack.store.blobs import BlobStore, fsync_dir
from modelpack.store.placement import remove_tree

log = logging.getLogger(__name__)

LOCK_NAME = ".materialize.lock"
STAGING_PREFIX = ".staging-"
BROKEN_PREFIX = ".broken-"
MAX_RECORD = 4 << 20  # the registry client's own bound on a manifest


class MaterializeError(jobresult.JobError):
    """A materialization failed; ``retryable`` decides the exit code (``jobresult``)."""


@dataclass(frozen=True)
class Result:
    digest: str
    path: str  # the tree, absolute
    files: int
    size: int
    skipped: bool  # the tree was already there and intact
    salvaged: int = 0  # verified blobs taken over from a crashed attempt

    def to_json(self) -> dict[str, Any]:
        return {"digest": self.digest, "path": self.path, "files": self.files,
                "sizeBytes": self.size, "skipped": self.skipped, "salvaged": self.salvaged}


def as_error(e: BaseException) -> MaterializeError:
    """The one place where core and OS errors become the materializer's error."""
    if isinstance(e, MaterializeError):
        return e
    if isinstance(e, ModelPackError):
        return MaterializeError(str(e), reason=e.reason, retryable=bool(e.retryable))
    if isinstance(e, OSError):
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            # retryable: the PVC may be expanded; the Job's backoff limit bounds the waiting
            return MaterializeError(f"no space left on the volume: {e}", reason="NoSpace",
                                    retryable=True)
        return MaterializeError(f"volume I/O: {e}", reason="VolumeError", retryable=True)
    return MaterializeError(f"{type(e).__name__}: {e}", reason="InternalError", retryable=False)


def record_path(dest: str, digest: str) -> str:
    return os.path.join(dest, f".{contract.pvc_subpath(digest)}.manifest.json")


def tree_path(dest: str, digest: str) -> str:
    return os.path.join(dest, contract.pvc_subpath(digest))


def intact(dest: str, digest: str) -> tuple[int, int] | None:
    """(files, bytes) if the tree of ``digest`` is in place and matches its manifest record.

    The record hashes to the digest (so it is the manifest, not any file), and
    every layer's file is there with its size. Contents are not rehashed: the
    tree was renamed into place only after every blob had been verified.
    """
    tree, rec = tree_path(dest, digest), record_path(dest, digest)
    if not os.path.isdir(tree):
        return None
    try:
        with open(rec, "rb") as f:
            raw = f.read(MAX_RECORD + 1)
        manifest, _ = parse_manifest(raw, digest)
        layers = layers_of(manifest)
        for layer in layers:
            st = os.lstat(join_under(tree, layer.path))
            if not stat.S_ISREG(st.st_mode) or st.st_size != layer.size:
                return None
    except (OSError, ValueError, KeyError, TypeError, ModelPackError):
        return None
    return len(layers), sum(layer.size for layer in layers)


class _Lock:
    """An exclusive POSIX lock on ``<dest>/.materialize.lock``, waited for up to ``timeout``."""

    def __init__(self, dest: str, timeout: float) -> None:
        self.path = os.path.join(dest, LOCK_NAME)
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> _Lock:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() > deadline:
                os.close(self.fd)
                raise MaterializeError(f"{self.path} is held by another materializer",
                                       reason="Locked", retryable=True)
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing drops the lock


def _salvage(dest: str, store: BlobStore, wanted: dict[str, Layer]) -> int:
    """Move verified blobs out of crashed attempts' staging dirs, then remove those dirs.

    Under the lock no other writer is alive, so every staging dir is a leftover.
    A salvaged blob is rehashed before it counts: it came from a dead process.
    """
    kept = 0
    for name in sorted(os.listdir(dest)):
        full = os.path.join(dest, name)
        if full == os.path.dirname(store.root) or not (
                name.startswith(STAGING_PREFIX) or name.startswith(BROKEN_PREFIX)):
            continue
        old = os.path.join(full, "store", "blobs", "sha256")
        for hexpart in (os.listdir(old) if os.path.isdir(old) else []):
            layer = wanted.get("sha256:" + hexpart)
            if layer is None or store.has(layer.digest, layer.size):
                continue
            src = os.path.join(old, hexpart)
            got, size = dg.of_file(src)
            if got == layer.digest and size == layer.size:
                os.rename(src, store.path(layer.digest))
                kept += 1
        log.info("removing a leftover staging dir", extra={"path": full})
        remove_tree(full)
    return kept


def materialize(client: RegistryClient, ref: Reference, dest: str, digest: str | None = None,
                *, progress: Callable[[int], None] | None = None, workers: int = pull.WORKERS,
                lock_timeout: float = 600.0) -> Result:
    """Ensure the verified tree of ``ref`` (pinned to ``digest`` if given) under ``dest``."""
    try:
        return _materialize(client, ref, dest, digest, progress or (lambda _: None), workers,
                            lock_timeout)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit):
            raise
        raise as_error(e) from e


def _materialize(client: RegistryClient, ref: Reference, dest: str, digest: str | None,
                 progress: Callable[[int], None], workers: int, lock_timeout: float) -> Result:
    if digest is not None:
        try:
            digest = dg.validate(digest)
        except ModelPackError as e:
            raise MaterializeError(str(e), reason="InvalidDigest", retryable=False) from e
        if ref.digest and ref.digest != digest:
            raise MaterializeError(f"{ref} is not pinned to {digest}", reason="DigestMismatch",
                                   retryable=False)
    digest = digest or ref.digest
    dest = os.path.abspath(dest)
    os.makedirs(dest, exist_ok=True)
    with _Lock(dest, lock_timeout):
        if digest is not None and (found := intact(dest, digest)) is not None:
            return Result(digest, tree_path(dest, digest), found[0], found[1], True)
        pack = pull.resolve(client, ref.with_digest(digest) if digest else ref)
        digest = pack.digest
        final = tree_path(dest, digest)
        if (found := intact(dest, digest)) is not None:
            return Result(digest, final, found[0], found[1], True)
        if os.path.lexists(final):
            # a tree without a matching record (or with a file missing or cut): never
            # trusted; moved aside first so its removal cannot race a reader's open
            aside = os.path.join(dest, BROKEN_PREFIX + secrets.token_hex(6))
            log.warning("replacing a damaged tree", extra={"path": final})
            os.rename(final, aside)
            remove_tree(aside)
        staging = os.path.join(dest, STAGING_PREFIX + secrets.token_hex(6))
        store = BlobStore(os.path.join(staging, "store"))
        try:
            salvaged = _salvage(dest, store, {layer.digest: layer for layer in pack.layers})
            pull.fetch_blobs(client, ref.repository, pack.layers, store, progress, workers)
            tree = os.path.join(staging, "tree")
            method = pull.place(pack, store, tree)
            _write_record(dest, digest, pack.manifest_bytes)
            # moving a directory to another parent rewrites its "..": without
            # CAP_DAC_OVERRIDE (the Job drops every capability) that needs write
            # permission on the read-only tree itself, for the rename only
            os.chmod(tree, 0o755)
            os.rename(tree, final)  # the commit point
            os.chmod(final, 0o555)
            fsync_dir(dest)
        except BaseException as e:
            # after a retryable failure the verified blobs stay for the next attempt to
            # salvage; a terminal one (a corrupt blob, a bad manifest) leaves nothing
            if not as_error(e).retryable:
                remove_tree(staging)
            raise
        remove_tree(staging)
        log.info("materialized", extra={"digest": digest, "path": final, "files": len(
            pack.layers), "bytes": pack.size, "salvagedBlobs": salvaged, "method": method.value})
        return Result(digest, final, len(pack.layers), pack.size, False, salvaged)


def _write_record(dest: str, digest: str, raw: bytes) -> None:
    path = record_path(dest, digest)
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o444)
    os.replace(tmp, path)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("materialize", help="pull a ModelPack into a SharedPVC, verified")
    p.add_argument("--reference", required=True, help="registry reference HOST/REPO[:TAG][@DIGEST]")
    p.add_argument("--dest", required=True, help="the PVC's mount point")
    p.add_argument("--digest", help="the manifest digest the tree must have (sha256:…)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.add_argument("--result-file", default="-", help="the result JSON ('-' = stdout)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--registry-mirror", action="append", default=[], metavar="HOST=URL",
                   help="ask URL first for HOST's blobs and pinned manifests (repeatable; "
                        "every byte is verified, the registry is the fallback)")
    p.add_argument("--registry-hosts-file", default=None, metavar="FILE",
                   help="a hosts.toml (containerd's format) with the mirrors of the "
                        "reference's registry, asked before any --registry-mirror")
    p.add_argument("--lock-timeout", type=float, default=600.0,
                   help="seconds to wait for another materializer of the same volume")


def mirrors_of(host: str, hosts_file: str | None, flags: list[str]) -> mirrors.Mirrors:
    """The mirrors of ``host``: those of ``hosts_file`` (the manager's, from the Job's
    Secret) first, then ``HOST=URL`` flags."""
    config = mirrors.load(flags=flags)
    if not hosts_file:
        return config
    try:
        with open(hosts_file, encoding="utf-8") as f:
            listed = mirrors.parse_hosts_toml(f.read(), hosts_file)
    except OSError as e:
        raise MaterializeError(f"{hosts_file}: {e.strerror}", reason="InvalidMirror",
                               retryable=False) from e
    return mirrors.Mirrors({**config.by_host, host: listed + config.of(host)})


def main(args: Any) -> int:
    """The ``materialize`` subcommand: the result JSON to ``--result-file``, the exit status;
    registry credentials from MODELCACHE_REGISTRY_USERNAME/_PASSWORD."""
    code = jobresult.OK
    result: dict[str, Any]
    try:
        try:
            ref = reference.parse(args.reference)
        except ModelPackError as e:
            raise MaterializeError(str(e), reason="InvalidReference", retryable=False) from e
        secretfiles.load()  # the pull credential: files of the Job's Secret
        client = RegistryClient(ref.host, insecure=args.insecure,
                                ca_bundle=secretfiles.ca_file(),
                                username=os.environ.get("MODELCACHE_REGISTRY_USERNAME") or None,
                                password=os.environ.get("MODELCACHE_REGISTRY_PASSWORD") or None)
        try:
            mirrors_of(ref.host, args.registry_hosts_file,
                       args.registry_mirror).attach(client, ref.host)
        except ModelPackError as e:
            raise MaterializeError(str(e), reason="InvalidMirror", retryable=False) from e
        result = materialize(client, ref, args.dest, args.digest, workers=args.workers,
                             lock_timeout=args.lock_timeout).to_json()
    except MaterializeError as e:
        result, code = jobresult.from_error(e)
    jobresult.write(result, args.result_file)
    return code
