"""Pack -> push -> pull against a real registry (Debian docker-registry)."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess

import pytest

from modelpack.errors import AuthError, IntegrityError, NotFoundError
from modelpack.oci import layout as oci_layout
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import canonical
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_layout, pack_to_registry
from modelpack.pull import pull_to_dir, resolve, verify_tree
from tests import modelgen
from tests.flakyproxy import FlakyProxy


def _same_tree(a: str, b: str) -> None:
    files_a = sorted(os.path.relpath(os.path.join(d, f), a)
                     for d, _, fs in os.walk(a) for f in fs)
    files_b = sorted(os.path.relpath(os.path.join(d, f), b)
                     for d, _, fs in os.walk(b) for f in fs)
    assert files_a == files_b
    _, mismatch, errors = filecmp.cmpfiles(a, b, files_a, shallow=False)
    assert mismatch == [] and errors == []


def test_roundtrip_is_byte_identical(registry, client, minilm_dir, tmp_path):
    ref = parse(f"{registry.host}/rt/minilm:v1")
    res = pack_to_registry(minilm_dir, client, ref)
    dest = str(tmp_path / "out")
    pack = pull_to_dir(client, ref, dest)
    assert pack.digest == res.pack.digest
    verify_tree(pack, dest)
    _same_tree(minilm_dir, dest)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "staging left behind"
    meta = pack.metadata()
    assert meta["format"] == "Safetensors" and meta["family"] == "bert"
    assert meta["parameterCount"] == 22713728 and meta["tensors"] == 104


def test_manifest_is_a_modelpack(registry, client, small_model):
    ref = parse(f"{registry.host}/rt/shape:v1")
    pack_to_registry(small_model, client, ref)
    raw, _, _ = client.get_manifest(ref)
    m = json.loads(raw)
    assert m["artifactType"] == mt.ARTIFACT
    assert m["config"]["mediaType"] == mt.CONFIG
    kinds = {layer["annotations"][mt.FILEPATH]: layer["mediaType"] for layer in m["layers"]}
    assert kinds == {
        "model.safetensors": "application/vnd.cncf.model.weight.v1.raw",
        "config.json": "application/vnd.cncf.model.weight.config.v1.raw",
        "tokenizer.json": "application/vnd.cncf.model.weight.config.v1.raw",
        "README.md": "application/vnd.cncf.model.doc.v1.raw",
    }
    cfg = json.loads(client.get_blob_bytes(ref.repository, m["config"]["digest"]))
    assert cfg["config"] == {"architecture": "LlamaForCausalLM", "format": "safetensors",
                             "paramSize": "32.8K", "precision": "f16"}
    assert cfg["descriptor"]["family"] == "llama"
    assert len(cfg["modelfs"]["diffIds"]) == 4


def test_same_files_same_digest_registry_and_layout(registry, client, small_model, tmp_path):
    ref = parse(f"{registry.host}/rt/same:v1")
    a = pack_to_registry(small_model, client, ref)
    b = pack_to_layout(small_model, str(tmp_path / "oci"))
    assert a.pack.digest == b.pack.digest
    read, _ = oci_layout.read(str(tmp_path / "oci"))
    assert read.digest == a.pack.digest


def test_corrupt_blob_in_registry_is_detected(registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=7)
    ref = parse(f"{registry.host}/rt/corrupt:v1")
    res = pack_to_registry(src, client, ref)
    weight = next(x for x in res.pack.layers if x.path == "model.safetensors")
    blob = registry.blob_path(weight.digest)
    data = bytearray(open(blob, "rb").read())
    data[len(data) // 2] ^= 0xFF
    with open(blob, "wb") as f:
        f.write(data)
    dest = str(tmp_path / "dest")
    with pytest.raises(IntegrityError):
        pull_to_dir(client, ref, dest)
    assert not os.path.exists(dest)
    assert os.listdir(tmp_path) == ["src"], "no staging or partial file may remain"


def test_dropped_connection_resumes_with_range(registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_big_model(src, files=2, total=24 << 20, seed=3)
    ref = parse(f"{registry.host}/rt/flaky:v1")
    pack_to_registry(src, client, ref)
    proxy = FlakyProxy(registry.host)
    try:
        proxy.cut_after = 5 << 20
        proxy.cuts_left = 2
        flaky = RegistryClient(proxy.host, insecure=True)
        dest = str(tmp_path / "dest")
        pack = pull_to_dir(flaky, parse(f"{proxy.host}/rt/flaky:v1"), dest)
        verify_tree(pack, dest)
        assert len(proxy.ranges) == 2 and all(r == f"bytes={5 << 20}-" for r in proxy.ranges)
        # resumed, not restarted: only the bytes after the cut were sent again
        assert proxy.bytes_sent < pack.size + (1 << 20)
    finally:
        proxy.close()


def test_interrupted_pull_resumes_on_the_next_run(registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_big_model(src, files=1, total=32 << 20, seed=4)
    ref = parse(f"{registry.host}/rt/resume:v1")
    pack_to_registry(src, client, ref)
    proxy = FlakyProxy(registry.host)
    try:
        flaky = RegistryClient(proxy.host, insecure=True, retries=0)
        pref = parse(f"{proxy.host}/rt/resume:v1")
        dest = str(tmp_path / "dest")
        seen = 0

        def stop_halfway(n: int) -> None:
            nonlocal seen
            seen += n
            if seen > 16 << 20:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pull_to_dir(flaky, pref, dest, progress=stop_halfway, workers=1)
        assert not os.path.exists(dest)
        first = proxy.bytes_sent
        pack = pull_to_dir(flaky, pref, dest)
        verify_tree(pack, dest)
        assert proxy.ranges, "second run must ask for the rest with Range"
        assert proxy.bytes_sent - first < pack.size - (12 << 20)
    finally:
        proxy.close()


def test_registry_down_is_retryable(tmp_path):
    from cli.local.registry import free_port
    from modelpack.errors import RegistryError

    c = RegistryClient(f"127.0.0.1:{free_port()}", insecure=True, retries=1)
    with pytest.raises(RegistryError) as ei:
        c.get_manifest(parse(f"{c.host}/rt/x:v1"))
    assert ei.value.retryable


def test_unknown_tag_is_not_found(registry, client):
    with pytest.raises(NotFoundError):
        resolve(client, parse(f"{registry.host}/rt/nothing-here:v9"))


def test_legacy_cnai_names_are_read(registry, client, small_model, tmp_path):
    ref = parse(f"{registry.host}/rt/legacy:v1")
    res = pack_to_registry(small_model, client, ref)
    m = json.loads(res.pack.manifest_bytes)
    m["artifactType"] = "application/vnd.cnai.model.manifest.v1+json"
    for layer in m["layers"]:
        kind = mt.kind_of(layer["mediaType"])
        layer["mediaType"] = f"application/vnd.cnai.model.{kind}.v1.raw"
        layer["annotations"] = {"org.cnai.model.filepath": layer["annotations"][mt.FILEPATH]}
    raw = canonical(m)
    client.put_manifest(ref.repository, "legacy", raw)
    dest = str(tmp_path / "legacy")
    pack = pull_to_dir(client, parse(f"{registry.host}/rt/legacy:legacy"), dest)
    verify_tree(pack, dest)
    _same_tree(small_model, dest)


def test_hostile_manifest_path_is_refused(registry, client, small_model, tmp_path):
    from modelpack.errors import UnsafePathError

    ref = parse(f"{registry.host}/rt/hostile:v1")
    res = pack_to_registry(small_model, client, ref)
    m = json.loads(res.pack.manifest_bytes)
    m["layers"][0]["annotations"][mt.FILEPATH] = "../../etc/cron.d/x"
    client.put_manifest(ref.repository, "evil", canonical(m))
    dest = str(tmp_path / "dest")
    with pytest.raises(UnsafePathError):
        pull_to_dir(client, parse(f"{registry.host}/rt/hostile:evil"), dest)
    assert not os.path.exists(dest)


def test_basic_auth(small_model, tmp_path):
    from cli.local import registry as localregistry

    with localregistry.running(username="alice", password="s3cret") as reg:
        ref = parse(f"{reg.host}/rt/private:v1")
        good = RegistryClient(reg.host, insecure=True, username="alice", password="s3cret")
        pack_to_registry(small_model, good, ref)
        with pytest.raises(AuthError):
            RegistryClient(reg.host, insecure=True, username="alice",
                           password="wrong").get_manifest(ref)
        with pytest.raises(AuthError):
            RegistryClient(reg.host, insecure=True).get_manifest(ref)
        pack = pull_to_dir(good, ref, str(tmp_path / "p"))
        verify_tree(pack, str(tmp_path / "p"))


def test_layout_is_real_oci_for_skopeo(registry, small_model, tmp_path):
    """skopeo (containers/image) reads our layout and copies it to the registry."""
    out = str(tmp_path / "oci")
    res = pack_to_layout(small_model, out, tag="v1")
    target = f"{registry.host}/rt/from-skopeo:v1"
    subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci:{out}:v1",
                    f"docker://{target}"], check=True, capture_output=True)
    c = RegistryClient(registry.host, insecure=True)
    pack = resolve(c, parse(target))
    assert pack.digest == res.pack.digest
    shutil.rmtree(out)
