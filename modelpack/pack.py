"""Packing: a verified model directory becomes a ModelPack.

``pack_to_registry`` streams each file once to the registry, hashing it on
the way (the registry checks the digest we commit), parallel across files
with a bound. ``pack_to_layout`` ingests each file once into an OCI image
layout. Both verify the model first (``formats.inspect_dir``) and build the
same canonical manifest, so the digest is the same either way.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from modelpack import digest as dg
from modelpack import parallel
from modelpack.formats import ModelFile, ModelInfo, inspect_dir
from modelpack.oci import layout as oci_layout
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import Layer, ModelPack, assemble, build_config, build_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.store.blobs import BlobStore

Progress = Callable[[int], None]
WORKERS = 4


def _noop(_: int) -> None:
    pass


@dataclass(frozen=True)
class PackResult:
    pack: ModelPack
    info: ModelInfo
    reference: str | None = None


def _run_parallel(files: Sequence[ModelFile], fn: Callable[[ModelFile], str],
                  workers: int) -> dict[str, str]:
    """Run ``fn`` per file, largest first, at most ``workers`` at once; path -> digest."""
    done = parallel.run_all(fn, files, workers, size=lambda f: f.size, name="pack")
    return {f.path: digest for f, digest in done}


def _finish(info: ModelInfo, digests: dict[str, str], name: str | None
            ) -> tuple[list[Layer], bytes, bytes]:
    layers = [Layer(f.path, digests[f.path], f.size, mt.layer_type(f.kind)) for f in info.files]
    config = build_config(info, layers, name=name)
    manifest = build_manifest(info, layers, config)
    return layers, config, manifest


def locked(progress: Progress) -> Progress:
    lock = threading.Lock()

    def report(n: int) -> None:
        with lock:
            progress(n)

    return report


def pack_to_registry(src: str | ModelInfo, client: RegistryClient, ref: Reference, *,
                     allow_pickle: bool = False, expected_format: str = "Auto",
                     progress: Progress = _noop, workers: int = WORKERS) -> PackResult:
    info = src if isinstance(src, ModelInfo) else inspect_dir(src, expected_format, allow_pickle)
    report = locked(progress)

    def upload(f: ModelFile) -> str:
        return client.upload_blob(ref.repository, lambda: open(f.abspath, "rb"), f.size, report)

    digests = _run_parallel(info.files, upload, workers)
    _, config, manifest = _finish(info, digests, None)
    client.upload_bytes(ref.repository, config)
    digest = client.put_manifest(ref.repository, ref.tag or dg.of_bytes(manifest), manifest)
    return PackResult(assemble(manifest, config, digest), info, str(ref.with_digest(digest)))


def pack_to_layout(src: str | ModelInfo, out_dir: str, tag: str | None = "latest", *,
                   allow_pickle: bool = False, expected_format: str = "Auto",
                   progress: Progress = _noop, workers: int = WORKERS,
                   name: str | None = None) -> PackResult:
    info = src if isinstance(src, ModelInfo) else inspect_dir(src, expected_format, allow_pickle)
    os.makedirs(out_dir, exist_ok=True)
    store = BlobStore(out_dir)
    report = locked(progress)
    digests = _run_parallel(info.files, lambda f: store.ingest_file(f.abspath, None, report),
                            workers)
    _, config, manifest = _finish(info, digests, name)
    for blob in (config, manifest):
        path = store.path(dg.of_bytes(blob))
        if not os.path.exists(path):
            store.ingest_stream(io.BytesIO(blob), dg.of_bytes(blob), len(blob))
    oci_layout.write_index(out_dir, manifest, tag)
    if not os.listdir(store.ingest_dir):
        os.rmdir(store.ingest_dir)  # a layout has no ingest area
    return PackResult(assemble(manifest, config), info)
