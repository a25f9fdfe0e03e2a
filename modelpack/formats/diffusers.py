"""Diffusers pipelines: ``model_index.json`` names the components.

Each component that names a library must have its directory; the weights
inside are verified like any other safetensors file by the caller.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from modelpack.errors import FormatError
from modelpack.formats.hfconfig import load_json
from modelpack.paths import safe_relpath

INDEX = "model_index.json"


@dataclass(frozen=True)
class DiffusersInfo:
    pipeline: str
    components: tuple[str, ...]


def verify(root: str, present: set[str]) -> DiffusersInfo:
    """Check ``model_index.json`` against the files present (relative paths)."""
    index = load_json(os.path.join(root, INDEX))
    if not isinstance(index, dict):
        raise FormatError(f"{INDEX} is not a JSON object", reason="InvalidDiffusers")
    pipeline = index.get("_class_name")
    if not isinstance(pipeline, str) or not pipeline:
        raise FormatError(f"{INDEX} has no _class_name", reason="InvalidDiffusers")
    components = []
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            continue
        if value[0] is None:  # an optional component left out
            continue
        safe_relpath(key)
        if "/" in key:
            raise FormatError(f"component name {key[:60]!r} is not a plain name",
                              reason="InvalidDiffusers")
        if not any(p.startswith(key + "/") for p in present):
            raise FormatError(f"component {key!r} named in {INDEX} has no directory",
                              reason="MissingComponent")
        components.append(key)
    if not components:
        raise FormatError(f"{INDEX} names no components", reason="InvalidDiffusers")
    return DiffusersInfo(pipeline, tuple(sorted(components)))
