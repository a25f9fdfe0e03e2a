"""One writer per digest in ``modelpack.store``: each rule of the protocol, one fault each.

The randomized version, with a registry and several processes, is
tests/integration/test_blob_single_flight.py; these pin the individual
cases down: a second writer waits and finds the blob stored; a writer
killed with SIGKILL leaves a prefix the next one resumes; a stalled holder
gives a typed, retryable error (ABORTED for kubelet); a commit that finds
the name taken is success and keeps the good file; clean-up never removes
a part a writer holds; nothing leaves the store as a raw OSError.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from csi.errors import to_csi
from modelpack import digest as dg
from modelpack.errors import BlobBusyError, IntegrityError, StoreError
from modelpack.store.blobs import BlobStore

DATA = os.urandom(3 << 20)
DIGEST = dg.of_bytes(DATA)


def _stored_ok(store: BlobStore, digest: str) -> bool:
    return dg.of_file(store.path(digest))[0] == digest


def test_second_writer_waits_then_finds_the_blob_stored(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    first = store.open_partial(DIGEST, len(DATA))
    first.write(DATA[:1 << 20])
    got = []
    waiter = threading.Thread(target=lambda: got.append(store.open_partial(DIGEST, len(DATA))))
    waiter.start()
    time.sleep(0.3)
    assert not got, "a second writer got the .part while the first held it"
    first.restart()  # the registry ignored Range: the holder starts over, alone
    first.write(DATA)
    assert store.commit(first) == DIGEST
    waiter.join(10)
    second = got[0]
    assert second.present and second.offset == len(DATA)
    assert store.commit(second) == DIGEST  # nothing to write: success
    assert _stored_ok(store, DIGEST)
    assert os.listdir(store.ingest_dir) == []


_HOLDER = """
import sys, time
from modelpack.store.blobs import BlobStore
store = BlobStore(sys.argv[1])
part = store.open_partial(sys.argv[2], int(sys.argv[3]))
part.write(open(sys.argv[4], "rb").read()[: int(sys.argv[5])])
print("holding", flush=True)
time.sleep(60)
"""


def test_a_writer_killed_mid_write_leaves_a_prefix_the_next_one_resumes(tmp_path) -> None:
    store = BlobStore(str(tmp_path / "store"))
    src = str(tmp_path / "src")
    with open(src, "wb") as f:
        f.write(DATA)
    prefix = 1_000_003
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, store.root, DIGEST, str(len(DATA)), src, str(prefix)],
        stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "holding"
        with pytest.raises(BlobBusyError):  # held, and the holder writes nothing now
            BlobStore(store.root, stall=0.3).open_partial(DIGEST, len(DATA))
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    part = store.open_partial(DIGEST, len(DATA))  # the kernel dropped the dead one's lock
    assert part.offset == prefix and not part.present
    part.write(DATA[prefix:])
    assert store.commit(part) == DIGEST
    assert _stored_ok(store, DIGEST)


def test_a_stalled_holder_gives_a_typed_retryable_busy_error(tmp_path) -> None:
    store = BlobStore(str(tmp_path), stall=0.3)
    holder = store.open_partial(DIGEST, len(DATA))
    try:
        start = time.monotonic()
        with pytest.raises(BlobBusyError) as ei:
            store.open_partial(DIGEST, len(DATA))
        assert time.monotonic() - start < 5
        assert ei.value.retryable and isinstance(ei.value, StoreError)
        assert to_csi(ei.value).code == grpc.StatusCode.ABORTED  # kubelet retries
    finally:
        holder.close()


def test_a_waiter_keeps_waiting_while_the_holder_makes_progress(tmp_path) -> None:
    store = BlobStore(str(tmp_path), stall=0.3)
    holder = store.open_partial(DIGEST, len(DATA))
    got: list[object] = []

    def wait() -> None:
        try:
            got.append(store.open_partial(DIGEST, len(DATA)))
        except BlobBusyError as e:
            got.append(e)

    waiter = threading.Thread(target=wait)
    waiter.start()
    step = len(DATA) // 8
    for i in range(8):  # 1.2 s in all, four times the stall bound, never stalled
        time.sleep(0.15)
        holder.write(DATA[i * step:(i + 1) * step if i < 7 else len(DATA)])
    store.commit(holder)
    waiter.join(10)
    assert not isinstance(got[0], BlobBusyError)
    assert got[0].present  # type: ignore[attr-defined]


def test_a_commit_that_finds_the_name_taken_is_success_and_keeps_the_good_file(
        tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    named = store.open_partial(DIGEST, len(DATA))
    named.write(DATA)
    # a writer that learns the digest only at its end (pack, archive expansion) gets there first
    assert store.ingest_stream(io.BytesIO(DATA)) == DIGEST
    first = os.stat(store.path(DIGEST)).st_ino
    assert store.commit(named) == DIGEST
    assert os.stat(store.path(DIGEST)).st_ino == first
    assert _stored_ok(store, DIGEST)
    assert os.listdir(store.ingest_dir) == []
    # a file of another size under the name is not that blob: a verified commit replaces it
    store.delete(DIGEST)
    with open(store.path(DIGEST), "wb") as f:
        f.write(b"short")
    assert store.ingest_stream(io.BytesIO(DATA)) == DIGEST
    assert _stored_ok(store, DIGEST)


def test_clean_up_never_removes_a_part_a_writer_holds(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    other = os.urandom(1 << 20)
    other_digest = dg.of_bytes(other)
    live = store.open_partial(DIGEST, len(DATA))
    live.write(DATA[:4096])
    idle = store.open_partial(other_digest, len(other))
    idle.write(other[:4096])
    idle.close()  # a failed pull's: nobody holds it
    assert store.drop_parts([DIGEST, other_digest]) == 1
    assert os.path.exists(live.path) and not os.path.exists(idle.path)
    # recover: unnamed and empty parts, parts of stored blobs, old parts go; the live one stays
    stored = store.ingest_stream(io.BytesIO(b"stored"))
    names = {"tmp-0123456789abcdef.part": b"x", dg.hex_of(stored) + ".part": b"st",
             "e" * 64 + ".part": b"", "f" * 64 + ".part": b"resumable", "c" * 64 + ".part": b"o"}
    for name, body in names.items():
        with open(os.path.join(store.ingest_dir, name), "wb") as f:
            f.write(body)
    old = os.path.join(store.ingest_dir, "c" * 64 + ".part")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    os.utime(live.path, (time.time() - 7200, time.time() - 7200))  # old, but held
    removed = store.recover(max_age=3600)
    assert sorted(removed) == sorted(n for n in names if n != "f" * 64 + ".part")
    assert sorted(os.listdir(store.ingest_dir)) == sorted([os.path.basename(live.path),
                                                           "f" * 64 + ".part"])
    live.write(DATA[4096:])
    assert store.commit(live) == DIGEST  # its file was never touched


def test_no_raw_oserror_leaves_the_store(tmp_path) -> None:
    store = BlobStore(str(tmp_path / "s"))
    part = store.open_partial(DIGEST, len(DATA))
    part.write(DATA)
    shutil.rmtree(store.ingest_dir)  # an operator's clean-up under a running writer
    with pytest.raises(StoreError) as ei:
        store.commit(part)
    assert ei.value.retryable  # the blob can be fetched again
    assert not store.has(DIGEST)
    with pytest.raises(StoreError):
        store.open_partial(DIGEST, len(DATA))  # no ingest dir at all
    with pytest.raises(StoreError):
        store.ingest_file(str(tmp_path / "missing"))
    blocker = str(tmp_path / "file")
    open(blocker, "w").close()
    with pytest.raises(StoreError):
        BlobStore(os.path.join(blocker, "store"))
    wrong = BlobStore(str(tmp_path / "w"))
    with pytest.raises(IntegrityError):
        wrong.ingest_stream(io.BytesIO(DATA[:-1] + b"!"), DIGEST, len(DATA))
    assert os.listdir(wrong.ingest_dir) == []
    assert to_csi(StoreError("no space left", retryable=True)).code == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_csi(IntegrityError("bad")).code == grpc.StatusCode.ABORTED  # retried, not final


def test_a_stream_resumes_the_prefix_an_earlier_writer_left(tmp_path) -> None:
    store = BlobStore(str(tmp_path))
    cut = store.open_partial(DIGEST, len(DATA))
    cut.write(DATA[:12345])
    cut.close()  # a manifest or config ingest cut by a full disk
    seen: list[int] = []
    assert store.ingest_stream(io.BytesIO(DATA), DIGEST, len(DATA), seen.append) == DIGEST
    assert sum(seen) == len(DATA) and _stored_ok(store, DIGEST)
