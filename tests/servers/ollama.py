"""An Ollama-style registry: CNCF distribution loaded with Ollama's media types.

``push_model`` writes what ``ollama push`` writes: a Docker v2 manifest
whose config (``application/vnd.docker.container.image.v1+json``) carries
``model_format``/``model_family``/``model_type``/``file_type`` and whose
layers are ``application/vnd.ollama.image.{model,template,params,license}``.
The registry itself is the real ``docker-registry`` from ``cli.local.registry``.
"""

from __future__ import annotations

import io
import json
import os

from modelpack import digest as dg
from modelpack.oci import mediatypes as mt
from modelpack.oci.registry import RegistryClient

OLLAMA = "application/vnd.ollama.image."
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"
PARAMS = {"stop": ["<|user|>"], "temperature": 0.7}
LICENSE = "Test model license: for tests only.\n"


def push_model(client: RegistryClient, repository: str, tag: str, gguf_path: str, *,
               family: str = "llama", model_type: str = "1B", file_type: str = "F16",
               extra_layers: list[tuple[str, bytes]] | None = None) -> dict[str, object]:
    """Push a GGUF file and its text layers as an Ollama model; return the manifest."""
    size = os.path.getsize(gguf_path)
    model_digest = client.upload_blob(repository, lambda: open(gguf_path, "rb"), size)
    layers = [{"mediaType": OLLAMA + "model", "digest": model_digest, "size": size}]
    texts = [("template", TEMPLATE.encode()), ("params", json.dumps(PARAMS).encode()),
             ("license", LICENSE.encode()), *(extra_layers or [])]
    for kind, data in texts:
        d = client.upload_bytes(repository, data)
        layers.append({"mediaType": OLLAMA + kind, "digest": d, "size": len(data)})
    config = json.dumps({
        "model_format": "gguf", "model_family": family, "model_families": [family],
        "model_type": model_type, "file_type": file_type, "architecture": "amd64",
        "os": "linux", "rootfs": {"type": "layers", "diff_ids": [x["digest"] for x in layers]},
    }).encode()
    cfg_digest = client.upload_bytes(repository, config)
    manifest = {
        "schemaVersion": 2, "mediaType": mt.DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": cfg_digest, "size": len(config)},
        "layers": layers,
    }
    raw = json.dumps(manifest).encode()
    client.put_manifest(repository, tag, raw, mt.DOCKER_MANIFEST)
    return {"manifest": manifest, "digest": dg.of_bytes(raw), "config": json.loads(config),
            "texts": dict(texts), "gguf": gguf_path}


def blob_stream(data: bytes) -> io.BytesIO:
    return io.BytesIO(data)
