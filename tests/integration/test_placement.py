"""Tree placement on real filesystems: reflink on XFS and btrfs, hardlink on
ext4 and tmpfs, copy across filesystems. Needs root for the loop mounts."""

from __future__ import annotations

import errno
import os

import pytest

from modelpack.errors import IntegrityError
from modelpack.store.blobs import BlobStore
from modelpack.store.placement import Method, place_tree, probe
from tests.loopfs import loop_mount, tmpfs_mount

pytestmark = pytest.mark.root


def _store_with_blobs(root: str) -> tuple[BlobStore, list[tuple[str, str]]]:
    store = BlobStore(os.path.join(root, "cache"))
    pairs = []
    for i, name in enumerate(["model.safetensors", "sub/dir/config.json", "README.md"]):
        src = os.path.join(root, f"src{i}")
        with open(src, "wb") as f:
            f.write(os.urandom(1 << 20) * (i + 1))
        d = store.ingest_file(src)
        pairs.append((name, store.path(d)))
    return store, pairs


def _check_tree(dest: str, pairs: list[tuple[str, str]]) -> None:
    for rel, blob in pairs:
        path = os.path.join(dest, rel)
        with open(path, "rb") as a, open(blob, "rb") as b:
            assert a.read() == b.read()
        assert os.stat(path).st_mode & 0o222 == 0, "placed files must be read-only"
    assert os.stat(dest).st_mode & 0o222 == 0


@pytest.mark.parametrize("fstype", ["xfs", "btrfs"])
def test_reflink_on_cow_filesystems(fstype: str) -> None:
    with loop_mount(fstype) as mnt:
        store, pairs = _store_with_blobs(mnt)
        dest = os.path.join(mnt, "models", "m1")
        method = place_tree(pairs, dest)
        assert method is Method.REFLINK
        _check_tree(dest, pairs)
        # own inodes: a reflinked tree shares extents, not the inode
        for rel, blob in pairs:
            assert os.stat(os.path.join(dest, rel)).st_ino != os.stat(blob).st_ino
        # a second tree of the same blobs costs (almost) no space
        before = os.statvfs(mnt)
        place_tree(pairs, os.path.join(mnt, "models", "m2"))
        after = os.statvfs(mnt)
        used = (before.f_bfree - after.f_bfree) * before.f_frsize
        assert used < 1 << 20, f"reflinked tree used {used} bytes"


@pytest.mark.parametrize("fstype", ["ext4", "tmpfs"])
def test_hardlink_where_no_reflink(fstype: str) -> None:
    ctx = loop_mount("ext4") if fstype == "ext4" else tmpfs_mount()
    with ctx as mnt:
        store, pairs = _store_with_blobs(mnt)
        dest = os.path.join(mnt, "models", "m1")
        assert place_tree(pairs, dest) is Method.HARDLINK
        _check_tree(dest, pairs)
        for rel, blob in pairs:
            assert os.stat(os.path.join(dest, rel)).st_ino == os.stat(blob).st_ino


def test_copy_across_filesystems() -> None:
    with tmpfs_mount() as blobs_fs, loop_mount("ext4") as tree_fs:
        store, pairs = _store_with_blobs(blobs_fs)
        assert probe(store.blob_dir, tree_fs) is Method.COPY
        dest = os.path.join(tree_fs, "m1")
        assert place_tree(pairs, dest) is Method.COPY
        _check_tree(dest, pairs)


def test_placed_tree_refuses_writes_for_non_root(tmp_path: os.PathLike[str]) -> None:
    store, pairs = _store_with_blobs(str(tmp_path))
    dest = os.path.join(str(tmp_path), "tree")
    place_tree(pairs, dest)
    pid = os.fork()
    if pid == 0:  # drop to nobody and try to write
        os.setgid(65534)
        os.setuid(65534)
        try:
            open(os.path.join(dest, "README.md"), "ab")
            os._exit(1)
        except PermissionError:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_blob_store_never_shows_a_corrupt_blob(tmp_path: os.PathLike[str]) -> None:
    store = BlobStore(str(tmp_path))
    src = os.path.join(str(tmp_path), "src")
    with open(src, "wb") as f:
        f.write(b"x" * 1000)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(IntegrityError):
        store.ingest_file(src, expected=wrong)
    assert not store.has(wrong)
    assert os.listdir(store.ingest_dir) == []


def test_disk_full_is_a_clean_store_error() -> None:
    from modelpack.errors import StoreError

    with tmpfs_mount(size=4 << 20) as mnt:
        store = BlobStore(os.path.join(mnt, "cache"))
        src = "/tmp/modelcache-big-src"
        with open(src, "wb") as f:
            f.write(os.urandom(8 << 20))
        try:
            with pytest.raises(StoreError) as ei:
                store.ingest_file(src)
            assert ei.value.retryable
            assert "no space" in str(ei.value)
            assert store.digests() == []
        finally:
            os.unlink(src)
        assert errno.ENOSPC  # the cause is mapped, not leaked
