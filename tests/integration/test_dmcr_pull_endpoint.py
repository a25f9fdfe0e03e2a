"""The DMCR's pull endpoint: a second registry process on the same storage in
distribution's read-only mode, with its own htpasswd (daemonset/dmcr-*.yaml).

Nodes and SharedPVC materializer Jobs hold only the pull credential, so a
compromised node or a user namespace running a materializer can read models
but never overwrite one. Checked with two real docker-registry processes.
"""

from __future__ import annotations

import os

import pytest

from cli.local import registry as localregistry
from modelpack.errors import ModelPackError
from modelpack.oci.reference import parse
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from modelpack.pull import pull_to_dir
from tests.servers.helpers import same_tree


@pytest.fixture(scope="module")
def dmcr(tmp_path_factory: pytest.TempPathFactory):
    base = str(tmp_path_factory.mktemp("dmcr"))
    data = os.path.join(base, "data")
    with localregistry.running(root=os.path.join(base, "rw"), data_dir=data,
                               username="modelcache", password="push-secret") as rw, \
            localregistry.running(root=os.path.join(base, "ro"), data_dir=data, readonly=True,
                                  username="puller", password="pull-secret") as ro:
        yield rw, ro


def test_pull_endpoint_serves_what_the_push_endpoint_stored(dmcr, small_model, tmp_path) -> None:
    rw, ro = dmcr
    pusher = RegistryClient(rw.host, insecure=True, username="modelcache", password="push-secret")
    digest = pack_to_registry(small_model, pusher,
                              parse(f"{rw.host}/models/team-a/m:v1")).pack.digest
    puller = RegistryClient(ro.host, insecure=True, username="puller", password="pull-secret")
    dest = str(tmp_path / "out")
    pull_to_dir(puller, parse(f"{ro.host}/models/team-a/m@{digest}"), dest)
    same_tree(small_model, dest)


def test_pull_endpoint_refuses_every_write(dmcr, small_model) -> None:
    _, ro = dmcr
    puller = RegistryClient(ro.host, insecure=True, username="puller", password="pull-secret")
    with pytest.raises(ModelPackError):
        pack_to_registry(small_model, puller, parse(f"{ro.host}/models/team-a/evil:v1"))
    with pytest.raises(ModelPackError):
        puller.upload_bytes("models/team-a/evil", b"overwrite")


def test_pull_credential_is_not_a_push_credential(dmcr, small_model) -> None:
    rw, _ = dmcr
    wrong = RegistryClient(rw.host, insecure=True, username="puller", password="pull-secret")
    with pytest.raises(ModelPackError):
        pack_to_registry(small_model, wrong, parse(f"{rw.host}/models/team-a/evil:v1"))


def test_node_plugin_pulls_through_the_pull_endpoint(dmcr, small_model, tmp_path) -> None:
    """modelcache-node --pull-via RW=RO --registry-credentials DIR: references
    name the push endpoint, bytes come from the read-only one."""
    from csi.main import Clients, pull_via_arg, read_credentials

    rw, ro = dmcr
    pusher = RegistryClient(rw.host, insecure=True, username="modelcache", password="push-secret")
    digest = pack_to_registry(small_model, pusher,
                              parse(f"{rw.host}/models/team-a/n:v1")).pack.digest
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "username").write_text("puller\n")
    (creds / "password").write_text("pull-secret\n")
    clients = Clients([ro.host], None, pull_via=pull_via_arg([f"{rw.host}={ro.host}"]),
                      credentials=read_credentials(str(creds)))
    client = clients(rw.host)
    assert client.host == ro.host and clients(rw.host) is client
    dest = str(tmp_path / "out")
    pull_to_dir(client, parse(f"{rw.host}/models/team-a/n@{digest}"), dest)
    same_tree(small_model, dest)
    with pytest.raises(ValueError, match="FROM=TO"):
        pull_via_arg(["no-equals-sign"])
