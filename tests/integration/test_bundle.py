"""Air-gap bundles across two real clusters: ``modelcache export`` in A, ``import`` in B.

Cluster A is the session API server with the controller manager, the FAKE
kubelet (tests/fake_kubelet.py runs publish Jobs as local processes), the
test HF hub and the session registry: its ClusterModels are published for
real. Cluster B is a second API server with its own registry and its own
manager, whose HF endpoint points at nothing and which has no kubelet: a
publish Job there would never run, so B's models can only become Ready by
adopting an import. Acceptance: the bundle round-trips byte-identical and
B's ClusterModel is Ready with A's digest, with no Job; the same model
exports to the same bytes; every tampered bundle is refused with its own
reason, with nothing pushed to B's registry and nothing applied to B.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from api import names
from cli import bundle
from cli.local import registry as localregistry
from cli.main import main as cli_main
from kube import client as k
from modelpack.errors import IntegrityError
from modelpack.oci.manifest import canonical
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import kubeenv, modelgen
from tests.flakyproxy import FlakyProxy
from tests.integration.test_controller import (
    REPO_ROOT,
    SYSTEM_NS,
    ManagerProcess,
    ensure_namespace,
    install_crds,
    jobs_of,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller import kubelet as kubelet
from tests.integration.test_controller import manager as manager
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

MODELS = ("bundle-rt", "bundle-tamper")


# --- the two clusters ----------------------------------------------------------------


class ClusterB:
    def __init__(self, env: kubeenv.KubeEnv, client: k.Kube, registry: localregistry.LocalRegistry,
                 manager: ManagerProcess) -> None:
        self.env, self.client, self.registry, self.manager = env, client, registry, manager
        self.rc = RegistryClient(registry.host, insecure=True)

    def cr(self, name: str) -> dict[str, Any] | None:
        try:
            return self.client.get(k.CLUSTER_MODELS, name)
        except k.NotFound:
            return None


@pytest.fixture(scope="module")
def cluster_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterB]:
    with kubeenv.running() as env, localregistry.running() as reg:
        install_crds(env)
        client = k.Kube.from_config(env.kubeconfig)
        ensure_namespace(client, SYSTEM_NS)
        # no reachable source: port 9 (discard) on loopback answers nothing useful
        m = ManagerProcess(env, reg.host, "http://127.0.0.1:9",
                           str(tmp_path_factory.mktemp("manager-b") / "manager.log")).start()
        try:
            yield ClusterB(env, client, reg, m)
        finally:
            m.stop()
            client.close()


def _cluster_model(name: str, repo: str) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
            "metadata": {"name": name, "labels": {"team": "ml"},
                         "annotations": {"example.com/owner": "ml-platform"}},
            "spec": {"source": {"huggingFace": {"repo": repo}}}}


@pytest.fixture(scope="module")
def published(kube: kubeenv.KubeEnv, cluster: k.Kube, manager: ManagerProcess,
              hub_server: Any, tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, dict[str, Any]]:
    """ClusterModels published for real in cluster A: name -> (object, model dir)."""
    out = {}
    for i, name in enumerate(MODELS):
        root = str(tmp_path_factory.mktemp(name) / "model")
        modelgen.make_safetensors_model(root, seed=i)
        hub_server.add_repo(f"acme/{name}", root)
        try:
            cluster.delete(k.CLUSTER_MODELS, name)
        except k.ApiError:
            pass
        cluster.create(k.CLUSTER_MODELS, _cluster_model(name, f"acme/{name}"))
        out[name] = {"dir": root}
    for name in MODELS:
        def ready(name: str = name) -> Any:
            obj = cluster.get(k.CLUSTER_MODELS, name)
            phase = (obj.get("status") or {}).get("phase")
            assert phase != "Failed", (obj["status"], manager.logs())
            return obj if phase == "Ready" else None
        out[name]["obj"] = wait_for(ready, 120, what=f"{name} Ready in cluster A")
    return out


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)


def _export(kube: kubeenv.KubeEnv, registry: Any, name: str, out: str) -> str:
    r = _cli("export", name, "--output", out, "--kubeconfig", kube.kubeconfig,
             "--registry", registry.host, "--insecure")
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def bundles(kube: kubeenv.KubeEnv, registry: Any, published: dict[str, Any],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bundles")
    return {name: (_export(kube, registry, name, str(d / f"{name}.tar")), str(d / f"{name}.tar"))[1]
            for name in MODELS}


# --- round trip ------------------------------------------------------------------------


def test_round_trip_is_byte_identical_and_adopted_without_a_job(
        kube, registry, client, published, bundles, cluster_b, tmp_path):
    a = published["bundle-rt"]["obj"]
    digest = a["status"]["artifact"]["digest"]
    path = bundles["bundle-rt"]
    with open(path, "rb") as f:
        bundle_sha = "sha256:" + hashlib.sha256(f.read()).hexdigest()

    r = _cli("import", path, "--kubeconfig", cluster_b.env.kubeconfig,
             "--registry", cluster_b.registry.host, "--insecure", "--wait", "90")
    assert r.returncode == 0, (r.stderr, cluster_b.manager.logs())
    assert f"digest: {digest}" in r.stdout
    assert "ready: ClusterModel bundle-rt" in r.stdout

    b = cluster_b.cr("bundle-rt")
    assert b is not None
    st = b["status"]
    assert st["phase"] == "Ready"
    assert st["artifact"]["digest"] == digest
    assert st["artifact"]["sizeBytes"] == a["status"]["artifact"]["sizeBytes"]
    assert st["artifact"]["reference"] == \
        f"{cluster_b.registry.host}/cluster/bundle-rt:{names.imported_tag(digest)}@{digest}"
    assert st["resolved"] == a["status"]["resolved"]  # same metadata as A's publish reported
    assert st["source"]["resolvedRevision"] == a["status"]["source"]["resolvedRevision"]
    assert {c["type"]: c["reason"] for c in st["conditions"]} == {
        "SourceResolved": "Imported", "Published": "Imported", "Ready": "Imported"}
    assert b["spec"]["source"] == a["spec"]["source"]
    assert b["metadata"]["labels"] == {"team": "ml"}
    assert b["metadata"]["annotations"]["example.com/owner"] == "ml-platform"
    assert b["metadata"]["annotations"][names.IMPORTED] == digest
    assert "modelcache.io/artifact" in b["metadata"]["finalizers"]
    assert jobs_of(cluster_b.client, b["metadata"]["uid"]) == []  # adopted, never published

    # byte-identical: B's artifact pulls back to the very files A published
    raw_a, _, _ = client.get_manifest(_ref(registry.host, "cluster/bundle-rt", digest))
    raw_b, _, _ = cluster_b.rc.get_manifest(_ref(cluster_b.registry.host, "cluster/bundle-rt",
                                                 digest))
    assert raw_a == raw_b
    pull_back(cluster_b.rc, f"{cluster_b.registry.host}/cluster/bundle-rt@{digest}",
              str(tmp_path / "from-b"))
    same_tree(published["bundle-rt"]["dir"], str(tmp_path / "from-b"))

    # importing the same bundle again changes nothing and succeeds
    r2 = _cli("import", path, "--kubeconfig", cluster_b.env.kubeconfig,
              "--registry", cluster_b.registry.host, "--insecure", "--no-progress")
    assert r2.returncode == 0, r2.stderr
    assert cluster_b.rc.list_tags("cluster/bundle-rt") == [names.imported_tag(digest)]
    with open(path, "rb") as f:
        assert "sha256:" + hashlib.sha256(f.read()).hexdigest() == bundle_sha  # not modified


def _ref(host: str, repo: str, digest: str) -> Any:
    from modelpack.oci.reference import Reference

    return Reference(host, repo, None, digest)


def test_export_is_deterministic_and_prints_the_bundle_sha256(kube, registry, bundles,
                                                              tmp_path):
    again = str(tmp_path / "again.tar")
    out = _export(kube, registry, "bundle-rt", again)
    with open(bundles["bundle-rt"], "rb") as f1, open(again, "rb") as f2:
        first, second = f1.read(), f2.read()
    assert first == second
    assert f"sha256:{hashlib.sha256(second).hexdigest()}" in out
    names = [m.name for m in tarfile.open(again).getmembers()]
    assert names[:3] == ["oci-layout", "index.json", "clustermodel.yaml"]
    cr = bundle.verify(again).cr
    assert set(cr) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(cr["metadata"]) == {"name", "labels", "annotations"}  # no uid, no status


def test_export_refuses_a_model_that_is_not_ready(kube, cluster, tmp_path):
    name = "bundle-pending"
    cluster.create(k.CLUSTER_MODELS, _cluster_model(name, "acme/nowhere-to-be-found"))
    try:
        r = _cli("export", name, "--output", str(tmp_path / "x.tar"),
                 "--kubeconfig", kube.kubeconfig, "--registry", "127.0.0.1:1")
        assert r.returncode == 1
        assert r.stderr.startswith("modelcache: NotReady: ClusterModel bundle-pending"), r.stderr
        assert not os.path.exists(tmp_path / "x.tar")
        r = _cli("export", "no-such-model", "--output", str(tmp_path / "x.tar"),
                 "--kubeconfig", kube.kubeconfig)
        assert r.returncode == 1 and r.stderr.startswith("modelcache: NotFound:"), r.stderr
    finally:
        cluster.delete(k.CLUSTER_MODELS, name)


def _ready_obj(name: str, digest: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"source": {"huggingFace": {"repo": "a/b"}}},
            "status": {"phase": "Ready", "artifact": {"digest": digest}}}


def test_export_resumes_dropped_connections_and_refuses_a_corrupt_registry_blob(
        registry, client, tmp_path):
    src = str(tmp_path / "src")
    modelgen.make_big_model(src, files=2, total=24 << 20, seed=7)
    pack = pack_to_registry(src, client, parse(f"{registry.host}/cluster/bundle-flaky:gen-1")).pack
    obj = _ready_obj("bundle-flaky", pack.digest)
    direct = bundle.export_bundle(obj, client, str(tmp_path / "direct.tar"))
    proxy = FlakyProxy(registry.host)
    try:
        proxy.cut_after, proxy.cuts_left = 5 << 20, 2
        flaky = bundle.export_bundle(obj, RegistryClient(proxy.host, insecure=True),
                                     str(tmp_path / "flaky.tar"))
        # two cuts (the layers are fetched side by side, so either may take either, and a
        # resumed stream may be cut again); each resumes with Range where it stopped
        assert len(proxy.ranges) == 2
        assert set(proxy.ranges) <= {f"bytes={5 << 20}-", f"bytes={10 << 20}-"}
        assert proxy.bytes_sent < pack.size + (1 << 20)  # nothing sent twice
    finally:
        proxy.close()
    assert flaky.sha256 == direct.sha256
    with open(tmp_path / "direct.tar", "rb") as f1, open(tmp_path / "flaky.tar", "rb") as f2:
        assert f1.read() == f2.read()
    for layer in pack.layers:  # every layer's data starts on a 4 KiB boundary (O_DIRECT)
        assert bundle.verify(str(tmp_path / "flaky.tar")).blobs[layer.digest].offset % 4096 == 0

    big = max(pack.layers, key=lambda x: x.size)
    os.chmod(registry.blob_path(big.digest), 0o644)
    with open(registry.blob_path(big.digest), "r+b") as f:
        f.seek(big.size // 2)
        byte = f.read(1)
        f.seek(big.size // 2)
        f.write(bytes([byte[0] ^ 1]))
    out = str(tmp_path / "corrupt.tar")
    with pytest.raises(IntegrityError):
        bundle.export_bundle(obj, client, out)
    assert not os.path.exists(out) and not os.path.exists(out + ".part")


def test_a_bundle_changed_after_verify_is_refused_by_the_registry(registry, client, tmp_path):
    """Push sends each blob from its offset in the tar without hashing it again: the
    registry's own digest check at commit is what keeps a file changed since ``verify``
    out, and then no blob of it and no manifest is there."""
    src = str(tmp_path / "src")
    modelgen.make_big_model(src, files=2, total=12 << 20, seed=8)
    pack = pack_to_registry(src, client, parse(f"{registry.host}/cluster/bundle-toctou:g")).pack
    path = str(tmp_path / "b.tar")
    bundle.export_bundle(_ready_obj("bundle-toctou", pack.digest), client, path)
    b = bundle.verify(path)
    big = max(pack.layers, key=lambda x: x.size)
    with open(path, "r+b") as f:  # one byte flipped after the verification
        at = b.blobs[big.digest].offset + big.size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(IntegrityError, match="changed after it was verified"):
        bundle.push(b, client, "imported/bundle-toctou")
    assert not client.blob_exists("imported/bundle-toctou", big.digest)
    assert client.list_tags("imported/bundle-toctou") == []


# --- tampering ---------------------------------------------------------------------------

Members = list[tuple[tarfile.TarInfo, bytes]]


def _members(path: str) -> Members:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"")  # type: ignore[union-attr]
                for m in tar.getmembers()]


def _write(members: Members, path: str) -> None:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info = _copy(info)
            if info.isreg():
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)


def _copy(info: tarfile.TarInfo) -> tarfile.TarInfo:
    new = tarfile.TarInfo(info.name)
    for attr in ("size", "mtime", "mode", "uid", "gid", "uname", "gname", "type", "linkname",
                 "devmajor", "devminor"):
        setattr(new, attr, getattr(info, attr))
    return new


def _named(members: Members, name: str) -> int:
    return next(i for i, (m, _) in enumerate(members) if m.name == name)


def _index(members: Members) -> dict[str, Any]:
    return json.loads(members[_named(members, "index.json")][1])  # type: ignore[no-any-return]


def _manifest_name(members: Members) -> str:
    return "blobs/sha256/" + _index(members)["manifests"][0]["digest"].split(":")[1]


def _largest_layer(members: Members) -> int:
    man = json.loads(members[_named(members, _manifest_name(members))][1])
    big = max(man["layers"], key=lambda x: x["size"])
    return _named(members, "blobs/sha256/" + big["digest"].split(":")[1])


def _entry(name: str, data: bytes = b"x", type_: bytes = tarfile.REGTYPE,
           linkname: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = type_, linkname, len(data)
    return info, data


def flip_blob_byte(ms: Members) -> None:
    i = _largest_layer(ms)
    data = bytearray(ms[i][1])
    data[len(data) // 2] ^= 0x01
    ms[i] = (ms[i][0], bytes(data))


def change_manifest(ms: Members) -> None:
    i = _named(ms, _manifest_name(ms))
    ms[i] = (ms[i][0], ms[i][1].replace(b'"schemaVersion":2', b'"schemaVersion":2 '))


def change_manifest_and_rehash(ms: Members) -> None:
    """A consistent forgery: a new manifest under its own digest, the index pointing at it."""
    i = _named(ms, _manifest_name(ms))
    man = json.loads(ms[i][1])
    man["annotations"]["io.modelcache.model.parameter-count"] = "1"
    raw = canonical(man)
    digest = "sha256:" + hashlib.sha256(raw).hexdigest()
    ms[i] = (_entry("blobs/sha256/" + digest.split(":")[1], raw)[0], raw)
    j = _named(ms, "index.json")
    index = _index(ms)
    index["manifests"][0].update(digest=digest, size=len(raw))
    ms[j] = (ms[j][0], canonical(index))


def drop_layer(ms: Members) -> None:
    del ms[_largest_layer(ms)]


def index_points_elsewhere(ms: Members) -> None:
    j = _named(ms, "index.json")
    index = _index(ms)
    index["manifests"][0]["digest"] = "sha256:" + "ab" * 32
    ms[j] = (ms[j][0], canonical(index))


def rename_cr(ms: Members) -> None:
    j = _named(ms, "clustermodel.yaml")
    ms[j] = (ms[j][0], ms[j][1].replace(b"name: bundle-tamper", b"name: bundle-other"))


def cr_digest(ms: Members) -> None:
    j = _named(ms, "clustermodel.yaml")
    text = ms[j][1].decode()
    start = text.index("modelcache.io/imported-digest: ") + len("modelcache.io/imported-digest: ")
    ms[j] = (ms[j][0], (text[:start] + "sha256:" + "cd" * 32 + text[start + 71:]).encode())


def add(entry: tuple[tarfile.TarInfo, bytes]) -> Callable[[Members], None]:
    return lambda ms: ms.append(entry)


def duplicate_index(ms: Members) -> None:
    ms.append(ms[_named(ms, "index.json")])


def extra_blob(ms: Members) -> None:
    data = b"not part of the model"
    ms.append(_entry("blobs/sha256/" + hashlib.sha256(data).hexdigest(), data))


def huge_index(ms: Members) -> None:
    j = _named(ms, "index.json")
    ms[j] = (ms[j][0], ms[j][1] + b" " * (5 << 20))


def _device() -> tuple[tarfile.TarInfo, bytes]:
    info, _ = _entry("blobs/sha256/" + "00" * 32, b"", tarfile.CHRTYPE)
    info.devmajor, info.devminor = 1, 3
    return info, b""


TAMPER: dict[str, tuple[Callable[[Members], None], str]] = {
    "changed-blob-byte": (flip_blob_byte, "DigestMismatch"),
    "changed-manifest": (change_manifest, "DigestMismatch"),
    "changed-manifest-rehashed": (change_manifest_and_rehash, "BundleMismatch"),
    "missing-blob": (drop_layer, "MissingBlob"),
    "index-digest-not-in-blobs": (index_points_elsewhere, "MissingManifest"),
    "cr-name-mismatch": (rename_cr, "BundleMismatch"),
    "cr-digest-mismatch": (cr_digest, "BundleMismatch"),
    "traversal": (add(_entry("../x")), "UnsafePath"),
    "traversal-inside": (add(_entry("blobs/../../x")), "UnsafePath"),
    "absolute-path": (add(_entry("/tmp/modelcache-bundle-x")), "UnsafePath"),
    "symlink": (add(_entry("blobs/sha256/" + "11" * 32, b"", tarfile.SYMTYPE, "/etc/passwd")),
                "UnsafeEntry"),
    "hardlink": (add(_entry("evil", b"", tarfile.LNKTYPE, "oci-layout")), "UnsafeEntry"),
    "device": (lambda ms: ms.append(_device()), "UnsafeEntry"),
    "fifo": (add(_entry("fifo", b"", tarfile.FIFOTYPE)), "UnsafeEntry"),
    "extra-file": (add(_entry("notes.txt", b"hello")), "UnexpectedEntry"),
    "extra-blob": (extra_blob, "UnexpectedEntry"),
    "duplicate-entry": (duplicate_index, "DuplicateEntry"),
    "oversized-metadata": (huge_index, "EntryTooLarge"),
}


def _assert_untouched(cluster_b: ClusterB, name: str, blobs: list[str]) -> None:
    assert cluster_b.rc.list_tags(f"cluster/{name}") == []
    assert not any(cluster_b.rc.blob_exists(f"cluster/{name}", d) for d in blobs)
    assert cluster_b.cr(name) is None


def _import_in_process(path: str, cluster_b: ClusterB, capsys: Any) -> tuple[int, str]:
    rc = cli_main(["import", path, "--kubeconfig", cluster_b.env.kubeconfig,
                   "--registry", cluster_b.registry.host, "--insecure", "--no-progress"])
    return rc, capsys.readouterr().err


@pytest.fixture(scope="module")
def tamper_base(bundles: dict[str, str]) -> tuple[Members, list[str]]:
    ms = _members(bundles["bundle-tamper"])
    blobs = ["sha256:" + m.name.split("/")[-1] for m, _ in ms if m.name.startswith("blobs/")]
    return ms, blobs


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_bundle_is_refused_and_nothing_is_pushed_or_applied(
        case, tamper_base, cluster_b, tmp_path, capsys):
    members, blobs = tamper_base
    mutate, reason = TAMPER[case]
    ms = list(members)
    mutate(ms)
    path = str(tmp_path / f"{case}.tar")
    _write(ms, path)
    rc, err = _import_in_process(path, cluster_b, capsys)
    assert rc == 1
    assert err.startswith(f"modelcache: {reason}: "), err
    assert err.count("\n") == 1  # one line
    _assert_untouched(cluster_b, "bundle-tamper", blobs)
    _assert_untouched(cluster_b, "bundle-other", blobs)


@pytest.mark.parametrize("where", ["mid-blob", "end-marker", "header"])
def test_truncated_bundle_is_refused(where, bundles, tamper_base, cluster_b, tmp_path, capsys):
    with open(bundles["bundle-tamper"], "rb") as f:
        raw = f.read()
    with tarfile.open(bundles["bundle-tamper"]) as tar:
        last = tar.getmembers()[-1]
        end = last.offset_data + last.size
    cut = {"mid-blob": last.offset_data + last.size // 2,
           "end-marker": end + (-end % 512),  # every entry whole, no end-of-archive blocks
           "header": last.offset + 100}[where]
    path = str(tmp_path / "cut.tar")
    with open(path, "wb") as f:
        f.write(raw[:cut])
    rc, err = _import_in_process(path, cluster_b, capsys)
    assert rc == 1
    assert err.startswith("modelcache: TruncatedBundle: "), err
    _assert_untouched(cluster_b, "bundle-tamper", tamper_base[1])


def test_not_a_tar_is_refused(cluster_b, tmp_path, capsys):
    path = str(tmp_path / "junk.tar")
    with open(path, "wb") as f:
        f.write(os.urandom(64 << 10))
    rc, err = _import_in_process(path, cluster_b, capsys)
    assert rc == 1 and err.startswith("modelcache: InvalidTar: "), err


def test_tampered_bundle_through_the_cli_subprocess(tamper_base, cluster_b, tmp_path):
    members, blobs = tamper_base
    ms = list(members)
    flip_blob_byte(ms)
    path = str(tmp_path / "flipped.tar")
    _write(ms, path)
    r = _cli("import", path, "--kubeconfig", cluster_b.env.kubeconfig,
             "--registry", cluster_b.registry.host, "--insecure")
    assert r.returncode == 1
    assert r.stderr.startswith("modelcache: DigestMismatch: blobs/sha256/"), r.stderr
    _assert_untouched(cluster_b, "bundle-tamper", blobs)


def test_a_cr_the_cluster_refuses_stops_before_any_push(tamper_base, cluster_b, tmp_path,
                                                        capsys):
    """B already has bundle-tamper from another source (spec.source is immutable): the
    dry-run apply fails, so not one blob is pushed."""
    members, blobs = tamper_base
    cluster_b.client.create(k.CLUSTER_MODELS, _cluster_model("bundle-tamper", "other/source"))
    try:
        _write(list(members), str(tmp_path / "ok.tar"))
        rc, err = _import_in_process(str(tmp_path / "ok.tar"), cluster_b, capsys)
        assert rc == 1 and err.startswith("modelcache: ApplyFailed: "), err
        assert "immutable" in err
        assert cluster_b.rc.list_tags("cluster/bundle-tamper") == []
        assert not any(cluster_b.rc.blob_exists("cluster/bundle-tamper", d) for d in blobs)
    finally:
        cluster_b.client.delete(k.CLUSTER_MODELS, "bundle-tamper")
        wait_for(lambda: cluster_b.cr("bundle-tamper") is None, 30, what="CR deleted")


# --- adoption ----------------------------------------------------------------------------


def test_adoption_waits_for_a_missing_artifact_then_becomes_ready(bundles, cluster_b):
    """A CR applied before its artifact is pushed is Pending (ImportedArtifactMissing), never
    publishes, and is adopted once the push lands."""
    b = bundle.verify(bundles["bundle-tamper"])
    cr = json.loads(json.dumps(b.cr))
    cr["metadata"]["name"] = "bundle-late"
    cluster_b.client.create(k.CLUSTER_MODELS, cr)
    try:
        def pending() -> Any:
            st = (cluster_b.cr("bundle-late") or {}).get("status") or {}
            conds = {c["type"]: c for c in st.get("conditions") or []}
            return st.get("phase") == "Pending" and \
                conds.get("Ready", {}).get("reason") == "ImportedArtifactMissing" and st
        st = wait_for(pending, 30, what="Pending ImportedArtifactMissing")
        ready_cond = next(c for c in st["conditions"] if c["type"] == "Ready")
        assert f"/cluster/bundle-late@{b.digest} is not in the registry" in ready_cond["message"]
        obj = cluster_b.cr("bundle-late")
        assert obj is not None and jobs_of(cluster_b.client, obj["metadata"]["uid"]) == []
        bundle.push(b, cluster_b.rc, "cluster/bundle-late")

        def ready() -> Any:
            st = (cluster_b.cr("bundle-late") or {}).get("status") or {}
            return st.get("phase") == "Ready" and st
        st = wait_for(ready, 60, what="adopted after the push")
        assert st["artifact"]["digest"] == b.digest
        assert jobs_of(cluster_b.client, obj["metadata"]["uid"]) == []
    finally:
        cluster_b.client.delete(k.CLUSTER_MODELS, "bundle-late")
        wait_for(lambda: cluster_b.cr("bundle-late") is None, 30, what="CR deleted")
    # the finalizer deleted the imported manifest (its tag) from B's registry
    assert cluster_b.rc.list_tags("cluster/bundle-late") == []
