"""The shipped chart, as a platform engineer installs it: ``helm install``
of charts/modelcache on two real nodes (tests/e2e/deployed.py), every
component a pod from the images hack/images.sh builds: the manager (2
replicas, leader election, its webhook registered with and reached by the
API server), the DMCR, the upload gateway, and the node DaemonSet Ready on
both nodes. Teardown leaves nothing behind.

Needs root, hack/images.sh's archives and MODELCACHE_NODE_E2E=1
hack/install.sh (kubelet, kube-proxy, helm, CoreDNS); run with hack/e2e.sh.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from tests.e2e import cluster2, deployed, nodeenv

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def test_chart_installs_on_two_nodes() -> None:
    from kubernetes import client

    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    t0 = time.monotonic()
    with deployed.running() as d:
        c = d.cluster
        t1 = time.monotonic()
        deployed.install(d, hf_endpoint=f"http://{cluster2.HOST_IP}:1")
        nodeenv.wait_for(c.env, "every chart workload Ready",
                         lambda: not deployed.ready_workloads(d), timeout=240,
                         describe=lambda: f"{deployed.ready_workloads(d)}\n"
                                          f"{deployed.describe_pods(d)}")
        d.timings["helm install to Ready"] = time.monotonic() - t1
        core = client.CoreV1Api(c.kube.api_client())
        pods = core.list_namespaced_pod(deployed.NAMESPACE).items
        node_pods = [p for p in pods if p.metadata.labels.get("app.kubernetes.io/component") == "node"]
        assert sorted(p.spec.node_name for p in node_pods) == sorted(c.node_names)
        # every pod from our images (or the named stand-ins), none from the host
        assert {ct.image for p in pods for ct in p.spec.containers} <= set(d.images.values())
        # the chart's Services by name, through CoreDNS
        assert deployed.dns_query(cluster2.HOST_IP, f"dmcr.{deployed.NAMESPACE}.svc.cluster.local")
        # the kubelets registered the driver through the stand-in registrar
        storage = client.StorageV1Api(c.kube.api_client())
        for n in c.node_names:
            nodeenv.wait_for(c.env, f"CSINode {n} has the driver",
                             lambda n=n: nodeenv._csinode_has_driver(storage, n), timeout=60)
        t2 = time.monotonic()
    teardown = time.monotonic() - t2
    left = cluster2.leftovers(c, netns_before)
    sys.stderr.write(f"as deployed: {d.timings} teardown {teardown:.1f}s "
                     f"total {time.monotonic() - t0:.1f}s\n")
    assert not left, left
