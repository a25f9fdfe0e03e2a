"""HTTP(S) URL source: one file or a tar/zip archive → registry → pull back."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile

import pytest

from ingest.publish import Options, PublishError, publish
from ingest.sources import base, open_source
from tests import modelgen
from tests.servers.files import FileServer
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]

FAST = Options(backoff=0.01)


@pytest.fixture
def served(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with FileServer(str(root)) as fs:
        yield fs


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tar(model: str, out: str, mode: str = "w:gz") -> None:
    with tarfile.open(out, mode) as tf:
        for name in sorted(os.listdir(model)):
            tf.add(os.path.join(model, name), arcname=f"./{name}")


def test_single_gguf_file_with_sha256(served, client, registry, work_dir, tmp_path):
    modelgen.make_gguf_model(served.root, name="tiny-q4.gguf")
    path = os.path.join(served.root, "tiny-q4.gguf")
    src = open_source(f"{served.url}/tiny-q4.gguf", sha256=_sha(path))
    res = publish(src, client, f"{registry.host}/models/http-gguf:v1", work_dir=work_dir)
    assert res.resolved["format"] == "GGUF" and res.resolved["files"] == 1
    assert res.revision == "sha256:" + _sha(path)
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    assert os.listdir(dest) == ["tiny-q4.gguf"]
    assert _sha(os.path.join(dest, "tiny-q4.gguf")) == _sha(path)


@pytest.mark.parametrize("kind", ["tar.gz", "tar", "zip"])
def test_archive_is_expanded_and_published(served, client, registry, work_dir, small_model,
                                           tmp_path, kind):
    archive = os.path.join(served.root, f"model.{kind}")
    if kind == "zip":
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(os.listdir(small_model)):
                zf.write(os.path.join(small_model, name), f"{name}")
    else:
        _tar(small_model, archive, "w:gz" if kind == "tar.gz" else "w")
    src = open_source(f"{served.url}/model.{kind}")
    res = publish(src, client, f"{registry.host}/models/http-{kind.replace('.', '-')}:v1",
                  work_dir=work_dir)
    assert res.resolved["format"] == "Safetensors" and res.resolved["family"] == "llama"
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    same_tree(small_model, dest)


def test_wrong_sha256_fails_and_leaves_no_tag(served, client, registry, work_dir):
    modelgen.make_gguf_model(served.root, name="m.gguf")
    src = open_source(f"{served.url}/m.gguf", sha256="0" * 64)
    with pytest.raises(PublishError) as e:
        publish(src, client, f"{registry.host}/models/http-bad:v1", work_dir=work_dir)
    assert e.value.reason == "ChecksumMismatch" and not e.value.retryable
    assert client.list_tags("models/http-bad") == []


def test_dropped_transfer_resumes_with_range_across_restarts(served, client, registry,
                                                            work_dir, tmp_path):
    root = str(tmp_path / "big")
    modelgen.make_big_model(root, 1, 3 << 20)
    archive = os.path.join(served.root, "big.tar")
    _tar(root, archive, "w")
    size = os.path.getsize(archive)
    served.drop_after["big.tar"] = size // 2
    served.drops_left["big.tar"] = 100
    with pytest.raises(PublishError) as e:
        publish(open_source(f"{served.url}/big.tar"), client,
                f"{registry.host}/models/http-big:v1", work_dir=work_dir, options=FAST)
    assert e.value.retryable
    assert client.list_tags("models/http-big") == []
    served.drops_left.clear()
    served.requests.clear()
    res = publish(open_source(f"{served.url}/big.tar"), client,
                  f"{registry.host}/models/http-big:v1", work_dir=work_dir, options=FAST)
    gets = [r for m, n, r in served.requests if m == "GET"]
    assert gets == [f"bytes={size // 2}-"]
    dest = str(tmp_path / "out")
    pull_back(client, res.reference, dest)
    same_tree(root, dest)


def test_auth_header_and_missing_file(tmp_path, small_model):
    root = tmp_path / "private"
    root.mkdir()
    modelgen.make_gguf_model(str(root))
    with FileServer(str(root), token="s3cret") as fs:
        with pytest.raises(base.SourceAuthError):
            open_source(f"{fs.url}/model.gguf").resolve()
        r = open_source(f"{fs.url}/model.gguf", token="s3cret").resolve()
        assert r.files[0].path == "model.gguf" and r.files[0].size
        with pytest.raises(base.SourceNotFound):
            open_source(f"{fs.url}/nope.gguf", token="s3cret").resolve()


def test_hostile_archive_is_refused_before_publish(served, client, registry, work_dir):
    archive = os.path.join(served.root, "evil.tar")
    with tarfile.open(archive, "w") as tf:
        data = b"x" * 10
        info = tarfile.TarInfo("../../escape.json")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    with pytest.raises(PublishError) as e:
        publish(open_source(f"{served.url}/evil.tar"), client,
                f"{registry.host}/models/http-evil:v1", work_dir=work_dir)
    assert e.value.reason == "UnsafePath"
    assert client.list_tags("models/http-evil") == []
