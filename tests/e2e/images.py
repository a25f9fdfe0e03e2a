"""Container images for the node end-to-end test, built without a Docker engine.

Sits between the test (``test_node_e2e.py``) and the local registry: the
whole root filesystem of both images is Debian's statically linked
``/bin/busybox`` (package ``busybox-static``, installed by
``hack/install.d/node-e2e.sh``) with one symlink per applet, so ``sh``,
``cat``, ``sha256sum``, ``sleep`` and ``touch`` exist. The layer is a
reproducible tar.gz (fixed mtimes and owners), packed with an OCI image
config and manifest and pushed with our own ``RegistryClient``; containerd
pulls it like any image.

Two images share that one layer:
- ``busybox``: the workload image (``Cmd`` ``/bin/sh``; the test sets the command).
- ``pause``: the pod sandbox image. containerd's default
  ``registry.k8s.io/pause`` is out of reach (no internet), so
  ``nodeenv`` points containerd's ``sandbox_image`` at this one. Its
  entrypoint just sleeps forever; a real pause binary also reaps zombies and
  exits on SIGTERM, neither of which a test sandbox needs (containerd stops a
  sandbox with SIGKILL anyway).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import tarfile
from dataclasses import dataclass

from modelpack.oci.registry import RegistryClient

BUSYBOX = "/bin/busybox"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class ImageError(RuntimeError):
    """The test images could not be built."""


@dataclass(frozen=True)
class Images:
    """References containerd can pull (plain HTTP registry on loopback)."""

    busybox: str
    pause: str


def _applets(busybox: str) -> list[str]:
    import subprocess

    out = subprocess.run([busybox, "--list"], check=True, capture_output=True, text=True,
                         timeout=30).stdout.split()
    return sorted(a for a in out if a and "/" not in a and a != "busybox")


def rootfs_layer(busybox: str = BUSYBOX) -> tuple[bytes, str]:
    """The gzipped layer and its diff_id (sha256 of the uncompressed tar)."""
    if not os.access(busybox, os.X_OK):
        raise ImageError(f"{busybox} missing (apt-get install busybox-static)")
    with open(busybox, "rb") as f:
        binary = f.read()
    if binary[:4] != b"\x7fELF":
        raise ImageError(f"{busybox} is not an ELF binary")
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime, info.uid, info.gid = kind, mode, 0, 0, 0
            info.linkname = link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d in ("bin", "dev", "etc", "proc", "sys", "tmp", "data"):
            add(d + "/", tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755)
        add("bin/busybox", tarfile.REGTYPE, 0o755, binary)
        for applet in _applets(busybox):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/:/bin/sh\n")
        add("etc/group", tarfile.REGTYPE, 0o644, b"root:x:0:\n")
    tar_bytes = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(tar_bytes).hexdigest()
    return gzip.compress(tar_bytes, mtime=0), diff_id


def _config(diff_id: str, *, cmd: list[str] | None = None,
            entrypoint: list[str] | None = None) -> bytes:
    conf: dict[str, object] = {"Env": ["PATH=/bin"], "WorkingDir": "/"}
    if cmd:
        conf["Cmd"] = cmd
    if entrypoint:
        conf["Entrypoint"] = entrypoint
    doc = {
        "architecture": _ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "config": conf,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/e2e/images.py: Debian busybox-static"}],
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _push(client: RegistryClient, repository: str, tag: str, layer: bytes,
          layer_digest: str, config: bytes) -> str:
    config_digest = client.upload_bytes(repository, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer_digest, "size": len(layer)}],
    }
    raw = json.dumps(manifest, separators=(",", ":")).encode()
    client.put_manifest(repository, tag, raw, OCI_MANIFEST)
    return f"{client.host}/{repository}:{tag}"


def push_images(client: RegistryClient, prefix: str = "e2e") -> Images:
    """Build both images and push them to ``client``'s registry."""
    layer, diff_id = rootfs_layer()
    refs = {}
    for name, config in (
        ("busybox", _config(diff_id, cmd=["/bin/sh"])),
        ("pause", _config(diff_id, entrypoint=["/bin/sleep", "inf"])),
    ):
        repository = f"{prefix}/{name}"
        layer_digest = client.upload_bytes(repository, layer)
        refs[name] = _push(client, repository, "1", layer, layer_digest, config)
    return Images(busybox=refs["busybox"], pause=refs["pause"])
