"""Per-blob single flight: concurrent writers of overlapping digests, with faults.

A property test of ``modelpack.store.blobs`` as its users drive it, against
the real registry behind a fault-injecting proxy (``_FaultProxy``, a
loopback proxy like tests/flakyproxy.py whose blob GETs, drawn from a seeded
RNG, ignore ``Range`` (the writer restarts) or are cut mid-body (the writer
resumes)). The store sits on a small tmpfs. In every round, at once: the
node cache (``csi.cache.Cache``, 4 pull workers) pulls four models that
share layers; two threads fetch random subsets of those layers the way
``modelcache pull`` and the materializer do (``modelpack.pull.fetch_blobs``);
a second process (``peer``) does the same; a third (``victim``) starts
writing a shared layer slowly and is killed with SIGKILL mid-write, lock
held; a ballast file fills the disk for a moment (ENOSPC, and the cache's
clean-up after it). Bounded in time (~15 s of rounds); the seed is printed
(``MODELCACHE_TEST_SEED`` replays one).

Asserted after every round: every file under ``blobs/sha256/<hex>`` hashes
to ``<hex>``; every failure is a typed ``ModelPackError`` (never a raw
``OSError``), retryable, and a gRPC code kubelet retries, and never an
``IntegrityError`` (the registry serves only good bytes, so one would mean
writers mixed their bytes); no writer found its ``.part`` removed under it. At the end: after ``recover()`` only resumable
prefixes of blobs not yet stored are left in ``ingest/``, none locked; then
every model pulls and verifies, and ``ingest/`` is empty.
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from csi.cache import Cache
from csi.errors import to_csi
from modelpack import digest as dg
from modelpack import pull as mpull
from modelpack.errors import IntegrityError, ModelPackError
from modelpack.oci.manifest import Layer
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.store import blobs
from tests import modelgen
from tests.loopfs import tmpfs_mount

KUBELET_RETRIES = {"ABORTED", "UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"}
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REPOSITORY = "sf/models"
ROUNDS_SECONDS = 15.0
MAX_ROUNDS = 8


class _FaultProxy:
    """Forwards GET/HEAD to the registry; blob GETs misbehave as ``rng`` draws."""

    def __init__(self, upstream: str, seed: int) -> None:
        self.upstream = upstream
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.faults = True
        self.counts = {"cut": 0, "ignored_range": 0, "blob_gets": 0}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                is_blob = self.command == "GET" and "/blobs/sha256:" in self.path
                ignore_range, cut_frac = proxy._draw(is_blob, "Range" in self.headers)
                if ignore_range:
                    headers.pop("Range", None)  # a server or CDN that ignores Range: 200, whole
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                conn.request(self.command, self.path, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status)
                length = 0
                for k, v in resp.getheaders():
                    if k.lower() in ("connection", "transfer-encoding"):
                        continue
                    if k.lower() == "content-length":
                        length = int(v)
                    self.send_header(k, v)
                self.end_headers()
                if self.command == "HEAD":
                    conn.close()
                    return
                cut = int(length * cut_frac) if cut_frac and length >= 256 << 10 else None
                sent = 0
                while True:
                    chunk = resp.read(256 << 10)
                    if not chunk:
                        break
                    if cut is not None and sent + len(chunk) > cut:
                        self.wfile.write(chunk[:cut - sent])  # truncated: the body ends early
                        self.wfile.flush()
                        self.close_connection = True
                        conn.close()
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(chunk)
                    sent += len(chunk)
                conn.close()

            do_HEAD = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host = f"127.0.0.1:{self.server.server_address[1]}"

    def _draw(self, is_blob: bool, has_range: bool) -> tuple[bool, float]:
        with self.lock:
            if not is_blob:
                return False, 0.0
            self.counts["blob_gets"] += 1
            if not self.faults:
                return False, 0.0
            ignore = has_range and self.rng.random() < 0.5
            cut = self.rng.uniform(0.1, 0.9) if self.rng.random() < 0.3 else 0.0
            self.counts["ignored_range"] += ignore
            self.counts["cut"] += bool(cut)
            return ignore, cut

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- what every writer records -------------------------------------------------------

def _watch_lost_parts(patch: Callable[[Any, str, Any], None], lost: list[str]) -> None:
    """Record a writer whose ``.part`` was unlinked under it (it would commit nothing
    or, worse, someone else's file): checked on the writer's own fd before it commits."""
    finish = blobs.PartialBlob.finish

    def watched(self: Any) -> str:
        fd = getattr(self, "fd", -1)
        if fd >= 0 and os.fstat(fd).st_nlink == 0:
            lost.append(self.path)
        return finish(self)

    patch(blobs.PartialBlob, "finish", watched)


def _outcome(e: BaseException | None) -> dict[str, Any] | None:
    if e is None:
        return None
    return {"type": type(e).__name__, "typed": isinstance(e, ModelPackError)
            and not isinstance(e, OSError), "integrity": isinstance(e, IntegrityError),
            "retryable": bool(getattr(e, "retryable", False)), "code": to_csi(e).code.name,
            "message": str(e)[:300]}


def _fetch(client: RegistryClient, layers: list[Layer], root: str,
           progress: Callable[[int], None] = lambda n: None) -> dict[str, Any] | None:
    try:
        mpull.fetch_blobs(client, REPOSITORY, tuple(layers), blobs.BlobStore(root),
                          progress=progress, workers=2)
    except BaseException as e:  # classified, not swallowed: the test asserts on it
        return _outcome(e)
    return None


# -- the child processes ---------------------------------------------------------------

def _child(argv: list[str]) -> None:
    """``peer ROOT HOST``: fetch what stdin asks, one JSON line in, one out.
    ``victim ROOT HOST LAYERS_JSON``: fetch slowly, say "writing" once bytes flow,
    and wait to be killed."""
    role, root, host = argv[:3]
    client = RegistryClient(host, insecure=True, retries=8)
    lost: list[str] = []
    _watch_lost_parts(setattr, lost)
    if role == "victim":
        layers = [Layer(*x) for x in json.loads(argv[3])]
        said = False

        def slow(n: int) -> None:
            nonlocal said
            if n > 0 and not said:
                said = True
                print("writing", flush=True)
            time.sleep(0.02)  # holds the blob's lock for a while: killed mid-write

        _fetch(client, layers, root, slow)
        print("done", flush=True)
        return
    print("ready", flush=True)
    for line in sys.stdin:
        layers = [Layer(*x) for x in json.loads(line)]
        del lost[:]
        out = _fetch(client, layers, root)
        print(json.dumps({"error": out, "lost": list(lost)}), flush=True)


def _wire(layer: Layer) -> list[Any]:
    return [layer.path, layer.digest, layer.size, layer.media_type]


def _spawn(*args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_blob_single_flight", *args],
        cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc


def _read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    box: list[str] = []
    t = threading.Thread(target=lambda: box.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    return box[0].strip() if box else ""


# -- the checks -------------------------------------------------------------------------

def _check_blobs(root: str) -> None:
    blob_dir = os.path.join(root, "blobs", "sha256")
    for name in os.listdir(blob_dir):
        got, _ = dg.of_file(os.path.join(blob_dir, name))
        assert got == "sha256:" + name, f"blobs/sha256/{name} holds bytes of {got}"


def _check_ingest_after_recover(root: str, sizes: dict[str, int]) -> None:
    ingest = os.path.join(root, "ingest")
    for name in os.listdir(ingest):
        m = re.fullmatch(r"([0-9a-f]{64})\.part", name)
        assert m, f"ingest/{name} is nobody's to resume"
        digest = "sha256:" + m.group(1)
        full = os.path.join(ingest, name)
        assert digest in sizes, f"ingest/{name} is no blob of these models"
        assert not os.path.exists(os.path.join(root, "blobs", "sha256", m.group(1))), \
            f"ingest/{name} is left though its blob is stored"
        # a whole one is resumable too: its writer was killed between its last byte and
        # its commit, and the next one commits it without fetching
        assert 0 < os.path.getsize(full) <= sizes[digest], f"ingest/{name} resumes nothing"
        fd = os.open(full, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: nobody is writing it
        finally:
            os.close(fd)


# -- the test -----------------------------------------------------------------------------

@pytest.fixture
def small_fs() -> Iterator[str]:
    with tmpfs_mount(size=48 << 20) as mnt:
        yield mnt


def _models(tmp: str, client: RegistryClient, host: str,
            rng: random.Random) -> tuple[list[Reference], list[Layer], dict[str, int]]:
    """Four models over six shards, each shard in two models; plus a config each.
    Returns the references, their layers, and the size of every blob they need."""
    shards = []
    for i in range(6):
        path = os.path.join(tmp, f"shard-{i}.safetensors")
        modelgen.write_big_safetensors(path, rng.randrange(1 << 20, 3 << 20), seed=rng.randrange(1 << 30))
        shards.append(path)
    refs = []
    for m in range(4):
        src = os.path.join(tmp, f"m{m}")
        os.makedirs(src)
        for k in (m, m + 1, m + 3):
            os.link(shards[k % 6], os.path.join(src, f"w{k % 6}.safetensors"))
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump({"model_type": "llama", "name": f"m{m}"}, f)
        pack_to_registry(src, client, Reference(host, REPOSITORY, tag=f"m{m}"))
        refs.append(Reference(host, REPOSITORY, tag=f"m{m}"))
    layers = {}
    sizes = {}
    for ref in refs:
        pack = mpull.resolve(client, ref)
        for layer in pack.layers:
            layers[layer.digest] = layer
        sizes[pack.digest] = len(pack.manifest_bytes)
        sizes[pack.config_digest] = len(pack.config_bytes)
    sizes.update((x.digest, x.size) for x in layers.values())
    return refs, sorted(layers.values(), key=lambda x: x.digest), sizes


@pytest.mark.root
def test_writers_of_overlapping_digests_under_faults(tmp_path: Any, registry: Any,
                                                     client: RegistryClient, small_fs: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seed = int(os.environ.get("MODELCACHE_TEST_SEED") or random.randrange(1 << 30))
    print(f"seed={seed} (MODELCACHE_TEST_SEED={seed} replays it)")
    rng = random.Random(seed)
    refs, shards, sizes = _models(str(tmp_path), client, registry.host, rng)
    proxy = _FaultProxy(registry.host, seed)
    root = os.path.join(small_fs, "cache")
    lost: list[str] = []
    _watch_lost_parts(monkeypatch.setattr, lost)
    via = RegistryClient(proxy.host, insecure=True, retries=8)
    cache = Cache(root, lambda host: via, pull_workers=4, blob_workers=3)
    cache.recover()
    peer = _spawn("peer", root, proxy.host)
    failures: list[dict[str, Any]] = []
    rounds = 0
    try:
        assert _read_line(peer, 30) == "ready"
        start = time.monotonic()
        while rounds < MAX_ROUNDS and time.monotonic() - start < ROUNDS_SECONDS:
            rounds += 1
            _round(rng, cache, via, refs, shards, root, small_fs, peer, failures, lost)
        # the end: no faults, nothing running; recovery, then everything pulls and verifies
        proxy.faults = False
        assert peer.stdin is not None
        peer.stdin.close()
        peer.wait(30)
        cache.recover()
        _check_ingest_after_recover(root, sizes)
        for ref in refs:
            digest = cache.pull(ref).result(60)
            pack = cache.pack_of(digest)
            assert pack is not None
            mpull.verify_tree(pack, cache.tree_path(digest))
        _check_blobs(root)
        assert os.listdir(os.path.join(root, "ingest")) == []
    finally:
        if peer.poll() is None:
            peer.kill()
            peer.wait()
        cache.close()
        proxy.close()
    kinds = Counter(f"{f['type']}(retryable={f['retryable']})" for f in failures)
    print(f"rounds={rounds} faults={proxy.counts} failures={dict(kinds)}")
    assert proxy.counts["cut"] and proxy.counts["ignored_range"], "no faults were drawn"


def _round(rng: random.Random, cache: Cache, via: RegistryClient, refs: list[Reference],
           shards: list[Layer], root: str, fs: str, peer: subprocess.Popen[str],
           failures: list[dict[str, Any]], lost: list[str]) -> None:
    victim_layers = rng.sample([x for x in shards if x.size >= 1 << 20], 2)
    victim = _spawn("victim", root, via.host, json.dumps(
        [_wire(x) for x in victim_layers]))
    results: list[dict[str, Any] | None] = []
    box_lock = threading.Lock()

    def fetch_subset(layers: list[Layer]) -> None:
        out = _fetch(via, layers, root)
        with box_lock:
            results.append(out)

    def disk_full(at: float, hold: float) -> None:
        time.sleep(at)
        ballast = os.path.join(fs, "ballast")
        st = os.statvfs(fs)
        try:
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(1, st.f_bavail * st.f_frsize - (256 << 10)))
            except OSError:
                pass  # the disk filled up anyway: that is the point
            finally:
                os.close(fd)
            time.sleep(hold)
        finally:
            os.unlink(ballast)

    try:
        # the victim first takes a lock, so the others meet a held lock and its prefix
        assert _read_line(victim, 30) == "writing", "the victim never wrote"
        futures = [cache.pull(ref) for ref in refs]
        threads = [threading.Thread(target=fetch_subset, args=(rng.sample(shards, 3),))
                   for _ in range(2)]
        threads.append(threading.Thread(target=disk_full,
                                        args=(rng.uniform(0.0, 0.5), rng.uniform(0.05, 0.3))))
        for t in threads:
            t.start()
        assert peer.stdin is not None
        peer.stdin.write(json.dumps([_wire(x) for x in rng.sample(shards, 3)]) + "\n")
        peer.stdin.flush()
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(victim.pid, signal.SIGKILL)  # mid-write, its lock held
        victim.wait(10)
        for fut in futures:
            results.append(_outcome(fut.exception(60)))
        for t in threads:
            t.join(60)
        reply = json.loads(_read_line(peer, 60) or "null")
        assert reply is not None, "the peer process gave no answer"
        results.append(reply["error"])
        lost.extend(reply["lost"])
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    failed = [r for r in results if r is not None]
    failures.extend(failed)
    assert [f for f in failed if not f["typed"]] == [], "a raw error left the store"
    assert [f for f in failed if f["integrity"]] == [], "writers mixed their bytes"
    # every fault here passes (space comes back, the registry answers): nothing is final,
    # and the node plugin answers kubelet with a code it retries
    assert [f for f in failed if not f["retryable"] or f["code"] not in KUBELET_RETRIES] == []
    assert lost == [], "a live writer's .part was removed"
    _check_blobs(root)
    # next round writes again: drop every tree and blob (nothing runs now)
    cache.evict(0)
    store = blobs.BlobStore(root)
    for d in store.digests():
        store.delete(d)


if __name__ == "__main__":
    _child(sys.argv[1:])
