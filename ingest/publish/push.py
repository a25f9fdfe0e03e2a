"""Push: staged, verified blobs and the ModelPack manifest into the registry.

Pipeline position: last. Blobs go up with ``RegistryClient.upload_file``
(skipped when present; sent with sendfile, not hashed again: we hashed
while staging and the registry checks the digest). The manifest goes
last, so a failure anywhere before leaves no tag. The manifest is built exactly as ``modelpack.pack`` builds it, so a model
published here and one packed from a directory have the same digest.
"""

from __future__ import annotations

from modelpack import digest as dg
from modelpack.formats import ModelInfo
from modelpack.oci import mediatypes as mt
from modelpack.oci.manifest import Layer, ModelPack, assemble, build_config, build_manifest
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient


def layers_for(info: ModelInfo, digests: dict[str, str]) -> list[Layer]:
    return [Layer(f.path, digests[f.path], f.size, mt.layer_type(f.kind)) for f in info.files]


def push_manifest(client: RegistryClient, ref: Reference, info: ModelInfo,
                  digests: dict[str, str], name: str | None = None) -> ModelPack:
    layers = layers_for(info, digests)
    config = build_config(info, layers, name=name)
    manifest = build_manifest(info, layers, config)
    client.upload_bytes(ref.repository, config)
    digest = client.put_manifest(ref.repository, ref.tag or dg.of_bytes(manifest), manifest)
    return assemble(manifest, config, digest)
