"""The CSI Node service: publish a cached model read-only into a pod.

Every RPC validates its arguments first (INVALID_ARGUMENT), then reads the
current state (mountinfo, the volume's record), then acts, and returns
early when nothing is owed, so kubelet's retries are harmless.

The server is asyncio (grpc.aio): a publish waiting for a pull awaits a
future and holds no thread, so fifty pods asking for the same model cost
fifty coroutines, not fifty threads, and Probe is never queued behind
them. Blocking work (mount(2), mountinfo, files) runs on a small executor;
pulls run on the cache's own pool and go on when a call's deadline passes
(the call answers ABORTED; kubelet retries and rejoins the same pull).

Per volume, a record (``csi.volumes``: an append-only journal, not a file
per volume) keeps which model a target shows, so a repeated publish is
answered without a registry round trip and a different model at a mounted
target is ALREADY_EXISTS.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import errno
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from csi import errors, metrics, mounts, volumes
from csi.cache import Cache, Tree
from csi.errors import CsiError
from csi.resolvers.base import Resolved, Resolver, Volume, require_inline
from csi.stubs import pb, rpc
from kube import logs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Leave this much of a call's deadline to answer ABORTED before kubelet gives up.
DEADLINE_MARGIN = 1.0


def rpc_method(histogram: Any = None) -> Callable[..., Any]:
    """Answer a CsiError (or any exception) with its gRPC code, once, and time the call."""

    def wrap(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        by_code: dict[str, Any] = {}  # the histogram's child per code: labels() takes a lock

        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            code = "OK"
            try:
                return await fn(self, request, context)
            except Exception as e:  # every failure leaves as a status code
                err = errors.to_csi(e)
                code = err.code.name
                level = logging.ERROR if err.code == grpc.StatusCode.INTERNAL else logging.INFO
                log.log(level, "rpc failed", extra={"rpc": fn.__name__, "code": code,
                                                    "error": err.message},
                        exc_info=err.code == grpc.StatusCode.INTERNAL)
                await context.abort(err.code, err.message)
            finally:
                if histogram is not None:
                    child = by_code.get(code)
                    if child is None:
                        child = by_code[code] = histogram.labels(code)
                    child.observe(time.monotonic() - start)

        return handler

    return wrap


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():  # the call went away (cancelled or past its deadline)
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class NodeService(rpc.NodeServicer):  # type: ignore[misc,name-defined]
    def __init__(self, node_id: str, cache: Cache, resolver: Resolver, *,
                 max_wait: float = 110.0, workers: int = 8) -> None:
        self.node_id = node_id
        self.cache = cache
        self.resolver = resolver
        self.max_wait = max_wait
        self.records = volumes.VolumeRecords(cache.root)
        self._executor = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="node")
        self._target_locks: dict[str, asyncio.Lock] = {}
        self.ready = asyncio.Event()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # What run_in_executor does, minus chaining a second future to the pool's
        # one (six callbacks on the event loop per call); the loop is the
        # bottleneck of fifty publishes at once.
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def work() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # handed to the awaiting coroutine, raised there
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self._executor.submit(work)
        return await done

    def recover(self) -> None:
        """Load the volume records, dropping those whose mount is gone (unpublished
        while we were down)."""
        self.records.load(m.mount_point for m in mounts.read_mounts())

    def _lock_for(self, target: str) -> asyncio.Lock:
        lock = self._target_locks.get(target)
        if lock is None:
            lock = self._target_locks[target] = asyncio.Lock()
        return lock

    def _unlock(self, target: str, lock: asyncio.Lock) -> None:
        if not lock.locked() and self._target_locks.get(target) is lock:
            del self._target_locks[target]

    async def _wait_ready(self, context: grpc.aio.ServicerContext) -> None:
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), timeout=10)
        except TimeoutError:
            raise errors.unavailable("cache recovery still running") from None

    # -- capabilities and info -----------------------------------------------------

    @rpc_method()
    async def NodeGetCapabilities(self, request: Any, context: Any) -> Any:
        rpc_type = pb.NodeServiceCapability.RPC
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=rpc_type(type=rpc_type.GET_VOLUME_STATS)),
            pb.NodeServiceCapability(rpc=rpc_type(type=rpc_type.VOLUME_CONDITION)),
        ])

    @rpc_method()
    async def NodeGetInfo(self, request: Any, context: Any) -> Any:
        # no topology: any node can serve any model; no volume limit: binds are cheap
        return pb.NodeGetInfoResponse(node_id=self.node_id, max_volumes_per_node=0)

    # -- publish -------------------------------------------------------------------

    @rpc_method(metrics.PUBLISH_SECONDS)
    async def NodePublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        if not request.target_path:
            raise errors.invalid("target_path is required")
        if not request.HasField("volume_capability"):
            raise errors.invalid("volume_capability is required")
        if request.volume_capability.HasField("block"):
            raise errors.invalid("block access is not supported: models are directories")
        if not os.path.isabs(request.target_path):
            raise errors.invalid("target_path must be absolute")
        ctx = dict(request.volume_context)
        require_inline(ctx)
        volume = Volume.from_context(ctx)
        target = os.path.normpath(request.target_path)
        await self._wait_ready(context)

        lock = self._lock_for(target)
        async with lock:
            try:
                digest = await self._publish(request.volume_id, target, volume, context)
            finally:
                self._unlock(target, lock)
        log.info("published", extra={"volumeId": request.volume_id, "target": target,
                                     "digest": digest, "volumeContext": logs.redact(ctx)})
        return pb.NodePublishVolumeResponse()

    def _publish_cached(self, volume_id: str, target: str, volume: Volume) -> str | Resolved:
        """The whole warm path in one executor hop: returns the digest published, or the
        resolved reference when a pull (or a comparison with an existing mount) is needed."""
        # kubelet creates only the parent: a target that does not exist is not mounted
        current = mounts.mounts_at(target) if os.path.lexists(target) else []
        if current:
            record = self.records.get(target)
            if record is not None:
                if record.get("key") == volume.key:
                    return str(record.get("digest"))  # already published: idempotent
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} already shows {record.get('key')}, not {volume.key}")
        resolved = self.resolver.resolve(volume)
        if current:
            return resolved
        digest = self.cache.local_digest(resolved.reference)
        tree = self.cache.lease(digest) if digest else None
        if tree is None:
            return resolved
        try:
            self._mount(tree, target)
            self.records.put(target, volume_id, volume.key, tree.digest)
        finally:
            self.cache.release(tree.digest)
        metrics.HITS.inc()
        return tree.digest

    async def _publish(self, volume_id: str, target: str, volume: Volume, context: Any) -> str:
        done = await self._run(self._publish_cached, volume_id, target, volume)
        if isinstance(done, str):
            return done
        resolved = done
        current = await self._run(mounts.mounts_at, target)
        tree = await self._ensure(resolved.reference, resolved.pin, context)
        try:
            if current:
                if await self._run(self._shows, target, tree):
                    await self._run(self.records.put, target, volume_id, volume.key, tree.digest)
                    return tree.digest
                raise CsiError(grpc.StatusCode.ALREADY_EXISTS,
                               f"{target} is already mounted with something else")
            await self._run(self._mount, tree, target)
            await self._run(self.records.put, target, volume_id, volume.key, tree.digest)
            return tree.digest
        finally:
            self.cache.release(tree.digest)

    async def _ensure(self, ref: Any, pin: bool, context: Any) -> Tree:
        """A leased tree for ``ref``, pulling if needed, within the call's deadline."""
        remaining = context.time_remaining()
        budget = self.max_wait if remaining is None else min(self.max_wait,
                                                              remaining - DEADLINE_MARGIN)
        until = time.monotonic() + max(0.0, budget)
        for _ in range(3):  # a tree evicted between pull and lease is pulled again
            digest = self.cache.local_digest(ref)
            if digest is not None:
                tree = self.cache.lease(digest)
                if tree is not None:
                    metrics.HITS.inc()
                    return tree
            metrics.MISSES.inc()  # counted per pull started or joined, not per retry of it
            fut = self.cache.pull(ref, pin)
            wait = until - time.monotonic()
            try:
                digest = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)),
                                                timeout=max(0.0, wait))
            except TimeoutError:
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"still pulling {ref}; the pull goes on, retry to rejoin it") from None
            tree = self.cache.lease(digest)
            if tree is not None:
                return tree
        raise CsiError(grpc.StatusCode.ABORTED, f"{ref} was evicted while publishing; retry")

    def _shows(self, target: str, tree: Tree) -> bool:
        table = mounts.read_mounts()
        dev, inner = mounts.fs_path(tree.path, table)
        top = mounts.mounts_at(target, table)
        return bool(top) and mounts.shows(top[-1], dev, inner) and top[-1].read_only

    def _mount(self, tree: Tree, target: str) -> None:
        created = False
        try:
            os.mkdir(target, 0o755)
            created = True
        except FileExistsError:
            if not os.path.isdir(target):
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{target} exists and is not a directory") from None
        except FileNotFoundError:
            raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the parent of {target} does not exist") from None
        try:
            mounts.bind_read_only(tree.path, target)
        except BaseException as e:
            if created:
                os.rmdir(target)
            if isinstance(e, mounts.MountError) and e.errno == errno.ENOENT \
                    and not os.path.isdir(tree.path):
                # scrub tainted the tree (moved it away) between the lease and the
                # bind: not final; kubelet's retry gets the fresh, verified copy
                raise CsiError(grpc.StatusCode.ABORTED,
                               f"model tree {tree.digest} was withdrawn before the mount "
                               "(tainted by scrub); retry") from e
            raise

    # -- unpublish -----------------------------------------------------------------

    @rpc_method(metrics.UNPUBLISH_SECONDS)
    async def NodeUnpublishVolume(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        if not request.target_path:
            raise errors.invalid("target_path is required")
        target = os.path.normpath(request.target_path)
        lock = self._lock_for(target)
        async with lock:
            try:
                await self._run(self._unpublish, target)
            finally:
                self._unlock(target, lock)
        log.info("unpublished", extra={"volumeId": request.volume_id, "target": target})
        return pb.NodeUnpublishVolumeResponse()

    def _unpublish(self, target: str) -> None:
        mounts.unmount_all(target)
        try:
            if os.path.isdir(target) and not os.path.islink(target):
                os.rmdir(target)
            else:
                os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno == errno.ENOTEMPTY:  # not ours to delete: say so, keep the data
                raise CsiError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"{target} is not empty after unmount") from e
            raise
        self.records.drop(target)
        self.cache.sweep_tainted()  # a corrupt tree scrub kept for this mount may go now

    # -- stats ---------------------------------------------------------------------

    @rpc_method()
    async def NodeGetVolumeStats(self, request: Any, context: Any) -> Any:
        if not request.volume_id:
            raise errors.invalid("volume_id is required")
        if not request.volume_path:
            raise errors.invalid("volume_path is required")
        path = os.path.normpath(request.volume_path)
        await self._wait_ready(context)  # records are loaded by then
        current = await self._run(mounts.mounts_at, path)
        record = self.records.get(path)
        if not current or record is None or record.get("volumeId") != request.volume_id:
            raise errors.not_found(f"volume {request.volume_id} is not published at {path}")
        pack = self.cache.pack_of(record["digest"])
        abnormal = pack is None or current[-1].root.endswith("//deleted")
        size = pack.size if pack else 0
        files = len(pack.layers) if pack else 0
        unit = pb.VolumeUsage
        return pb.NodeGetVolumeStatsResponse(
            usage=[unit(total=size, used=size, available=0, unit=unit.BYTES),
                   unit(total=files, used=files, available=0, unit=unit.INODES)],
            volume_condition=pb.VolumeCondition(
                abnormal=abnormal,
                message="model no longer in the node cache" if abnormal else "ok"))

    # -- not offered -----------------------------------------------------------------

    async def _unimplemented(self, context: Any, what: str) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{what} is not offered by this node-only ephemeral driver")

    async def NodeStageVolume(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "NodeStageVolume")

    async def NodeUnstageVolume(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "NodeUnstageVolume")

    async def NodeExpandVolume(self, request: Any, context: Any) -> Any:
        return await self._unimplemented(context, "NodeExpandVolume")
