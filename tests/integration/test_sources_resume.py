"""Each network source resumes a file another process left half-staged, against real servers.

What a publish pod killed mid-download leaves behind is a ``.part`` in the
work directory (kept by a PVC across pods: test_publish_resume.py). Here a
first staging run is "killed" at 60 % (a source wrapper that breaks there and
then refuses to open again: the ``.part`` stays, as after SIGKILL), and a
second run, with a fresh source as a new pod would have, stages the same
file: it must ask for the rest with ``Range`` and end with the right digest;
a server that ignores Range (answers 200, whole) must be restarted from
byte 0, cleanly, with the hash still right. Servers: the counting HTTP server
(tests/servers/counting.py), the Hub-compatible server and versitygw.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from ingest.publish.stage import stage_file
from ingest.sources import base, open_source
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.servers import s3 as s3server
from tests.servers.counting import CountingServer

pytest_plugins = ["tests.servers.fixtures"]

SIZE = 6 << 20


class _Killed:
    """``inner``, until byte ``at`` of the first transfer; then dead (no more opens)."""

    def __init__(self, inner: base.Source, at: int) -> None:
        self.inner, self.at, self.uri = inner, at, inner.uri
        self.opened = False

    def resolve(self) -> base.Resolved:
        return self.inner.resolve()

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        if self.opened:
            raise base.SourceError("the pod is gone", reason="Killed", retryable=False)
        self.opened = True
        return _Cut(self.inner.open(file, offset), self.at)

    def close(self) -> None:
        self.inner.close()


class _Cut:
    def __init__(self, inner: base.Stream, at: int) -> None:
        self.inner, self.offset, self.at = inner, inner.offset, at

    def readinto(self, buf: memoryview) -> int:
        left = self.at - self.offset
        if left <= 0:
            raise base.SourceUnavailable("cut")
        n = self.inner.readinto(buf[:min(len(buf), left)])
        self.offset += n
        return n

    def close(self) -> None:
        self.inner.close()


class _Opens:
    """Records the offsets a source is opened at and where its streams really start."""

    def __init__(self, inner: base.Source) -> None:
        self.inner, self.uri = inner, inner.uri
        self.asked: list[int] = []
        self.started: list[int] = []

    def resolve(self) -> base.Resolved:
        return self.inner.resolve()

    def open(self, file: base.SourceFile, offset: int = 0) -> base.Stream:
        self.asked.append(offset)
        stream = self.inner.open(file, offset)
        self.started.append(stream.offset)
        return stream

    def close(self) -> None:
        self.inner.close()


def _two_pods(make: Any, store: BlobStore, path: str) -> tuple[str, _Opens, int, list[int]]:
    """Stage ``path`` in a pod killed at 60 %, then in a new one; what the second did."""
    first = _Killed(make(), 0)
    resolved = first.resolve()
    (f,) = [x for x in resolved.files if x.path == path]
    assert f.size is not None
    first.at = f.size * 6 // 10
    with pytest.raises(base.SourceError):
        stage_file(first, resolved.revision, f, store, lambda n: None, sleep=lambda _: None)
    first.close()
    second = _Opens(make())
    again = second.resolve()
    assert again.revision == resolved.revision  # the key the kept .part is found by
    progress: list[int] = []
    digest = stage_file(second, again.revision, f, store, progress.append,
                        sleep=lambda _: None)
    second.close()
    return digest, second, first.at, progress


def _sha(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@pytest.fixture
def served(tmp_path: Any) -> Any:
    root = tmp_path / "www"
    root.mkdir()
    modelgen.write_big_safetensors(str(root / "m.safetensors"), SIZE)
    with CountingServer(str(root)) as cs:
        yield cs


def test_http_resumes_with_range(served: CountingServer, tmp_path: Any) -> None:
    store = BlobStore(str(tmp_path / "work"))
    path = os.path.join(served.root, "m.safetensors")
    size = os.path.getsize(path)
    digest, opens, at, progress = _two_pods(
        lambda: open_source(f"{served.url}/m.safetensors"), store, "m.safetensors")
    assert digest == _sha(path)
    assert opens.asked == opens.started == [at]
    assert served.served[-1] == [f"bytes={at}-", size - at]  # only the rest was sent
    assert sum(progress) == size  # the kept prefix counts as done


def test_http_server_ignoring_range_restarts_cleanly(served: CountingServer,
                                                     tmp_path: Any) -> None:
    store = BlobStore(str(tmp_path / "work"))
    path = os.path.join(served.root, "m.safetensors")
    size = os.path.getsize(path)
    served.ignore_range = True
    digest, opens, at, progress = _two_pods(
        lambda: open_source(f"{served.url}/m.safetensors"), store, "m.safetensors")
    assert digest == _sha(path)  # the kept prefix was dropped, not spliced
    assert opens.asked == [at] and opens.started == [0]
    assert served.served[-1] == [f"bytes={at}-", size]
    assert sum(progress) == size
    assert os.listdir(store.ingest_dir) == []


def test_http_open_at_an_offset(served: CountingServer) -> None:
    src = open_source(f"{served.url}/m.safetensors")
    (f,) = src.resolve().files
    with open(os.path.join(served.root, "m.safetensors"), "rb") as fp:
        fp.seek(12345)
        want = fp.read()
    stream = src.open(f, 12345)
    buf = bytearray(SIZE)
    got = bytearray()
    while n := stream.readinto(memoryview(buf)):
        got += buf[:n]
    stream.close()
    assert stream.offset == 12345 and bytes(got) == want
    served.ignore_range = True
    whole = src.open(f, 12345)
    assert whole.offset == 0  # the caller learns the server sent the file from byte 0
    whole.close()
    src.close()


def test_hf_resumes_with_range(hub: Any, tmp_path: Any) -> None:
    model = tmp_path / "model"
    model.mkdir()
    modelgen.write_big_safetensors(str(model / "model.safetensors"), SIZE)
    (model / "config.json").write_text('{"model_type": "llama"}')
    hub.add_repo("acme/resume", str(model))
    store = BlobStore(str(tmp_path / "work"))
    digest, opens, at, _ = _two_pods(
        lambda: open_source("hf://acme/resume", endpoint=hub.url, token="hf_test_token"),
        store, "model.safetensors")
    assert digest == _sha(str(model / "model.safetensors"))
    assert opens.asked == opens.started == [at]
    gets = [r for m, p, r in hub.requests
            if m == "GET" and p.startswith("/cdn/") and p.endswith("model.safetensors")]
    assert gets[-1] == f"bytes={at}-"


def test_s3_resumes_with_range(s3: s3server.S3Server, tmp_path: Any) -> None:
    s3c = s3.client()
    s3c.create_bucket(Bucket="resume")
    path = str(tmp_path / "m.safetensors")
    modelgen.write_big_safetensors(path, SIZE)
    s3c.upload_file(path, "resume", "m/m.safetensors")
    creds = {"endpoint": s3.endpoint, "region": "us-east-1",
             "access_key": s3server.ACCESS_KEY, "secret_key": s3server.SECRET_KEY}
    store = BlobStore(str(tmp_path / "work"))
    digest, opens, at, progress = _two_pods(lambda: open_source("s3://resume/m/", **creds),
                                            store, "m.safetensors")
    assert digest == _sha(path)
    assert opens.asked == opens.started == [at]  # Content-Range said it starts there
    assert sum(progress) == os.path.getsize(path)
