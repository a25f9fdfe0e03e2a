"""``open_source`` maps what a user types to the right source, and refuses the rest."""

from __future__ import annotations

import pytest

from ingest.sources import base, open_source
from ingest.sources.huggingface import HuggingFaceSource
from ingest.sources.local import LocalDirSource
from ingest.sources.ollama import OllamaSource
from ingest.sources.s3 import S3Source
from ingest.sources.url import UrlSource


def test_schemes(tmp_path):
    hf = open_source("hf://Qwen/Qwen2.5-0.5B@abc", endpoint="http://127.0.0.1:1")
    assert isinstance(hf, HuggingFaceSource) and hf.repo == "Qwen/Qwen2.5-0.5B"
    assert hf.revision == "abc"
    assert open_source("hf://a/b", endpoint="http://x").revision == "main"
    assert open_source("hf://gpt2", endpoint="http://x").repo == "gpt2"  # legacy bare names
    o = open_source("ollama://127.0.0.1:5000/library/llama3.2:1b")
    assert isinstance(o, OllamaSource) and o.ref.repository == "library/llama3.2"
    assert o.client.insecure  # loopback registries speak plain HTTP, as with docker
    u = open_source("https://user:pw@example.invalid/m.tar?sig=secret", sha256="a" * 64)
    assert isinstance(u, UrlSource) and u.sha256 == "sha256:" + "a" * 64
    assert "pw" not in u.uri and "secret" not in u.uri
    s = open_source("s3://models/llama", endpoint="http://127.0.0.1:1", access_key="a",
                    secret_key="b")
    assert isinstance(s, S3Source) and s.prefix == "llama/"
    assert isinstance(open_source(str(tmp_path)), LocalDirSource)


@pytest.mark.parametrize("uri", ["ftp://x/y", "hf://a/b/c", "hf://a/../b", "hf://../etc",
                                 "s3://UPPER/x", "ollama://a/b/c/d", "gopher://x"])
def test_refused(uri):
    with pytest.raises(base.SourceError):
        open_source(uri, endpoint="http://127.0.0.1:1")


def test_bad_sha256_and_archive_mode():
    with pytest.raises(base.InvalidSourceError):
        open_source("https://h/x", sha256="zz")
    with pytest.raises(base.InvalidSourceError):
        open_source("https://h/x", archive="Rar")
