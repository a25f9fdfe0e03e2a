"""Safetensors verification: the header is the whole contract.

Layout: 8-byte little-endian header length N, N bytes of JSON, then the
tensor data. The header must be bounded, valid JSON, name known dtypes,
and its offsets must tile the data region exactly: sorted, contiguous, no
hole, no overlap, ending at the end of the file. Only the header is read;
the data bytes are covered by the blob digest.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections import Counter
from dataclasses import dataclass

from modelpack.errors import FormatError

MAX_HEADER = 100 << 20  # the reference implementation's own bound

DTYPE_BYTES: dict[str, float] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
    "F4": 0.5, "F6_E2M3": 0.75, "F6_E3M2": 0.75,
}


@dataclass(frozen=True)
class SafetensorsInfo:
    tensors: int
    parameters: int
    dtypes: dict[str, int]  # dtype -> parameter count
    metadata: dict[str, str]


def _fail(path: str, why: str, reason: str = "InvalidSafetensors") -> FormatError:
    return FormatError(f"{os.path.basename(path)}: {why}", reason=reason)


def read_header(path: str) -> tuple[dict[str, object], int, int]:
    """Return (header, header_len, file_size) after bounding the header."""
    size = os.path.getsize(path)
    if size < 8:
        raise _fail(path, f"file is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER:
            raise _fail(path, f"header length {n} exceeds the {MAX_HEADER}-byte bound")
        if n + 8 > size:
            raise _fail(path, f"header length {n} runs past the end of the {size}-byte file",
                        reason="Truncated")
        raw = f.read(n)
    if len(raw) != n:
        raise _fail(path, "header truncated", reason="Truncated")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        # ValueError covers bad UTF-8, bad JSON and over-long integer literals;
        # RecursionError a deeply nested header. Both are malformed input.
        raise _fail(path, f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise _fail(path, "header is not a JSON object")
    return header, n, size


def verify(path: str) -> SafetensorsInfo:
    header, n, size = read_header(path)
    data_len = size - 8 - n
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    params = 0
    by_dtype: Counter[str] = Counter()
    for name, t in header.items():
        if not isinstance(t, dict):
            raise _fail(path, f"tensor {name[:60]!r} is not an object")
        dtype, shape, offs = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise _fail(path, f"tensor {name[:60]!r} has unknown dtype {str(dtype)[:20]!r}",
                        reason="UnknownDtype")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise _fail(path, f"tensor {name[:60]!r} has an invalid shape")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise _fail(path, f"tensor {name[:60]!r} has invalid data_offsets")
        begin, end = offs
        if not 0 <= begin <= end:
            raise _fail(path, f"tensor {name[:60]!r} has offsets [{begin}, {end}] out of order")
        numel = math.prod(shape)
        need = numel * DTYPE_BYTES[dtype]
        if need != end - begin:
            raise _fail(path, f"tensor {name[:60]!r}: shape {shape} of {dtype} needs "
                        f"{need} bytes, offsets give {end - begin}")
        spans.append((begin, end, name))
        params += numel
        by_dtype[dtype] += numel
    spans.sort()
    cursor = 0
    for begin, end, name in spans:
        if begin < cursor:
            raise _fail(path, f"tensor {name[:60]!r} overlaps the previous tensor",
                        reason="OverlappingTensors")
        if begin > cursor:
            raise _fail(path, f"hole of {begin - cursor} bytes before tensor {name[:60]!r}",
                        reason="HoleInData")
        cursor = end
    if cursor != data_len:
        why = "past the end of the file" if cursor > data_len else "short of the end of the file"
        raise _fail(path, f"tensor data ends at {cursor}, {why} ({data_len} data bytes)",
                    reason="Truncated" if cursor > data_len else "TrailingData")
    return SafetensorsInfo(len(spans), params, dict(by_dtype), dict(meta))
