"""ModelPack v1 manifests and configs: build them, and read them back.

A manifest is canonical JSON (sorted keys, no spaces) built only from the
files and their verified metadata, so packing the same files twice gives
the same manifest digest: the digest is the model's identity. Reading
accepts the older CNAI names and refuses any layer path that is unsafe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from modelpack import digest as dg
from modelpack.errors import FormatError, IntegrityError
from modelpack.formats import ModelInfo
from modelpack.oci import mediatypes as mt
from modelpack.paths import safe_relpath

MAX_MANIFEST = 4 << 20


@dataclass(frozen=True)
class Layer:
    path: str
    digest: str
    size: int
    media_type: str

    @property
    def kind(self) -> str:
        return mt.kind_of(self.media_type) or "weight.config"

    def descriptor(self) -> dict[str, Any]:
        meta = {"name": self.path, "mode": 0o444, "size": self.size, "typeflag": 48}
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
            "annotations": {
                mt.FILEPATH: self.path,
                mt.FILE_METADATA: canonical(meta).decode(),
            },
        }


@dataclass(frozen=True)
class ModelPack:
    """A parsed ModelPack: its manifest digest is its identity."""

    digest: str
    manifest: dict[str, Any]
    manifest_bytes: bytes
    config: dict[str, Any]
    config_bytes: bytes
    layers: tuple[Layer, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def config_digest(self) -> str:
        return str(self.manifest["config"]["digest"])

    def metadata(self) -> dict[str, Any]:
        """Format, family and the rest, from the config and our exact annotations."""
        cfg = self.config.get("config", {}) or {}
        desc = self.config.get("descriptor", {}) or {}
        ann = self.manifest.get("annotations", {}) or {}
        fmt = str(cfg.get("format") or "")
        return {
            "format": _FORMAT_NAMES.get(fmt.lower(), fmt or None),
            "family": desc.get("family"),
            "architecture": cfg.get("architecture"),
            "parameterCount": _int(ann.get(mt.ANN_PARAMS)),
            "paramSize": cfg.get("paramSize"),
            "precision": cfg.get("precision"),
            "quantization": cfg.get("quantization"),
            "contextLength": _int(ann.get(mt.ANN_CONTEXT)),
            "tensors": _int(ann.get(mt.ANN_TENSORS)),
            "files": len(self.layers),
            "sizeBytes": self.size,
        }


_FORMAT_NAMES = {"safetensors": "Safetensors", "gguf": "GGUF", "diffusers": "Diffusers",
                 "pickle": "Pickle", "raw": "Raw"}


def _int(v: object) -> int | None:
    try:
        return int(str(v)) if v is not None else None
    except ValueError:
        return None


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def param_size(n: int) -> str:
    """Human parameter size as model cards write it: 494M, 7.6B."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return (f"{v:.1f}".rstrip("0").rstrip(".")) + unit
    return str(n)


def build_config(info: ModelInfo, layers: list[Layer], name: str | None = None,
                 created: str | None = None) -> bytes:
    """The ModelPack config: descriptor + config + modelfs, never empty."""
    descriptor: dict[str, Any] = {"family": info.family or "unknown"}
    if name:
        descriptor["name"] = name
    if created:
        descriptor["createdAt"] = created
    config: dict[str, Any] = {
        "format": info.format.lower(),
        "architecture": info.architecture or "unknown",
        "paramSize": param_size(info.parameter_count),
        "precision": info.precision or "unknown",
    }
    if info.quantization:
        config["quantization"] = info.quantization
    return canonical({
        "descriptor": descriptor,
        "config": config,
        "modelfs": {"type": "layers", "diffIds": [layer.digest for layer in layers]},
    })


def build_manifest(info: ModelInfo, layers: list[Layer], config_bytes: bytes) -> bytes:
    annotations = {mt.ANN_PARAMS: str(info.parameter_count), mt.ANN_TENSORS: str(info.tensors)}
    if info.context_length:
        annotations[mt.ANN_CONTEXT] = str(info.context_length)
    return canonical({
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": mt.ARTIFACT,
        "config": {"mediaType": mt.CONFIG, "digest": dg.of_bytes(config_bytes),
                   "size": len(config_bytes)},
        "layers": [layer.descriptor() for layer in sorted(layers, key=lambda x: x.path)],
        "annotations": annotations,
    })


def parse_manifest(raw: bytes, digest: str | None = None) -> tuple[dict[str, Any], str]:
    """Parse and check a manifest; return (manifest, digest)."""
    if len(raw) > MAX_MANIFEST:
        raise FormatError(f"manifest of {len(raw)} bytes is over the bound", reason="InvalidManifest")
    got = dg.of_bytes(raw)
    if digest is not None and got != digest:
        raise IntegrityError(f"manifest hashes to {got}, expected {digest}")
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"manifest is not JSON: {e}", reason="InvalidManifest") from e
    if not isinstance(m, dict) or m.get("schemaVersion") != 2:
        raise FormatError("not an OCI image manifest (schemaVersion 2)", reason="InvalidManifest")
    if m.get("mediaType") == mt.OCI_INDEX or "manifests" in m:
        raise FormatError("reference names an index, not a ModelPack manifest",
                          reason="NotAModelPack")
    cfg = m.get("config")
    if not isinstance(cfg, dict) or not isinstance(m.get("layers"), list):
        raise FormatError("manifest lacks config or layers", reason="InvalidManifest")
    art = m.get("artifactType") or cfg.get("mediaType")
    if art not in (mt.ARTIFACT, mt.CONFIG, *mt.LEGACY_ARTIFACTS, *mt.LEGACY_CONFIGS):
        raise FormatError(f"artifact type {str(art)[:100]!r} is not a ModelPack",
                          reason="NotAModelPack")
    return m, got


def layers_of(manifest: dict[str, Any]) -> tuple[Layer, ...]:
    """The file layers, with safe, unique paths."""
    out: list[Layer] = []
    seen: set[str] = set()
    for d in manifest["layers"]:
        if not isinstance(d, dict):
            raise FormatError("layer descriptor is not an object", reason="InvalidManifest")
        media_type = str(d.get("mediaType", ""))
        if mt.kind_of(media_type) is None:
            raise FormatError(f"layer type {media_type[:100]!r} is not a ModelPack layer",
                              reason="InvalidManifest")
        if not mt.is_raw(media_type):
            raise FormatError(f"layer type {media_type!r} (archived layers) is not supported yet",
                              reason="UnsupportedLayer")
        ann = d.get("annotations") or {}
        path = next((ann[k] for k in mt.FILEPATH_KEYS if k in ann), None)
        if not isinstance(path, str):
            raise FormatError("layer without a file path annotation", reason="InvalidManifest")
        path = safe_relpath(path)
        if path in seen:
            raise FormatError(f"file {path!r} appears twice", reason="InvalidManifest")
        seen.add(path)
        size = d.get("size")
        if not isinstance(size, int) or size < 0:
            raise FormatError(f"layer {path!r} has an invalid size", reason="InvalidManifest")
        out.append(Layer(path, dg.validate(str(d.get("digest"))), size, media_type))
    for p in seen:  # a file may not also be a directory of another file
        if any(q.startswith(p + "/") for q in seen):
            raise FormatError(f"{p!r} is both a file and a directory", reason="InvalidManifest")
    return tuple(out)


def parse_config(raw: bytes, digest: str) -> dict[str, Any]:
    if dg.of_bytes(raw) != digest:
        raise IntegrityError(f"config does not hash to {digest}")
    try:
        cfg = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"config is not JSON: {e}", reason="InvalidConfig") from e
    if not isinstance(cfg, dict):
        raise FormatError("config is not an object", reason="InvalidConfig")
    return cfg


def assemble(manifest_bytes: bytes, config_bytes: bytes, digest: str | None = None) -> ModelPack:
    m, d = parse_manifest(manifest_bytes, digest)
    cfg = parse_config(config_bytes, str(m["config"]["digest"]))
    return ModelPack(d, m, manifest_bytes, cfg, config_bytes, layers_of(m))
