"""The node cache in-process against the real registry: scrub, recovery, inventory."""

from __future__ import annotations

import os

from csi.cache import Cache
from modelpack import pull as mpull
from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import modelgen


def _cache(root: str) -> Cache:
    cache = Cache(root, lambda host: RegistryClient(host, insecure=True))
    cache.recover()
    return cache


def test_scrub_drops_corrupt_blob_and_its_idle_tree(tmp_path, registry, client):
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=21)
    ref = reference.parse(f"{registry.host}/models/scrub:v1")
    pack_to_registry(src, client, ref)
    cache = _cache(str(tmp_path / "cache"))
    try:
        digest = cache.pull(ref).result(60)
        pack = cache.pack_of(digest)
        layer = max(pack.layers, key=lambda x: x.size)
        blob = cache.store.path(layer.digest)
        os.chmod(blob, 0o644)
        with open(blob, "r+b") as f:  # bit rot
            f.seek(layer.size // 2)
            f.write(b"\xff\x00\xff")
        assert cache.scrub() == [layer.digest]
        assert cache.pack_of(digest) is None
        assert not os.path.exists(cache.tree_path(digest))
        assert cache.pull(ref).result(60) == digest  # pulled again, verified
        mpull.verify_tree(pack, cache.tree_path(digest))
        assert cache.scrub() == []
        inv = cache.inventory()
        assert [m["digest"] for m in inv["models"]] == [digest]
        assert inv["models"][0]["references"] == [str(ref)]
    finally:
        cache.close()


def test_recovery_removes_temp_and_unlisted_trees(tmp_path, registry, client):
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=22)
    ref = reference.parse(f"{registry.host}/models/recover:v1")
    pack_to_registry(src, client, ref)
    root = str(tmp_path / "cache")
    cache = _cache(root)
    digest = cache.pull(ref).result(60)
    cache.close()
    models = os.path.join(root, "models")
    os.makedirs(os.path.join(models, ".abc.tmp-x", "sub"))  # a placement cut by a crash
    os.makedirs(os.path.join(models, "f" * 64))  # a tree never listed (no state)
    with open(os.path.join(root, "ingest", "junk"), "w") as f:
        f.write("x")
    cache = _cache(root)
    try:
        assert sorted(os.listdir(models)) == [digest.split(":")[1]]
        assert os.listdir(os.path.join(root, "ingest")) == []
        # a tag known from before publishes from the cache without the registry
        assert cache.local_digest(ref, fresh_only=False) == digest
        assert cache.lease(digest) is not None
        cache.release(digest)
    finally:
        cache.close()
