"""Hostile archives are refused before a byte lands under a name of their choosing."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile
import zipfile

import pytest

from ingest.sources import archive, base
from modelpack.store.blobs import BlobStore


@pytest.fixture
def store(tmp_path):
    return BlobStore(str(tmp_path / "store"))


def _tar(path, entries, mode="w"):
    with tarfile.open(path, mode) as tf:
        for info, data in entries:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data=b"{}"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def test_a_plain_tar_expands(tmp_path, store):
    p = str(tmp_path / "a.tar")
    d = tarfile.TarInfo("sub")
    d.type = tarfile.DIRTYPE
    _tar(p, [(d, None), _file("./sub/config.json", b'{"a": 1}'), _file("README.md", b"hi")])
    out = archive.expand(p, store)
    assert [(e.path, e.size) for e in out] == [("README.md", 2), ("sub/config.json", 8)]
    with open(store.path(out[1].digest), "rb") as f:
        assert f.read() == b'{"a": 1}'


@pytest.mark.parametrize("name", ["../evil.json", "/etc/passwd", "a/../../b", "a\\..\\b"])
def test_traversal_names_refused(tmp_path, store, name):
    p = str(tmp_path / "t.tar")
    _tar(p, [_file(name)])
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store)
    assert e.value.reason == "UnsafePath"


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_links_in_tar_refused(tmp_path, store, kind):
    p = str(tmp_path / "l.tar")
    _tar(p, [_file("config.json"), _link("model.safetensors", "/etc/shadow", kind)])
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store)
    assert e.value.reason == "LinkInArchive"


def test_devices_and_fifos_refused(tmp_path, store):
    for kind in (tarfile.CHRTYPE, tarfile.FIFOTYPE):
        p = str(tmp_path / f"d{kind!r}.tar")
        info = tarfile.TarInfo("dev")
        info.type = kind
        _tar(p, [(info, None)])
        with pytest.raises(base.UnsafeSourceError):
            archive.expand(p, store)


def test_symlink_in_zip_refused(tmp_path, store):
    p = str(tmp_path / "l.zip")
    with zipfile.ZipFile(p, "w") as zf:
        info = zipfile.ZipInfo("model.safetensors")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/shadow")
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store)
    assert e.value.reason == "LinkInArchive"


def test_zip_traversal_and_duplicates_refused(tmp_path, store):
    p = str(tmp_path / "t.zip")
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("../../x.json", "{}")
    with pytest.raises(base.UnsafeSourceError):
        archive.expand(p, store)
    p2 = str(tmp_path / "d.tar")
    _tar(p2, [_file("a.json"), _file("a.json", b"[]")])
    with pytest.raises(base.UnsafeSourceError):
        archive.expand(p2, store)
    p3 = str(tmp_path / "fd.tar")
    _tar(p3, [_file("a"), _file("a/b.json")])
    with pytest.raises(base.UnsafeSourceError):
        archive.expand(p3, store)


def test_gzip_bomb_refused_from_declared_sizes(tmp_path, store):
    """100 MiB of zeros in a ~100 KiB tar.gz: over the default ratio, refused unread."""
    p = str(tmp_path / "bomb.tar.gz")
    size = 100 << 20
    with gzip.open(p, "wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tf:
        info = tarfile.TarInfo("model.safetensors")
        info.size = size

        class Zeros(io.RawIOBase):
            left = size

            def readable(self):
                return True

            def readinto(self, b):
                n = min(len(b), self.left)
                b[:n] = bytes(n)
                self.left -= n
                return n

        tf.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    assert os.path.getsize(p) < size // 100
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store)
    assert e.value.reason == "ArchiveBomb"
    assert store.digests() == []


def test_entry_count_and_total_bounds(tmp_path, store):
    p = str(tmp_path / "many.tar")
    _tar(p, [_file(f"f{i}.json") for i in range(20)])
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store, archive.Limits(max_entries=10))
    assert e.value.reason == "ArchiveBomb"
    with pytest.raises(base.UnsafeSourceError):
        archive.expand(p, store, archive.Limits(max_bytes=20))
    zp = str(tmp_path / "many.zip")
    with zipfile.ZipFile(zp, "w") as zf:
        for i in range(20):
            zf.writestr(f"f{i}.json", "{}")
    with pytest.raises(base.UnsafeSourceError):
        archive.expand(zp, store, archive.Limits(max_entries=10))


def test_zip_bomb_ratio(tmp_path, store):
    p = str(tmp_path / "bomb.zip")
    with zipfile.ZipFile(p, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model.safetensors", bytes(80 << 20))
    with pytest.raises(base.UnsafeSourceError) as e:
        archive.expand(p, store)
    assert e.value.reason == "ArchiveBomb"


def test_not_an_archive(tmp_path, store):
    p = str(tmp_path / "x.tar")
    with open(p, "wb") as f:
        f.write(b"plain text, not an archive" * 40)
    with pytest.raises(base.SourceError):
        archive.expand(p, store)
