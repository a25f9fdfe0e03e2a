"""NodeCache acceptance: the real plugin process over a real gRPC unix socket,
a real registry (behind a counting proxy) and real bind mounts.

Each test gets its own plugin process and cache dir (start-up is ~1 s);
the registry and the pushed models are shared by the module.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import json
import os
import time

import grpc
import pytest

from csi import mounts
from modelpack import pull as mpull
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import loopfs, modelgen

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def proxy(registry):
    p = cf_.Proxy(registry.host)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def models(registry, tmp_path_factory):
    """Push a few generated models; return name -> (registry ref text via proxy later, pack)."""
    client = RegistryClient(registry.host, insecure=True)
    out = {}
    specs = {
        "small": lambda d: modelgen.make_safetensors_model(d, seed=1),
        "other": lambda d: modelgen.make_safetensors_model(d, seed=2, family="qwen2"),
        "ten": lambda d: modelgen.make_big_model(d, files=10, total=20 << 20, seed=3),
        "slow": lambda d: modelgen.make_big_model(d, files=6, total=24 << 20, seed=4),
        "e1": lambda d: modelgen.make_big_model(d, files=2, total=4 << 20, seed=5),
        "e2": lambda d: modelgen.make_big_model(d, files=2, total=4 << 20, seed=6),
        "e3": lambda d: modelgen.make_big_model(d, files=2, total=4 << 20, seed=7),
        "big": lambda d: modelgen.make_big_model(d, files=4, total=12 << 20, seed=8),
    }
    for name, make in specs.items():
        src = str(tmp_path_factory.mktemp(f"src-{name}"))
        make(src)
        ref = reference.parse(f"{registry.host}/models/team-a/{name}:v1")
        res = pack_to_registry(src, client, ref)
        out[name] = res.pack
    return out


def models_doc(proxy, models, names=None):
    names = names or list(models)
    return {f"team-a/{n}": f"{proxy.host}/models/team-a/{n}:v1" for n in names}


@pytest.fixture
def plugin_factory(tmp_path, proxy, models):
    made = []

    def make(cache_dir=None, extra=None, start=True, models_map=None, cluster=None):
        work = tmp_path / f"plugin{len(made)}"
        work.mkdir()
        cache = cache_dir or str(work / "cache")
        mf = str(work / "models.json")
        cf_.write_models_file(mf, models_map or models_doc(proxy, models), cluster)
        p = cf_.PluginProcess(str(work), cache, mf, [proxy.host], extra)
        made.append(p)
        if start:
            p.start()
        return p

    yield make
    for p in made:
        p.kill()
    cf_.unmount_everything_under(str(tmp_path))
    proxy.rate = None


@pytest.fixture
def targets(tmp_path):
    base = tmp_path / "pods"
    base.mkdir()
    yield str(base)
    cf_.unmount_everything_under(str(base))


def target_in(base, name):
    parent = os.path.join(base, name)
    os.makedirs(parent, exist_ok=True)  # kubelet creates only the parent
    return os.path.join(parent, "mount")


def code_of(call, *args, **kwargs):
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- publish / unpublish ----------------------------------------------------------


def test_publish_read_only_idempotent_unpublish(plugin_factory, targets, models):
    p = plugin_factory()
    node = p.node()
    target = target_in(targets, "pod1")
    req = cf_.publish_request("vol-1", target, model="small")
    node.NodePublishVolume(req, timeout=60)

    pack = models["small"]
    mpull.verify_tree(pack, target)
    assert sorted(os.listdir(target)) == sorted(layer.path for layer in pack.layers)
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "config.json"), "a").close()
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        open(os.path.join(target, "new-file"), "w").close()
    assert e.value.errno == errno.EROFS
    layers = mounts.mounts_at(target)
    assert len(layers) == 1
    assert {"ro", "nosuid", "nodev"} <= layers[0].options

    node.NodePublishVolume(req, timeout=60)  # again: no second mount
    assert len(mounts.mounts_at(target)) == 1

    stats = node.NodeGetVolumeStats(cf_.pb.NodeGetVolumeStatsRequest(
        volume_id="vol-1", volume_path=target), timeout=10)
    assert stats.usage[0].total == pack.size
    assert not stats.volume_condition.abnormal

    # another model at a mounted target: ALREADY_EXISTS, mount untouched
    other = cf_.publish_request("vol-1", target, model="other")
    assert code_of(node.NodePublishVolume, other, timeout=60) == grpc.StatusCode.ALREADY_EXISTS
    assert len(mounts.mounts_at(target)) == 1

    node.NodeUnpublishVolume(cf_.unpublish_request("vol-1", target), timeout=30)
    assert not mounts.mounts_at(target)
    assert not os.path.exists(target)
    node.NodeUnpublishVolume(cf_.unpublish_request("vol-1", target), timeout=30)  # idempotent

    inv = json.load(open(os.path.join(p.cache_dir, "inventory.json")))
    assert [m["digest"] for m in inv["models"]] == [pack.digest]


def test_unpublish_removes_stacked_mounts(plugin_factory, targets):
    p = plugin_factory()
    node = p.node()
    target = target_in(targets, "stacked")
    node.NodePublishVolume(cf_.publish_request("v", target, model="small"), timeout=60)
    tree = os.path.join(p.cache_dir, "models", os.listdir(os.path.join(p.cache_dir, "models"))[0])
    mounts.bind_read_only(tree, target)  # someone stacked a second bind on top
    assert len(mounts.mounts_at(target)) == 2
    node.NodeUnpublishVolume(cf_.unpublish_request("v", target), timeout=30)
    assert not mounts.mounts_at(target) and not os.path.exists(target)


def test_mounts_at_reads_escaped_mount_points(targets, tmp_path):
    # mounts_at parses only the mountinfo lines that can name the path: the
    # kernel's octal escapes must be matched, and a prefix must not match
    src = tmp_path / "src"
    src.mkdir()
    odd = os.path.join(targets, "a b\\c", "mount")
    os.makedirs(odd)
    os.makedirs(odd + "2")
    mounts.bind_read_only(str(src), odd)
    mounts.bind_read_only(str(src), odd)  # stacked
    mounts.bind_read_only(str(src), odd + "2")
    assert [m.mount_point for m in mounts.mounts_at(odd)] == [odd, odd]
    assert mounts.mounts_at(odd) == mounts.mounts_at(odd, mounts.read_mounts())
    assert mounts.unmount_all(odd) == 2 and not mounts.mounts_at(odd)
    assert len(mounts.mounts_at(odd + "2")) == 1


def test_names_are_namespaced_and_arguments_validated(plugin_factory, targets, proxy):
    p = plugin_factory(cluster={"shared": f"{proxy.host}/models/team-a/small:v1"})
    node = p.node()
    t = target_in(targets, "x")
    nf = grpc.StatusCode.NOT_FOUND
    assert code_of(node.NodePublishVolume,
                   cf_.publish_request("v", t, model="nope"), timeout=30) == nf
    # team-a/small exists, team-b/small does not: never another namespace's model
    assert code_of(node.NodePublishVolume,
                   cf_.publish_request("v", t, model="small", namespace="team-b"),
                   timeout=30) == nf
    assert code_of(node.NodePublishVolume,
                   cf_.publish_request("v", t, cluster_model="small"), timeout=30) == nf
    node.NodePublishVolume(cf_.publish_request("v", t, cluster_model="shared"), timeout=60)
    assert os.path.exists(os.path.join(t, "config.json"))
    node.NodeUnpublishVolume(cf_.unpublish_request("v", t), timeout=30)

    inv = grpc.StatusCode.INVALID_ARGUMENT
    req = cf_.publish_request("v", t, model="small")
    req.ClearField("volume_capability")
    assert code_of(node.NodePublishVolume, req, timeout=10) == inv
    req = cf_.publish_request("v", t, model="small", cluster_model="shared")
    assert code_of(node.NodePublishVolume, req, timeout=10) == inv
    req = cf_.publish_request("v", t, model="small")
    req.volume_capability.block.SetInParent()
    assert code_of(node.NodePublishVolume, req, timeout=10) == inv
    assert code_of(node.NodePublishVolume, cf_.publish_request("", t, model="small"),
                   timeout=10) == inv
    assert not os.path.exists(t)


# -- one pull per digest -------------------------------------------------------------


def test_50_concurrent_publishes_fetch_each_blob_once(plugin_factory, targets, proxy, models):
    p = plugin_factory()
    node, ident = p.node(), p.identity()
    pack = models["ten"]
    proxy.reset()
    proxy.rate = 8 << 20  # the pull takes a few seconds: all 50 calls overlap it
    tgts = [target_in(targets, f"pod{i}") for i in range(50)]

    def publish(i):
        node.NodePublishVolume(cf_.publish_request(f"vol-{i}", tgts[i], model="ten"),
                               timeout=120)

    with cf.ThreadPoolExecutor(50) as pool:
        futures = [pool.submit(publish, i) for i in range(50)]
        time.sleep(0.5)
        # Probe answers at once while 50 publishes wait on the pull
        t0 = time.monotonic()
        assert ident.Probe(cf_.pb.ProbeRequest(), timeout=5).ready.value
        assert time.monotonic() - t0 < 0.5
        for f in futures:
            f.result()

    for layer in pack.layers:
        assert proxy.blob_gets[layer.digest] == 1, layer.path
    assert proxy.blob_gets[pack.config_digest] == 1
    for t in tgts:
        assert len(mounts.mounts_at(t)) == 1
    mpull.verify_tree(pack, tgts[17])
    for i, t in enumerate(tgts):
        node.NodeUnpublishVolume(cf_.unpublish_request(f"vol-{i}", t), timeout=30)
    assert not any(mounts.mounts_at(t) for t in tgts)


def test_deadline_answers_aborted_and_pull_goes_on(plugin_factory, targets, proxy, models):
    p = plugin_factory()
    node = p.node()
    pack = models["slow"]
    proxy.reset()
    proxy.rate = 3 << 20  # ~2 s per 4 MiB blob
    t = target_in(targets, "slow")
    req = cf_.publish_request("v", t, model="slow")
    assert code_of(node.NodePublishVolume, req, timeout=2.5) == grpc.StatusCode.ABORTED
    assert not os.path.exists(t)
    proxy.rate = None
    node.NodePublishVolume(req, timeout=60)  # kubelet's retry rejoins the same pull
    mpull.verify_tree(pack, t)
    for layer in pack.layers:
        assert proxy.blob_gets[layer.digest] == 1


# -- crash and recovery ----------------------------------------------------------------


def test_kill9_mid_pull_then_restart_completes(plugin_factory, targets, proxy, models):
    p = plugin_factory()
    pack = models["slow"]
    proxy.reset()
    proxy.rate = 2 << 20
    t = target_in(targets, "crash")
    req = cf_.publish_request("v", t, model="slow")
    assert code_of(p.node().NodePublishVolume, req, timeout=2.5) == grpc.StatusCode.ABORTED
    ingest = os.path.join(p.cache_dir, "ingest")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # some bytes of some blob on disk, none finished
        parts = [f for f in os.listdir(ingest) if os.path.getsize(os.path.join(ingest, f))]
        if parts:
            break
        time.sleep(0.1)
    assert parts
    p.kill()  # SIGKILL mid-pull
    models_dir = os.path.join(p.cache_dir, "models")
    assert cf_.visible_files(models_dir) == []  # nothing half-pulled is visible
    assert not mounts.mounts_at(t)

    proxy.rate = None
    p2 = plugin_factory(cache_dir=p.cache_dir, start=False)
    p2.models_file = p.models_file
    p2.start()
    p2.node().NodePublishVolume(req, timeout=60)
    mpull.verify_tree(pack, t)
    assert sum(proxy.range_gets.values()) >= 1  # the cut blob was resumed, not restarted
    for name in os.listdir(models_dir):
        assert not name.startswith("."), name  # recovery left no temp trees
    assert os.listdir(ingest) == []


def test_restart_keeps_published_volumes(plugin_factory, targets, models):
    p = plugin_factory()
    t = target_in(targets, "keep")
    req = cf_.publish_request("v", t, model="small")
    p.node().NodePublishVolume(req, timeout=60)
    p.kill()
    assert len(mounts.mounts_at(t)) == 1  # a plugin restart never disturbs a pod
    p2 = plugin_factory(cache_dir=p.cache_dir)
    p2.node().NodePublishVolume(req, timeout=30)
    assert len(mounts.mounts_at(t)) == 1
    p2.node().NodeUnpublishVolume(cf_.unpublish_request("v", t), timeout=30)
    assert not os.path.exists(t)


# -- failures ------------------------------------------------------------------------------


def test_registry_down_retryable_and_cached_still_publish(plugin_factory, targets, proxy):
    # --tag-ttl 0: every publish asks the registry, so "down" is really exercised
    p = plugin_factory(extra=["--tag-ttl", "0"])
    node = p.node()
    t1 = target_in(targets, "cached")
    node.NodePublishVolume(cf_.publish_request("v1", t1, model="small"), timeout=60)
    node.NodeUnpublishVolume(cf_.unpublish_request("v1", t1), timeout=30)
    proxy.stop()
    try:
        node.NodePublishVolume(cf_.publish_request("v1", t1, model="small"), timeout=60)
        assert len(mounts.mounts_at(t1)) == 1
        t2 = target_in(targets, "uncached")
        code = code_of(node.NodePublishVolume, cf_.publish_request("v2", t2, model="other"),
                       timeout=60)
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED)
        assert not os.path.exists(t2)
    finally:
        proxy.start()


def test_disk_full_is_resource_exhausted_and_cache_stays_consistent(
        plugin_factory, targets, proxy, models):
    with loopfs.tmpfs_mount(20 << 20) as fs:
        cache = os.path.join(fs, "cache")
        p = plugin_factory(cache_dir=cache)
        node = p.node()
        # 1: the model cannot fit at all -> refused before a byte is written
        t = target_in(targets, "full")
        with open(os.path.join(fs, "filler"), "wb") as f:
            f.write(b"\0" * (10 << 20))
        code = code_of(node.NodePublishVolume, cf_.publish_request("v", t, model="big"),
                       timeout=60)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # 2: the disk fills up while pulling -> ENOSPC mid-write, partials dropped
        os.unlink(os.path.join(fs, "filler"))
        proxy.rate = 4 << 20
        req = cf_.publish_request("v", t, model="big")
        with cf.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(code_of, node.NodePublishVolume, req, timeout=60)
            time.sleep(0.8)
            with open(os.path.join(fs, "filler"), "wb") as f:
                try:
                    f.write(b"\0" * (16 << 20))
                except OSError:
                    pass
            code = fut.result()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert cf_.visible_files(os.path.join(cache, "models")) == []
        assert os.listdir(os.path.join(cache, "ingest")) == []
        assert not os.path.exists(t)
        # 3: space is back: the same publish now succeeds, verified
        os.unlink(os.path.join(fs, "filler"))
        proxy.rate = None
        node.NodePublishVolume(req, timeout=60)
        mpull.verify_tree(models["big"], t)
        node.NodeUnpublishVolume(cf_.unpublish_request("v", t), timeout=30)


def test_eviction_never_touches_a_mounted_tree(plugin_factory, targets, models):
    # capacity for ~2.5 of the 4 MiB models: a third pull must evict one
    p = plugin_factory(extra=["--cache-capacity", "10Mi", "--high-watermark", "0.9",
                              "--low-watermark", "0.5"])
    node = p.node()
    ta, tb, tc = (target_in(targets, n) for n in ("a", "b", "c"))
    node.NodePublishVolume(cf_.publish_request("va", ta, model="e1"), timeout=60)
    time.sleep(0.05)
    node.NodePublishVolume(cf_.publish_request("vb", tb, model="e2"), timeout=60)
    node.NodeUnpublishVolume(cf_.unpublish_request("vb", tb), timeout=30)
    # e1 is older (LRU first) but mounted; e2 is newer but idle: e2 must go
    node.NodePublishVolume(cf_.publish_request("vc", tc, model="e3"), timeout=60)
    cached = {m["digest"] for m in
              json.load(open(os.path.join(p.cache_dir, "inventory.json")))["models"]}
    assert models["e1"].digest in cached
    assert models["e2"].digest not in cached
    assert models["e3"].digest in cached
    mpull.verify_tree(models["e1"], ta)
    mpull.verify_tree(models["e3"], tc)


# -- placement: reflink on XFS, hardlink on ext4 -------------------------------------------


@pytest.mark.parametrize("fstype,method", [("xfs", "reflink"), ("ext4", "hardlink")])
def test_placement_method_per_filesystem(plugin_factory, targets, models, fstype, method):
    with cf_.loop_fs(fstype, 300) as fs:
        cache = os.path.join(fs, "cache")
        p = plugin_factory(cache_dir=cache)
        t = target_in(targets, fstype)
        p.node().NodePublishVolume(cf_.publish_request("v", t, model="e1"), timeout=60)
        pack = models["e1"]
        mpull.verify_tree(pack, t)
        inv = json.load(open(os.path.join(cache, "inventory.json")))
        assert inv["models"][0]["method"] == method
        layer = pack.layers[0]
        blob = os.path.join(cache, "blobs", "sha256", layer.digest.split(":")[1])
        same_inode = os.stat(blob).st_ino == os.stat(os.path.join(t, layer.path)).st_ino
        assert same_inode == (method == "hardlink")
        p.node().NodeUnpublishVolume(cf_.unpublish_request("v", t), timeout=30)
        p.kill()
