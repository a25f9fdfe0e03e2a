"""Staging against scripted sources: resume, restart, cuts and lies, without a network.

``ScriptedSource`` is an in-memory stand-in for the ``Source`` interface
(the network sources have their own integration tests against real servers);
each ``open`` follows a script: honour Range or not, cut after N bytes.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from controller.upload.sessions import SessionStore
from ingest.publish.stage import stage_file
from ingest.sources import base
from modelpack.store import partial
from modelpack.store.blobs import BlobStore

DATA = bytes(range(256)) * 4096  # 1 MiB


class _Stream:
    def __init__(self, data: bytes, offset: int, cut: int | None) -> None:
        self.data, self.offset, self.pos = data, offset, offset
        self.cut = cut

    def readinto(self, buf):
        if self.cut is not None and self.pos >= self.cut:
            raise base.SourceUnavailable("cut")
        end = len(self.data) if self.cut is None else min(len(self.data), self.cut)
        n = min(len(buf), end - self.pos, 65536)
        buf[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n

    def close(self):
        pass


class ScriptedSource:
    uri = "scripted://model"

    def __init__(self, data: bytes, script: list[dict]) -> None:
        self.data = data
        self.script = script
        self.opens: list[int] = []

    def resolve(self):
        raise NotImplementedError

    def open(self, file, offset=0):
        self.opens.append(offset)
        step = self.script.pop(0) if self.script else {}
        start = offset if step.get("range", True) else 0
        return _Stream(self.data, start, step.get("cut"))

    def close(self):
        pass


def _git(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


@pytest.fixture
def store(tmp_path):
    return BlobStore(str(tmp_path / "s"))


def test_cut_then_resume_with_range(store):
    src = ScriptedSource(DATA, [{"cut": 300_000}, {}])
    f = base.SourceFile("a.bin", len(DATA), "sha256:" + hashlib.sha256(DATA).hexdigest())
    done: list[int] = []
    d = stage_file(src, "r", f, store, done.append, sleep=lambda _: None)
    assert src.opens == [0, 300_000]
    assert sum(done) == len(DATA)
    assert d == f.sha256


def test_server_ignoring_range_restarts_and_check_hash_still_holds(store):
    src = ScriptedSource(DATA, [{"cut": 500_000}, {"range": False}])
    f = base.SourceFile("config.json", len(DATA), None, ("git-sha1", _git(DATA)))
    done: list[int] = []
    stage_file(src, "r", f, store, done.append, sleep=lambda _: None)
    assert sum(done) == len(DATA)


def test_unknown_size_cut_is_retried_not_accepted(store):
    src = ScriptedSource(DATA, [{"cut": 100_000}, {}])
    f = base.SourceFile("x.bin", None)
    d = stage_file(src, "r", f, store, lambda n: None, sleep=lambda _: None)
    assert d == "sha256:" + hashlib.sha256(DATA).hexdigest()
    assert src.opens == [0, 100_000]


def test_short_clean_stream_is_a_size_lie(store):
    src = ScriptedSource(DATA[:1000], [])
    f = base.SourceFile("x.bin", 5000)
    with pytest.raises(base.SourceIntegrityError) as e:
        stage_file(src, "r", f, store, lambda n: None, sleep=lambda _: None)
    assert e.value.reason == "SizeMismatch"


def test_persistent_cut_is_retryable_and_keeps_the_part(store):
    src = ScriptedSource(DATA, [{"cut": 200_000}] * 20)
    f = base.SourceFile("x.bin", len(DATA), "sha256:" + hashlib.sha256(DATA).hexdigest())
    with pytest.raises(base.SourceUnavailable):
        stage_file(src, "r", f, store, lambda n: None, sleep=lambda _: None)
    src2 = ScriptedSource(DATA, [])
    stage_file(src2, "r", f, store, lambda n: None, sleep=lambda _: None)
    assert src2.opens == [200_000]  # a new run resumes from the kept .part


def test_delta_sink_turns_events_into_bar_updates():
    from ingest.publish import delta_sink

    got: list[int] = []
    totals: list[int] = []
    sink = delta_sink(got.append, totals.append)
    for done in (0, 10, 10, 25, 100):
        sink({"bytesDone": done, "bytesTotal": 100})
    assert got == [10, 15, 75] and totals == [100]


def test_staged_files_and_uploads_are_written_through_the_page_cache(store, monkeypatch):
    """A staged file is read back at once (format check, push): no O_DIRECT write, which
    would send that read to the disk (bench/regress: ingest 3.7 → 4.4 s with it)."""
    opened: list[str] = []
    real = partial._open_direct

    def spy(path: str) -> int:
        opened.append(path)
        return real(path)
    monkeypatch.setattr(partial, "_open_direct", spy)
    data = DATA * 12  # over DIRECT_MIN (8 MiB)
    named = "sha256:" + hashlib.sha256(data).hexdigest()
    for f in (base.SourceFile("named.bin", len(data), named),
              base.SourceFile("unnamed.bin", len(data), None, check=("git-sha1", _git(data)))):
        stage_file(ScriptedSource(data, []), "r", f, store, lambda n: None, sleep=lambda _: None)
    assert opened == []
    # an upload gateway's parts are read back the same way
    sessions = SessionStore(os.path.join(store.root, "sessions"))
    session, _ = sessions.create("m", "r/m:v1", 600, len(data))
    session.open_part("big.bin", len(data), 0).write(data)
    assert opened == []
    # the node cache's blobs, which are not read back, still go direct
    store.open_partial("sha256:" + hashlib.sha256(b"x").hexdigest(), len(data)).close()
    assert len(opened) == 1
