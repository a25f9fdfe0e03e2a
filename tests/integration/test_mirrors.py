"""Registry mirrors (``modelpack.oci.mirrors``) against real registries on loopback.

The DMCR is a real docker-registry behind a counting proxy (``FlakyProxy``);
the good mirror is a second docker-registry in pull-through-cache mode in
front of it; the bad mirror is a fake that answers every blob with garbage of
the right size and records what it was sent.
"""

from __future__ import annotations

import os
import time
import urllib.parse

import pytest

from cli.local import registry as localregistry
from modelpack.oci import mirrors
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import place, pull_to_store, verify_tree
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.flakyproxy import FlakyProxy
from tests.servers.badmirror import BadMirror


@pytest.fixture
def dmcr():
    with localregistry.running(username="puller", password="s3cret-pw") as reg:
        proxy = FlakyProxy(reg.host)
        try:
            yield reg, proxy
        finally:
            proxy.close()


@pytest.fixture
def open_dmcr():
    # distribution's proxy cannot log in to an htpasswd (Basic) upstream: anonymous here
    with localregistry.running() as reg:
        proxy = FlakyProxy(reg.host)
        try:
            yield reg, proxy
        finally:
            proxy.close()


def _push(reg, tmp_path, name: str):
    src = str(tmp_path / "model")
    modelgen.make_big_model(src, files=3, total=6 << 20)
    client = RegistryClient(reg.host, insecure=True, username=reg.username,
                            password=reg.password)
    res = pack_to_registry(src, client, parse(f"{reg.host}/{name}:v1"))
    return res.pack


def _node_client(proxy: FlakyProxy, reg, config: mirrors.Mirrors) -> RegistryClient:
    client = RegistryClient(proxy.host, insecure=True, username=reg.username,
                            password=reg.password, retries=1)
    return config.attach(client)


def _pull(client: RegistryClient, host: str, name: str, digest: str, root: str):
    store = BlobStore(root)
    pack = pull_to_store(client, parse(f"{host}/{name}@{digest}"), store)
    dest = os.path.join(root, "tree")
    place(pack, store, dest)
    verify_tree(pack, dest)
    return pack


def _blob_gets(proxy: FlakyProxy) -> int:
    with proxy.lock:
        return proxy.requests["GET blob"]


def test_pull_through_mirror_serves_later_nodes_without_the_dmcr(open_dmcr, tmp_path):
    reg, proxy = open_dmcr
    pack = _push(reg, tmp_path, "fan/out")
    blobs = {layer.digest for layer in pack.layers} | {pack.config_digest}
    with localregistry.running(proxy={"remoteurl": f"http://{proxy.host}"}) as mirror:
        config = mirrors.load(flags=[f"{proxy.host}=http://{mirror.host}"])
        _pull(_node_client(proxy, reg, config), proxy.host, "fan/out", pack.digest,
              str(tmp_path / "node0"))
        first = _blob_gets(proxy)
        # distribution stores what it proxied in the background: wait for it
        deadline = time.monotonic() + 20
        while not all(os.path.exists(mirror.blob_path(d)) for d in blobs):
            assert time.monotonic() < deadline, "the mirror never stored the blobs"
            time.sleep(0.05)
        bytes_before = proxy.bytes_sent
        for i in range(1, 4):
            _pull(_node_client(proxy, reg, config), proxy.host, "fan/out", pack.digest,
                  str(tmp_path / f"node{i}"))
        assert _blob_gets(proxy) == first, "a later node fetched a blob from the DMCR"
        assert proxy.bytes_sent - bytes_before < 64 << 10  # manifests and pings at most
    # the first node's pull reached the DMCR only through the mirror, a bounded number of
    # times per blob (distribution 2.8 fetches a missed blob twice: to store, to stream)
    assert 0 < first <= 2 * len(blobs)


def test_mirror_down_falls_back_to_the_dmcr(dmcr, tmp_path):
    reg, proxy = dmcr
    pack = _push(reg, tmp_path, "fall/back")
    dead = f"http://127.0.0.1:{localregistry.free_port()}"
    config = mirrors.load(flags=[f"{proxy.host}={dead}"])
    t0 = time.monotonic()
    got = _pull(_node_client(proxy, reg, config), proxy.host, "fall/back", pack.digest,
                str(tmp_path / "node"))
    assert got.digest == pack.digest
    assert time.monotonic() - t0 < 10
    assert _blob_gets(proxy) >= len(pack.layers) + 1


def test_lying_mirror_is_skipped_and_never_gets_credentials(dmcr, tmp_path):
    reg, proxy = dmcr
    pack = _push(reg, tmp_path, "evil/mirror")
    sizes = {layer.digest: layer.size for layer in pack.layers}
    hosts = tmp_path / "certs.d" / proxy.host
    with BadMirror(sizes) as bad:
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(
            f'server = "http://{proxy.host}"\n'
            f'[host."{bad.url}"]\n  capabilities = ["pull"]\n')
        config = mirrors.load(hosts_dir=str(tmp_path / "certs.d"))
        client = _node_client(proxy, reg, config)
        got = _pull(client, proxy.host, "evil/mirror", pack.digest, str(tmp_path / "n1"))
        assert got.digest == pack.digest  # verify_tree rehashed every placed file
        store = BlobStore(str(tmp_path / "n1"))
        for layer in pack.layers:
            assert store.has(layer.digest, layer.size)
        asked = len(bad.seen)
        assert asked >= 1
        assert all(auth is None for _, _, auth in bad.seen), "DMCR credentials sent to a mirror"
        assert all(f"ns={urllib.parse.quote(proxy.host)}" in path for _, path, _ in bad.seen)
        assert not any("/manifests/" in path for _, path, _ in bad.seen)  # no "resolve"
        # skipped from then on, by this client
        _pull(client, proxy.host, "evil/mirror", pack.digest, str(tmp_path / "n2"))
        assert len(bad.seen) == asked


def test_resolve_mirror_gets_pinned_manifests_only(dmcr, tmp_path):
    reg, proxy = dmcr
    pack = _push(reg, tmp_path, "pin/only")
    with BadMirror() as bad:
        config = mirrors.load(flags=[f"{proxy.host}={bad.url}"])
        client = _node_client(proxy, reg, config)
        raw, digest, _ = client.get_manifest(parse(f"{proxy.host}/pin/only:v1"))
        assert digest == pack.digest and bad.seen == []  # a tag is the DMCR's to resolve
        client.get_manifest(parse(f"{proxy.host}/pin/only@{pack.digest}"))
        assert [m for m, p, _ in bad.seen if "/manifests/" in p] == ["GET"]


def test_credentials_go_to_a_mirror_only_when_configured(dmcr, tmp_path):
    reg, proxy = dmcr
    pack = _push(reg, tmp_path, "fwd/creds")
    hosts = tmp_path / "certs.d" / proxy.host
    hosts.mkdir(parents=True)
    with BadMirror({pack.config_digest: 10}) as bad:
        (hosts / "hosts.toml").write_text(
            f'[host."{bad.url}"]\n  capabilities = ["pull"]\n  forward_credentials = true\n'
            f'[host."{bad.url}".header]\n  X-Dragonfly-Registry = ["http://{proxy.host}"]\n')
        config = mirrors.load(hosts_dir=str(tmp_path / "certs.d"))
        client = _node_client(proxy, reg, config)
        client.get_blob_bytes("fwd/creds", pack.config_digest)
        assert bad.seen and all(a and a.startswith("Basic ") for _, _, a in bad.seen)
