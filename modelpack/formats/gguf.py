"""GGUF verification and metadata, read with bounds on every count.

A GGUF file is: magic ``GGUF``, a version (2 or 3), tensor and key/value
counts, the key/values, the tensor infos, then aligned tensor data. Every
count and length is checked against the bytes that remain before it is
trusted, so an absurd header costs a few reads, not gigabytes of memory.
Tensor data is checked to lie inside the file; the bytes themselves are
covered by the blob digest.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO

from modelpack.errors import FormatError

MAGIC = b"GGUF"
MAX_TENSORS = 1 << 20
MAX_KV = 1 << 20
MAX_DIMS = 4
MAX_STRING = 64 << 20

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
}

# llama.cpp's general.file_type values
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}

# value type id -> struct format of a scalar (8: string, 9: array handled apart)
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFInfo:
    version: int
    tensors: int
    parameters: int
    architecture: str | None
    name: str | None
    file_type: str | None
    context_length: int | None
    tensor_types: dict[str, int]  # ggml type name -> parameter count
    metadata: dict[str, object]  # scalar key/values only (arrays are summarised)


class _Reader:
    """Reads a file with the remaining byte count always known."""

    def __init__(self, f: BinaryIO, size: int, label: str) -> None:
        self.f, self.size, self.pos, self.label = f, size, 0, label

    def fail(self, why: str, reason: str = "InvalidGGUF") -> FormatError:
        return FormatError(f"{self.label}: {why}", reason=reason)

    def read(self, n: int) -> bytes:
        if n > self.size - self.pos:
            raise self.fail(f"needs {n} bytes at offset {self.pos}, past the end of the file",
                            reason="Truncated")
        data = self.f.read(n)
        if len(data) != n:
            raise self.fail("short read", reason="Truncated")
        self.pos += n
        return data

    def unpack(self, fmt: str) -> object:
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def u32(self) -> int:
        v = self.unpack("<I")
        assert isinstance(v, int)
        return v

    def u64(self) -> int:
        v = self.unpack("<Q")
        assert isinstance(v, int)
        return v

    def string(self) -> str:
        n = self.u64()
        if n > MAX_STRING or n > self.size - self.pos:
            raise self.fail(f"string of {n} bytes at offset {self.pos} exceeds the file")
        try:
            return self.read(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"string at offset {self.pos} is not UTF-8") from e

    def value(self, vtype: int, depth: int = 0) -> object:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 2:
                raise self.fail("arrays nested too deep")
            etype, count = self.u32(), self.u64()
            min_size = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8
            if etype not in _SCALARS and etype not in (_STRING, _ARRAY):
                raise self.fail(f"unknown array element type {etype}")
            if count * min_size > self.size - self.pos:
                raise self.fail(f"array of {count} elements cannot fit in the file",
                                reason="AbsurdCount")
            if etype in _SCALARS and etype not in (7,):
                self.read(count * min_size)  # skipped: only its length matters
                return f"<array of {count}>"
            for _ in range(count):
                self.value(etype, depth + 1)
            return f"<array of {count}>"
        raise self.fail(f"unknown value type {vtype}")


def verify(path: str) -> GGUFInfo:
    label = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f, size, label)
        if size < 24:
            raise r.fail(f"file is {size} bytes, too short for a GGUF header", reason="Truncated")
        if r.read(4) != MAGIC:
            raise r.fail("bad magic: not a GGUF file", reason="BadMagic")
        version = r.u32()
        if version not in (2, 3):
            raise r.fail(f"unsupported GGUF version {version}", reason="UnsupportedVersion")
        n_tensors, n_kv = r.u64(), r.u64()
        if n_tensors > MAX_TENSORS or n_tensors * 24 > size:
            raise r.fail(f"tensor count {n_tensors} is absurd for a {size}-byte file",
                         reason="AbsurdCount")
        if n_kv > MAX_KV or n_kv * 12 > size:
            raise r.fail(f"key/value count {n_kv} is absurd for a {size}-byte file",
                         reason="AbsurdCount")
        kv: dict[str, object] = {}
        for _ in range(n_kv):
            key = r.string()
            kv[key] = r.value(r.u32())
        infos: list[tuple[str, list[int], int, int]] = []
        for _ in range(n_tensors):
            name = r.string()
            n_dims = r.u32()
            if n_dims > MAX_DIMS:
                raise r.fail(f"tensor {name[:60]!r} has {n_dims} dimensions (max {MAX_DIMS})")
            dims = [r.u64() for _ in range(n_dims)]
            ttype, offset = r.u32(), r.u64()
            if ttype not in GGML_TYPES:
                raise r.fail(f"tensor {name[:60]!r} has unknown ggml type {ttype}",
                             reason="UnknownDtype")
            infos.append((name, dims, ttype, offset))
        header_end = r.pos
    align = kv.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise FormatError(f"{label}: general.alignment {align!r} is not a power of two",
                          reason="InvalidGGUF")
    data_start = (header_end + align - 1) // align * align
    data_len = size - data_start
    params = 0
    by_type: Counter[str] = Counter()
    spans: list[tuple[int, int, str]] = []
    for name, dims, ttype, offset in infos:
        tname, block, bsize = GGML_TYPES[ttype]
        numel = math.prod(dims) if dims else 1
        if numel % block:
            raise FormatError(f"{label}: tensor {name[:60]!r} has {numel} elements, "
                              f"not a multiple of the {tname} block of {block}",
                              reason="InvalidGGUF")
        nbytes = numel // block * bsize
        if offset % align:
            raise FormatError(f"{label}: tensor {name[:60]!r} offset {offset} is not aligned",
                              reason="InvalidGGUF")
        if offset + nbytes > data_len:
            raise FormatError(f"{label}: tensor {name[:60]!r} data ends at "
                              f"{data_start + offset + nbytes}, past the end of the "
                              f"{size}-byte file", reason="Truncated")
        spans.append((offset, offset + nbytes, name))
        params += numel
        by_type[tname] += numel
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise FormatError(f"{label}: tensors {a[:40]!r} and {b[:40]!r} overlap",
                              reason="OverlappingTensors")
    arch = kv.get("general.architecture")
    arch_s = arch if isinstance(arch, str) else None
    ctx = kv.get(f"{arch_s}.context_length") if arch_s else None
    ft = kv.get("general.file_type")
    file_type = FILE_TYPES.get(ft, f"type{ft}") if isinstance(ft, int) else None
    if file_type is None and by_type:
        file_type = by_type.most_common(1)[0][0]
    name_v = kv.get("general.name")
    scalars = {k: v for k, v in kv.items() if not (isinstance(v, str) and v.startswith("<array"))}
    return GGUFInfo(
        version=version, tensors=len(infos), parameters=params, architecture=arch_s,
        name=name_v if isinstance(name_v, str) else None, file_type=file_type,
        context_length=ctx if isinstance(ctx, int) else None,
        tensor_types=dict(by_type), metadata=scalars,
    )
