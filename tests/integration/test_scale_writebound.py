"""bench/scale/writebound.py at a small size, as a correctness test (no timings asserted).

The real kube-apiserver + etcd; gated pods lifted with the lifter's conditional
JSON patch as the manager's ServiceAccount (its RBAC as deployed), W in flight.
Each answer must show the pod ungated and labelled ``gated=false`` (the harness
raises otherwise), so the rate the bench reports is a rate of real lifts, and the
CPU it counts is the servers'. Needs the kube tools (hack/install.d/kube.sh).
"""

from __future__ import annotations

from api import names
from bench.scale import writebound as bench


def test_writebound_lifts_every_pod_as_the_manager() -> None:
    blocks = bench.run(pods=30, block=10, inflight=4, cpus=None, affinity=True,
                       say=lambda _: None)
    assert [b.lifts for b in blocks] == [10, 10, 10]
    assert all(b.seconds > 0 for b in blocks)
    # /proc counts in clock ticks: over the blocks the API server's CPU shows
    assert sum(b.apiserver_cpu for b in blocks) > 0
    assert "lifts/s" in bench.summary(blocks, None)


def test_writebound_patch_is_conditional_and_lifts_only_our_gate() -> None:
    pod = bench.gated_pod(7)
    pod["metadata"]["resourceVersion"] = "42"
    ops = bench.lift_patch(pod, affinity=False)
    assert ops[0] == {"op": "test", "path": "/metadata/resourceVersion", "value": "42"}
    assert {"op": "remove", "path": "/spec/schedulingGates"} in ops
    label = names.LABEL_GATED.replace("~", "~0").replace("/", "~1")
    assert {"op": "add", "path": f"/metadata/labels/{label}", "value": "false"} in ops
