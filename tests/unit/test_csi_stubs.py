"""The generated gRPC stubs match proto/csi.proto, and the proto matches CSI's wire format."""

from __future__ import annotations

from csi import stubs
from csi.stubs import pb, rpc


def test_generated_stubs_are_fresh():
    assert stubs.current_stamp() == stubs.expected_stamp(), \
        "csi/gen is stale: delete it or import csi.stubs to regenerate"


def test_descriptor_matches_the_proto_file():
    # the loaded module is the one built from proto/csi.proto right now
    names = set(pb.DESCRIPTOR.services_by_name)
    assert names == {"Identity", "Node"}
    assert pb.DESCRIPTOR.package == "csi.v1"
    assert hasattr(rpc, "add_NodeServicer_to_server")


def test_wire_numbers_of_kubelet_facing_fields():
    f = pb.NodePublishVolumeRequest.DESCRIPTOR.fields_by_name
    assert {n: f[n].number for n in f} == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8}
    cap = pb.VolumeCapability.DESCRIPTOR.fields_by_name
    assert (cap["block"].number, cap["mount"].number, cap["access_mode"].number) == (1, 2, 3)
    info = pb.NodeGetInfoResponse.DESCRIPTOR.fields_by_name
    assert (info["node_id"].number, info["max_volumes_per_node"].number,
            info["accessible_topology"].number) == (1, 2, 3)
    rpc_type = pb.NodeServiceCapability.RPC
    assert (rpc_type.GET_VOLUME_STATS, rpc_type.VOLUME_CONDITION) == (2, 4)
    # a message encoded with the spec's numbers decodes field by field
    raw = pb.NodeUnpublishVolumeRequest(volume_id="a", target_path="/t").SerializeToString()
    assert raw == b"\n\x01a\x12\x02/t"
