"""Pure pieces of the node plugin: mountinfo parsing, resolver, redaction, flags, error codes."""

from __future__ import annotations

import json
import logging
import os
import time

import grpc
import pytest

from csi import errors, main, mounts, volumes
from csi.resolvers.base import Volume
from csi.resolvers.file import FileResolver
from kube import flags, logs
from modelpack import errors as mp

MOUNTINFO = (
    "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "30 22 0:25 / /var/lib/kubelet rw shared:5 - tmpfs tmpfs rw\n"
    "41 22 253:0 /var/lib/modelcache/models/abc /var/lib/kubelet/pods/p/volumes/x/mount "
    "ro,nosuid,nodev,relatime shared:1 - ext4 /dev/vda rw\n"
    "42 22 253:0 /srv/with\\040space /mnt/a\\040b rw master:3 - ext4 /dev/vda rw\n"
)


def test_parse_mountinfo_fields_and_escapes():
    table = mounts.parse_mountinfo(MOUNTINFO)
    assert len(table) == 4
    m = table[2]
    assert m.dev == os.makedev(253, 0)
    assert m.root == "/var/lib/modelcache/models/abc"
    assert m.read_only and {"nosuid", "nodev"} <= m.options
    assert table[3].mount_point == "/mnt/a b" and table[3].root == "/srv/with space"
    assert mounts.mounts_at("/var/lib/kubelet/pods/p/volumes/x/mount/", table) == [m]


def test_fs_path_and_shows():
    table = mounts.parse_mountinfo(MOUNTINFO)
    assert mounts.containing_mount("/var/lib/kubelet/x", table).mount_id == 30
    dev, inner = mounts.fs_path("/var/lib/modelcache/models/abc", table)
    assert inner == "/var/lib/modelcache/models/abc"
    assert mounts.shows(table[2], dev, inner)
    assert not mounts.shows(table[2], dev, "/var/lib/modelcache/models/abd")


def test_volume_records_journal(tmp_path):
    root = str(tmp_path)
    recs = volumes.VolumeRecords(root)
    recs.put("/t/a", "va", "ns/m", "sha256:1")
    recs.put("/t/b", "vb", "ns/m", "sha256:1")
    recs.put("/t/a", "va", "ns/m", "sha256:2")  # a later line wins
    recs.drop("/t/b")
    assert recs.get("/t/a")["digest"] == "sha256:2" and recs.get("/t/b") is None
    recs.close()
    with open(os.path.join(root, volumes.JOURNAL), "ab") as f:
        f.write(b'{"target":"/t/c","volumeId":"vc","ke')  # torn by a crash
    # an unpublish that arrives before startup's load is kept too
    early = volumes.VolumeRecords(root)
    early.drop("/t/a")
    early.close()

    legacy = tmp_path / volumes.LEGACY_DIR  # the one-file-per-volume layout before
    legacy.mkdir()
    (legacy / "x.json").write_text(json.dumps({"target": "/t/d", "volumeId": "vd",
                                               "key": "ns/n", "digest": "sha256:3"}))
    (legacy / "y.json").write_text(json.dumps({"target": "/t/gone", "volumeId": "vg"}))
    again = volumes.VolumeRecords(root)
    again.load(["/", "/t/a", "/t/d"])  # /t/gone is no longer a mount point
    assert again.get("/t/a") is None and again.get("/t/c") is None
    assert again.get("/t/d")["volumeId"] == "vd" and again.get("/t/gone") is None
    assert not legacy.exists()
    with open(os.path.join(root, volumes.JOURNAL)) as f:
        assert [json.loads(line)["target"] for line in f] == ["/t/d"]  # compacted


def test_volume_records_compact_while_serving(tmp_path, monkeypatch):
    monkeypatch.setattr(volumes, "COMPACT_MIN_LINES", 10)
    recs = volumes.VolumeRecords(str(tmp_path))
    for i in range(25):
        recs.put(f"/t/{i}", f"v{i}", "ns/m", "sha256:1")
        if i % 5:
            recs.drop(f"/t/{i}")
    with open(recs.path) as f:
        lines = f.readlines()
    assert len(lines) <= 20
    recs.close()
    reloaded = volumes.VolumeRecords(str(tmp_path))
    reloaded.load([f"/t/{i}" for i in range(25)])
    assert sorted(reloaded._records) == sorted(f"/t/{i}" for i in range(0, 25, 5))


def _write(path, doc):
    with open(path, "w") as f:
        f.write(doc)


def test_file_resolver_namespaces_and_reload(tmp_path):
    path = str(tmp_path / "models.yaml")
    _write(path, "models:\n  team-a/qwen: 127.0.0.1:5000/m/qwen:v1\n"
                 "clusterModels:\n  llama: {reference: 127.0.0.1:5000/c/llama:v2, pin: true}\n")
    r = FileResolver(path)
    got = r.resolve(Volume("team-a", model="qwen"))
    assert str(got.reference) == "127.0.0.1:5000/m/qwen:v1" and not got.pin
    assert r.resolve(Volume(None, cluster_model="llama")).pin
    with pytest.raises(errors.CsiError) as e:
        r.resolve(Volume("team-b", model="qwen"))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    # a pinned digest nothing can confirm in the model's own repository is refused
    # (tests/integration/test_csi_volume_attacks.py: the attack, with a registry)
    with pytest.raises(errors.CsiError) as e:
        r.resolve(Volume("team-a", model="qwen", digest="sha256:" + "a" * 64))
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    time.sleep(0.01)
    _write(path, json.dumps({"models": {"team-b/qwen": "127.0.0.1:5000/m/qwen:v3"}}))
    assert str(r.resolve(Volume("team-b", model="qwen")).reference).endswith(":v3")
    _write(path, "models: [unclosed")  # a broken edit keeps the last good file
    assert str(r.resolve(Volume("team-b", model="qwen")).reference).endswith(":v3")


def test_volume_context_validation():
    ns = "csi.storage.k8s.io/pod.namespace"
    assert Volume.from_context({"model": "m", ns: "a"}).key == "model/a/m"
    for ctx in ({}, {"model": "m", "clusterModel": "c", ns: "a"}, {"model": "m"},
                {"clusterModel": "c", "digest": "sha256:nothex"}):
        with pytest.raises(errors.CsiError) as e:
            Volume.from_context(ctx)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_redaction_never_logs_tokens(caplog):
    ctx = {"model": "m", "csi.storage.k8s.io/serviceAccount.tokens": '{"a":{"token":"SECRET"}}'}
    red = logs.redact(ctx)
    assert red["model"] == "m" and "SECRET" not in json.dumps(red)
    rec = logging.makeLogRecord({"msg": "publish", "volumeContext": red, "levelname": "INFO"})
    line = logs.JsonFormatter().format(rec)
    assert json.loads(line)["volumeContext"]["model"] == "m" and "SECRET" not in line


def test_error_codes_are_retryable_where_kubelet_must_retry():
    code = lambda e: errors.to_csi(e).code  # noqa: E731
    assert code(mp.StoreError("full", retryable=True)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert code(mp.RegistryError("down", retryable=True)) == grpc.StatusCode.UNAVAILABLE
    assert code(mp.NotFoundError("gone")) == grpc.StatusCode.NOT_FOUND
    assert code(mp.AuthError("no")) == grpc.StatusCode.PERMISSION_DENIED
    assert code(mp.FormatError("bad")) == grpc.StatusCode.FAILED_PRECONDITION
    assert code(RuntimeError("x")) == grpc.StatusCode.INTERNAL


def test_flag_parsers():
    assert flags.binary_size_arg("500Gi") == 500 << 30 and flags.binary_size_arg("10M") == 10 << 20
    assert main.duration_arg("24h") == 86400 and main.duration_arg("90") == 90
    args = main.parser().parse_args(["--endpoint", "unix:///x.sock", "--cache-dir", "/c",
                                     "--node-id", "n"])
    assert args.high_watermark == 0.85 and args.low_watermark == 0.70
