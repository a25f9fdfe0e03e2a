"""Ollama registry source → publish worker → registry → pull back.

The Ollama registry is a real docker-registry loaded with Ollama's media
types (``tests/servers/ollama.py``); the GGUF is written by the ``gguf``
package.
"""

from __future__ import annotations

import json
import os

import pytest

from ingest.publish import Options, PublishError, publish
from ingest.sources import base, open_source
from ingest.sources.ollama import parse_uri
from tests import modelgen
from tests.servers import ollama
from tests.servers.helpers import pull_back

pytest_plugins = ["tests.servers.fixtures"]


@pytest.fixture
def gguf_file(tmp_path):
    modelgen.make_gguf_model(str(tmp_path / "g"))
    return str(tmp_path / "g" / "model.gguf")


def test_ollama_model_publishes_and_pulls_back(ollama_client, ollama_registry, client,
                                               registry, gguf_file, work_dir, tmp_path):
    pushed = ollama.push_model(ollama_client, "library/tinyllama", "1b", gguf_file)
    src = open_source(f"ollama://{ollama_registry.host}/library/tinyllama:1b")
    res = publish(src, client, f"{registry.host}/models/tinyllama:1b", work_dir=work_dir)
    assert res.revision == pushed["digest"]
    assert res.resolved["format"] == "GGUF"
    assert res.resolved["family"] == "llama"
    assert res.resolved["contextLength"] == 2048
    assert res.source["model_family"] == "llama"
    assert res.source["model_type"] == "1B"
    assert res.source["file_type"] == "F16"
    dest = str(tmp_path / "out")
    pack = pull_back(client, res.reference, dest)
    kinds = {layer.path: layer.kind for layer in pack.layers}
    assert kinds == {"model.gguf": "weight", "template": "weight.config",
                     "params.json": "weight.config", "LICENSE": "doc"}
    with open(os.path.join(dest, "model.gguf"), "rb") as a, open(gguf_file, "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(dest, "template"), "rb") as f:
        assert f.read() == ollama.TEMPLATE.encode()
    with open(os.path.join(dest, "params.json")) as f:
        assert json.load(f) == ollama.PARAMS
    with open(os.path.join(dest, "LICENSE"), "rb") as f:
        assert f.read() == ollama.LICENSE.encode()


def test_ollama_corrupt_blob_is_refused(ollama_client, ollama_registry, client, registry,
                                        gguf_file, work_dir):
    pushed = ollama.push_model(ollama_client, "library/corrupt", "1b", gguf_file)
    blob = ollama_registry.blob_path(pushed["manifest"]["layers"][0]["digest"])
    with open(blob, "r+b") as f:  # flip a byte inside the registry's storage
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    src = open_source(f"ollama://{ollama_registry.host}/library/corrupt:1b")
    with pytest.raises(PublishError) as e:
        publish(src, client, f"{registry.host}/models/corrupt-ollama:1b", work_dir=work_dir,
                options=Options(backoff=0.01))
    assert e.value.reason == "ChecksumMismatch"
    assert client.list_tags("models/corrupt-ollama") == []


def test_ollama_missing_model_and_uri_forms(ollama_registry):
    src = open_source(f"ollama://{ollama_registry.host}/library/nothing:here")
    with pytest.raises(base.SourceNotFound):
        src.resolve()
    assert parse_uri("llama3.2:1b") == ("registry.ollama.ai", "library/llama3.2", "1b")
    assert parse_uri("acme/m") == ("registry.ollama.ai", "acme/m", "latest")
    assert parse_uri("127.0.0.1:5000/acme/m:q4") == ("127.0.0.1:5000", "acme/m", "q4")
    with pytest.raises(base.InvalidSourceError):
        parse_uri("a/b/c/d")
