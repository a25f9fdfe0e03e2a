"""Attacks on the node plugin's volume checks, over its real gRPC socket.

- A PersistentVolume naming this driver (no ``csi.storage.k8s.io/ephemeral=true``,
  no pod uid) gets no model: INVALID_ARGUMENT, nothing mounted.
- ``--models-file`` mode: a pod names its own model but pins another
  namespace's digest, already in the shared node cache: NOT_FOUND, nothing
  mounted (the pin must be the model's own).
"""

from __future__ import annotations

import os

import grpc
import pytest

from modelpack.oci import reference
from modelpack.oci.registry import RegistryClient
from modelpack.pack import pack_to_registry
from tests import csi_fixtures as cf_
from tests import modelgen

pytestmark = [pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def packs(registry, tmp_path_factory):
    client = RegistryClient(registry.host, insecure=True)
    out = {}
    for ns, name, seed in (("team-a", "mine", 11), ("team-b", "secret", 12)):
        src = str(tmp_path_factory.mktemp(f"src-{name}"))
        modelgen.make_safetensors_model(src, seed=seed)
        ref = reference.parse(f"{registry.host}/models/{ns}/{name}:v1")
        out[name] = pack_to_registry(src, client, ref).pack
    return out


@pytest.fixture
def plugin(tmp_path, registry, packs):
    made = []

    def make(models):
        work = tmp_path / f"plugin{len(made)}"
        work.mkdir()
        mf = str(work / "models.json")
        cf_.write_models_file(mf, models)
        p = cf_.PluginProcess(str(work), str(work / "cache"), mf, [registry.host])
        made.append(p)
        return p.start()

    yield make
    for p in made:
        p.kill()
    cf_.unmount_everything_under(str(tmp_path))


def target(tmp_path, name):
    parent = tmp_path / "pods" / name
    parent.mkdir(parents=True, exist_ok=True)
    return str(parent / "mount")


def code_of(node, req):
    try:
        node.NodePublishVolume(req, timeout=60)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def test_persistent_volume_without_ephemeral_flag_gets_no_model(plugin, registry, tmp_path):
    node = plugin({"team-a/mine": f"{registry.host}/models/team-a/mine:v1"}).node()
    t = target(tmp_path, "pv")
    req = cf_.publish_request("pv-1", t, model="mine")
    del req.volume_context["csi.storage.k8s.io/ephemeral"]
    assert code_of(node, req) == grpc.StatusCode.INVALID_ARGUMENT
    req.volume_context["csi.storage.k8s.io/ephemeral"] = "false"
    assert code_of(node, req) == grpc.StatusCode.INVALID_ARGUMENT
    req = cf_.publish_request("pv-1", t, model="mine")
    del req.volume_context["csi.storage.k8s.io/pod.uid"]
    assert code_of(node, req) == grpc.StatusCode.INVALID_ARGUMENT
    assert not os.path.exists(t)
    # the same volume as a pod's inline one is served
    assert code_of(node, cf_.publish_request("pv-1", t, model="mine")) == grpc.StatusCode.OK
    assert os.path.exists(os.path.join(t, "config.json"))


@pytest.mark.parametrize("mapping", ["tag", "digest"])
def test_pinning_another_namespaces_digest_is_refused(plugin, registry, packs, tmp_path,
                                                      mapping):
    mine, secret = packs["mine"].digest, packs["secret"].digest
    pin = f"@{mine}" if mapping == "digest" else ":v1"
    node = plugin({"team-a/mine": f"{registry.host}/models/team-a/mine{pin}",
                   "team-b/secret": f"{registry.host}/models/team-b/secret:v1"}).node()
    # team-b's pod puts its model into the shared node cache
    victim = target(tmp_path, "victim")
    assert code_of(node, cf_.publish_request("b-1", victim, model="secret",
                                             namespace="team-b")) == grpc.StatusCode.OK
    # team-a's pod names its own model and pins team-b's digest
    t = target(tmp_path, "attacker")
    req = cf_.publish_request("a-1", t, model="mine", namespace="team-a",
                              extra={"digest": secret})
    assert code_of(node, req) == grpc.StatusCode.NOT_FOUND
    assert not os.path.exists(t)
    # its own digest, pinned, is served
    req = cf_.publish_request("a-1", t, model="mine", namespace="team-a",
                              extra={"digest": mine})
    assert code_of(node, req) == grpc.StatusCode.OK
    assert os.path.exists(os.path.join(t, "config.json"))
