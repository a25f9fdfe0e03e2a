"""Blobs streamed registry to registry: the registry client's helpers and catalog imports.

Real docker-registries on loopback. The "catalog" here is a plain registry
reached as ``catalog+http://127.0.0.1:PORT#REPO@DIGEST`` (its OCI endpoints
are what an import reads; the catalog server's own auth and TLS are covered
by test_catalog_import.py), behind tests/flakyproxy.py where a connection
must drop. Acceptance: an import streams every blob into B byte-identical,
restarts only the blob that was cut, skips what B has; a weight file whose
header is wrong is checked on the streamed bytes and never committed; an
upload refused before its commit leaves no blob; a blob inside an archive is
pushed from its offset.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from cli.local import registry as localregistry
from ingest.publish import catalog_import
from ingest.sources import catalog
from modelpack import digest as dg
from modelpack.errors import FormatError, IntegrityError
from modelpack.oci.manifest import Layer
from modelpack.oci.reference import Reference, parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import modelgen
from tests.flakyproxy import FlakyProxy
from tests.servers.helpers import pull_back, same_tree


@pytest.fixture(scope="module")
def dest() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running() as reg:
        yield reg


def _import(base: str, repo: str, digest: str, dest: RegistryClient, to: str,
            work: str) -> catalog_import.ImportResult:
    return catalog_import.import_model(catalog.build_uri(base, repo, digest), dest,
                                Reference(dest.host, to, tag="v1"), token=None,
                                work_dir=work, wait=5.0, max_delay=0.5)


def test_import_streams_restarts_only_the_cut_blob_and_skips_what_b_has(
        registry: localregistry.LocalRegistry, client: RegistryClient,
        dest: localregistry.LocalRegistry, tmp_path: Any) -> None:
    src = str(tmp_path / "src")
    modelgen.make_big_model(src, files=3, total=24 << 20, seed=61)
    pack = pack_to_registry(src, client, parse(f"{registry.host}/cluster/stream:v1")).pack
    b = RegistryClient(dest.host, insecure=True)
    work = str(tmp_path / "work")
    proxy = FlakyProxy(registry.host)
    try:
        proxy.cut_after, proxy.cuts_left = 3 << 20, 1  # the first blob GET drops at 3 MiB
        res = _import(f"http://{proxy.host}", "cluster/stream", pack.digest, b,
                      "cluster/stream", work)
        assert res.digest == pack.digest and res.skipped == 0
        blobs = len({x.digest for x in pack.layers})
        # each blob once, the config once, and the cut one again from its first byte
        assert proxy.requests["GET blob"] == blobs + 2
        assert proxy.ranges == []
        cut_once = proxy.bytes_sent
        assert pack.size + (3 << 20) <= cut_once < pack.size + (4 << 20)

        again = _import(f"http://{proxy.host}", "cluster/stream", pack.digest, b,
                        "cluster/stream", work)
        assert again.skipped == pack.size  # everything was in B: only the config is read
        assert proxy.requests["GET blob"] == blobs + 3
    finally:
        proxy.close()
    raw, _, _ = b.get_manifest(Reference(dest.host, "cluster/stream", digest=pack.digest))
    assert raw == pack.manifest_bytes
    out = str(tmp_path / "pulled")
    pull_back(b, f"{dest.host}/cluster/stream@{pack.digest}", out)
    same_tree(src, out)
    assert os.listdir(work) == []  # nothing staged is left behind


def _bad_weights(root: str) -> bytes:
    """``model.safetensors`` with 8 bytes past the end of its tensor data."""
    with open(os.path.join(root, "model.safetensors"), "rb") as f:
        return f.read() + b"\0" * 8


def test_a_bad_safetensors_header_is_checked_on_the_stream_and_never_committed(
        registry: localregistry.LocalRegistry, client: RegistryClient,
        dest: localregistry.LocalRegistry, tmp_path: Any) -> None:
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=62)
    good = pack_to_registry(src, client, parse(f"{registry.host}/cluster/badhead:v1")).pack
    # the same model with its weights swapped for a file of the right digest but a header
    # that does not cover it: what only a format check can catch (the publish path refuses
    # to pack it, so the manifest is written by hand)
    bad = _bad_weights(src)
    bad_digest = client.upload_bytes("cluster/badhead", bad)
    manifest = json.loads(good.manifest_bytes)
    for layer in manifest["layers"]:
        if layer["annotations"]["org.cncf.model.filepath"] == "model.safetensors":
            layer["digest"], layer["size"] = bad_digest, len(bad)
    raw = json.dumps(manifest).encode()
    digest = client.put_manifest("cluster/badhead", "v2", raw)
    b = RegistryClient(dest.host, insecure=True)
    work = str(tmp_path / "work")
    with pytest.raises(FormatError) as e:
        _import(f"http://{registry.host}", "cluster/badhead", digest, b, "cluster/badhead",
                work)
    assert e.value.reason == "TrailingData" and "model.safetensors" in str(e.value)
    assert not b.blob_exists("cluster/badhead", bad_digest)
    assert b.list_tags("cluster/badhead") == []
    assert not os.path.exists(work) or os.listdir(work) == []


def test_a_gguf_model_is_imported_with_its_header_checked(
        registry: localregistry.LocalRegistry, client: RegistryClient,
        dest: localregistry.LocalRegistry, tmp_path: Any) -> None:
    src = str(tmp_path / "src")
    modelgen.make_gguf_model(src, seed=63)
    pack = pack_to_registry(src, client, parse(f"{registry.host}/cluster/gguf:v1")).pack
    b = RegistryClient(dest.host, insecure=True)
    res = _import(f"http://{registry.host}", "cluster/gguf", pack.digest, b, "cluster/gguf",
                  str(tmp_path / "work"))
    assert res.resolved["format"] == "GGUF"
    out = str(tmp_path / "pulled")
    pull_back(b, f"{dest.host}/cluster/gguf@{pack.digest}", out)
    same_tree(src, out)


def test_the_probe_reads_a_header_that_arrives_in_small_pieces(tmp_path: Any) -> None:
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, seed=64)
    for data, reason in ((open(os.path.join(src, "model.safetensors"), "rb").read(), None),
                         (_bad_weights(src), "TrailingData")):
        layer = Layer("model.safetensors", dg.of_bytes(data), len(data),
                      "application/vnd.cncf.model.weight.v1.raw")
        probe = catalog_import._Probe(layer, str(tmp_path), allow_pickle=False)
        try:
            view = memoryview(data)
            for at in range(0, len(data), 3):  # the 8-byte length split across reads
                probe.feed(view[at:at + 3], at)
            (hlen,) = struct.unpack("<Q", data[:8])
            assert probe.want == 8 + hlen < len(data)  # the header, not the tensors
            if reason is None:
                probe.check()
            else:
                with pytest.raises(FormatError) as e:
                    probe.check()
                assert e.value.reason == reason
        finally:
            probe.close()
        assert not os.path.exists(probe.dir)


def test_upload_refused_before_commit_leaves_no_blob(client: RegistryClient) -> None:
    data = os.urandom(1 << 20)

    def refuse() -> None:
        raise FormatError("refused by the check", reason="Refused")

    with pytest.raises(FormatError):
        client.upload_blob("stream/refused", lambda: _Bytes(data), len(data),
                           digest=dg.of_bytes(data), before_commit=refuse)
    assert not client.blob_exists("stream/refused", dg.of_bytes(data))
    lie = data[:-1] + bytes([data[-1] ^ 1])  # a source that lies about its last byte
    with pytest.raises(IntegrityError):
        client.upload_blob("stream/refused", lambda: _Bytes(lie), len(data),
                           digest=dg.of_bytes(data))
    assert not client.blob_exists("stream/refused", dg.of_bytes(data))


def test_upload_file_pushes_a_region_of_an_archive(client: RegistryClient, tmp_path: Any
                                                   ) -> None:
    blob = os.urandom((3 << 20) + 5)
    path = str(tmp_path / "archive")
    with open(path, "wb") as f:
        f.write(os.urandom(4096) + blob + os.urandom(777))
    d = dg.of_bytes(blob)
    client.upload_file("stream/region", path, len(blob), d, offset=4096)
    assert client.get_blob_bytes("stream/region", d) == blob
    # the streamed path (a TLS registry, or sendfile refused) takes a region too
    streamed = RegistryClient(client.host, insecure=True)
    streamed._patch_sendfile = lambda *a, **k: None  # type: ignore[method-assign]
    other = os.urandom(100_000)
    with open(path, "r+b") as f:
        f.seek(12345)
        f.write(other)
    streamed.upload_file("stream/region", path, len(other), dg.of_bytes(other), offset=12345)
    assert streamed.get_blob_bytes("stream/region", dg.of_bytes(other)) == other


class _Bytes:
    """A stream over bytes, without ``readinto``: upload_blob's plain ``read`` path."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def read(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def __enter__(self) -> _Bytes:
        return self

    def __exit__(self, *_: object) -> None:
        pass
