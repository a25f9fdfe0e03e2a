"""The integrity scrub against real mounts and a real registry (root).

Faults are written straight into the cache (chmod bypassed, as bit rot or a
stray root process would): a blob, or a reflinked tree file on XFS. What must
hold: a corrupt model under a pod's mount is *tainted* (new publishes get a
fresh verified tree in another directory, the old mount keeps its view until
unpublished, then the tainted tree goes); an idle one is dropped; a pull that
reuses a blob scrub rejects does not list it; the read rate stays under its
budget; metrics and log lines name the model.
"""

from __future__ import annotations

import os
import time

import prometheus_client as prom
import pytest

from csi import mounts
from csi.cache import Cache
from csi.cache import scrub as cscrub
from modelpack import digest as dg
from modelpack import pull as mpull
from modelpack.errors import IntegrityError
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import kubeenv, modelgen

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


def _push(tmp_path, client, registry, name: str, seed: int, total: int = 4 << 20) -> tuple:
    src = str(tmp_path / f"src-{name}")
    modelgen.make_big_model(src, files=2, total=total, seed=seed)
    ref = reference.parse(f"{registry.host}/models/scrub/{name}:v1")
    return ref, pack_to_registry(src, client, ref).pack


def _cache(root: str, host_map: dict[str, str] | None = None, rate: float = 0) -> Cache:
    hosts = host_map or {}
    cache = Cache(root, lambda h: RegistryClient(hosts.get(h, h), insecure=True),
                  scrub_rate=rate)
    cache.recover()
    return cache


def _corrupt(path: str, at: int) -> None:
    """Bit rot: flip bytes in place (same size, same inode), bypassing the 0444."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff\x00\xff")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o444)


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return prom.REGISTRY.get_sample_value(name, labels or {}) or 0.0


@pytest.fixture
def pods(tmp_path):
    base = tmp_path / "pods"
    base.mkdir()
    yield str(base)
    cf_.unmount_everything_under(str(base))


def _mount(cache: Cache, digest: str, pods: str, name: str) -> str:
    """What a publish does: lease, bind read-only, release."""
    tree = cache.lease(digest)
    assert tree is not None
    target = os.path.join(pods, name)
    os.makedirs(target)
    try:
        mounts.bind_read_only(tree.path, target)
    finally:
        cache.release(digest)
    return target


def _root_of(target: str) -> str:
    return mounts.mounts_at(target)[-1].root


def test_corrupt_blob_under_a_mounted_tree_taints_it(tmp_path, registry, client, pods):
    ref, pack = _push(tmp_path, client, registry, "taint", seed=31)
    cache = _cache(str(tmp_path / "cache"))
    try:
        digest = cache.pull(ref).result(60)
        old = _mount(cache, digest, pods, "pod1")
        layer = max(pack.layers, key=lambda x: x.size)
        _corrupt(cache.store.path(layer.digest), layer.size // 2)  # hardlinked: the pod's too
        corrupt_before = _sample("modelcache_node_scrub_corrupt_total", {"kind": "blob"})

        assert cache.scrub() == [layer.digest]

        # the model is unlisted: it is not leased again as it is
        assert cache.lease(digest) is None
        [finding] = cache.last_scrub.findings
        assert (finding.digest, finding.kind, finding.what, finding.action, finding.mounts) == \
            (digest, "blob", layer.digest, "tainted", 1)
        assert _sample("modelcache_node_scrub_corrupt_total", {"kind": "blob"}) == \
            corrupt_before + 1
        assert _sample("modelcache_node_tainted_trees") == 1
        [tainted] = cache.inventory()["tainted"]
        assert (tainted["digest"], tainted["mounts"]) == (digest, 1)
        # the pod keeps its view, now shown from the tainted directory
        assert "/tainted/" in _root_of(old)
        assert os.path.exists(os.path.join(old, layer.path))

        # a new publish pulls a fresh, verified tree into another directory
        assert cache.pull(ref).result(60) == digest
        fresh = _mount(cache, digest, pods, "pod2")
        mpull.verify_tree(pack, fresh)
        assert _root_of(fresh) != _root_of(old)
        assert os.stat(fresh).st_ino != os.stat(old).st_ino
        assert cache.scrub() == []  # the fresh copy passes; the tainted one is not listed

        # the tainted tree goes once its last mount is gone (an unpublish sweeps)
        assert cache.sweep_tainted() == 1
        mounts.unmount_all(old)
        assert cache.sweep_tainted() == 0
        assert os.listdir(os.path.join(cache.root, "tainted")) == []
        assert _sample("modelcache_node_tainted_trees") == 0
        mpull.verify_tree(pack, fresh)  # untouched by the removal
    finally:
        cache.close()


def test_tainted_tree_outlives_a_restart_only_while_mounted(tmp_path, registry, client, pods):
    ref, pack = _push(tmp_path, client, registry, "restart", seed=32)
    root = str(tmp_path / "cache")
    cache = _cache(root)
    digest = cache.pull(ref).result(60)
    old = _mount(cache, digest, pods, "pod1")
    layer = pack.layers[0]
    _corrupt(cache.store.path(layer.digest), 10)
    assert cache.scrub() == [layer.digest]
    cache.close()
    cache = _cache(root)  # recovery keeps the tainted tree under the pod
    try:
        assert cache.pack_of(digest) is None
        assert len(os.listdir(os.path.join(root, "tainted"))) == 1
        assert os.path.exists(os.path.join(old, layer.path))
        mounts.unmount_all(old)
    finally:
        cache.close()
    cache = _cache(root)  # and removes it once no pod has it
    cache.close()
    assert os.listdir(os.path.join(root, "tainted")) == []


def test_reflinked_tree_file_is_hashed_apart_from_its_blob(tmp_path, registry, client):
    """On XFS a tree file is a reflink, its own inode: written to, it diverges from a
    blob that still hashes right, and scrub must read it too. On ext4 the tree file
    is the blob's inode and is read once."""
    ref, pack = _push(tmp_path, client, registry, "reflink", seed=33)
    blob_bytes = pack.size + len(pack.manifest_bytes) + len(pack.config_bytes)
    with cf_.loop_fs("xfs", 300) as fs:
        cache = _cache(os.path.join(fs, "cache"))
        try:
            digest = cache.pull(ref).result(60)
            assert cache.inventory()["models"][0]["method"] == "reflink"
            assert cache.scrub() == []
            assert cache.last_scrub.bytes == blob_bytes + pack.size  # blobs, then tree files
            layer = pack.layers[1]
            before = _sample("modelcache_node_scrub_corrupt_total", {"kind": "tree"})
            _corrupt(os.path.join(cache.tree_path(digest), layer.path), 100)
            assert cache.scrub() == []  # every blob is fine...
            [f] = cache.last_scrub.findings  # ...but the file pods read is not
            assert (f.kind, f.action) == ("tree", "dropped")
            assert f.what.endswith(layer.path) and layer.digest in f.reason
            assert _sample("modelcache_node_scrub_corrupt_total", {"kind": "tree"}) == before + 1
            assert cache.pack_of(digest) is None
            assert cache.pull(ref).result(60) == digest
            mpull.verify_tree(pack, cache.tree_path(digest))
        finally:
            cache.close()
    cache = _cache(str(tmp_path / "ext4-cache"))
    try:
        cache.pull(ref).result(60)
        assert cache.inventory()["models"][0]["method"] == "hardlink"
        assert cache.scrub() == []
        assert cache.last_scrub.bytes == blob_bytes  # the tree files are the blobs
    finally:
        cache.close()


def test_scrub_reads_within_its_rate(tmp_path, registry, client):
    ref, pack = _push(tmp_path, client, registry, "rate", seed=34, total=6 << 20)
    rate = 4 << 20
    cache = _cache(str(tmp_path / "cache"), rate=rate)
    try:
        cache.pull(ref).result(60)
        start = time.monotonic()
        assert cache.scrub() == []
        took = time.monotonic() - start
        read = cache.last_scrub.bytes
        assert read >= pack.size
        assert read / rate <= took <= read / rate + 1.5, (read, took)
    finally:
        cache.close()


def test_a_pull_reusing_a_blob_scrub_rejects_does_not_list_it(tmp_path, registry, client):
    """Scrub and a pull that started during it: the pull reuses a blob already
    present, scrub finds that blob corrupt. The pull must not list a tree built on
    it (a retryable IntegrityError), and its retry must fetch the blob afresh."""
    shared = str(tmp_path / "shared.safetensors")
    modelgen.write_big_safetensors(shared, 1 << 20, seed=35)
    refs, packs = {}, {}
    for name, seed, size in (("a", 36, 1 << 20), ("b", 37, 3 << 20)):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        os.link(shared, src / "shared.safetensors")
        modelgen.write_big_safetensors(str(src / "own.safetensors"), size, seed=seed)
        (src / "config.json").write_text(f'{{"model_type": "llama", "name": "{name}"}}')
        refs[name] = reference.parse(f"{registry.host}/models/scrub/race-{name}:v1")
        packs[name] = pack_to_registry(str(src), client, refs[name]).pack
    [common] = ({x.digest for x in packs["a"].layers} & {x.digest for x in packs["b"].layers})
    proxy = cf_.Proxy(registry.host)
    cache = _cache(str(tmp_path / "cache"), {registry.host: proxy.host})
    try:
        cache.pull(refs["a"]).result(60)
        _corrupt(cache.store.path(common), 1000)
        proxy.rate = 1 << 20  # b's own 3 MiB take ~3 s; the shared blob is reused at once
        fut = cache.pull(refs["b"])
        store = cache._models
        deadline = time.monotonic() + 10
        while not store.protected[common] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.protected[common], "pull b never started"
        time.sleep(0.3)  # past its check of which blobs are present
        assert cache.scrub() == [common]  # found although a running pull needs it
        with pytest.raises(IntegrityError, match="scrub"):
            fut.result(60)
        assert cache.pack_of(packs["b"].digest) is None
        assert not cache.store.has(common)  # deleted once the pull let go
        proxy.rate = None
        assert cache.pull(refs["b"]).result(60) == packs["b"].digest
        mpull.verify_tree(packs["b"], cache.tree_path(packs["b"].digest))
        assert dg.of_file(cache.store.path(common))[0] == common
    finally:
        cache.close()
        proxy.stop()


def test_plugin_repairs_a_mounted_model(tmp_path, registry, client, pods):
    """The real plugin: scrub every second, unlimited rate; publish, corrupt, see it
    tainted on /metrics, publish again, unpublish the old pod."""
    ref, pack = _push(tmp_path, client, registry, "plugin", seed=38)
    work = tmp_path / "plugin"
    work.mkdir()
    models_file = str(work / "models.json")
    cf_.write_models_file(models_file, {"team-a/m": str(ref)})
    port = kubeenv.free_port()
    p = cf_.PluginProcess(str(work), str(work / "cache"), models_file, [registry.host],
                          ["--scrub-interval", "1s", "--scrub-rate", "0",
                           "--metrics-address", f"127.0.0.1:{port}"]).start()
    try:
        node = p.node()
        t1, t2 = (os.path.join(pods, n, "mount") for n in ("pod1", "pod2"))
        for t in (t1, t2):
            os.makedirs(os.path.dirname(t))
        node.NodePublishVolume(cf_.publish_request("v1", t1, model="m"), timeout=60)
        layer = pack.layers[0]
        _corrupt(os.path.join(p.cache_dir, "blobs", "sha256", dg.hex_of(layer.digest)), 5)
        deadline = time.monotonic() + 20
        while _metric(port, "modelcache_node_tainted_trees") != 1:
            assert time.monotonic() < deadline, p.log_tail()
            time.sleep(0.2)
        assert _metric(port, 'modelcache_node_scrub_corrupt_total{kind="blob"}') == 1
        node.NodePublishVolume(cf_.publish_request("v2", t2, model="m"), timeout=60)
        mpull.verify_tree(pack, t2)
        assert "/tainted/" in _root_of(t1) and "/tainted/" not in _root_of(t2)
        assert os.path.exists(os.path.join(t1, layer.path))  # the old pod keeps its view
        node.NodeUnpublishVolume(cf_.unpublish_request("v1", t1), timeout=30)
        assert os.listdir(os.path.join(p.cache_dir, "tainted")) == []
        assert _metric(port, "modelcache_node_tainted_trees") == 0
        log = open(p.log_path).read()
        assert "integrity scrub: model tainted" in log and pack.digest in log
        node.NodeUnpublishVolume(cf_.unpublish_request("v2", t2), timeout=30)
    finally:
        p.kill()


def _metric(port: int, prefix: str) -> float:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
    for line in body.decode().splitlines():
        if line.startswith(prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_budget_is_a_token_bucket():
    budget = cscrub.Budget(10 << 20)
    start = time.monotonic()
    for _ in range(5):
        budget.take(1 << 20)
    assert 0.45 <= time.monotonic() - start <= 1.0
    budget.stop.set()
    with pytest.raises(cscrub.Stopped):
        budget.take(1)


def test_manifests_and_chart_turn_scrub_on():
    """The DaemonSet and the chart's defaults run scrub with a rate limit, and the
    plugin's own parser reads their flags."""
    import yaml

    from csi import main

    with open(os.path.join(kubeenv.REPO_ROOT, "daemonset", "node-daemonset.yaml")) as f:
        ds = yaml.safe_load(f)
    plugin = ds["spec"]["template"]["spec"]["containers"][0]
    args = main.parser().parse_args(["--endpoint", "unix:///x.sock", "--cache-dir", "/c",
                                     "--node-id", "n", *[a for a in plugin["args"]
                                                         if a.startswith("--scrub-")]])
    assert (args.scrub_interval, args.scrub_rate) == (24 * 3600, 50 << 20)
    with open(os.path.join(kubeenv.REPO_ROOT, "charts", "modelcache", "values.yaml")) as f:
        node = yaml.safe_load(f)["node"]
    assert (main.duration_arg(node["scrubInterval"]), main.rate_arg(node["scrubRate"])) == \
        (args.scrub_interval, args.scrub_rate)


def test_a_finding_becomes_a_node_event():
    from csi import main

    got = []

    class Events:  # stands in for kube.events.Recorder, which only queues
        def record(self, obj, type_, reason, message):
            got.append((obj["kind"], obj["metadata"]["name"], type_, reason, message))

    f = cscrub.Finding("sha256:" + "a" * 64, "blob", "sha256:" + "b" * 64,
                       "content hashes to sha256:" + "c" * 64, "tainted", 2)
    main._scrub_event(Events(), "node-1", f)  # type: ignore[arg-type]
    [(kind, name, type_, reason, message)] = got
    assert (kind, name, type_, reason) == ("Node", "node-1", "Warning", "ModelCorrupt")
    assert f.digest in message and f.what in message and "2 mounts" in message
