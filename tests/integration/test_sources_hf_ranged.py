"""One large Hugging Face file staged as several byte ranges at once, the sha256 the gate.

The real hub test server (``tests/servers/hfhub.py``) serves a 64 MiB
single-file safetensors repo; its LFS redirects point at a proxy in front
of its CDN (``RoutedHub``): ``bench/bigblob/throttle.py``, which caps each
connection as the Hub's CDN does, or ``tests/rangeproxy.py``, which cuts,
flips a byte or strips Range. The threshold is lowered to 16 MiB, so the file
goes as 8 ranges of 8 MiB (``ingest.publish.ranges``, on
``modelpack.oci.ranged``). Acceptance: through the capped link the publish
worker's one stream is split after its probe and the ranges tile the rest
of the file, at least twice as fast as one stream, and the published model
pulls back byte for byte; a flipped byte in one range fails the sha256 and
nothing is committed or left in ``ingest/``; a cut range resumes where it
stopped (no byte sent twice), and a download stopped part-way (the
worker's cancel) resumes each range from its record, fetching only what
it lacked; a CDN that ignores Range still yields the
verified file over one stream; a listed size larger than the file fails as
a size mismatch and leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.bigblob.throttle import Throttle
from ingest.publish import Options, publish
from ingest.publish.stage import stage_file
from ingest.sources import base
from ingest.sources.huggingface import HuggingFaceSource
from modelpack import digest as dg
from modelpack.oci.ranged import RangePolicy
from modelpack.oci.registry import RegistryClient
from modelpack.store import partial
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.rangeproxy import RangeProxy
from tests.servers.helpers import pull_back, same_tree
from tests.servers.hfhub import RoutedHub

SIZE = 64 << 20
AT_ONCE = RangePolicy(streams=8, min_size=16 << 20, probe=0)  # split at once
REPO = "acme/one-big-file"


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("big"))
    modelgen.make_big_model(root, files=1, total=SIZE, seed=29)
    return root


@pytest.fixture
def hub(model: str) -> Iterator[RoutedHub]:
    h = RoutedHub()
    with h:
        h.add_repo(REPO, model)
        yield h


def _weight(hub: RoutedHub) -> tuple[str, int, str]:
    """(path, size, sha256) of the repo's one large file."""
    f = max(hub.repos[REPO].files.values(), key=lambda x: x.size)
    assert f.lfs and f.size >= AT_ONCE.min_size
    return f.path, f.size, f.sha256


def _cdn_ranges(hub: RoutedHub, path: str) -> list[str]:
    return [r for m, p, r in hub.requests if m == "GET" and p.startswith("/cdn/")
            and p.endswith(path)]


def _stage(hub: RoutedHub, root: str, policy: RangePolicy = AT_ONCE,
           progress: Callable[[int], None] = lambda n: None) -> tuple[BlobStore, str]:
    """Resolve the repo with the real HF source and stage its large file."""
    src = HuggingFaceSource(REPO, endpoint=hub.url)
    try:
        f = max(src.resolve().files, key=lambda x: x.size or 0)
        assert f.sha256 is not None
        store = BlobStore(root)
        got = stage_file(src, str(src.sha), f, store, progress, backoff=0.01, policy=policy)
        return store, got
    finally:
        src.close()


def test_a_capped_cdn_is_split_and_the_model_pulls_back(hub: RoutedHub, model: str,
                                                        client: RegistryClient,
                                                        tmp_path: Any) -> None:
    """No stand-ins: the throttle caps each connection; the probe's thread waits for bytes."""
    path, size, sha = _weight(hub)
    rate = 2e6  # bytes/s per connection: one stream would take ~34 s
    throttle = Throttle(hub.cdn_host, rate, bind="127.0.0.2")
    hub.cdn_via = throttle.host
    src = HuggingFaceSource(REPO, endpoint=hub.url)
    policy = RangePolicy(streams=8, min_size=16 << 20, probe=4 << 20)
    try:
        t0 = time.monotonic()
        res = publish(src, client, f"{client.host}/models/big-hf:v1",
                      work_dir=str(tmp_path / "work"), options=Options(ranges=policy))
        took = time.monotonic() - t0
    finally:
        src.close()
        throttle.close()
    gets = _cdn_ranges(hub, path)
    assert gets[0] == ""  # one stream first, from byte 0
    spans = sorted(tuple(int(x) for x in r.split("=")[1].split("-")) for r in gets[1:])
    assert len(spans) == 8 and spans[0][0] >= policy.probe  # split after the probe
    assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))  # they tile the rest
    assert spans[-1][1] == size - 1
    assert took < size / rate / 2  # at least twice one stream
    dest = str(tmp_path / "pulled")
    pack = pull_back(client, res.reference, dest)
    assert pack.digest == res.digest
    assert any(x.digest == "sha256:" + sha for x in pack.layers)
    same_tree(model, dest)


@pytest.fixture
def proxy(hub: RoutedHub) -> Iterator[RangeProxy]:
    p = RangeProxy(hub.cdn_host)
    hub.cdn_via = p.host
    yield p
    p.close()


def test_ranges_write_the_right_bytes(hub: RoutedHub, proxy: RangeProxy, model: str,
                                      tmp_path: Any) -> None:
    path, size, sha = _weight(hub)
    store, got = _stage(hub, str(tmp_path / "s"))
    assert got == "sha256:" + sha
    assert len(proxy.ranges) == 8 and proxy.bytes_sent == size
    assert sorted(int(r.split("=")[1].split("-")[0]) for r in proxy.ranges) == [
        i * (8 << 20) for i in range(8)]
    assert dg.of_file(store.path(got)) == (got, size)
    with open(store.path(got), "rb") as a, open(os.path.join(model, path), "rb") as b:
        assert a.read() == b.read()
    assert partial.RANGES_XATTR not in os.listxattr(store.path(got))
    assert os.listdir(store.ingest_dir) == []


def test_a_flipped_byte_in_one_range_fails_the_digest(hub: RoutedHub, proxy: RangeProxy,
                                                      tmp_path: Any) -> None:
    _, _, sha = _weight(hub)
    proxy.flip_at = 5 * (8 << 20) + 12345  # inside the sixth range
    root = str(tmp_path / "s")
    with pytest.raises(base.SourceIntegrityError) as err:
        _stage(hub, root)
    assert err.value.reason == "ChecksumMismatch"
    assert len(proxy.ranges) == 8  # it came in ranges, and the digest caught it
    store = BlobStore(root)
    assert not store.has("sha256:" + sha)
    assert os.listdir(store.blob_dir) == [] and os.listdir(store.ingest_dir) == []


def test_a_cut_range_resumes_where_it_stopped(hub: RoutedHub, proxy: RangeProxy,
                                              tmp_path: Any) -> None:
    _, size, sha = _weight(hub)
    proxy.cut_after, proxy.cuts_left = 3 << 20, 3  # three ranges drop at 3 MiB
    store, got = _stage(hub, str(tmp_path / "s"))
    assert got == "sha256:" + sha and dg.of_file(store.path(got)) == (got, size)
    resumed = [r for r in proxy.ranges if int(r.split("=")[1].split("-")[0]) % (8 << 20)]
    assert len(proxy.ranges) == 8 + 3 and len(resumed) == 3
    assert proxy.bytes_sent == size  # no byte twice: no range started over


def test_a_cdn_that_ignores_range_gets_one_stream(hub: RoutedHub, proxy: RangeProxy,
                                                  tmp_path: Any) -> None:
    _, size, sha = _weight(hub)
    proxy.strip_range = True
    store, got = _stage(hub, str(tmp_path / "s"))
    assert got == "sha256:" + sha and dg.of_file(store.path(got)) == (got, size)
    assert partial.RANGES_XATTR not in os.listxattr(store.path(got))
    assert proxy.ranges  # ranges were asked for
    assert proxy.gets <= 8 + 1  # the ranges that saw a 200 gave up; one stream took it
    assert os.listdir(store.ingest_dir) == []


@pytest.mark.parametrize("extra", [8 << 20, 64 << 20], ids=["last-range-short", "past-the-end"])
def test_a_listed_size_larger_than_the_file_fails(hub: RoutedHub, proxy: RangeProxy,
                                                  tmp_path: Any, extra: int) -> None:
    path, size, _ = _weight(hub)
    hub.knobs.size_lie[path] = size + extra  # listed (and linked) size; the body is the real one
    root = str(tmp_path / "s")
    with pytest.raises(base.SourceIntegrityError) as err:
        _stage(hub, root)
    assert err.value.reason == "SizeMismatch"
    store = BlobStore(root)
    assert os.listdir(store.blob_dir) == [] and os.listdir(store.ingest_dir) == []


class _Stopped(Exception):
    """The publish worker's cancel: raised from a progress callback, in a range's thread."""


def test_a_stopped_download_resumes_each_range(hub: RoutedHub, proxy: RangeProxy,
                                               tmp_path: Any) -> None:
    _, size, sha = _weight(hub)
    root = str(tmp_path / "s")
    proxy.rate = 4 << 20  # 4 MiB/s a connection: the ranges are under way when it stops
    seen = [0]

    def stop_at_a_third(n: int) -> None:
        seen[0] += n
        if seen[0] >= size // 3:
            raise _Stopped()

    with pytest.raises(_Stopped):
        _stage(hub, root, progress=stop_at_a_third)
    part = BlobStore(root).part_path("sha256:" + sha)
    state = json.loads(os.getxattr(part, partial.RANGES_XATTR))
    kept = sum(d for _, _, d in state["ranges"])
    assert size // 3 <= kept < size and len(state["ranges"]) == 8

    proxy.rate = None
    before = -1
    while before != proxy.bytes_sent:  # the proxy's threads for the stopped ranges stop
        before = proxy.bytes_sent
        time.sleep(0.5)
    store, got = _stage(hub, root)
    assert got == "sha256:" + sha and dg.of_file(store.path(got)) == (got, size)
    assert proxy.bytes_sent - before == size - kept  # each range resumed at its record
    assert os.listdir(store.ingest_dir) == []
