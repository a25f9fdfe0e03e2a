"""The product images, as hack/images.sh builds them from the shipped Dockerfiles.

Runs with the e2e (``hack/e2e.sh``, which CI runs; marked ``e2e``): builds
both images or reuses the content-hashed cache, then reads each OCI archive
as a registry or containerd would (layout, digests, config) and runs the
image's entrypoint with ``runc`` on a bundle unpacked from it, as the user
the image names. runc, not podman: podman always sets rlimits, which this
sandbox refuses; a bare runc bundle is what containerd hands runc anyway.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import uuid

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.root]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "build", "images")
SITE = "opt/modelcache/lib/python3.11/site-packages"
USERS = {"controller": "65532:65532", "node": "0:0"}  # the chart's runAsUser; node: privileged


@pytest.fixture(scope="module")
def archives() -> dict[str, str]:
    if os.geteuid() != 0 or not shutil.which("buildah") or not shutil.which("runc"):
        pytest.skip("needs root, buildah and runc (hack/install.d/images.sh, node-e2e.sh)")
    subprocess.run(["bash", os.path.join(ROOT, "hack", "images.sh")], check=True, timeout=1800)
    return {n: os.path.join(OUT, f"modelcache-{n}.oci.tar") for n in USERS}


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    algo, hexd = digest.split(":")
    f = tar.extractfile(f"blobs/{algo}/{hexd}")
    assert f is not None, digest
    data = f.read()
    assert hashlib.sha256(data).hexdigest() == hexd, f"blob {digest} does not match its digest"
    return data


def read_image(path: str) -> tuple[dict, list[bytes]]:
    """Check the OCI layout; return the image config and its layers (bytes, in order)."""
    with tarfile.open(path) as tar:
        layout = json.loads(tar.extractfile("oci-layout").read())  # type: ignore[union-attr]
        assert layout["imageLayoutVersion"] == "1.0.0"
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        assert index["schemaVersion"] == 2 and len(index["manifests"]) == 1
        manifest = json.loads(_blob(tar, index["manifests"][0]["digest"]))
        assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
        config = json.loads(_blob(tar, manifest["config"]["digest"]))
        layers = [_blob(tar, layer["digest"]) for layer in manifest["layers"]]
        # the uncompressed layers are the config's diff_ids
        diff_ids = ["sha256:" + hashlib.sha256(_plain(b)).hexdigest() for b in layers]
        assert diff_ids == config["rootfs"]["diff_ids"]
    return config, layers


def _plain(layer: bytes) -> bytes:
    return gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer


def unpack(layers: list[bytes], rootfs: str) -> None:
    """Apply the layers in order (whiteouts included), as a snapshotter would."""
    for layer in layers:
        with tarfile.open(fileobj=io.BytesIO(_plain(layer))) as tar:
            members = []
            for m in tar.getmembers():
                head, base = os.path.split(m.name)
                if base.startswith(".wh."):
                    gone = os.path.join(rootfs, head, base[len(".wh."):])
                    if os.path.isdir(gone) and not os.path.islink(gone):
                        shutil.rmtree(gone)
                    elif os.path.lexists(gone):
                        os.remove(gone)
                    continue
                members.append(m)
            tar.extractall(rootfs, members=members, numeric_owner=True, filter="tar")


@pytest.fixture(scope="module")
def unpacked(archives: dict[str, str], tmp_path_factory: pytest.TempPathFactory):
    images = {}
    for name, path in archives.items():
        config, layers = read_image(path)
        rootfs = str(tmp_path_factory.mktemp(name) / "rootfs")
        os.makedirs(rootfs)
        unpack(layers, rootfs)
        images[name] = (config, rootfs)
    return images


def runc(config: dict, rootfs: str, args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``args`` in the image with runc, as the image's user and environment."""
    bundle = os.path.dirname(rootfs)
    subprocess.run(["runc", "spec", "--bundle", bundle], check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        spec = json.load(f)
    uid, _, gid = config["config"].get("User", "0:0").partition(":")
    spec["process"].update(args=args, terminal=False, env=config["config"]["Env"],
                           cwd=config["config"].get("WorkingDir") or "/",
                           user={"uid": int(uid), "gid": int(gid or 0)})
    spec["process"].pop("rlimits", None)  # setrlimit is refused in this sandbox
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(spec, f)
    try:
        return subprocess.run(["runc", "run", "--bundle", bundle, f"mc-img-{uuid.uuid4().hex[:8]}"],
                              capture_output=True, text=True, timeout=120, check=False)
    finally:
        os.remove(os.path.join(bundle, "config.json"))


@pytest.mark.parametrize("name", sorted(USERS))
def test_image_runs_as_the_manifests_expect(unpacked, name):
    config, rootfs = unpacked[name]
    assert config["config"]["User"] == USERS[name]
    entry = config["config"]["Entrypoint"]
    assert entry == [f"modelcache-{name}"]
    res = runc(config, rootfs, [*entry, "--help"])
    assert res.returncode == 0, res.stderr
    assert "usage" in res.stdout.lower()
    who = runc(config, rootfs, ["id", "-u"])
    assert who.stdout.strip() == USERS[name].split(":")[0]


@pytest.mark.parametrize("name", sorted(USERS))
def test_image_carries_only_what_runs(unpacked, name):
    _, rootfs = unpacked[name]
    for d in ("usr/bin", "usr/local/bin", "bin"):
        tools = os.listdir(os.path.join(rootfs, d)) if os.path.isdir(os.path.join(rootfs, d)) else []
        compilers = [t for t in tools if t in ("cc", "c++", "gcc", "g++", "clang", "protoc")
                     or t.startswith(("gcc-", "x86_64-linux-gnu-gcc"))]
        assert not compilers, f"{d}: {compilers}"
    site = os.path.join(rootfs, SITE)
    assert os.path.isdir(os.path.join(site, "modelpack"))
    assert not os.path.exists(os.path.join(site, "tests"))
    for top, dirs, _ in os.walk(rootfs):
        assert "grpc_tools" not in dirs, top
        assert "wheels" not in dirs or top != rootfs, "the build's wheelhouse leaked into the image"
    assert not os.path.exists(os.path.join(rootfs, "src")), "the build stage's source leaked"


def test_node_image_has_prebuilt_stubs(unpacked):
    config, rootfs = unpacked["node"]
    gen = os.path.join(rootfs, SITE, "csi", "gen")
    for f in ("csi_pb2.py", "csi_pb2_grpc.py"):
        assert os.path.isfile(os.path.join(gen, f)), f
    # loads without proto/csi.proto or grpcio-tools in the image
    res = runc(config, rootfs, ["python3", "-c", "from csi import stubs; print(stubs.pb.DESCRIPTOR.name)"])
    assert res.returncode == 0, res.stderr
