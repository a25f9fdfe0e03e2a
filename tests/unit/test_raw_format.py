"""The Raw format: declared, never guessed; not parsed; every other rule kept.

``formats.inspect_dir`` on a tree of runtime files (distributed-llama's
``.m``/``.t``) refuses it under Auto and describes it under Raw without
opening a file; pickle, links and empty trees are refused as for any
format; the packed artifact says ``raw`` in its config and carries every
file by its sha256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from modelpack.errors import FormatError, PickleRefusedError, UnsafePathError
from modelpack.formats import EXPECTABLE, inspect_dir
from modelpack.oci import mediatypes as mt
from modelpack.pack import pack_to_layout


def dllama(root: Path) -> Path:
    (root / "dllama_model_llama3_8b_q40.m").write_bytes(os.urandom(4096))
    (root / "dllama_tokenizer_llama3.t").write_bytes(os.urandom(512))
    (root / "README.md").write_text("# converted with distributed-llama\n")
    return root


def test_auto_never_picks_raw(tmp_path: Path) -> None:
    with pytest.raises(FormatError) as e:
        inspect_dir(str(dllama(tmp_path)))
    assert e.value.reason == "NoWeights" and "format Raw" in str(e.value)
    assert "Raw" in EXPECTABLE


def test_declared_raw_describes_without_parsing(tmp_path: Path) -> None:
    info = inspect_dir(str(dllama(tmp_path)), "Raw")
    assert info.format == "Raw"
    assert (info.parameter_count, info.tensors, info.family) == (0, 0, None)
    assert {f.path: f.kind for f in info.files} == {
        "README.md": "doc", "dllama_model_llama3_8b_q40.m": "weight",
        "dllama_tokenizer_llama3.t": "weight"}
    # not parsed: a file that claims a parsed format is carried as bytes
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(FormatError):
        inspect_dir(str(tmp_path), "Auto")
    assert inspect_dir(str(tmp_path), "Raw").format == "Raw"


def test_raw_keeps_the_pickle_link_and_empty_rules(tmp_path: Path) -> None:
    (tmp_path / "pickle").mkdir()
    tree = dllama(tmp_path / "pickle")
    (tree / "model.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(PickleRefusedError):
        inspect_dir(str(tree), "Raw")
    assert inspect_dir(str(tree), "Raw", allow_pickle=True).format == "Raw"

    linked = tmp_path / "linked"
    linked.mkdir()
    dllama(linked)
    (linked / "escape.m").symlink_to("/etc/passwd")
    with pytest.raises(UnsafePathError):
        inspect_dir(str(linked), "Raw")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FormatError) as e:
        inspect_dir(str(empty), "Raw")
    assert e.value.reason == "EmptyModel"


def test_raw_artifact_carries_each_file_by_digest(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    tree = dllama(tmp_path / "tree")
    result = pack_to_layout(str(tree), str(tmp_path / "oci"), expected_format="Raw")
    assert result.pack.config["config"]["format"] == "raw"
    assert result.pack.metadata()["format"] == "Raw"
    for layer in result.pack.layers:
        data = (tree / layer.path).read_bytes()
        assert layer.digest == "sha256:" + hashlib.sha256(data).hexdigest(), layer.path
        want = mt.layer_type("doc" if layer.path == "README.md" else "weight")
        assert layer.media_type == want, layer.path
