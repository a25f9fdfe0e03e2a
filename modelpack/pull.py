"""Pulling: a ModelPack in a registry (or a layout) becomes verified files.

Every layer goes through a ``BlobStore``: downloaded into a ``.part`` file
while hashed, resumed with ``Range`` after a drop or a crash, renamed only
when the digest matches; one writer per digest at a time, so pulls of
models that share a layer (threads or processes on one store) fetch it once. Then the tree is placed from the blobs (reflink,
hardlink or copy) and renamed into place whole. A pod or a user therefore
sees a complete, verified tree or nothing at all.

``pull_to_store`` is the node cache's path (blobs kept, shared by trees);
``pull_to_dir`` is the CLI's: a staging store beside DEST, kept across an
interrupted run for resume, removed once DEST is in place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable

from modelpack import digest as dg
from modelpack import parallel
from modelpack.errors import FormatError, IntegrityError, ModelPackError, StoreError
from modelpack.oci.manifest import Layer, ModelPack, assemble
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import locked
from modelpack.store.blobs import BlobStore
from modelpack.store.placement import Method, place_tree, remove_tree

Progress = Callable[[int], None]
WORKERS = 4


def _noop(_: int) -> None:
    pass


def resolve(client: RegistryClient, ref: Reference) -> ModelPack:
    """Fetch and verify a manifest and its config."""
    raw, digest, _ = client.get_manifest(ref)
    try:
        cfg_digest = dg.validate(str(json.loads(raw)["config"]["digest"]))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"manifest of {ref} has no config digest", reason="InvalidManifest") from e
    config = client.get_blob_bytes(ref.repository, cfg_digest)
    return assemble(raw, config, digest)


def fetch_blobs(client: RegistryClient, repository: str, layers: tuple[Layer, ...],
                store: BlobStore, progress: Progress = _noop, workers: int = WORKERS) -> None:
    """Ensure every layer's blob is in ``store``, verified; parallel with a bound."""
    report = locked(progress)
    todo: dict[str, Layer] = {}
    for layer in layers:
        if store.has(layer.digest, layer.size):
            report(layer.size)
        else:
            todo.setdefault(layer.digest, layer)

    def one(layer: Layer) -> None:
        # one writer per digest, in this process or another: this may wait for a
        # pull of another model that shares the layer, then find it stored
        part = store.open_partial(layer.digest, layer.size)
        try:
            if part.present:
                report(layer.size)
                return
            client.download_blob(repository, layer.digest, layer.size, part, report)
            store.commit(part)
        except IntegrityError:
            part.discard()
            raise
        finally:
            part.close()

    parallel.run_all(one, todo.values(), workers, size=lambda x: x.size, name="pull")


def place(pack: ModelPack, store: BlobStore, dest: str, method: Method | None = None) -> Method:
    return place_tree(((layer.path, store.path(layer.digest)) for layer in pack.layers),
                      dest, method)


def pull_to_store(client: RegistryClient, ref: Reference, store: BlobStore,
                  progress: Progress = _noop, workers: int = WORKERS) -> ModelPack:
    pack = resolve(client, ref)
    fetch_blobs(client, ref.repository, pack.layers, store, progress, workers)
    return pack


def _staging(dest: str, digest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest))
    return os.path.join(parent, f".{os.path.basename(os.path.abspath(dest))}"
                                f".modelcache-{dg.hex_of(digest)[:16]}")


def pull_to_dir(client: RegistryClient, ref: Reference, dest: str,
                progress: Progress = _noop, workers: int = WORKERS,
                pack: ModelPack | None = None) -> ModelPack:
    """Pull into a new directory ``dest``; nothing appears there unless all verified.

    ``pack``: the manifest ``resolve`` already returned for ``ref`` (the CLI
    resolves first to size its progress bar), so it is not fetched twice.
    """
    if os.path.exists(dest) and (not os.path.isdir(dest) or os.listdir(dest)):
        raise StoreError(f"{dest} exists and is not an empty directory")
    if pack is None:
        pack = resolve(client, ref)
    staging = _staging(dest, pack.digest)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    store = BlobStore(staging)
    try:
        fetch_blobs(client, ref.repository, pack.layers, store, progress, workers)
        if os.path.isdir(dest):
            os.rmdir(dest)
        place(pack, store, dest)
    except ModelPackError as e:
        if not e.retryable:  # a resumable failure keeps its partial blobs for next time
            shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_tree(staging)
    return pack


def verify_tree(pack: ModelPack, root: str) -> None:
    """Rehash a placed tree against the manifest (used by tests and scrub)."""
    for layer in pack.layers:
        path = os.path.join(root, *layer.path.split("/"))
        got, size = dg.of_file(path)
        if got != layer.digest or size != layer.size:
            raise IntegrityError(f"{layer.path} in {root} does not match {layer.digest}")
