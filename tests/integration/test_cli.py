"""The ``modelcache`` command as a user runs it, against a real registry."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
from safetensors import safe_open


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(["modelcache", *args], capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_inspect_json_on_the_real_minilm(minilm_dir):
    out = json.loads(run("inspect", minilm_dir, "--json").stdout)
    with safe_open(os.path.join(minilm_dir, "model.safetensors"), "np") as f:
        keys = list(f.keys())
        params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in keys)
    assert out["format"] == "Safetensors"
    assert out["family"] == "bert"
    assert out["architecture"] == "BertModel"
    assert out["tensors"] == len(keys) == 104
    assert out["parameterCount"] == params == 22713728
    assert out["contextLength"] == 512


def test_pack_push_pull_inspect(registry, small_model, tmp_path):
    ref = f"{registry.host}/cli/model:v1"
    packed = run("pack", small_model, "--push", ref, "--insecure").stdout
    digest = packed.split("digest: ")[1].split()[0]
    dest = str(tmp_path / "pulled")
    pulled = run("pull", ref, dest, "--insecure").stdout
    assert digest in pulled
    for name in os.listdir(small_model):
        assert open(os.path.join(dest, name), "rb").read() == \
            open(os.path.join(small_model, name), "rb").read()
    remote = json.loads(run("inspect", f"{ref}", "--json").stdout)
    assert remote["digest"] == digest and remote["family"] == "llama"


def test_pack_to_layout_then_inspect(small_model, tmp_path):
    out = str(tmp_path / "oci")
    run("pack", small_model, "--output", out)
    meta = json.loads(run("inspect", out, "--json").stdout)
    assert meta["source"] == "oci-layout" and meta["files"] == 4


@pytest.mark.parametrize("case", ["pickle", "truncated", "empty"])
def test_refused_input_writes_nothing(case, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    if case == "pickle":
        (src / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    elif case == "truncated":
        (src / "model.safetensors").write_bytes((500).to_bytes(8, "little") + b"{}")
    out = tmp_path / "oci"
    p = run("pack", str(src), "--output", str(out), check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelcache: ")
    assert {"pickle": "PickleRefused", "truncated": "Truncated", "empty": "EmptyModel"}[case] \
        in lines[0]
    assert not out.exists()


def test_pull_refuses_a_non_empty_destination(registry, small_model, tmp_path):
    ref = f"{registry.host}/cli/busy:v1"
    run("pack", small_model, "--push", ref)
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    p = run("pull", ref, str(dest), check=False)
    assert p.returncode == 1 and "not an empty directory" in p.stderr
    assert os.listdir(dest) == ["keep.txt"]


def test_unreachable_registry_is_one_line(tmp_path):
    from cli.local.registry import free_port

    p = run("pull", f"127.0.0.1:{free_port()}/x/y:v1", str(tmp_path / "d"), check=False)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "RegistryUnavailable" in p.stderr


@pytest.mark.parametrize("sub", ["pack", "pull", "inspect"])
def test_help_explains(sub):
    out = run(sub, "--help").stdout
    assert "usage: modelcache " + sub in out and len(out.splitlines()) > 8
