"""Media types and annotations of CNCF ModelPack v1, and their older names.

We write only the ``org.cncf``/``vnd.cncf`` names; we read the earlier
``vnd.cnai``/``org.cnai`` ones too, so artifacts built by older tools
still pull.
"""

from __future__ import annotations

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"

ARTIFACT = "application/vnd.cncf.model.manifest.v1+json"
CONFIG = "application/vnd.cncf.model.config.v1+json"
KINDS = ("weight", "weight.config", "doc", "code", "dataset")


def layer_type(kind: str) -> str:
    return f"application/vnd.cncf.model.{kind}.v1.raw"


FILEPATH = "org.cncf.model.filepath"
FILE_METADATA = "org.cncf.model.file.metadata+json"

LEGACY_ARTIFACTS = ("application/vnd.cnai.model.manifest.v1+json",)
LEGACY_CONFIGS = ("application/vnd.cnai.model.config.v1+json",)
FILEPATH_KEYS = (FILEPATH, "org.cnai.model.filepath", "vnd.cnai.model.filepath",
                 "org.opencontainers.image.title")

# modelcache's own exact values beside the spec's rounded ones
ANN_PARAMS = "io.modelcache.model.parameter-count"
ANN_CONTEXT = "io.modelcache.model.context-length"
ANN_TENSORS = "io.modelcache.model.tensors"


def kind_of(media_type: str) -> str | None:
    """'weight', 'doc', ... for any ModelPack layer type, old or new, raw or tar."""
    for prefix in ("application/vnd.cncf.model.", "application/vnd.cnai.model."):
        if media_type.startswith(prefix):
            rest = media_type[len(prefix):]
            kind = rest.split(".v1", 1)[0]
            if kind in KINDS:
                return kind
    return None


def is_raw(media_type: str) -> bool:
    return media_type.endswith(".raw")
