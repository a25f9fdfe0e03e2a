"""Registry mirrors (``modelpack.oci.mirrors``) against real registries on loopback.

The DMCR is a real docker-registry behind a counting proxy (``FlakyProxy``);
the good mirror is a second docker-registry in pull-through-cache mode in
front of it; the bad mirror is a fake that answers every blob with garbage of
the right size and records what it was sent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse

import pytest

from api import names as contract
from cli.local import registry as localregistry
from controller import jobspec
from controller.delivery import materializer
from controller.models.publishjob import Settings
from modelpack.oci import mirrors
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import place, pull_to_store, verify_tree
from modelpack.store.blobs import BlobStore
from tests import modelgen
from tests.flakyproxy import FlakyProxy
from tests.servers.badmirror import BadMirror

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


@pytest.mark.parametrize("build", ["debian-2.8", "v3"])
def test_pull_through_mirror_serves_later_nodes_without_the_dmcr(open_dmcr, tmp_path, build):
    reg, proxy = open_dmcr
    pack = _push(reg, tmp_path, "fan/out")
    blobs = {layer.digest for layer in pack.layers} | {pack.config_digest}
    binary = localregistry.distribution_v3() if build == "v3" else None
    with localregistry.running(proxy={"remoteurl": f"http://{proxy.host}"},
                               binary=binary) as mirror:
        config = mirrors.load(flags=[f"{proxy.host}=http://{mirror.host}"])
        _pull(_node_client(proxy, reg, config), proxy.host, "fan/out", pack.digest,
              str(tmp_path / "node0"))
        # distribution 2.8 stores what it proxied in the background: wait for it
        deadline = time.monotonic() + 20
        while not all(os.path.exists(mirror.blob_path(d)) for d in blobs):
            assert time.monotonic() < deadline, "the mirror never stored the blobs"
            time.sleep(0.05)
        first = _blob_gets(proxy)
        bytes_before = proxy.bytes_sent
        for i in range(1, 4):
            _pull(_node_client(proxy, reg, config), proxy.host, "fan/out", pack.digest,
                  str(tmp_path / f"node{i}"))
        assert _blob_gets(proxy) == first, "a later node fetched a blob from the DMCR"
        assert proxy.bytes_sent - bytes_before < 64 << 10  # manifests and pings at most
    # the first node's pull reached the DMCR only through the mirror
    if build == "v3":
        # one upstream fetch per miss, streamed to the node and stored at once: the DMCR
        # served each blob exactly once for the four node caches
        assert first == len(blobs), (first, len(blobs))
    else:
        # distribution 2.8 fetches a missed blob twice (to store, to stream)
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


def _materializer_hosts_file(tmp_path, registry_host: str, config: mirrors.Mirrors,
                             reference: str) -> tuple[list[str], str]:
    """The manager's half: the Job's command and its Secret's hosts.toml, written where a
    test can hand it to the materializer (the Job would see it under the Secret's mount)."""
    settings = Settings(namespace="modelcache", registry=registry_host,
                        registry_mirrors=config)
    listed = materializer.mirrors_of(settings, reference)
    files = materializer.mirror_files(listed)
    pvc = {"metadata": {"namespace": "team", "name": "claim", "uid": "u1"}}
    job = materializer.build_job(pvc, "sha256:" + "0" * 64, reference, settings, True)
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    path = tmp_path / materializer.MIRRORS_KEY
    path.write_bytes(files[materializer.MIRRORS_KEY])
    return cmd, str(path)


def _materialize(reference: str, digest: str, dest, hosts_file: str, env=None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "controller.main", "materialize", "--reference", reference,
         "--digest", digest, "--dest", str(dest), "--insecure",
         "--registry-hosts-file", hosts_file],
        cwd=REPO_ROOT, capture_output=True, timeout=120, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_materializer_pulls_through_the_managers_mirror(open_dmcr, tmp_path):
    reg, proxy = open_dmcr
    pack = _push(reg, tmp_path, "mat/mirror")
    reference = f"{proxy.host}/mat/mirror@{pack.digest}"
    with localregistry.running(proxy={"remoteurl": f"http://{proxy.host}"}) as mirror:
        hosts = tmp_path / "certs.d" / proxy.host
        hosts.mkdir(parents=True)
        (hosts / "hosts.toml").write_text(f'[host."http://{mirror.host}"]\n'
                                          '  capabilities = ["pull"]\n')
        config = mirrors.load(hosts_dir=str(tmp_path / "certs.d"))
        cmd, hosts_file = _materializer_hosts_file(tmp_path, proxy.host, config, reference)
        assert cmd[cmd.index("--registry-hosts-file") + 1].endswith(materializer.MIRRORS_KEY)
        _materialize(reference, pack.digest, tmp_path / "pvc0", hosts_file)
        first = _blob_gets(proxy)
        blobs = {layer.digest for layer in pack.layers}
        deadline = time.monotonic() + 20
        while not all(os.path.exists(mirror.blob_path(d)) for d in blobs):
            assert time.monotonic() < deadline, "the mirror never stored the blobs"
            time.sleep(0.05)
        out = _materialize(reference, pack.digest, tmp_path / "pvc1", hosts_file)
        assert not out["skipped"] and out["files"] == len(pack.layers)
        assert _blob_gets(proxy) == first, "the second materializer fetched from the DMCR"
    tree = tmp_path / "pvc1" / contract.pvc_subpath(pack.digest)
    verify_tree(pack, str(tree))


def test_materializer_falls_back_to_the_dmcr_past_bad_mirrors(dmcr, tmp_path):
    reg, proxy = dmcr
    pack = _push(reg, tmp_path, "mat/fallback")
    reference = f"{proxy.host}/mat/fallback@{pack.digest}"
    dead = f"http://127.0.0.1:{localregistry.free_port()}"
    with BadMirror({layer.digest: layer.size for layer in pack.layers}) as bad:
        config = mirrors.load(flags=[f"{proxy.host}={bad.url}", f"{proxy.host}={dead}"])
        _, hosts_file = _materializer_hosts_file(tmp_path, proxy.host, config, reference)
        out = _materialize(reference, pack.digest, tmp_path / "pvc", hosts_file,
                           {"MODELCACHE_REGISTRY_USERNAME": reg.username,
                            "MODELCACHE_REGISTRY_PASSWORD": reg.password})
        assert out["digest"] == pack.digest and out["files"] == len(pack.layers)
        assert bad.seen and all(auth is None for _, _, auth in bad.seen)
    assert _blob_gets(proxy) >= len(pack.layers)  # the DMCR served what the mirrors did not
    verify_tree(pack, str(tmp_path / "pvc" / contract.pvc_subpath(pack.digest)))


def test_no_mirrors_no_hosts_file_for_the_materializer():
    settings = Settings(namespace="modelcache", registry="dmcr:5000")
    pvc = {"metadata": {"namespace": "team", "name": "claim", "uid": "u1"}}
    job = materializer.build_job(pvc, "sha256:" + "0" * 64, "dmcr:5002/m@sha256:" + "0" * 64,
                                 settings, False)
    assert "--registry-hosts-file" not in job["spec"]["template"]["spec"]["containers"][0][
        "command"]


def test_the_materializers_hosts_toml_keeps_every_setting(tmp_path):
    """What the manager hands a Job reads back as the mirrors it was given: order, paths,
    capabilities, TLS settings and headers; each ca/client file travels in the Secret."""
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.crt", "c.key"))
    for f in (ca, cert, key):
        f.write_text(f"pem of {f.name}")
    hosts = tmp_path / "certs.d" / "dmcr:5000"
    hosts.mkdir(parents=True)
    (hosts / "hosts.toml").write_text(
        '[host."https://harbor.example/v2/dmcr-proxy"]\n  override_path = true\n'
        f'  capabilities = ["pull"]\n  ca = "{ca}"\n  client = [["{cert}", "{key}"]]\n'
        '[host."https://harbor.example/v2/dmcr-proxy".header]\n'
        '  Authorization = ["Basic a2V5", "x\\"y"]\n'
        '[host."http://spegel:30020"]\n  skip_verify = true\n  forward_credentials = true\n')
    settings = Settings(namespace="modelcache", registry="dmcr:5000",
                        registry_mirrors=mirrors.load(hosts_dir=str(tmp_path / "certs.d")))
    listed = materializer.mirrors_of(settings, "dmcr:5002/models/a/b@sha256:" + "0" * 64)
    files = materializer.mirror_files(listed)
    back = mirrors.parse_hosts_toml(files.pop(materializer.MIRRORS_KEY).decode())
    assert sorted(files.values()) == [b"pem of c.crt", b"pem of c.key", b"pem of ca.pem"]
    where = {jobspec.path(k): v for k, v in files.items()}
    assert [(m.base, m.repo_prefix, m.capabilities, m.skip_verify, m.forward_credentials,
             m.headers) for m in back] == [
        (m.base, m.repo_prefix, m.capabilities, m.skip_verify, m.forward_credentials,
         m.headers) for m in listed]
    assert where[back[0].ca] == b"pem of ca.pem"
    assert [where[p] for p in back[0].client_cert] == [b"pem of c.crt", b"pem of c.key"]
