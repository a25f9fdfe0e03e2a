"""Hand-built safetensors and GGUF bytes for the bad-input tests.

The formats' own writers (the ``safetensors`` and ``gguf`` packages) refuse
to write a malformed file, so hostile files are assembled here byte by byte.
Every helper takes its lengths and counts as arguments so a test can lie in
exactly one field.

safetensors::

    u64 LE   N            length of the header
    N bytes  header       a JSON object: name -> {"dtype", "shape", "data_offsets"},
                          plus an optional "__metadata__": {str: str}
    ...      data         offsets are [begin, end) relative to the end of the header;
                          together they must tile the data exactly

GGUF (versions 2 and 3, little-endian)::

    4 bytes  b"GGUF"
    u32      version
    u64      tensor count
    u64      key/value count
    kv  * n  string key, u32 value type, value
    ti  * n  string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset
    padding  up to general.alignment (32 unless a key says otherwise)
    data     tensor offsets are relative to the start of this region

    string      u64 byte length, then UTF-8 bytes (no NUL)
    value type  0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool,
                8 string, 9 array (u32 element type, u64 count, elements),
                10 u64, 11 i64, 12 f64
"""

from __future__ import annotations

import json
import struct

GGUF_U32, GGUF_STRING, GGUF_ARRAY = 4, 8, 9
GGML_F32, GGML_F16, GGML_Q4_0 = 0, 1, 2


def st_tensor(dtype: object, shape: object, begin: object, end: object) -> dict[str, object]:
    """One safetensors header entry; any field may be given a hostile value."""
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def st_bytes(header: dict[str, object] | list[object] | bytes, data: bytes = b"",
             length: int | None = None) -> bytes:
    """A safetensors file: ``length`` overrides the stated header length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + data


def gguf_str(s: str | bytes, length: int | None = None) -> bytes:
    """A GGUF string; ``length`` overrides the stated byte length."""
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def gguf_kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    """A key/value pair whose value bytes are given raw."""
    return gguf_str(key) + struct.pack("<I", vtype) + payload


def gguf_kv_u32(key: str, value: int) -> bytes:
    return gguf_kv(key, GGUF_U32, struct.pack("<I", value))


def gguf_kv_str(key: str, value: str) -> bytes:
    return gguf_kv(key, GGUF_STRING, gguf_str(value))


def gguf_array_header(etype: int, count: int) -> bytes:
    """The start of an array value: element type and count (elements follow)."""
    return struct.pack("<IQ", etype, count)


def gguf_tensor_info(name: str, dims: list[int], ggml_type: int, offset: int) -> bytes:
    return (gguf_str(name) + struct.pack("<I", len(dims))
            + b"".join(struct.pack("<Q", d) for d in dims)
            + struct.pack("<IQ", ggml_type, offset))


def gguf_bytes(kvs: list[bytes] | tuple[bytes, ...] = (),
               infos: list[bytes] | tuple[bytes, ...] = (), data: bytes = b"", *,
               magic: bytes = b"GGUF", version: int = 3, n_tensors: int | None = None,
               n_kv: int | None = None, alignment: int = 32, tail: bytes = b"") -> bytes:
    """A GGUF file; the counts default to the real ones, ``tail`` is appended raw.

    When ``data`` is given, the header is padded to ``alignment`` before it, as
    a writer would.
    """
    head = (magic + struct.pack("<I", version)
            + struct.pack("<QQ", len(infos) if n_tensors is None else n_tensors,
                          len(kvs) if n_kv is None else n_kv)
            + b"".join(kvs) + b"".join(infos))
    if data:
        head += b"\0" * (-len(head) % alignment)
    return head + data + tail


def valid_gguf(**overrides: object) -> bytes:
    """A minimal valid GGUF: one architecture key, one F32 tensor of 8 elements."""
    args: dict[str, object] = {
        "kvs": [gguf_kv_str("general.architecture", "llama")],
        "infos": [gguf_tensor_info("w", [8], GGML_F32, 0)],
        "data": struct.pack("<8f", *range(8)),
    }
    args.update(overrides)
    return gguf_bytes(**args)  # type: ignore[arg-type]


VALID_ST_HEADER: dict[str, object] = {
    "__metadata__": {"format": "pt"},
    "a": st_tensor("F32", [2], 0, 8),
    "b": st_tensor("F16", [2, 2], 8, 16),
}
VALID_ST_DATA = bytes(16)


def valid_st(**tensors: object) -> bytes:
    """The minimal valid safetensors file, with some header entries replaced."""
    header = dict(VALID_ST_HEADER)
    header.update(tensors)
    return st_bytes(header, VALID_ST_DATA)
