"""ModelPack manifests: deterministic, filled, and strict when read back."""

from __future__ import annotations

import json

import pytest

from modelpack.errors import FormatError, IntegrityError, UnsafePathError
from modelpack.formats import inspect_dir
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import (
    Layer,
    assemble,
    build_config,
    build_manifest,
    canonical,
    layers_of,
    param_size,
    parse_manifest,
)
from modelpack.oci.reference import parse
from tests import modelgen

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


@pytest.mark.parametrize("n,text", [(0, "0"), (999, "999"), (22713728, "22.7M"),
                                    (494032768, "494M"), (7_615_616_512, "7.6B"),
                                    (1_000_000_000_000, "1T")])
def test_param_size(n, text):
    assert param_size(n) == text


def _built(tmp_path):
    modelgen.make_safetensors_model(str(tmp_path))
    info = inspect_dir(str(tmp_path))
    layers = [Layer(f.path, D1 if i % 2 else D2, f.size, mt.layer_type(f.kind))
              for i, f in enumerate(info.files)]
    config = build_config(info, layers)
    return info, layers, config, build_manifest(info, layers, config)


def test_manifest_is_deterministic_and_filled(tmp_path):
    info, layers, config, manifest = _built(tmp_path)
    assert manifest == build_manifest(info, list(reversed(layers)), config)
    cfg = json.loads(config)
    assert cfg["config"]["format"] == "safetensors" and cfg["config"]["precision"] == "f16"
    assert cfg["descriptor"]["family"] == "llama"
    m = json.loads(manifest)
    assert [x["annotations"][mt.FILEPATH] for x in m["layers"]] == sorted(f.path for f in info.files)
    pack = assemble(manifest, config)
    assert pack.metadata()["parameterCount"] == info.parameter_count
    assert pack.metadata()["contextLength"] == 4096


def _manifest(**changes):
    m = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": mt.ARTIFACT,
         "config": {"mediaType": mt.CONFIG, "digest": D1, "size": 2},
         "layers": [{"mediaType": mt.layer_type("weight"), "digest": D2, "size": 3,
                     "annotations": {mt.FILEPATH: "a.safetensors"}}]}
    m.update(changes)
    return m


@pytest.mark.parametrize("bad,reason", [
    (_manifest(artifactType="application/vnd.example+json",
               config={"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": D1, "size": 2}), "NotAModelPack"),
    ({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}, "NotAModelPack"),
    (_manifest(schemaVersion=1), "InvalidManifest"),
    (_manifest(layers=[{"mediaType": "application/octet-stream", "digest": D2, "size": 1,
                        "annotations": {mt.FILEPATH: "x"}}]), "InvalidManifest"),
    (_manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": D2, "size": 1}]),
     "InvalidManifest"),
    (_manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": D2, "size": 1,
                        "annotations": {mt.FILEPATH: "a"}}] * 2), "InvalidManifest"),
    (_manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": D2, "size": 1,
                        "annotations": {mt.FILEPATH: "a"}},
                       {"mediaType": mt.layer_type("weight"), "digest": D1, "size": 1,
                        "annotations": {mt.FILEPATH: "a/b"}}]), "InvalidManifest"),
    (_manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": "sha256:zz", "size": 1,
                        "annotations": {mt.FILEPATH: "a"}}]), "InvalidDigest"),
    (_manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": D2, "size": -1,
                        "annotations": {mt.FILEPATH: "a"}}]), "InvalidManifest"),
    (_manifest(layers=[{"mediaType": "application/vnd.cncf.model.weight.v1.tar", "digest": D2,
                        "size": 1, "annotations": {mt.FILEPATH: "a"}}]), "UnsupportedLayer"),
])
def test_bad_manifests_are_refused(bad, reason):
    with pytest.raises(FormatError) as ei:
        m, _ = parse_manifest(canonical(bad))
        layers_of(m)
    assert ei.value.reason == reason


def test_traversal_in_annotation_is_refused():
    m = _manifest(layers=[{"mediaType": mt.layer_type("weight"), "digest": D2, "size": 1,
                           "annotations": {mt.FILEPATH: "../../etc/passwd"}}])
    with pytest.raises(UnsafePathError):
        layers_of(parse_manifest(canonical(m))[0])


def test_manifest_digest_is_checked():
    with pytest.raises(IntegrityError):
        parse_manifest(canonical(_manifest()), digest=D1)


@pytest.mark.parametrize("text,host,repo,tag,digest", [
    ("127.0.0.1:5000/models/qwen:v1", "127.0.0.1:5000", "models/qwen", "v1", None),
    ("reg.example/a/b/c", "reg.example", "a/b/c", "latest", None),
    (f"oci://h:1/r@{D1}", "h:1", "r", None, D1),
    (f"h/r:t@{D2}", "h", "r", "t", D2),
])
def test_reference_parse(text, host, repo, tag, digest):
    r = parse(text)
    assert (r.host, r.repository, r.tag, r.digest) == (host, repo, tag, digest)


@pytest.mark.parametrize("text", ["justaname", "h/UPPER:v1", "h/r:bad tag", "h/r@sha256:12",
                                  "h/../r:v1"])
def test_reference_rejects(text):
    with pytest.raises(FormatError):
        parse(text)
