"""The bad-input corpus: hostile or malformed model directories.

Every case builds one directory in ``tmp_path`` that differs from a valid
model in one way and states the exact ``reason`` tag ``inspect_dir`` must
give, plus a fragment of the message. Anything but a ``FormatError`` (a
``KeyError``, a ``struct.error``, a ``RecursionError``) fails the test.
Hand-built bytes come from ``rawfmt``, which documents both layouts.
"""

from __future__ import annotations

import json
import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelpack.errors import FormatError, PickleRefusedError, UnsafePathError
from modelpack.formats import gguf, inspect_dir, safetensors
from modelpack.paths import join_under, safe_relpath
from tests.modelgen import (
    make_diffusers_model,
    make_gguf_model,
    make_safetensors_model,
    write_safetensors,
)
from tests.unit.rawfmt import (
    GGML_F16,
    GGML_F32,
    GGML_Q4_0,
    GGUF_ARRAY,
    GGUF_STRING,
    GGUF_U32,
    VALID_ST_DATA,
    VALID_ST_HEADER,
    gguf_array_header,
    gguf_bytes,
    gguf_kv,
    gguf_kv_str,
    gguf_kv_u32,
    gguf_str,
    gguf_tensor_info,
    st_bytes,
    st_tensor,
    valid_gguf,
    valid_st,
)

Build = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    id: str
    build: Build
    reason: str
    fragment: str
    expected: str = "Auto"


# --- builders -----------------------------------------------------------------------------

def put(root: Path, rel: str | bytes, data: bytes | str = b"") -> Path:
    """Write one file under ``root``, creating its parents (``rel`` may be raw bytes)."""
    if isinstance(rel, bytes):
        path = Path(os.fsdecode(os.path.join(os.fsencode(root), rel)))
    else:
        path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def files(named: dict[str, bytes | str]) -> Build:
    """Files by relative path."""
    def build(root: Path) -> None:
        for rel, data in named.items():
            put(root, rel, data)
    return build


def with_weights(build: Build) -> Build:
    """``build`` plus a valid safetensors file, so only ``build``'s part is at fault."""
    def both(root: Path) -> None:
        put(root, "model.safetensors", valid_st())
        build(root)
    return both


def st(data: bytes, name: str = "model.safetensors") -> Build:
    return lambda root: put(root, name, data)


def st_header(header: object, data: bytes = VALID_ST_DATA) -> Build:
    return st(st_bytes(header, data))  # type: ignore[arg-type]


def st_with(**tensors: object) -> Build:
    return st(valid_st(**tensors))


def gg(data: bytes, name: str = "model.gguf") -> Build:
    return lambda root: put(root, name, data)


def truncated(make: Callable[[str], object], name: str, cut: int) -> Build:
    """A generated model whose file ``name`` loses its last ``cut`` bytes."""
    def build(root: Path) -> None:
        make(str(root))
        os.truncate(root / name, os.path.getsize(root / name) - cut)
    return build


def component_named(key: str) -> Build:
    """A diffusers pipeline whose model_index.json names a hostile component first."""
    index = {"_class_name": "StableDiffusionPipeline", key: ["diffusers", "UNet2DModel"],
             "unet": ["diffusers", "UNet2DConditionModel"]}
    return files({"model_index.json": json.dumps(index),
                  "unet/diffusion_pytorch_model.safetensors": valid_st()})


def disk_name(rel: str | bytes) -> Build:
    """A valid model plus one file whose on-disk name is hostile."""
    return with_weights(lambda root: put(root, rel, b"{}"))


def symlink(target: Callable[[Path], str], name: str = "config.json") -> Build:
    def build(root: Path) -> None:
        put(root, "model.safetensors", valid_st())
        os.symlink(target(root), root / name)
    return build


def outside_file(root: Path) -> str:
    path = root.parent / "outside.json"
    path.write_text("{}")
    return str(path)


def outside_relative(root: Path) -> str:
    outside_file(root)
    return "../outside.json"


def outside_dir(root: Path) -> str:
    path = root.parent / "outside"
    path.mkdir(exist_ok=True)
    (path / "x.json").write_text("{}")
    return str(path)


def inside_dir(root: Path) -> str:
    (root / "real").mkdir(exist_ok=True)
    (root / "real" / "x.json").write_text("{}")
    return "real"


def fifo(root: Path) -> None:
    put(root, "model.safetensors", valid_st())
    os.mkfifo(root / "config.json")


def fifo_behind_link(root: Path) -> None:
    put(root, "model.safetensors", valid_st())
    os.mkfifo(root / "pipe")
    os.symlink("pipe", root / "config.json")


def root_is_a_file(root: Path) -> None:
    root.rmdir()
    root.write_bytes(valid_st())


def long_path(root: Path) -> None:
    put(root, "model.safetensors", valid_st())
    put(root, "/".join(["d" * 200] * 6) + "/x.json", b"{}")


def json_bigger_than_16mib(name: str) -> Build:
    body = b'{"pad": "' + b"x" * ((16 << 20) + 16) + b'"}'
    return lambda root: put(root, name, body)


def diffusers_index(rewrite: Callable[[dict[str, object]], object]) -> Build:
    """A generated diffusers pipeline whose model_index.json becomes ``rewrite(index)``."""
    def build(root: Path) -> None:
        make_diffusers_model(str(root))
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps(rewrite(index)))
    return build


def config(body: bytes | str) -> Build:
    """A valid safetensors file beside the given config.json."""
    return with_weights(files({"config.json": body}))


def sharded(weight_map: object) -> Build:
    """Shard 1 of 2 present, and an index whose weight_map is given."""
    def build(root: Path) -> None:
        put(root, "model-00001-of-00002.safetensors", valid_st())
        put(root, "model.safetensors.index.json",
            json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    return build


def bad_second_shard(root: Path) -> None:
    put(root, "model-00001-of-00002.safetensors", valid_st())
    put(root, "model-00002-of-00002.safetensors", valid_st()[:-1])


# --- the corpus ---------------------------------------------------------------------------

NESTED = b"[" * 100_000 + b"]" * 100_000
PICKLE = b"\x80\x04N."  # pickle of None; never loaded, only its name matters
HUGE_INT = b"1" * 5000  # past CPython's int-from-string digit limit (4300)
UNSAFE = "UnsafePath"
BAD_ST = "InvalidSafetensors"
BAD_GGUF = "InvalidGGUF"

PATH_CASES = [
    # names from an untrusted model_index.json, checked by safe_relpath
    Case("name-dotdot", component_named("../x"), UNSAFE, "climbs out with '..'"),
    Case("name-nested-dotdot", component_named("a/../../x"), UNSAFE, "climbs out"),
    Case("name-dotdot-alone", component_named(".."), UNSAFE, "climbs out"),
    Case("name-absolute", component_named("/etc/passwd"), UNSAFE, "absolute file path"),
    Case("name-drive-backslash", component_named("C:\\x"), UNSAFE, "backslash"),
    Case("name-drive-slash", component_named("C:/x"), UNSAFE, "absolute file path"),
    Case("name-backslash-dotdot", component_named("a\\..\\..\\x"), UNSAFE, "backslash"),
    Case("name-nul", component_named("unet\x00.txt"), UNSAFE, "control character"),
    Case("name-escape", component_named("\x1b[31mred"), UNSAFE, "control character"),
    Case("name-del", component_named("unet\x7f"), UNSAFE, "control character"),
    Case("name-empty", component_named(""), UNSAFE, "empty file path"),
    Case("name-dot", component_named("."), UNSAFE, "does not name a file"),
    Case("name-overlong", component_named("a" * 2000), UNSAFE, "longer than 1024"),
    Case("name-with-slash", component_named("unet/sub"), "InvalidDiffusers",
         "is not a plain name"),
    # names found on disk by walk_model_dir
    Case("disk-backslash", disk_name("C:\\x"), UNSAFE, "backslash"),
    Case("disk-drive", disk_name("C:x"), UNSAFE, "absolute file path"),
    Case("disk-control", disk_name("conf\x01ig.json"), UNSAFE, "control character"),
    Case("disk-newline", disk_name("a\nb.json"), UNSAFE, "control character"),
    Case("disk-del", disk_name("a\x7fb.json"), UNSAFE, "control character"),
    Case("disk-c1-control", disk_name("a\x85b.json"), UNSAFE, "control character"),
    Case("disk-not-utf8", disk_name(b"bad\xff.json"), UNSAFE, "is not valid UTF-8"),
    Case("disk-overlong", long_path, UNSAFE, "longer than 1024"),
    Case("symlink-out-absolute", symlink(outside_file), UNSAFE, "points outside"),
    Case("symlink-out-relative", symlink(outside_relative), UNSAFE, "points outside"),
    Case("symlink-dir-outside", symlink(outside_dir, "sub"), UNSAFE, "directory symlink"),
    Case("symlink-dir-inside", symlink(inside_dir, "sub"), UNSAFE, "directory symlink"),
    Case("symlink-dangling", symlink(lambda r: "missing.json"), UNSAFE, "does not resolve"),
    Case("symlink-loop", symlink(lambda r: "config.json"), UNSAFE, "does not resolve"),
    Case("fifo", fifo, UNSAFE, "is not a regular file"),
    Case("fifo-behind-symlink", fifo_behind_link, UNSAFE, "is not a regular file"),
    Case("root-not-a-directory", root_is_a_file, "NotADirectory", "is not a directory"),
]

SAFETENSORS_CASES = [
    Case("st-shorter-than-length", st(b"\x05\0\0\0\0"), BAD_ST, "shorter than the 8-byte"),
    Case("st-cut-in-data", truncated(make_safetensors_model, "model.safetensors", 3),
         "Truncated", "past the end of the file"),
    Case("st-cut-in-header", lambda r: put(r, "model.safetensors", valid_st()[:40]),
         "Truncated", "runs past the end"),
    Case("st-length-past-eof", st(st_bytes(VALID_ST_HEADER, VALID_ST_DATA, length=4096)),
         "Truncated", "header length 4096 runs past the end"),
    Case("st-length-over-bound", st(st_bytes(VALID_ST_HEADER, length=(100 << 20) + 1)),
         BAD_ST, "exceeds the 104857600-byte bound"),
    Case("st-length-u64-max", st(st_bytes(b"{}", length=2**64 - 1)), BAD_ST,
         "exceeds the"),
    Case("st-header-not-json", st_header(b"{not json}"), BAD_ST, "not valid JSON"),
    Case("st-header-not-utf8", st_header(b'{"\xff\xfe": 1}'), BAD_ST, "not valid JSON"),
    Case("st-header-array", st_header([1, 2]), BAD_ST, "not a JSON object"),
    Case("st-header-string", st_header(b'"x"'), BAD_ST, "not a JSON object"),
    Case("st-header-deeply-nested", st_header(NESTED), BAD_ST, "not valid JSON"),
    Case("st-header-huge-int", st_header(b'{"a": {"dtype": "U8", "shape": [' + HUGE_INT
                                         + b'], "data_offsets": [0, 0]}}'),
         BAD_ST, "not valid JSON"),
    Case("st-tensor-not-object", st_with(a=[0, 8]), BAD_ST, "tensor 'a' is not an object"),
    Case("st-overlap", st_with(b=st_tensor("F16", [2, 2], 4, 12)), "OverlappingTensors",
         "overlaps"),
    Case("st-hole", st_with(b=st_tensor("F16", [2], 12, 16)), "HoleInData",
         "hole of 4 bytes before tensor 'b'"),
    Case("st-hole-at-start", st(st_bytes({"a": st_tensor("F32", [2], 4, 12)}, bytes(12))),
         "HoleInData", "hole of 4 bytes"),
    Case("st-trailing-data", st(valid_st() + b"junk"), "TrailingData",
         "short of the end of the file"),
    Case("st-data-past-eof", st(st_bytes({"a": st_tensor("F32", [4], 0, 16)}, bytes(8))),
         "Truncated", "past the end of the file"),
    Case("st-unknown-dtype", st_with(a=st_tensor("F128", [2], 0, 8)), "UnknownDtype",
         "unknown dtype 'F128'"),
    Case("st-lowercase-dtype", st_with(a=st_tensor("f32", [2], 0, 8)), "UnknownDtype",
         "unknown dtype 'f32'"),
    Case("st-dtype-not-string", st_with(a=st_tensor(4, [2], 0, 8)), "UnknownDtype",
         "unknown dtype"),
    Case("st-shape-negative", st_with(a=st_tensor("F32", [-2], 0, 8)), BAD_ST,
         "invalid shape"),
    Case("st-shape-bool", st_with(a=st_tensor("F32", [True, 2], 0, 8)), BAD_ST,
         "invalid shape"),
    Case("st-shape-float", st_with(a=st_tensor("F32", [2.0], 0, 8)), BAD_ST, "invalid shape"),
    Case("st-shape-not-list", st_with(a=st_tensor("F32", 2, 0, 8)), BAD_ST, "invalid shape"),
    Case("st-offsets-vs-shape", st_with(a=st_tensor("F32", [4], 0, 8)), BAD_ST,
         "needs 16 bytes, offsets give 8"),
    Case("st-offsets-reversed", st_with(a=st_tensor("F32", [0], 8, 0)), BAD_ST,
         "out of order"),
    Case("st-offsets-negative", st_with(a=st_tensor("F32", [2], -8, 0)), BAD_ST,
         "out of order"),
    Case("st-offsets-bool", st_with(a=st_tensor("F32", [2], False, 8)), BAD_ST,
         "invalid data_offsets"),
    Case("st-offsets-three", st_with(a={"dtype": "F32", "shape": [2],
                                        "data_offsets": [0, 4, 8]}),
         BAD_ST, "invalid data_offsets"),
    Case("st-offsets-missing", st_with(a={"dtype": "F32", "shape": [2]}), BAD_ST,
         "invalid data_offsets"),
    Case("st-metadata-int", st_with(__metadata__={"epoch": 3}), BAD_ST,
         "__metadata__ must map strings to strings"),
    Case("st-metadata-nested", st_with(__metadata__={"a": {"b": "c"}}), BAD_ST,
         "__metadata__ must map"),
    Case("st-metadata-list", st_with(__metadata__=["a"]), BAD_ST, "__metadata__ must map"),
    Case("st-in-diffusers-component",
         truncated(make_diffusers_model, "unet/diffusion_pytorch_model.safetensors", 1),
         "Truncated", "diffusion_pytorch_model.safetensors"),
    Case("st-bad-second-shard", bad_second_shard, "Truncated",
         "model-00002-of-00002.safetensors"),
]


def gguf_tensor(ggml_type: int, dims: list[int], offset: int = 0, nbytes: int = 32) -> bytes:
    return valid_gguf(infos=[gguf_tensor_info("w", dims, ggml_type, offset)],
                      data=bytes(nbytes))


GGUF_CASES = [
    Case("gguf-too-short", gg(b"GGUF\3\0\0\0"), "Truncated", "too short for a GGUF header"),
    Case("gguf-bad-magic", gg(valid_gguf(magic=b"GGML")), "BadMagic", "bad magic"),
    Case("gguf-version-1", gg(valid_gguf(version=1)), "UnsupportedVersion",
         "unsupported GGUF version 1"),
    Case("gguf-version-4", gg(valid_gguf(version=4)), "UnsupportedVersion", "version 4"),
    Case("gguf-big-endian", gg(valid_gguf(version=3 << 24)), "UnsupportedVersion",
         "version 50331648"),
    Case("gguf-tensor-count-absurd", gg(valid_gguf(n_tensors=1 << 40)), "AbsurdCount",
         "tensor count 1099511627776 is absurd"),
    Case("gguf-tensor-count-vs-size", gg(valid_gguf(n_tensors=10_000)), "AbsurdCount",
         "tensor count 10000"),
    Case("gguf-kv-count-absurd", gg(valid_gguf(n_kv=1 << 63)), "AbsurdCount",
         "key/value count"),
    Case("gguf-key-length-past-eof",
         gg(gguf_bytes(n_kv=1, tail=struct.pack("<Q", 1 << 20) + b"abc")), BAD_GGUF,
         "string of 1048576 bytes at offset 32 exceeds the file"),
    Case("gguf-key-length-u64-max",
         gg(gguf_bytes(n_kv=1, tail=struct.pack("<Q", 2**64 - 1))), BAD_GGUF,
         "exceeds the file"),
    Case("gguf-value-string-past-eof",
         gg(valid_gguf(kvs=[gguf_kv("general.name", GGUF_STRING, gguf_str("x", 9999))])),
         BAD_GGUF, "string of 9999 bytes"),
    Case("gguf-key-not-utf8", gg(valid_gguf(kvs=[gguf_kv(b"\xff\xfe", GGUF_U32, bytes(4))])),
         BAD_GGUF, "is not UTF-8"),
    Case("gguf-unknown-value-type", gg(valid_gguf(kvs=[gguf_kv("k", 13, bytes(8))])),
         BAD_GGUF, "unknown value type 13"),
    Case("gguf-unknown-array-type",
         gg(valid_gguf(kvs=[gguf_kv("k", GGUF_ARRAY, gguf_array_header(42, 1))])),
         BAD_GGUF, "unknown array element type 42"),
    Case("gguf-array-count-absurd",
         gg(valid_gguf(kvs=[gguf_kv("k", GGUF_ARRAY, gguf_array_header(GGUF_STRING,
                                                                      1 << 60))])),
         "AbsurdCount", "cannot fit in the file"),
    Case("gguf-array-nested-too-deep",
         gg(valid_gguf(kvs=[gguf_kv("k", GGUF_ARRAY, gguf_array_header(GGUF_ARRAY, 1) * 3)])),
         BAD_GGUF, "nested too deep"),
    Case("gguf-value-cut", gg(gguf_bytes(n_kv=1, tail=gguf_str("k") + struct.pack(
        "<I", GGUF_U32) + bytes(2))), "Truncated", "needs 4 bytes at offset 37"),
    Case("gguf-tensor-info-cut", gg(valid_gguf(data=b"")[:-6]), "Truncated",
         "past the end of the file"),
    Case("gguf-data-past-eof", truncated(make_gguf_model, "model.gguf", 40), "Truncated",
         "'output_norm.weight' data ends at"),
    Case("gguf-offset-past-eof", gg(gguf_tensor(GGML_F32, [8], offset=1 << 40)),
         "Truncated", "past the end"),
    Case("gguf-unknown-ggml-type", gg(gguf_tensor(99, [8])), "UnknownDtype",
         "unknown ggml type 99"),
    Case("gguf-removed-ggml-type", gg(gguf_tensor(4, [8])), "UnknownDtype",
         "unknown ggml type 4"),
    Case("gguf-five-dims", gg(gguf_tensor(GGML_F32, [1, 1, 1, 1, 8])), BAD_GGUF,
         "has 5 dimensions (max 4)"),
    Case("gguf-dims-count-absurd", gg(gguf_bytes(
        infos=[gguf_str("w") + struct.pack("<I", 2**32 - 1)], data=bytes(32))),
         BAD_GGUF, "4294967295 dimensions"),
    Case("gguf-unaligned-offset", gg(gguf_tensor(GGML_F16, [8], offset=4)), BAD_GGUF,
         "offset 4 is not aligned"),
    Case("gguf-block-remainder", gg(gguf_tensor(GGML_Q4_0, [31])), BAD_GGUF,
         "31 elements, not a multiple of the Q4_0 block of 32"),
    Case("gguf-overlap", gg(valid_gguf(infos=[gguf_tensor_info("a", [8], GGML_F32, 0),
                                              gguf_tensor_info("b", [8], GGML_F32, 0)])),
         "OverlappingTensors", "'a' and 'b' overlap"),
    Case("gguf-alignment-not-power-of-two",
         gg(valid_gguf(kvs=[gguf_kv_u32("general.alignment", 48)])), BAD_GGUF,
         "general.alignment 48 is not a power of two"),
    Case("gguf-alignment-zero", gg(valid_gguf(kvs=[gguf_kv_u32("general.alignment", 0)])),
         BAD_GGUF, "general.alignment 0"),
    Case("gguf-alignment-string",
         gg(valid_gguf(kvs=[gguf_kv_str("general.alignment", "32")])), BAD_GGUF,
         "is not a power of two"),
]

MODEL_CASES = [
    Case("empty-dir", lambda root: None, "EmptyModel", "the model has no files"),
    Case("readme-only", files({"README.md": "# hi\n"}), "NoWeights", "no weight files"),
    Case("config-only", files({"config.json": "{}", "tokenizer.json": "{}"}), "NoWeights",
         "no weight files"),
    Case("empty-subdirs-only", lambda root: (root / "a" / "b").mkdir(parents=True),
         "EmptyModel", "no files"),
    Case("pickle-bin", files({"pytorch_model.bin": PICKLE}), "PickleRefused",
         "'pytorch_model.bin' is a pickle file"),
    Case("pickle-pt", files({"model.pt": PICKLE}), "PickleRefused", "'model.pt'"),
    Case("pickle-pth", files({"model.pth": PICKLE}), "PickleRefused", "'model.pth'"),
    Case("pickle-ckpt", files({"sd.ckpt": PICKLE}), "PickleRefused", "'sd.ckpt'"),
    Case("pickle-upper-case", files({"MODEL.BIN": PICKLE}), "PickleRefused", "'MODEL.BIN'"),
    Case("pickle-beside-safetensors", with_weights(files({"sub/optimizer.pt": PICKLE})),
         "PickleRefused", "'sub/optimizer.pt' is a pickle file"),
    Case("config-too-large", with_weights(json_bigger_than_16mib("config.json")),
         "JSONTooLarge", "over the 16777216-byte bound"),
    Case("config-not-json", config("{'model_type': 'llama'}"), "InvalidJSON",
         "config.json is not valid JSON"),
    Case("config-not-utf8", config(b'{"a": "\xff"}'), "InvalidJSON",
         "config.json is not valid JSON"),
    Case("config-array", config("[]"), "InvalidJSON", "config.json is not a JSON object"),
    Case("config-deeply-nested", config(NESTED), "InvalidJSON",
         "config.json is not valid JSON"),
    Case("config-huge-int", config(b'{"n_ctx": ' + HUGE_INT + b"}"), "InvalidJSON",
         "config.json is not valid JSON"),
    Case("diffusers-missing-component",
         diffusers_index(lambda ix: {**ix, "text_encoder": ["transformers", "CLIPTextModel"]}),
         "MissingComponent",
         "component 'text_encoder' named in model_index.json has no directory"),
    Case("diffusers-no-class-name",
         diffusers_index(lambda ix: {k: v for k, v in ix.items() if k != "_class_name"}),
         "InvalidDiffusers", "model_index.json has no _class_name"),
    Case("diffusers-class-name-not-string",
         diffusers_index(lambda ix: {**ix, "_class_name": ["Pipeline"]}), "InvalidDiffusers",
         "has no _class_name"),
    Case("diffusers-index-array", diffusers_index(list), "InvalidDiffusers",
         "model_index.json is not a JSON object"),
    Case("diffusers-no-components",
         diffusers_index(lambda ix: {"_class_name": ix["_class_name"]}), "InvalidDiffusers",
         "names no components"),
    Case("diffusers-index-not-json",
         lambda root: (make_diffusers_model(str(root)),
                       put(root, "model_index.json", "{")), "InvalidJSON",
         "model_index.json is not valid JSON"),
    Case("diffusers-index-too-large", json_bigger_than_16mib("model_index.json"),
         "JSONTooLarge", "model_index.json is"),
    Case("shard-missing", sharded({"a": "model-00001-of-00002.safetensors",
                                   "b": "model-00002-of-00002.safetensors"}),
         "MissingShard", "names shard 'model-00002-of-00002.safetensors', which is missing"),
    Case("shard-traversal", sharded({"a": "../model-00001-of-00002.safetensors"}),
         "MissingShard", "'../model-00001-of-00002.safetensors'"),
    Case("shard-not-string", sharded({"a": ["model-00001-of-00002.safetensors"]}),
         "MissingShard", "which is missing"),
    Case("shard-no-weight-map", sharded(None), "InvalidShardIndex", "has no weight_map"),
    Case("shard-weight-map-list", sharded(["model-00001-of-00002.safetensors"]),
         "InvalidShardIndex", "model.safetensors.index.json has no weight_map"),
    Case("expected-gguf-got-safetensors", lambda root: make_safetensors_model(str(root)),
         "FormatMismatch", "expected format GGUF, found Safetensors", expected="GGUF"),
    Case("expected-safetensors-got-gguf", lambda root: make_gguf_model(str(root)),
         "FormatMismatch", "expected format Safetensors, found GGUF",
         expected="Safetensors"),
    Case("expected-safetensors-got-diffusers", lambda root: make_diffusers_model(str(root)),
         "FormatMismatch", "found Diffusers", expected="Safetensors"),
]

CORPUS = PATH_CASES + SAFETENSORS_CASES + GGUF_CASES + MODEL_CASES


def test_corpus_is_large_and_ids_unique() -> None:
    assert len(CORPUS) >= 35
    assert len({c.id for c in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input_is_refused(case: Case, tmp_path: Path) -> None:
    root = tmp_path / "model"
    root.mkdir()
    case.build(root)
    with pytest.raises(FormatError) as caught:
        inspect_dir(str(root), expected=case.expected)
    err = caught.value
    assert err.reason == case.reason, str(err)
    assert case.fragment in str(err)
    assert not err.retryable
    assert len(str(err)) < 600, "hostile input must be cut before it reaches a message"
    if case.reason == UNSAFE:
        assert isinstance(err, UnsafePathError)
    if case.reason == "PickleRefused":
        assert isinstance(err, PickleRefusedError)


# --- the hand-built baselines are valid, so each case is wrong in one way only --------------

def test_hand_built_baselines_are_valid(tmp_path: Path) -> None:
    put(tmp_path, "m.safetensors", valid_st())
    info = safetensors.verify(str(tmp_path / "m.safetensors"))
    assert (info.tensors, info.parameters, info.dtypes) == (2, 6, {"F32": 2, "F16": 4})
    put(tmp_path, "m.gguf", valid_gguf())
    g = gguf.verify(str(tmp_path / "m.gguf"))
    assert (g.tensors, g.parameters, g.architecture) == (1, 8, "llama")


def test_hand_built_gguf_matches_the_gguf_reader(tmp_path: Path) -> None:
    import gguf as gguf_pkg

    path = put(tmp_path, "m.gguf", valid_gguf(
        kvs=[gguf_kv_str("general.architecture", "llama"),
             gguf_kv("tokenizer.ggml.tokens", GGUF_ARRAY,
                     gguf_array_header(GGUF_STRING, 2) + gguf_str("a") + gguf_str("b"))]))
    reader = gguf_pkg.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == ["w"]
    assert int(reader.tensors[0].n_elements) == gguf.verify(str(path)).parameters


# --- allow_pickle ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "model.pth", "sd.ckpt"])
def test_pickle_accepted_when_allowed(name: str, tmp_path: Path) -> None:
    # a pickle that would run code if anything unpickled it: only its name is looked at
    put(tmp_path, name, b"cos\nsystem\n(S'false'\ntR.")
    put(tmp_path, "config.json", json.dumps({"model_type": "gpt2",
                                             "architectures": ["GPT2LMHeadModel"]}))
    info = inspect_dir(str(tmp_path), allow_pickle=True)
    assert info.format == "Pickle"
    assert info.family == "gpt2"
    assert {f.path: f.kind for f in info.files}[name] == "weight"
    assert info.parameter_count == 0  # never guessed from a pickle


def test_pickle_beside_safetensors_allowed_keeps_safetensors_format(tmp_path: Path) -> None:
    put(tmp_path, "model.safetensors", valid_st())
    put(tmp_path, "training_args.bin", b"\x80\x04N.")
    info = inspect_dir(str(tmp_path), allow_pickle=True)
    assert (info.format, info.parameter_count) == ("Safetensors", 6)


# --- safe_relpath and join_under on names that never reach a disk -----------------------

@pytest.mark.parametrize(("name", "fragment"), [
    ("../x", "climbs out"), ("a/../../x", "climbs out"), ("a/..", "climbs out"),
    ("./../x", "climbs out"), ("/etc/passwd", "absolute"), ("//server/share", "absolute"),
    ("C:\\x", "backslash"), ("C:x", "absolute"), ("a\\b", "backslash"),
    ("a\x00b", "control character"), ("a\tb", "control character"),
    ("a\x9bb", "control character"), ("a\udcffb", "not valid UTF-8"), ("", "empty"),
    ("x" * 1025, "longer than 1024"), (".", "does not name a file"),
    ("./", "does not name a file"),
], ids=lambda v: repr(v)[:24])
def test_safe_relpath_refuses(name: str, fragment: str) -> None:
    with pytest.raises(UnsafePathError) as caught:
        safe_relpath(name)
    assert fragment in str(caught.value)
    assert caught.value.reason == UNSAFE


@pytest.mark.parametrize("value", [None, b"model.safetensors", 3])
def test_safe_relpath_refuses_non_strings(value: object) -> None:
    with pytest.raises(UnsafePathError):
        safe_relpath(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "norm"), [
    ("model.safetensors", "model.safetensors"), ("a//b.json", "a/b.json"),
    ("./a/./b", "a/b"), ("unet/", "unet"), ("x" * 1024, "x" * 1024),
    ("modèle/重み.safetensors", "modèle/重み.safetensors"), ("a..b", "a..b"),
])
def test_safe_relpath_accepts(name: str, norm: str) -> None:
    assert safe_relpath(name) == norm


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "C:\\x", ""])
def test_join_under_refuses(name: str, tmp_path: Path) -> None:
    with pytest.raises(UnsafePathError):
        join_under(str(tmp_path), name)


# --- every truncation and random header damage: FormatError or success, nothing else ------

def test_every_truncation_of_a_gguf_is_refused(tmp_path: Path) -> None:
    make_gguf_model(str(tmp_path))
    path = str(tmp_path / "model.gguf")
    for size in range(os.path.getsize(path) - 1, -1, -1):
        os.truncate(path, size)
        with pytest.raises(FormatError):
            gguf.verify(path)


def test_every_truncation_of_a_safetensors_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "model.safetensors")
    write_safetensors(path, {"a": ((3, 5), "float16"), "b": ((7,), "float32")})
    for size in range(os.path.getsize(path) - 1, -1, -1):
        os.truncate(path, size)
        with pytest.raises(FormatError):
            safetensors.verify(path)


def _mutations(original: bytes, limit: int, count: int, seed: int) -> list[bytes]:
    """``count`` copies of ``original`` with 1-4 random bytes changed within ``limit``."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        data = bytearray(original)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(limit)
            data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
        out.append(bytes(data))
    return out


@pytest.mark.parametrize(("fmt", "maker"), [
    ("gguf", lambda d: make_gguf_model(d)),
    ("safetensors", lambda d: write_safetensors(
        os.path.join(d, "model.safetensors"), {"a": ((3, 5), "float16"),
                                               "b": ((7,), "float32")})),
])
def test_damaged_headers_never_crash(fmt: str, maker: Callable[[str], object],
                                     tmp_path: Path) -> None:
    maker(str(tmp_path))
    path = str(tmp_path / f"model.{fmt}")
    original = Path(path).read_bytes()
    verify = gguf.verify if fmt == "gguf" else safetensors.verify
    # the header region: GGUF up to its tensor data, safetensors its length and JSON
    limit = 600 if fmt == "gguf" else 8 + struct.unpack("<Q", original[:8])[0]
    refused = 0
    for data in _mutations(original, min(limit, len(original)), 400, seed=7):
        Path(path).write_bytes(data)
        try:
            verify(path)
        except FormatError:
            refused += 1
    assert refused > 0
