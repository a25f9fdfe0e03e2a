"""Hugging Face ``config.json``: family, architecture and context length.

Only reads what the config states; the parameter count comes from the
weight headers, never from here.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from modelpack.errors import FormatError

MAX_CONFIG = 16 << 20
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len",
                 "seq_length", "n_ctx", "max_sequence_length")


@dataclass(frozen=True)
class HFConfig:
    family: str | None
    architecture: str | None
    context_length: int | None
    torch_dtype: str | None


def load_json(path: str, limit: int = MAX_CONFIG) -> object:
    """Load a bounded JSON file with a clear error on anything malformed."""
    size = os.path.getsize(path)
    if size > limit:
        raise FormatError(f"{os.path.basename(path)} is {size} bytes, over the {limit}-byte "
                          "bound for a JSON file", reason="JSONTooLarge")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, huge ints, deep nesting
        raise FormatError(f"{os.path.basename(path)} is not valid JSON: {e}",
                          reason="InvalidJSON") from e


def read(path: str) -> HFConfig:
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        raise FormatError(f"{os.path.basename(path)} is not a JSON object", reason="InvalidJSON")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    assert isinstance(text, dict)
    family = cfg.get("model_type")
    archs = cfg.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    ctx = None
    for source in (cfg, text):
        for key in _CONTEXT_KEYS:
            v = source.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                ctx = v
                break
        if ctx:
            break
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    return HFConfig(
        family=family if isinstance(family, str) else None,
        architecture=arch,
        context_length=ctx,
        torch_dtype=dtype if isinstance(dtype, str) else None,
    )
