"""Generators of small, valid model directories for tests and benchmarks.

Tests never ship model files: they make them. Safetensors are written by
the ``safetensors`` package and GGUF by the ``gguf`` package (the formats'
own writers), so our verifier is checked against independent producers.
"""

from __future__ import annotations

import json
import os

import numpy as np


def write_safetensors(path: str, tensors: dict[str, tuple[tuple[int, ...], str]],
                      seed: int = 0) -> int:
    """Write a safetensors file; tensors map name -> (shape, numpy dtype). Returns params."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    arrays = {}
    params = 0
    for name, (shape, dtype) in tensors.items():
        arrays[name] = rng.standard_normal(shape).astype(dtype)
        params += int(np.prod(shape))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(arrays, path, metadata={"format": "np"})
    return params


def write_big_safetensors(path: str, size: int, seed: int = 0) -> None:
    """A safetensors file of about ``size`` bytes of random-ish data, written in chunks."""
    header = {"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, size=8 << 20, dtype=np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        left = size
        i = 0
        while left:
            n = min(left, len(block))
            # vary every block so no two blobs or blocks dedupe by accident
            f.write(i.to_bytes(8, "little") + block[8:n] if n >= 8 else block[:n])
            left -= n
            i += 1


def make_safetensors_model(root: str, family: str = "llama", layers: int = 2,
                           hidden: int = 64, seed: int = 0) -> dict[str, int]:
    """A small HF-style model directory: config.json, one safetensors, tokenizer, README."""
    os.makedirs(root, exist_ok=True)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {
        "embed.weight": ((128, hidden), "float16")}
    for i in range(layers):
        tensors[f"layers.{i}.attn.weight"] = ((hidden, hidden), "float16")
        tensors[f"layers.{i}.mlp.weight"] = ((hidden, hidden * 2), "float16")
    params = write_safetensors(os.path.join(root, "model.safetensors"), tensors, seed)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": family, "architectures": ["LlamaForCausalLM"],
                   "max_position_embeddings": 4096, "torch_dtype": "float16",
                   "hidden_size": hidden}, f)
    with open(os.path.join(root, "tokenizer.json"), "w") as f:
        json.dump({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}, f)
    with open(os.path.join(root, "README.md"), "w") as f:
        f.write(f"# test model {family} seed {seed}\n")
    return {"parameters": params, "tensors": len(tensors)}


def make_gguf_model(root: str, arch: str = "llama", seed: int = 0,
                    name: str = "model.gguf") -> dict[str, int]:
    """A small GGUF file written by the gguf package (F32 and F16 tensors)."""
    import gguf

    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, name)
    w = gguf.GGUFWriter(path, arch)
    w.add_name("test-model")
    w.add_context_length(2048)
    w.add_file_type(1)  # MOSTLY_F16
    w.add_token_list(["<s>", "</s>", "a", "b"])
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (32, 16), "blk.0.attn_q.weight": (16, 16),
              "output_norm.weight": (16,)}
    params = 0
    for tname, shape in shapes.items():
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor(tname, rng.standard_normal(shape).astype(dtype))
        params += int(np.prod(shape))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"parameters": params, "tensors": len(shapes)}


def make_diffusers_model(root: str, seed: int = 0) -> dict[str, int]:
    """A tiny diffusers pipeline: model_index.json and two components."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                   "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"],
                   "safety_checker": [None, None]}, f)
    params = 0
    for comp in ("unet", "vae"):
        os.makedirs(os.path.join(root, comp), exist_ok=True)
        with open(os.path.join(root, comp, "config.json"), "w") as f:
            json.dump({"_class_name": comp}, f)
        params += write_safetensors(
            os.path.join(root, comp, "diffusion_pytorch_model.safetensors"),
            {"conv.weight": ((8, 4, 3, 3), "float32")}, seed)
    return {"parameters": params, "tensors": 2}


def make_big_model(root: str, files: int, total: int, seed: int = 0) -> None:
    """``files`` safetensors shards summing to ``total`` bytes, plus config.json."""
    os.makedirs(root, exist_ok=True)
    per = total // files
    for i in range(files):
        write_big_safetensors(os.path.join(root, f"model-{i:05d}-of-{files:05d}.safetensors"),
                              per, seed=seed * 1000 + i)
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, f)
