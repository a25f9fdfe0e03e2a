"""Every digest check on the read path, served wrong bytes for exactly that check.

Each test makes one check the only thing between wrong bytes and a
visible result, through a real server: the real ``docker-registry`` with
its storage changed on disk (a blob's bytes, same length), or a loopback
proxy in front of it that answers one request with other bytes
(``_Tamper``). It then asserts the typed failure (``IntegrityError``,
reason ``DigestMismatch``; a Job's ``MaterializeError`` or a publish's
``PublishError`` with that reason, terminal) and that nothing unverified
became visible: no tree, no committed blob that does not hash to its
name, no ``.part`` left to resume from, no tag.

The registry here is this module's own (``own``): a blob changed on disk
is changed for every repository that shares it, so the session registry
other tests push to is never tampered with. Each test's model has its own
seed and family, so no two tests share a blob either.

Checks and their tests (the consumers are the CLI's ``pull_to_dir``, the
node cache's ``pull_to_store`` and the SharedPVC materializer):
- ``RegistryClient.get_manifest``, a manifest pinned by digest: ``test_manifest_*``
- ``RegistryClient.get_blob_bytes``, a config: ``test_config_blob_*``, and the
  Ollama source, which reads its config through that check alone
- ``manifest.parse_config``, the only check of a layout's config, and ``layout.read``
  then ``parse_manifest``, a layout's manifest: ``test_layout_blob_*``
- ``PartialBlob.finish`` under ``BlobStore.commit``, a weight: ``test_weight_blob_*``;
  a resumed download whose kept prefix was changed between runs: ``test_resumed_*``
- ``manifest.parse_manifest`` (digest given), the materializer's record: ``test_materialize_record_*``
- ``RegistryClient.put_manifest``, the digest the registry says it stored:
  ``test_registry_storing_*``
"""

from __future__ import annotations

import glob
import http.client
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli.local import registry as localregistry
from ingest.publish import PublishError, publish
from ingest.sources import open_source
from jobs import materialize as mat
from modelpack import digest as dg
from modelpack import pull as mpull
from modelpack.errors import IntegrityError
from modelpack.oci import layout as oci_layout
from modelpack.oci.manifest import ModelPack
from modelpack.oci.reference import Reference, parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_layout, pack_to_registry
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.servers import ollama

CONSUMERS = ("pull_to_dir", "node_store", "materialize")
# what a consumer of a refused model may leave beside it: the materializer's lock file
LOCK_ONLY = [mat.LOCK_NAME]

Rewrite = Callable[[bytes, dict[str, str]], tuple[bytes, dict[str, str]]]


class _Tamper:
    """A loopback proxy in front of a registry; ``rules[(METHOD, path)]`` rewrites
    one answer (its body and headers) and every other request passes as it is.
    Whole bodies are buffered: the models here are a few MiB."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.rules: dict[tuple[str, str], Rewrite] = {}
        self.hits: list[tuple[str, str]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out = {k: v for k, v in resp.getheaders()
                           if k.lower() not in ("connection", "transfer-encoding")}
                finally:
                    conn.close()
                if "Location" in out:
                    out["Location"] = out["Location"].replace(proxy.upstream, proxy.host)
                key = (self.command, urllib.parse.urlsplit(self.path).path)
                rule = proxy.rules.get(key)
                if rule is not None:
                    proxy.hits.append(key)
                    data, out = rule(data, out)
                    if self.command != "HEAD":
                        out["Content-Length"] = str(len(data))
                self.send_response(resp.status)
                for k, v in out.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def own() -> Iterator[localregistry.LocalRegistry]:
    with localregistry.running() as reg:
        yield reg


@pytest.fixture(scope="module")
def own_client(own: localregistry.LocalRegistry) -> RegistryClient:
    return RegistryClient(own.host, insecure=True, retries=1)


@pytest.fixture
def tamper(own: localregistry.LocalRegistry) -> Iterator[_Tamper]:
    proxy = _Tamper(own.host)
    yield proxy
    proxy.close()


def _push(own: localregistry.LocalRegistry, client: RegistryClient, root: str, repo: str,
          seed: int) -> ModelPack:
    modelgen.make_safetensors_model(root, family=f"dc{seed}", seed=seed)
    return pack_to_registry(root, client, parse(f"{own.host}/{repo}:v1")).pack


def _swap_on_disk(path: str, old: bytes, new: bytes) -> None:
    """Change a stored blob in place, same length, so only its digest can tell."""
    assert len(old) == len(new)
    os.chmod(path, 0o644)  # a layout's blobs are read-only; the registry's are not
    with open(path, "rb") as f:
        data = f.read()
    assert old in data, (old, data[:200])
    with open(path, "wb") as f:
        f.write(data.replace(old, new, 1))


def _flip(path: str, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def _refused(consumer: str, client: RegistryClient, ref: Reference, work: str,
             bad: str | None = None) -> None:
    """``consumer`` refuses ``ref`` (DigestMismatch, terminal) and shows nothing unverified.

    ``work``: an empty directory for the consumer's output; ``bad``: the digest whose
    bytes were wrong, never committed anywhere.
    """
    os.makedirs(work)
    if consumer == "materialize":
        dest = os.path.join(work, "pvc")
        with pytest.raises(mat.MaterializeError) as m:
            mat.materialize(client, ref, dest)
        assert m.value.reason == "DigestMismatch" and not m.value.retryable, m.value
        assert sorted(os.listdir(dest)) == LOCK_ONLY, "no tree, record or staging may remain"
        return
    store = BlobStore(os.path.join(work, "store")) if consumer == "node_store" else None
    with pytest.raises(IntegrityError) as e:
        if store is None:
            mpull.pull_to_dir(client, ref, os.path.join(work, "dest"))
        else:
            mpull.pull_to_store(client, ref, store)
    assert e.value.reason == "DigestMismatch" and not e.value.retryable, e.value
    if store is None:
        assert os.listdir(work) == [], "no tree and no staging may remain"
        return
    # blobs that did verify may stay; none is under a name its bytes do not hash to
    assert store.scrub() == []
    assert os.listdir(store.ingest_dir) == [], "a bad .part is discarded"
    if bad is not None:
        assert not store.has(bad)


# --- manifests -----------------------------------------------------------------------


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_manifest_that_does_not_hash_to_the_pinned_digest_is_refused(
        consumer, own, own_client, tamper, tmp_path):
    """Asked for A by digest, the registry answers with B's manifest: a real ModelPack,
    complete in the registry, that would pull cleanly under its own digest."""
    repo = f"dc/manifest-{consumer}"
    seed = 1300 + 2 * CONSUMERS.index(consumer)
    a = _push(own, own_client, str(tmp_path / "a"), repo, seed=seed)
    b = _push(own, own_client, str(tmp_path / "b"), f"{repo}-b", seed=seed + 1)
    tamper.rules[("GET", f"/v2/{repo}/manifests/{a.digest}")] = \
        lambda _body, headers: (b.manifest_bytes, headers)
    via = RegistryClient(tamper.host, insecure=True, retries=0)
    _refused(consumer, via, Reference(tamper.host, repo, digest=a.digest),
             str(tmp_path / "run"))
    assert tamper.hits, "the wrong manifest was served"


# --- config blobs --------------------------------------------------------------------


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_config_blob_swapped_is_refused(consumer, own, own_client, tmp_path):
    seed = 1310 + CONSUMERS.index(consumer)
    pack = _push(own, own_client, str(tmp_path / "src"), f"dc/config-{consumer}", seed=seed)
    _swap_on_disk(own.blob_path(pack.config_digest), f"dc{seed}".encode(), f"DC{seed}".encode())
    _refused(consumer, own_client, parse(f"{own.host}/dc/config-{consumer}:v1"),
             str(tmp_path / "run"), bad=pack.config_digest)


def test_config_blob_read_alone_is_verified(own, own_client, tmp_path):
    """``get_blob_bytes`` is the only check for a caller that reads a config by itself
    (the Ollama source, below); ``resolve`` checks it a second time in ``assemble``."""
    pack = _push(own, own_client, str(tmp_path / "src"), "dc/config-alone", seed=1314)
    _swap_on_disk(own.blob_path(pack.config_digest), b"dc1314", b"XXXXXX")
    with pytest.raises(IntegrityError) as e:
        own_client.get_blob_bytes("dc/config-alone", pack.config_digest)
    assert e.value.reason == "DigestMismatch"


def test_ollama_config_blob_swapped_fails_the_publish(own, own_client, client, registry,
                                                      tmp_path):
    """The Ollama source reads its config (the model's family, type, file type) through
    ``get_blob_bytes`` alone; swapped, the publish fails and nothing is tagged."""
    modelgen.make_gguf_model(str(tmp_path / "g"), seed=1315)
    pushed = ollama.push_model(own_client, "library/dc-config", "1b",
                               str(tmp_path / "g" / "model.gguf"), family="dcfam1315")
    cfg = pushed["manifest"]["config"]["digest"]  # type: ignore[index]
    _swap_on_disk(own.blob_path(cfg), b"dcfam1315", b"DCFAM1315")
    src = open_source(f"ollama://{own.host}/library/dc-config:1b")
    with pytest.raises(IntegrityError) as s:
        src.resolve()
    assert s.value.reason == "DigestMismatch" and not s.value.retryable
    work = str(tmp_path / "work")
    with pytest.raises(PublishError) as e:
        publish(src, client, f"{registry.host}/models/dc-ollama-config:1b", work_dir=work)
    assert e.value.reason == "DigestMismatch" and not e.value.retryable, e.value
    assert client.list_tags("models/dc-ollama-config") == []
    assert not os.path.exists(work) or not os.listdir(work)


@pytest.mark.parametrize("blob", ["config", "manifest"])
def test_layout_blob_swapped_is_refused(blob, tmp_path):
    """A layout's config is checked by ``parse_config`` alone (no registry client); its
    manifest against ``index.json``'s digest by ``layout.read`` and again by
    ``parse_manifest``. Each swapped for bytes that still parse (a family renamed, a
    file renamed), the layout is refused."""
    src = str(tmp_path / "src")
    seed = 1316 + (blob == "manifest")
    modelgen.make_safetensors_model(src, family=f"dc{seed}", seed=seed)
    out = str(tmp_path / "oci")
    pack = pack_to_layout(src, out).pack
    if blob == "config":
        _swap_on_disk(BlobStore(out).path(pack.config_digest), f"dc{seed}".encode(),
                      f"DC{seed}".encode())
    else:
        _swap_on_disk(BlobStore(out).path(pack.digest), b'"README.md"', b'"README.MD"')
    with pytest.raises(IntegrityError) as e:
        oci_layout.read(out)
    assert e.value.reason == "DigestMismatch"


# --- weight blobs --------------------------------------------------------------------


@pytest.mark.parametrize("consumer", CONSUMERS)
def test_weight_blob_swapped_is_refused(consumer, own, own_client, tmp_path):
    pack = _push(own, own_client, str(tmp_path / "src"), f"dc/weight-{consumer}",
                 seed=1320 + CONSUMERS.index(consumer))
    weight = next(x for x in pack.layers if x.path == "model.safetensors")
    _flip(own.blob_path(weight.digest), weight.size // 2)  # a tensor byte: the format holds
    _refused(consumer, own_client, parse(f"{own.host}/dc/weight-{consumer}:v1"),
             str(tmp_path / "run"), bad=weight.digest)


# --- a resumed download --------------------------------------------------------------


@pytest.mark.parametrize("consumer", ("pull_to_dir", "node_store"))
def test_resumed_download_with_a_changed_prefix_never_commits(consumer, own, own_client,
                                                             tmp_path):
    """A pull cut half way keeps its ``.part``; a byte of that prefix changes on disk
    before the next run. The next run resumes (rehashing the prefix it keeps), fails
    DigestMismatch and discards the ``.part``; the run after starts from byte 0 and
    succeeds. The bad bytes are never committed under the digest's name."""
    src = str(tmp_path / "src")
    seed = 1330 + (consumer == "node_store")
    modelgen.make_big_model(src, files=1, total=12 << 20, seed=seed)
    repo = f"dc/resume-{consumer}"
    pack = pack_to_registry(src, own_client, parse(f"{own.host}/{repo}:v1")).pack
    weight = max(pack.layers, key=lambda x: x.size)
    ref = parse(f"{own.host}/{repo}:v1")
    store = BlobStore(str(tmp_path / "store"))
    dest = str(tmp_path / "dest")

    def run(progress: Callable[[int], None] = lambda _: None) -> None:
        if consumer == "pull_to_dir":
            mpull.pull_to_dir(own_client, ref, dest, progress=progress, workers=1)
        else:
            mpull.pull_to_store(own_client, ref, store, progress=progress, workers=1)

    seen = 0

    def cut(n: int) -> None:
        nonlocal seen
        seen += n
        if seen > 2 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(cut)
    parts = glob.glob(str(tmp_path / "**" / f"{dg.hex_of(weight.digest)}.part"),
                      recursive=True, include_hidden=True)  # pull_to_dir stages in a dot dir
    assert len(parts) == 1 and os.path.getsize(parts[0]) > 4096, parts
    _flip(parts[0], 4000)  # inside the kept prefix: a later Range GET never sees it

    with pytest.raises(IntegrityError) as e:
        run()
    assert e.value.reason == "DigestMismatch" and not e.value.retryable
    assert not os.path.exists(parts[0]), "the bad prefix is discarded, not resumed again"
    assert not os.path.exists(dest)
    assert not store.has(weight.digest) and store.scrub() == []

    run()  # from byte 0
    if consumer == "pull_to_dir":
        mpull.verify_tree(pack, dest)
    else:
        assert dg.of_file(store.path(weight.digest)) == (weight.digest, weight.size)


# --- the materializer's record of a tree ---------------------------------------------


def test_materialize_record_that_does_not_hash_to_its_digest_is_not_trusted(
        own, own_client, tmp_path):
    """A re-run trusts a tree by its manifest record (no registry call). A record whose
    bytes are another manifest, listing the same paths and sizes, is not that tree's
    record: the tree is rebuilt from the registry, not trusted."""
    a = _push(own, own_client, str(tmp_path / "a"), "dc/record", seed=1340)
    b = _push(own, own_client, str(tmp_path / "b"), "dc/record-b", seed=1341)
    # same paths and sizes (only seeds differ): only the record's digest tells them apart
    assert sorted((x.path, x.size) for x in a.layers) == sorted((x.path, x.size) for x in b.layers)
    dest = str(tmp_path / "pvc")
    ref = Reference(own.host, "dc/record", digest=a.digest)
    first = mat.materialize(own_client, ref, dest)
    with open(mat.record_path(dest, a.digest), "wb") as f:
        f.write(b.manifest_bytes)
    again = mat.materialize(own_client, ref, dest, a.digest)
    assert not again.skipped, "a record that is not the manifest must not vouch for the tree"
    assert again.path == first.path
    mpull.verify_tree(a, again.path)
    with open(mat.record_path(dest, a.digest), "rb") as f:
        assert dg.of_bytes(f.read()) == a.digest


# --- what the registry says it stored ------------------------------------------------


def test_registry_storing_another_manifest_is_an_integrity_error(own, own_client, tamper,
                                                                  tmp_path):
    """The registry answers a manifest PUT with the digest it stored; one that is not
    the digest of the bytes sent fails the push (the tag cannot be trusted)."""
    src = str(tmp_path / "src")
    modelgen.make_safetensors_model(src, family="dc1350", seed=1350)
    other = "sha256:" + "0" * 64

    def lie(body: bytes, headers: dict[str, str]) -> tuple[bytes, dict[str, str]]:
        return body, {**headers, "Docker-Content-Digest": other}

    tamper.rules[("PUT", "/v2/dc/stored/manifests/v1")] = lie
    via = RegistryClient(tamper.host, insecure=True, retries=0)
    with pytest.raises(IntegrityError) as e:
        pack_to_registry(src, via, parse(f"{tamper.host}/dc/stored:v1"))
    assert e.value.reason == "DigestMismatch" and other in str(e.value)
