"""Ranged download of one large blob: N byte ranges at once, written in place.

The real docker-registry on loopback holds a 64 MiB single-file model; the
threshold is lowered to 16 MiB so its weight blob goes as 8 ranges of 8 MiB
(``modelpack.oci.ranged``). Blob GETs pass tests/rangeproxy.py, which counts
bytes and can cut, strip Range, flip a byte or throttle. Acceptance: the
ranges write the right bytes and the stored blob carries no download
state; a cut mid-range resumes that range from where it stopped (the proxy
sends no byte twice); a flipped byte in one range fails the digest and
nothing is committed, nor left in ``ingest/``; a server that ignores Range
still yields the blob over one stream; a puller killed with SIGKILL
mid-download leaves a ``.part`` whose recorded ranges the next pull
resumes, fetching only what they lacked, and commits the right digest.
With a probe (the default policy), a stream at the policy's rate goes on
alone (one GET, no ranges); a slower one stops after the probe's bytes and
the rest comes in ranges from its hashed prefix, no byte fetched twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cli.local import registry as localregistry
from modelpack import digest as dg
from modelpack.errors import IntegrityError
from modelpack.oci import ranged
from modelpack.oci.manifest import ModelPack
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import fetch_blobs
from modelpack.store import partial
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.rangeproxy import RangeProxy

SIZE = 64 << 20
POLICY = RangePolicy(streams=8, min_size=16 << 20, probe=0)  # split at once
REPO = "ranged/big"


@pytest.fixture(scope="module")
def big(registry: localregistry.LocalRegistry, client: RegistryClient,
        tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelPack, str]:
    src = str(tmp_path_factory.mktemp("big"))
    modelgen.make_big_model(src, files=1, total=SIZE, seed=71)
    pack = pack_to_registry(src, client, parse(f"{registry.host}/{REPO}:v1")).pack
    weights = [x for x in pack.layers if x.size >= POLICY.min_size]
    assert len(weights) == 1
    return pack, os.path.join(src, weights[0].path)


@pytest.fixture
def proxy(registry: localregistry.LocalRegistry) -> Iterator[RangeProxy]:
    p = RangeProxy(registry.host)
    yield p
    p.close()


def _pull(proxy: RangeProxy, pack: ModelPack, root: str) -> BlobStore:
    store = BlobStore(root)
    client = RegistryClient(proxy.host, insecure=True, ranges=POLICY)
    big = tuple(x for x in pack.layers if x.size >= POLICY.min_size)
    fetch_blobs(client, REPO, big, store)
    return store


def _weight(pack: ModelPack) -> Any:
    return next(x for x in pack.layers if x.size >= POLICY.min_size)


def test_ranges_write_the_right_bytes(big: tuple[ModelPack, str], proxy: RangeProxy,
                                      tmp_path: Any) -> None:
    pack, src = big
    layer = _weight(pack)
    store = _pull(proxy, pack, str(tmp_path / "s"))
    assert len(proxy.ranges) == 8 and proxy.bytes_sent == layer.size
    starts = sorted(int(r.split("=")[1].split("-")[0]) for r in proxy.ranges)
    assert starts == [i * (8 << 20) for i in range(8)]
    path = store.path(layer.digest)
    assert dg.of_file(path) == (layer.digest, layer.size)
    with open(path, "rb") as a, open(src, "rb") as b:
        assert a.read() == b.read()
    assert partial.RANGES_XATTR not in os.listxattr(path)
    assert os.listdir(store.ingest_dir) == []


def test_a_cut_range_resumes_where_it_stopped(big: tuple[ModelPack, str], proxy: RangeProxy,
                                              tmp_path: Any) -> None:
    pack, _ = big
    layer = _weight(pack)
    proxy.cut_after, proxy.cuts_left = 3 << 20, 3  # three ranges drop at 3 MiB
    store = _pull(proxy, pack, str(tmp_path / "s"))
    assert dg.of_file(store.path(layer.digest)) == (layer.digest, layer.size)
    assert len(proxy.ranges) == 8 + 3
    resumed = [r for r in proxy.ranges if int(r.split("=")[1].split("-")[0]) % (8 << 20)]
    assert len(resumed) == 3 and all(
        int(r.split("=")[1].split("-")[0]) % (8 << 20) == 3 << 20 for r in resumed)
    assert proxy.bytes_sent == layer.size  # no byte twice: no range started over


def test_a_flipped_byte_in_one_range_commits_nothing(big: tuple[ModelPack, str],
                                                     proxy: RangeProxy, tmp_path: Any) -> None:
    pack, _ = big
    layer = _weight(pack)
    proxy.flip_at = 5 * (8 << 20) + 12345  # inside the sixth range
    root = str(tmp_path / "s")
    with pytest.raises(IntegrityError):
        _pull(proxy, pack, root)
    store = BlobStore(root)
    assert not store.has(layer.digest)
    assert os.listdir(store.blob_dir) == [] and os.listdir(store.ingest_dir) == []


def test_a_server_that_ignores_range_gets_one_stream(big: tuple[ModelPack, str],
                                                     proxy: RangeProxy, tmp_path: Any) -> None:
    pack, _ = big
    layer = _weight(pack)
    proxy.strip_range = True
    store = _pull(proxy, pack, str(tmp_path / "s"))
    assert dg.of_file(store.path(layer.digest)) == (layer.digest, layer.size)
    assert partial.RANGES_XATTR not in os.listxattr(store.path(layer.digest))
    assert proxy.gets <= 8 + 1  # the ranges that saw a 200 gave up; one stream took it


_CHILD = """
import sys
from modelpack.oci import ranged
from modelpack.oci.manifest import Layer
from modelpack.oci.registry import RegistryClient
from modelpack.pull import fetch_blobs
from modelpack.store.blobs import BlobStore
ranged.CHECKPOINT = 4 << 20
host, repo, digest, size, root = sys.argv[1:6]
client = RegistryClient(host, insecure=True, ranges=ranged.RangePolicy(8, 16 << 20, 0))
layer = Layer(path="w", digest=digest, size=int(size), media_type="x")
fetch_blobs(client, repo, (layer,), BlobStore(root))
"""


def _recorded(part: str) -> int:
    try:
        state = json.loads(os.getxattr(part, partial.RANGES_XATTR))
    except OSError:
        return 0
    return sum(d for _, _, d in state["ranges"])


def test_a_killed_puller_resumes_each_range(big: tuple[ModelPack, str], proxy: RangeProxy,
                                            tmp_path: Any) -> None:
    pack, _ = big
    layer = _weight(pack)
    root = str(tmp_path / "s")
    store = BlobStore(root)
    part = store.part_path(layer.digest)
    proxy.rate = 2 << 20  # 2 MiB/s a connection: ~4 s for the blob over 8 ranges
    child = subprocess.Popen([sys.executable, "-c", _CHILD, proxy.host, REPO, layer.digest,
                              str(layer.size), root],
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    deadline = time.monotonic() + 30
    while _recorded(part) < layer.size // 4:
        assert child.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    kept = _recorded(part)
    assert layer.size // 4 <= kept < layer.size
    assert not store.has(layer.digest)

    proxy.rate = None
    before = -1
    while before != proxy.bytes_sent:  # the proxy's threads for the dead child stop writing
        before = proxy.bytes_sent
        time.sleep(0.5)
    _pull(proxy, pack, root)
    fetched = proxy.bytes_sent - before
    assert fetched == layer.size - kept  # each range resumed at its record, none twice
    assert dg.of_file(store.path(layer.digest)) == (layer.digest, layer.size)
    assert os.listdir(store.ingest_dir) == []


def _probed(proxy: RangeProxy, pack: ModelPack, root: str, fast: float) -> BlobStore:
    store = BlobStore(root)
    policy = RangePolicy(streams=8, min_size=16 << 20, probe=8 << 20, fast=fast)
    client = RegistryClient(proxy.host, insecure=True, ranges=policy)
    fetch_blobs(client, REPO, (_weight(pack),), store)
    return store


@pytest.mark.parametrize("fast,waits_for_bytes", [(1.0, True), (1e15, False)],
                         ids=["fast-stream", "slow-but-cpu-bound"])
def test_a_stream_goes_on_alone_when_fast_or_cpu_bound(
        big: tuple[ModelPack, str], proxy: RangeProxy, tmp_path: Any,
        monkeypatch: pytest.MonkeyPatch, fast: float, waits_for_bytes: bool) -> None:
    pack, _ = big
    layer = _weight(pack)
    monkeypatch.setattr(ranged, "network_bound", lambda cpu, wall: waits_for_bytes)
    store = _probed(proxy, pack, str(tmp_path / "s"), fast=fast)
    assert proxy.gets == 1 and proxy.ranges == [] and proxy.bytes_sent == layer.size
    assert dg.of_file(store.path(layer.digest)) == (layer.digest, layer.size)


def test_a_slow_stream_is_split_after_the_probe(big: tuple[ModelPack, str], proxy: RangeProxy,
                                                tmp_path: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pack, src = big
    layer = _weight(pack)
    monkeypatch.setattr(ranged, "network_bound", lambda cpu, wall: True)  # a busy CI box
    store = _probed(proxy, pack, str(tmp_path / "s"), fast=1e15)  # no rate is fast
    spans = sorted(tuple(int(x) for x in r.split("=")[1].split("-")) for r in proxy.ranges)
    assert len(spans) == 8 and spans[0][0] >= 8 << 20  # the ranges start past the probe
    # they tile the rest exactly: the probe's prefix is kept, no byte is asked for twice
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))
    assert spans[-1][1] == layer.size - 1
    path = store.path(layer.digest)
    with open(path, "rb") as a, open(src, "rb") as b:
        assert a.read() == b.read()
    assert partial.RANGES_XATTR not in os.listxattr(path)


def test_a_capped_connection_is_split(big: tuple[ModelPack, str], proxy: RangeProxy,
                                      tmp_path: Any) -> None:
    """No stand-ins: the proxy caps each connection; the probe's thread waits for bytes."""
    pack, _ = big
    layer = _weight(pack)
    proxy.rate = 8e6  # bytes/s per connection
    store = BlobStore(str(tmp_path / "s"))
    policy = RangePolicy(streams=8, min_size=16 << 20, probe=4 << 20)
    client = RegistryClient(proxy.host, insecure=True, ranges=policy)
    t0 = time.monotonic()
    fetch_blobs(client, REPO, (layer,), store)
    assert len(proxy.ranges) == 8  # split after the probe
    assert time.monotonic() - t0 < layer.size / 8e6 / 2  # at least twice one stream
    assert dg.of_file(store.path(layer.digest)) == (layer.digest, layer.size)
