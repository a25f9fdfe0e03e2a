"""The shipped chart, as a platform engineer installs it: ``helm install``
of charts/modelcache on two real nodes (tests/e2e/deployed.py), every
component a pod from the images hack/images.sh builds: the manager (2
replicas, leader election, its webhook registered with and reached by the
API server), the DMCR, the upload gateway, and the node DaemonSet Ready on
both nodes with no container restarted. Then the flow a user meets:

- a Model whose source is a Hugging Face-compatible hub (tests/servers/hfhub.py,
  bound on the host's node-bridge address so pods reach it) is published by a
  real publish Job pod, from our controller image, to Ready;
- a Deployment with only the ``modelcache.io/models`` annotation and 2
  replicas spread over both nodes: each replica has the model read-only,
  every file's sha256 (``kubectl exec``) equal to its layer digest in the
  manifest the DMCR serves, and a write fails;
- each node's plugin fetched each layer blob exactly once from the DMCR's
  pull endpoint (its access log, by the plugin pod's address);
- a pod in another namespace naming that Model is refused by the webhook
  (the API server reached it: the refusal is the webhook's own message);
- day 2: ``helm upgrade`` to a new node image tag (the same archive, retagged)
  replaces both node plugin pods; the running readers, never restarted, still
  read every file, and a third replica started afterwards mounts the model;
- day 2: the manager's leader hung (SIGSTOP) then killed: the standby takes
  the lease once it expires and publishes the next Model; one publish Job per
  Model, none repeated.

Teardown leaves nothing behind. Needs root, hack/images.sh's archives and
MODELCACHE_NODE_E2E=1 hack/install.sh (kubelet, kube-proxy, helm, CoreDNS);
run with hack/e2e.sh.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

import pytest

from api import names as c
from cli.local import hub as localhub
from modelpack.oci.manifest import layers_of, parse_manifest
from tests import modelgen
from tests.e2e import cluster2, deployed, nodeenv

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(1200)]

GROUP, VERSION = "modelcache.io", "v1alpha1"
TEAM, OTHER = "e2e-team", "e2e-other"
MODEL, SECOND, REPO = "tiny", "second", "e2e/tiny"
LEASE = "modelcache-controller"  # the manager's leader election Lease (controller/app.py)
APP = "model-reader"
MOUNT = f"{c.MOUNT_ROOT}/{MODEL}"


class PodReachableHub(localhub.HubServer):
    """The test hub on the node-bridge address (its "CDN" on a second port there)."""

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://{cluster2.HOST_IP}:{self.httpd.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        assert self.cdn is not None
        return f"http://{cluster2.HOST_IP}:{self.cdn.server_address[1]}"

    def start(self) -> PodReachableHub:
        server = self

        class Handler(localhub._Handler):
            hub = server

        self.httpd = ThreadingHTTPServer((cluster2.HOST_IP, 0), Handler)
        self.cdn = ThreadingHTTPServer((cluster2.HOST_IP, 0), Handler)
        for httpd in (self.httpd, self.cdn):
            httpd.daemon_threads = True
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
        return self


def _namespace(d: deployed.Deployed, name: str) -> None:
    from kubernetes import client

    core = client.CoreV1Api(d.cluster.kube.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    nodeenv.wait_for(d.cluster.env, f"ServiceAccount default in {name}",
                     lambda: core.read_namespaced_service_account("default", name), timeout=120)


def _reader(image: str) -> dict[str, Any]:
    """The workload as a user writes it: the annotation and nothing else of ours;
    2 replicas, one per node."""
    labels = {"app": APP}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": APP, "namespace": TEAM, "annotations": {c.ANN_MODELS: MODEL}},
        "spec": {"replicas": 2, "selector": {"matchLabels": labels}, "template": {
            "metadata": {"labels": labels},
            "spec": {
                "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                "topologySpreadConstraints": [{
                    "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": labels}}],
                "containers": [{"name": "reader", "image": image,
                                "command": ["/bin/sh", "-c", "exec sleep inf"]}]}}}}


def _layers_from_dmcr(d: deployed.Deployed, plugin_pod: str, reference: str) -> Any:
    """The published manifest, as the DMCR's pull endpoint serves it to a node
    (fetched inside a node plugin pod, with its pull credential and CA)."""
    pull = reference.replace(f"dmcr.{deployed.NAMESPACE}.svc:5000/",
                             f"dmcr.{deployed.NAMESPACE}.svc:5002/", 1)
    script = (
        "import sys\n"
        "from modelpack.oci import reference\n"
        "from modelpack.oci.registry import RegistryClient\n"
        "r = reference.parse(sys.argv[1])\n"
        "cred = '/etc/modelcache/registry/'\n"
        "cl = RegistryClient(r.host, username=open(cred + 'username').read().strip(),\n"
        "                    password=open(cred + 'password').read().strip(),\n"
        "                    ca_bundle='/etc/modelcache/registry-ca/ca.crt')\n"
        "sys.stdout.write(cl.get_manifest(r)[0].decode())\n")
    got = d.kubectl("exec", "-n", deployed.NAMESPACE, plugin_pod, "-c", "plugin", "--",
                    "/opt/modelcache/bin/python", "-c", script, pull, check=False, timeout=60)
    assert got.returncode == 0, got.stderr
    digest = reference.rsplit("@", 1)[1]
    manifest, _ = parse_manifest(got.stdout.encode(), digest)  # checks the digest
    return layers_of(manifest)


def _read_in(d: deployed.Deployed, pod: str) -> tuple[dict[str, str], str]:
    """Every model file's sha256 inside the container, and whether a write succeeded."""
    script = (f"cd {MOUNT} || exit 3; find . -type f | sort | xargs sha256sum; "
              "if touch ./.write-probe 2>/dev/null; then echo WRITE allowed; "
              "else echo WRITE refused; fi")
    got = d.kubectl("exec", "-n", TEAM, pod, "-c", "reader", "--", "/bin/sh", "-c", script,
                    check=False, timeout=60)
    assert got.returncode == 0, got.stderr
    sha, write = {}, ""
    for line in got.stdout.splitlines():
        if line.startswith("WRITE "):
            write = line.split()[1]
        elif line.strip():
            h, path = line.split(None, 1)
            sha[path.strip()] = h
    return sha, write


def _host_pid(pod: str) -> int:
    """The host pid of the manager process in ``pod`` (its HOSTNAME is the pod's name)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if b"manager" in cmd and f"HOSTNAME={pod}".encode() in environ:
            found.append(int(pid))
    assert found, f"no manager process of {pod} on this host"
    return min(found)


def _blob_gets(log: str) -> dict[tuple[str, str], int]:
    """(client address, layer digest) -> successful blob GETs, from the DMCR's access log."""
    counts: dict[tuple[str, str], int] = {}
    for m in re.finditer(r'^(\S+) - \S* \[[^\]]*\] "GET /v2/\S+/blobs/(sha256:[0-9a-f]{64}) '
                         r'[^"]*" (?:200|206) ', log, re.M):
        key = (m.group(1), m.group(2))
        counts[key] = counts.get(key, 0) + 1
    return counts


def test_chart_installs_on_two_nodes_and_delivers_a_published_model(tmp_path: Any) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    netns_before = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    src = str(tmp_path / "model")
    modelgen.make_safetensors_model(src, seed=21)
    t0 = time.monotonic()
    hub = PodReachableHub()
    hub.add_repo(REPO, src)
    with deployed.running() as d, hub:
        c2 = d.cluster
        api = c2.kube.api_client()
        core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
        crds, batch = client.CustomObjectsApi(api), client.BatchV1Api(api)

        # 1. helm install: every workload Ready, nothing restarting
        t1 = time.monotonic()
        deployed.install(d, hf_endpoint=hub.url)
        nodeenv.wait_for(c2.env, "every chart workload Ready",
                         lambda: not deployed.ready_workloads(d), timeout=300,
                         describe=lambda: f"{deployed.ready_workloads(d)}\n"
                                          f"{deployed.describe_pods(d)}")
        d.timings["helm install to Ready"] = time.monotonic() - t1
        pods = core.list_namespaced_pod(deployed.NAMESPACE).items
        restarted = {f"{p.metadata.name}/{s.name}": s.restart_count for p in pods
                     for s in p.status.container_statuses or [] if s.restart_count}
        assert not restarted, f"{restarted}\n{deployed.describe_pods(d)}"
        node_pods = {p.spec.node_name: p for p in pods
                     if p.metadata.labels.get("app.kubernetes.io/component") == "node"}
        assert sorted(node_pods) == sorted(c2.node_names)
        # every pod from our images (or the named stand-ins), none from the host
        assert {ct.image for p in pods for ct in p.spec.containers} <= set(d.images.values())
        # the chart's Services by name, through CoreDNS
        assert deployed.dns_query(cluster2.HOST_IP, f"dmcr.{deployed.NAMESPACE}.svc.cluster.local")
        # the kubelets registered the driver through the stand-in registrar
        storage = client.StorageV1Api(api)
        for n in c2.node_names:
            nodeenv.wait_for(c2.env, f"CSINode {n} has the driver",
                             lambda n=n: nodeenv._csinode_has_driver(storage, n), timeout=60)

        # 2. a Model from the hub, published by a publish Job pod
        _namespace(d, TEAM)
        t2 = time.monotonic()
        crds.create_namespaced_custom_object(GROUP, VERSION, TEAM, "models", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
            "metadata": {"name": MODEL, "namespace": TEAM},
            "spec": {"source": {"huggingFace": {"repo": REPO}}}})
        jobs_seen: dict[str, Any] = {}

        def ready() -> dict[str, Any] | None:
            for j in batch.list_namespaced_job(deployed.NAMESPACE).items:
                jobs_seen[j.metadata.name] = j
            m = crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", MODEL)
            return m if (m.get("status") or {}).get("phase") == "Ready" else None

        status = nodeenv.wait_for(
            c2.env, f"Model {MODEL} Ready", ready, timeout=240,
            describe=lambda: json.dumps(crds.get_namespaced_custom_object(
                GROUP, VERSION, TEAM, "models", MODEL).get("status"), indent=1)
            + "\n" + deployed.describe_pods(d))["status"]
        d.timings["publish to Ready"] = time.monotonic() - t2
        assert len(jobs_seen) == 1, sorted(jobs_seen)
        (job,) = jobs_seen.values()
        assert {ct.image for ct in job.spec.template.spec.containers} == {d.images["controller"]}
        assert any(p.startswith("/api/models/") for _, p, _ in hub.requests), hub.requests[:5]
        reference = status["artifact"]["reference"]
        digest = status["artifact"]["digest"]
        assert reference.startswith(f"dmcr.{deployed.NAMESPACE}.svc:5000/") and \
            reference.endswith("@" + digest)
        layers = _layers_from_dmcr(d, node_pods[c2.node_names[0]].metadata.name, reference)
        expected = {f"./{layer.path}": layer.digest.removeprefix("sha256:") for layer in layers}
        assert any(p.endswith(".safetensors") for p in expected)
        with open(os.path.join(src, "model.safetensors"), "rb") as f:
            assert expected["./model.safetensors"] == hashlib.sha256(f.read()).hexdigest()

        # 3. the annotated Deployment, one replica per node, the model read-only on each
        t3 = time.monotonic()
        apps.create_namespaced_deployment(TEAM, _reader(d.busybox))
        tpl = apps.read_namespaced_deployment(APP, TEAM).spec.template.spec
        assert [v.csi.driver for v in tpl.volumes if v.csi] == [nodeenv.DRIVER]  # mutated

        def running() -> list[Any] | None:
            got = [p for p in core.list_namespaced_pod(TEAM).items
                   if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
            return got if len(got) == 2 else None

        readers = nodeenv.wait_for(c2.env, "2 reader pods Running", running, timeout=180,
                                   describe=lambda: d.kubectl("get", "pods", "-A", "-o", "wide",
                                                              check=False).stdout)
        d.timings["Deployment to Running"] = time.monotonic() - t3
        assert sorted(p.spec.node_name for p in readers) == sorted(c2.node_names)
        for p in readers:
            sha, write = _read_in(d, p.metadata.name)
            assert sha == expected, (p.spec.node_name, sha)
            assert write == "refused", p.spec.node_name

        # each node's plugin fetched each layer blob once, from the pull endpoint
        dmcr = next(p for p in core.list_namespaced_pod(deployed.NAMESPACE).items
                    if p.metadata.labels.get("app.kubernetes.io/component") == "dmcr")
        log = d.kubectl("logs", "-n", deployed.NAMESPACE, dmcr.metadata.name,
                        "-c", "registry-pull").stdout
        gets = _blob_gets(log)
        for node, plugin in node_pods.items():
            ip = plugin.status.pod_ip
            got = {dg: n for (addr, dg), n in gets.items() if addr == ip}
            want = {layer.digest: 1 for layer in layers}
            assert {dg: n for dg, n in got.items() if dg in want} == want, (node, ip, gets)

        # 4. another namespace naming that Model: the webhook refuses it
        _namespace(d, OTHER)
        with pytest.raises(ApiException) as refused:
            core.create_namespaced_pod(OTHER, {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "intruder", "annotations": {c.ANN_MODELS: MODEL}},
                "spec": {"containers": [{"name": "c", "image": d.busybox,
                                         "command": ["sleep", "inf"]}]}})
        body = refused.value.body or ""
        assert "denied the request" in body and "not found" in body, body
        assert not core.list_namespaced_pod(OTHER).items

        # 5. day 2: helm upgrade to a new node image tag replaces the node plugin
        # pods; the running readers keep their mounts, a new replica still mounts
        t5 = time.monotonic()
        before = {p.metadata.uid for p in node_pods.values()}
        new_node = deployed.retag(d, "node", "0.1.0-upgrade")
        deployed.upgrade(d, {"node.image": new_node})

        def upgraded() -> list[Any] | None:
            if deployed.ready_workloads(d):
                return None
            got = [p for p in core.list_namespaced_pod(deployed.NAMESPACE).items
                   if p.metadata.labels.get("app.kubernetes.io/component") == "node"]
            fresh = [p for p in got if p.metadata.uid not in before and
                     p.metadata.deletion_timestamp is None and
                     {ct.image for ct in p.spec.containers if ct.name == "plugin"} == {new_node}]
            return fresh if len(got) == len(fresh) == 2 else None

        nodeenv.wait_for(c2.env, "the node plugin upgraded on both nodes", upgraded, timeout=180,
                         describe=lambda: deployed.describe_pods(d))
        for n in c2.node_names:
            nodeenv.wait_for(c2.env, f"CSINode {n} has the driver again",
                             lambda n=n: nodeenv._csinode_has_driver(storage, n), timeout=60)
        d.timings["helm upgrade to Ready"] = time.monotonic() - t5
        for p in readers:  # the same pods, never restarted, still reading the model
            sha, _ = _read_in(d, p.metadata.name)
            assert sha == expected, (p.spec.node_name, sha)
            now = core.read_namespaced_pod(p.metadata.name, TEAM)
            assert not now.status.container_statuses[0].restart_count
        apps.patch_namespaced_deployment_scale(APP, TEAM, {"spec": {"replicas": 3}})
        names = {p.metadata.name for p in readers}

        def third() -> Any:
            got = [p for p in core.list_namespaced_pod(TEAM).items
                   if p.status.phase == "Running" and p.metadata.name not in names]
            return got[0] if got else None

        new_pod = nodeenv.wait_for(c2.env, "a third reader Running after the upgrade", third,
                                   timeout=120, describe=lambda: deployed.describe_pods(d))
        sha, write = _read_in(d, new_pod.metadata.name)
        assert sha == expected and write == "refused", (new_pod.spec.node_name, sha, write)

        # 6. day 2: the manager's leader hangs (SIGSTOP: it neither renews nor
        # releases its lease), the standby takes the lease once it expires, the
        # hung leader is killed (SIGKILL; its container restarts as a candidate),
        # and the next Model is published; one publish Job per Model, none repeated
        coord = client.CoordinationV1Api(api)

        def holder() -> str:
            lease = coord.read_namespaced_lease(LEASE, deployed.NAMESPACE)
            return str(lease.spec.holder_identity or "")

        leader = holder()
        leader_pod = leader.rsplit("_", 1)[0]
        controllers = sorted(p.metadata.name for p in core.list_namespaced_pod(
            deployed.NAMESPACE).items if p.metadata.labels.get(
                "app.kubernetes.io/component") == "controller")
        assert leader_pod in controllers and len(controllers) == 2, (leader, controllers)
        (standby,) = set(controllers) - {leader_pod}
        pid = _host_pid(leader_pod)
        t6 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            nodeenv.wait_for(c2.env, f"the standby {standby} holds the lease",
                             lambda: holder().rsplit("_", 1)[0] == standby, timeout=90)
        finally:
            os.kill(pid, signal.SIGKILL)
        d.timings["leader failover"] = time.monotonic() - t6
        crds.create_namespaced_custom_object(GROUP, VERSION, TEAM, "models", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
            "metadata": {"name": SECOND, "namespace": TEAM},
            "spec": {"source": {"huggingFace": {"repo": REPO}}}})

        def second_ready() -> bool:
            for j in batch.list_namespaced_job(deployed.NAMESPACE).items:
                jobs_seen[j.metadata.name] = j
            m = crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", SECOND)
            return (m.get("status") or {}).get("phase") == "Ready"

        nodeenv.wait_for(c2.env, f"Model {SECOND} Ready under the new leader", second_ready,
                         timeout=180, describe=lambda: deployed.describe_pods(d))
        d.timings["failover to next Model Ready"] = time.monotonic() - t6
        assert sorted(n.rsplit("-", 1)[0] for n in jobs_seen) == sorted(
            [f"mc-{TEAM}-{MODEL}", f"mc-{TEAM}-{SECOND}"]), sorted(jobs_seen)
        assert holder().rsplit("_", 1)[0] == standby
        killed = core.read_namespaced_pod(leader_pod, deployed.NAMESPACE)
        assert killed.status.container_statuses[0].restart_count == 1
        t_end = time.monotonic()
    teardown = time.monotonic() - t_end
    left = cluster2.leftovers(c2, netns_before)
    sys.stderr.write(f"as deployed: { {k: round(v, 1) for k, v in d.timings.items()} } "
                     f"teardown {teardown:.1f}s total {time.monotonic() - t0:.1f}s\n")
    assert not left, left
