"""OCI image layout directories: ``oci-layout``, ``index.json``, ``blobs/``.

The ``blobs/sha256`` tree is exactly a ``BlobStore``, so writing a layout
is ingesting files into a store plus two small JSON files.
"""

from __future__ import annotations

import json
import os
from typing import Any

from modelpack import digest as dg
from modelpack.errors import FormatError, IntegrityError, NotFoundError
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import ModelPack, assemble, canonical
from modelpack.store.blobs import BlobStore

REF_NAME = "org.opencontainers.image.ref.name"


def is_layout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "oci-layout"))


def write_index(root: str, manifest_bytes: bytes, tag: str | None) -> None:
    """Add (or replace, by tag) the manifest in ``index.json``."""
    index_path = os.path.join(root, "index.json")
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": []}
    if os.path.exists(index_path):
        with open(index_path, "rb") as f:
            index = json.load(f)
    desc: dict[str, Any] = {"mediaType": mt.OCI_MANIFEST, "digest": dg.of_bytes(manifest_bytes),
                            "size": len(manifest_bytes), "artifactType": mt.ARTIFACT}
    if tag:
        desc["annotations"] = {REF_NAME: tag}
    keep = [m for m in index.get("manifests", [])
            if m.get("digest") != desc["digest"]
            and not (tag and (m.get("annotations") or {}).get(REF_NAME) == tag)]
    index["manifests"] = [*keep, desc]
    with open(os.path.join(root, "oci-layout"), "wb") as f:
        f.write(canonical({"imageLayoutVersion": "1.0.0"}))
    tmp = index_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(canonical(index))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_path)


def read(root: str, tag: str | None = None) -> tuple[ModelPack, BlobStore]:
    """The ModelPack in a layout (by tag, or the only one), verified from its blobs."""
    if not is_layout(root):
        raise FormatError(f"{root} is not an OCI image layout", reason="NotALayout")
    store = BlobStore(root)
    with open(os.path.join(root, "index.json"), "rb") as f:
        index = json.load(f)
    manifests = index.get("manifests") or []
    if tag:
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(REF_NAME) == tag]
    if not manifests:
        raise NotFoundError(f"no manifest{' tagged ' + tag if tag else ''} in {root}")
    if len(manifests) > 1:
        raise FormatError(f"{root} holds {len(manifests)} manifests; name one with :TAG",
                          reason="Ambiguous")
    digest = dg.validate(str(manifests[0]["digest"]))

    def blob(d: str) -> bytes:
        path = store.path(d)
        if not os.path.exists(path):
            raise NotFoundError(f"blob {d} missing from {root}")
        with open(path, "rb") as f:
            return f.read(16 << 20)

    mbytes = blob(digest)
    m_digest = dg.of_bytes(mbytes)
    if m_digest != digest:
        raise IntegrityError(f"manifest blob {digest} in {root} is corrupt")
    cfg_digest = json.loads(mbytes)["config"]["digest"]
    return assemble(mbytes, blob(dg.validate(cfg_digest)), digest), store
