"""Two real nodes (tests/e2e/cluster2.py): both Ready, a pod on node 1
reaches a pod on node 2 by pod IP and through a ClusterIP Service, and
teardown leaves no process, mount, netns, link or cgroup behind.

Needs root and ``MODELCACHE_NODE_E2E=1 hack/install.d/node-e2e.sh`` (kubelet,
kube-proxy, containerd, CNI plugins); run with ``hack/e2e.sh``.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
from typing import Any

import pytest

from cli.local import registry as localregistry
from modelpack.oci.registry import RegistryClient
from tests.e2e import cluster2, images, nodeenv

pytestmark = pytest.mark.e2e

NS = "two-nodes"


def _pod(name: str, node: str, image: str, command: list[str],
         labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}},
            "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                     # placed by the scheduler, on the node's label
                     "nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "c", "image": image, "command": command}]}}


def _running(core: Any, name: str) -> Any:
    pod = core.read_namespaced_pod(name, NS)
    return pod if pod.status.phase == "Running" and pod.status.pod_ip else None


def _fetch(c: cluster2.Cluster2, pod: str, url: str) -> str:
    """``wget`` in ``pod`` (kubectl exec: API server -> kubelet on its node IP).
    Not ``-T``: busybox-static 1.35 wget segfaults with it here."""
    got = c.kube.kubectl("exec", "-n", NS, pod, "--", "wget", "-q", "-O-", url,
                         check=False, timeout=30)
    return got.stdout if got.returncode == 0 else ""


def test_two_nodes_route_pods_and_services() -> None:
    from kubernetes import client

    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    with localregistry.running() as reg:
        imgs = images.push_images(RegistryClient(reg.host, insecure=True))
        t0 = time.monotonic()
        with cluster2.running(sandbox_image=imgs.pause, registries=[reg.host]) as c:
            cold = time.monotonic() - t0
            core = client.CoreV1Api(c.kube.api_client())
            n1, n2 = c.node_names
            assert all(nodeenv._node_ready(core, n) for n in (n1, n2))
            assert {core.read_node(n).status.addresses[0].address for n in (n1, n2)} == {
                cluster2.node_ip(1), cluster2.node_ip(2)}

            core.create_namespace({"metadata": {"name": NS}})
            nodeenv.wait_for(c.env, "ServiceAccount default in the namespace",
                             lambda: core.read_namespaced_service_account("default", NS),
                             timeout=60)
            core.create_namespaced_pod(NS, _pod(
                "server", n2, imgs.busybox, ["sh", "-c", "mkdir /www && hostname > /www/index.html"
                                             " && exec httpd -f -p 8080 -h /www"],
                labels={"app": "server"}))
            core.create_namespaced_pod(NS, _pod("client", n1, imgs.busybox, ["sleep", "3600"]))
            core.create_namespaced_service(NS, {
                "metadata": {"name": "server"},
                "spec": {"selector": {"app": "server"},
                         "ports": [{"port": 80, "targetPort": 8080}]}})
            t1 = time.monotonic()
            server = nodeenv.wait_for(c.env, "server pod Running", lambda: _running(core, "server"),
                                      timeout=120)
            client_pod = nodeenv.wait_for(c.env, "client pod Running",
                                          lambda: _running(core, "client"), timeout=120)
            pods_up = time.monotonic() - t1
            assert server.spec.node_name == n2 and client_pod.spec.node_name == n1
            assert server.status.pod_ip.startswith("10.244.2.")
            assert client_pod.status.pod_ip.startswith("10.244.1.")

            # node 1's pod -> node 2's pod, by pod IP (routed via node 2's netns)
            by_ip = nodeenv.wait_for(c.env, "client reaches server by pod IP", lambda: _fetch(
                c, "client", f"http://{server.status.pod_ip}:8080/"), timeout=60)
            assert by_ip.strip() == "server"
            # ... and by ClusterIP: node 1's kube-proxy DNATs to the endpoint on node 2
            svc_ip = core.read_namespaced_service("server", NS).spec.cluster_ip
            by_svc = nodeenv.wait_for(c.env, "client reaches server by ClusterIP", lambda: _fetch(
                c, "client", f"http://{svc_ip}/"), timeout=60,
                describe=c.logs)
            assert by_svc.strip() == "server"
            # the host reaches pods too (its routes to the pod CIDRs)
            with urllib.request.urlopen(f"http://{server.status.pod_ip}:8080/", timeout=5) as r:
                assert r.read() == b"server\n"

            core.delete_namespaced_pod("server", NS, grace_period_seconds=1)
            core.delete_namespaced_pod("client", NS, grace_period_seconds=1)
            nodeenv.wait_for(c.env, "pods gone", lambda: not core.list_namespaced_pod(NS).items,
                             timeout=60)
            t2 = time.monotonic()
        teardown = time.monotonic() - t2
    left = cluster2.leftovers(c, netns_before)
    sys.stderr.write(f"two nodes: cold start {cold:.1f}s, pods Running {pods_up:.1f}s, "
                     f"teardown {teardown:.1f}s\n")
    assert not left, left
