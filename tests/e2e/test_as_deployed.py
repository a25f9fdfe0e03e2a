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
  the same upgrade sets both cache watermarks to a few bytes, so from then on
  a node cache keeps nothing that is not mounted;
- day 2: the manager's leader hung (SIGSTOP) then killed: the standby takes
  the lease once it expires and publishes the next Model; one publish Job per
  Model, none repeated;
- cache-aware placement: with a Model cached on one node only (held there by
  a pinned DaemonSet pod that also makes that node the busier one), three
  unpinned pods naming it all land on that node;
- SharedPVC on a ReadWriteMany volume both nodes reach (a hostPath STAND-IN
  for NFS/CephFS, deployed.rwx_volume): one materializer Job fills it, a
  replica on each node reads the same bytes;
- ``spec.validation``: a Model's check (the controller image's python3 parses
  config.json and the safetensors header, and finds the tree read-only) runs
  as a Job pod in the team's namespace, within its limits and timeout, on the
  candidate digest's read-only CSI volume: ``Validated`` True, then Ready;
  upstream's next revision (config.json without model_type), reimported: the
  check prints why it refuses and exits 1, ``Validated`` False with that line
  in the message's log tail, and the validated digest still in
  ``status.artifact``, mounted byte-exact by a new pod;
- observability: a host Prometheus (Debian's) discovering the pods through the
  API server scrapes both manager replicas and both node plugins by pod IP;
  every query of the chart's Grafana dashboard returns data, the shipped alert
  rules load and evaluate; the manager counted both validations;
- day 2: ``kubectl drain`` of a node: the idle model is evicted from its
  cache, the one its remaining (DaemonSet) pod mounts is kept and still read;
  the other node's readers read on;
- uninstall in the documented order (workloads and Models, ``helm uninstall``,
  then by hand what the manager made): after helm uninstall no publish Job, no
  Secret but the manager's own three, the SharedPVC's materializer Job only
  (owned by the claim), no mount of our driver or any pod volume on either
  node; after the by-hand step nothing; the CRDs stay.

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
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from api import names as c
from api import podspec
from cli.local import hub as localhub
from modelpack.oci.manifest import layers_of, parse_manifest
from tests import modelgen
from tests.e2e import cluster2, deployed, nodeenv

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(1200)]

GROUP, VERSION = "modelcache.io", "v1alpha1"
TEAM, OTHER = "e2e-team", "e2e-other"
MODEL, SECOND, SHARED, CHECKED = "tiny", "second", "shared", "checked"
REPO, REPO2 = "e2e/tiny", "e2e/second"  # SECOND's files differ: another digest
REPO3 = "e2e/checked"  # CHECKED's: files of its own, a third digest; step 8b moves it
LEASE = "modelcache-controller"  # the manager's leader election Lease (controller/app.py)
APP, SHARED_APP, KEEPER, PLACED = "model-reader", "shared-reader", "keeper", "placed"
CHECKED_APP = "checked-reader"
MOUNT = f"{c.MOUNT_ROOT}/{MODEL}"
MOUNT2 = f"{c.MOUNT_ROOT}/{SECOND}"
MOUNT_SHARED = f"{c.MOUNT_ROOT}/{SHARED}"
MOUNT_CHECKED = f"{c.MOUNT_ROOT}/{CHECKED}"
# CHECKED's spec.validation, as a user writes one: the controller image's python3
# parses config.json and the safetensors header of the mounted candidate, and
# refuses a tree it can write to; it prints what it read, with the digest, or
# why it refuses (exit 1)
REFUSAL = "e2e-check: config.json names no model_type"
CHECK = f"""\
import json, os, struct, sys
root = os.environ["MODELCACHE_MODEL_PATH"]
config = json.load(open(os.path.join(root, "config.json")))
if not config.get("model_type"):
    sys.exit("{REFUSAL}")
with open(os.path.join(root, "model.safetensors"), "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
tensors = [k for k in header if k != "__metadata__"]
assert tensors, header
try:
    open(os.path.join(root, ".write-probe"), "w")
except OSError:
    pass
else:
    sys.exit("the model tree is writable")
print("checked", config["model_type"], len(tensors), "tensors",
      os.environ["MODELCACHE_MODEL_DIGEST"])
"""
CHECKED_TENSORS = 5  # modelgen.make_safetensors_model: the embedding, 2 layers of 2
TINY = "0.000000001"  # a watermark fraction: a few bytes of the cache's filesystem
CHART_FILES = os.path.join(deployed.ROOT, "charts", "modelcache", "files")
RULES = os.path.join(CHART_FILES, "alerts.yaml")
DASHBOARD = os.path.join(CHART_FILES, "dashboard.json")
# what the manager makes itself, which helm uninstall cannot know of: the webhook's
# serving certificate, the DMCR's (controller/dmcrtls.py) and the ticket signing key
MANAGER_SECRETS = ["modelcache-dmcr-tls", "modelcache-dmcr-token", "modelcache-webhook-tls"]


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


def _reader(image: str, name: str = APP, model: str = MODEL) -> dict[str, Any]:
    """The workload as a user writes it: the annotation and nothing else of ours;
    2 replicas, one per node."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": TEAM, "annotations": {c.ANN_MODELS: model}},
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


def _read_in(d: deployed.Deployed, pod: str, mount: str = MOUNT) -> tuple[dict[str, str], str]:
    """Every model file's sha256 inside the container, and whether a write succeeded."""
    script = (f"cd {mount} || exit 3; find . -type f | sort | xargs sha256sum; "
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


@dataclass
class Flow:
    """What steps 7-11 (and 8b) share: the cluster, its Prometheus, and each Model's
    files as ``./path -> sha256`` (its layer digests in the DMCR's manifest)."""

    d: deployed.Deployed
    prom: deployed.PodPrometheus
    expected: dict[str, str]   # MODEL
    expected2: dict[str, str]  # SECOND
    shared: dict[str, str] = field(default_factory=dict)  # SHARED, from step 8
    materializer: str = ""  # its materializer Job, from step 8
    api: Any = None  # one kubernetes ApiClient for all the steps

    def __post_init__(self) -> None:
        self.api = self.d.cluster.kube.api_client()

    def core(self) -> Any:
        from kubernetes import client
        return client.CoreV1Api(self.api)

    def apps(self) -> Any:
        from kubernetes import client
        return client.AppsV1Api(self.api)

    def batch(self) -> Any:
        from kubernetes import client
        return client.BatchV1Api(self.api)

    def crds(self) -> Any:
        from kubernetes import client
        return client.CustomObjectsApi(self.api)

    def wait(self, what: str, check: Any, timeout: float = 120) -> Any:
        return nodeenv.wait_for(self.d.cluster.env, what, check, timeout=timeout, interval=1,
                                describe=self.describe)

    def describe(self) -> str:
        """The pods, and in the team's namespace its events and the last Job pod's log."""
        ev = self.d.kubectl("get", "events", "-n", TEAM, "--sort-by=.lastTimestamp",
                            check=False).stdout
        jobs = self.d.kubectl("logs", "-n", TEAM, "-l", "batch.kubernetes.io/job-name",
                              "--tail=30", "--prefix", check=False)
        return f"{deployed.describe_pods(self.d)}\n{ev[-4000:]}\n{jobs.stdout}{jobs.stderr}"

    def running(self, app: str, count: int) -> list[Any] | None:
        """``count`` pods labelled app=``app`` Running (none terminating), else None."""
        got = [p for p in self.core().list_namespaced_pod(TEAM, label_selector=f"app={app}").items
               if p.status.phase == "Running" and p.metadata.deletion_timestamp is None]
        return got if len(got) == count else None

    def plugin_pod(self, node: str) -> str:
        (pod,) = [p.metadata.name for p in self.core().list_namespaced_pod(
            deployed.NAMESPACE, label_selector="app.kubernetes.io/component=node").items
            if p.spec.node_name == node and p.metadata.deletion_timestamp is None]
        return str(pod)

    def inventory(self, node: str) -> dict[str, Any]:
        """The node cache's live /inventory (digest -> entry), from inside its plugin
        pod: the endpoint answers loopback peers only."""
        script = ("import sys, urllib.request\nsys.stdout.write(urllib.request.urlopen("
                  "'http://127.0.0.1:9810/inventory', timeout=10).read().decode())\n")
        got = self.d.kubectl("exec", "-n", deployed.NAMESPACE, self.plugin_pod(node), "-c",
                             "plugin", "--", "/opt/modelcache/bin/python", "-c", script,
                             check=False, timeout=60)
        assert got.returncode == 0, got.stderr
        return {m["digest"]: m for m in json.loads(got.stdout)["models"]}


def _layer_sha(d: deployed.Deployed, reference: str) -> dict[str, str]:
    """``./path -> sha256`` of the published manifest's layers (read through a node plugin)."""
    from kubernetes import client

    core = client.CoreV1Api(d.cluster.kube.api_client())
    plugin = next(p.metadata.name for p in core.list_namespaced_pod(
        deployed.NAMESPACE, label_selector="app.kubernetes.io/component=node").items
        if p.status.phase == "Running" and p.metadata.deletion_timestamp is None)
    return {f"./{layer.path}": layer.digest.removeprefix("sha256:")
            for layer in _layers_from_dmcr(d, plugin, reference)}


def _cpu_requests(core: Any) -> dict[str, float]:
    """CPU requested on each node by the pods bound to it (what the scheduler's
    resource scoring sees)."""
    from kubernetes.utils import parse_quantity

    out: dict[str, float] = {}
    for p in core.list_pod_for_all_namespaces().items:
        if not p.spec.node_name or p.status.phase in ("Succeeded", "Failed"):
            continue
        for ct in p.spec.containers:
            cpu = ((ct.resources and ct.resources.requests) or {}).get("cpu")
            if cpu:
                out[p.spec.node_name] = out.get(p.spec.node_name, 0.0) + float(parse_quantity(cpu))
    return out


def _cache_aware_placement(f: Flow, digest: str) -> None:
    """7. SECOND is cached on one node only, held there by a DaemonSet pod
    pinned to it (the "keeper", which requests 600m CPU, so resource scoring
    alone would send new pods to the other node); then three unpinned pods
    naming SECOND: the webhook gives each the preferred affinity for the
    node label of SECOND's digest, and all three land on the cached node."""
    core = f.core()
    c2 = f.d.cluster
    # node 2 holds it: the DMCR's volume is on node 1, and step 10 drains node 2
    cold, warm = c2.node_names
    label = c.node_label(digest)
    f.apps().create_namespaced_daemon_set(TEAM, {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": KEEPER, "namespace": TEAM, "annotations": {c.ANN_MODELS: SECOND}},
        "spec": {"selector": {"matchLabels": {"app": KEEPER}}, "template": {
            "metadata": {"labels": {"app": KEEPER}},
            "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                     "nodeSelector": {"kubernetes.io/hostname": warm},
                     "containers": [{"name": "reader", "image": f.d.busybox,
                                     "command": ["/bin/sh", "-c", "exec sleep inf"],
                                     "resources": {"requests": {"cpu": "600m"}}}]}}}})
    (keeper,) = f.wait("the keeper Running", lambda: f.running(KEEPER, 1))
    assert keeper.spec.node_name == warm
    sha, write = _read_in(f.d, keeper.metadata.name, MOUNT2)
    assert sha == f.expected2 and write == "refused", (sha, write)

    def labels(node: str) -> dict[str, str]:
        return dict(core.read_node(node).metadata.labels or {})

    f.wait(f"{warm} labelled {label}", lambda: labels(warm).get(label) == "true", timeout=60)
    assert label not in labels(cold)
    requests = _cpu_requests(core)
    assert requests.get(warm, 0) > requests.get(cold, 0), requests  # the premise above

    for i in range(3):
        core.create_namespaced_pod(TEAM, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{PLACED}-{i}", "labels": {"app": PLACED},
                         "annotations": {c.ANN_MODELS: SECOND}},
            "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "reader", "image": f.d.busybox,
                                     "command": ["/bin/sh", "-c", "exec sleep inf"]}]}})
    placed = f.wait("3 placed pods Running", lambda: f.running(PLACED, 3))
    for p in placed:
        spec = f.api.sanitize_for_serialization(p.spec)
        assert label in podspec.affinity_labels(spec), (p.metadata.name, spec.get("affinity"))
        assert p.spec.node_name == warm, (p.metadata.name, p.spec.node_name)
    sha, _ = _read_in(f.d, placed[0].metadata.name, MOUNT2)
    assert sha == f.expected2
    core.delete_collection_namespaced_pod(TEAM, label_selector=f"app={PLACED}",
                                          grace_period_seconds=0)
    f.wait("the placed pods gone", lambda: not core.list_namespaced_pod(
        TEAM, label_selector=f"app={PLACED}").items)


def _shared_pvc(f: Flow) -> None:
    """8. SharedPVC on a ReadWriteMany volume both nodes reach (a STAND-IN for
    NFS/CephFS: deployed.rwx_volume says why and what): the manager makes the
    claim, one materializer Job pod fills it, and a Deployment's replicas on
    both nodes read the same bytes, read-only."""
    share = deployed.rwx_volume(f.d.cluster)
    crds, core = f.crds(), f.core()

    def ready() -> dict[str, Any] | None:
        m = crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", SHARED)
        return m if (m.get("status") or {}).get("phase") == "Ready" else None

    artifact = f.wait(f"Model {SHARED} Ready", ready)["status"]["artifact"]
    f.shared = _layer_sha(f.d, artifact["reference"])
    f.apps().create_namespaced_deployment(TEAM, _reader(f.d.busybox, SHARED_APP, SHARED))
    pods = f.wait("2 SharedPVC readers Running", lambda: f.running(SHARED_APP, 2), timeout=240)
    assert sorted(p.spec.node_name for p in pods) == sorted(f.d.cluster.node_names)
    for p in pods:
        sha, write = _read_in(f.d, p.metadata.name, MOUNT_SHARED)
        assert sha == f.shared and write == "refused", (p.spec.node_name, sha, write)
    claim = c.pvc_name(artifact["digest"])
    pvc = core.read_namespaced_persistent_volume_claim(claim, TEAM)
    assert pvc.spec.volume_name == "e2e-rwx-share" and pvc.spec.access_modes == ["ReadWriteMany"]
    assert (pvc.metadata.annotations or {}).get(c.ANN_PVC_MATERIALIZED) == artifact["digest"]
    jobs = f.batch().list_namespaced_job(TEAM, label_selector=f"{c.LABEL_PVC}=true").items
    f.materializer = c.materializer_job_name(TEAM, artifact["digest"])
    assert [(j.metadata.name, j.status.succeeded) for j in jobs] == [(f.materializer, 1)]
    assert [(o.kind, o.name) for o in jobs[0].metadata.owner_references] == [
        ("PersistentVolumeClaim", claim)]
    # the bytes the pods read are the share's, written once by that Job
    tree = os.path.join(share, c.pvc_subpath(artifact["digest"]))
    on_disk = {}
    for dirpath, _, files in os.walk(tree):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                on_disk["./" + os.path.relpath(path, tree)] = hashlib.sha256(fh.read()).hexdigest()
    assert on_disk == f.shared, on_disk


def _validation_start(f: Flow) -> None:
    """8b, begun before step 8 (it publishes and validates meanwhile): CHECKED,
    a Model with ``spec.validation``: CHECK in the controller image (already on
    both nodes), within limits and a timeout."""
    f.crds().create_namespaced_custom_object(GROUP, VERSION, TEAM, "models", {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
        "metadata": {"name": CHECKED, "namespace": TEAM},
        "spec": {"source": {"huggingFace": {"repo": REPO3}},
                 "validation": {"image": f.d.images["controller"],
                                "command": ["python3", "-c", CHECK], "timeout": "2m",
                                "resources": {"limits": {"cpu": "250m", "memory": "128Mi"}}}}})


def _validation_jobs(f: Flow) -> dict[str, Any]:
    """CHECKED's validation Jobs in the team's namespace, by name."""
    return {j.metadata.name: j for j in f.batch().list_namespaced_job(
        TEAM, label_selector=f"app.kubernetes.io/component=validation,{c.LABEL_NAME}={CHECKED}"
    ).items}


def _validation_pod(f: Flow, job: Any, digest: str, phase: str) -> Any:
    """``job``'s one pod, finished in ``phase`` on one of the nodes, after its Job
    asked for ``digest`` read-only through our driver, within its bounds."""
    spec = job.spec.template.spec
    (volume,) = spec.volumes
    assert volume.csi.driver == c.CSI_DRIVER and volume.csi.read_only, volume
    assert volume.csi.volume_attributes == {c.ATTR_MODEL: CHECKED, c.ATTR_DIGEST: digest}
    (box,) = spec.containers
    assert box.image == f.d.images["controller"] and box.volume_mounts[0].read_only
    assert box.resources.limits == {"cpu": "250m", "memory": "128Mi"}, box.resources
    assert job.spec.active_deadline_seconds == 120 and not spec.automount_service_account_token
    (pod,) = f.core().list_namespaced_pod(
        TEAM, label_selector=f"batch.kubernetes.io/job-name={job.metadata.name}").items
    assert pod.status.phase == phase and pod.spec.node_name in f.d.cluster.node_names, (
        pod.status.phase, pod.spec.node_name)
    return pod


def _validation(f: Flow, next_revision: Callable[[], object]) -> None:
    """8b. ``spec.validation`` as deployed. CHECKED's check (the controller
    image's python3: config.json and the safetensors header parsed, a write
    refused) runs as a Job pod in the team's namespace with the candidate's
    read-only CSI volume: ``Validated`` True, then Ready on that digest. Then
    ``next_revision`` moves REPO3 upstream to a config.json without model_type
    and a reimport publishes it: the check prints why it refuses and exits 1,
    so ``Validated`` is False, reason ValidationFailed, that line the
    message's log tail, phase Failed; the validated digest is still
    ``status.artifact`` (Ready, ServingPreviousArtifact), and a new pod
    mounts it byte-exact."""
    crds, core = f.crds(), f.core()

    def model() -> dict[str, Any]:
        return dict(crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", CHECKED))

    def condition(m: dict[str, Any], kind: str) -> dict[str, Any]:
        return next((x for x in (m.get("status") or {}).get("conditions") or []
                     if x["type"] == kind), {})

    def passed() -> dict[str, Any] | None:
        m = model()
        assert (m.get("status") or {}).get("phase") != "Failed", m.get("status")
        return m if m["status"]["phase"] == "Ready" else None

    good = f.wait(f"Model {CHECKED} validated and Ready", passed)
    digest = good["status"]["artifact"]["digest"]
    validated = condition(good, "Validated")
    assert (validated["status"], validated["reason"]) == ("True", "ValidationPassed"), validated
    assert digest in validated["message"], validated
    (job,) = _validation_jobs(f).values()
    pod = _validation_pod(f, job, digest, "Succeeded")
    said = f.d.kubectl("logs", "-n", TEAM, pod.metadata.name, "-c", "validate").stdout
    assert said.split() == ["checked", "llama", str(CHECKED_TENSORS), "tensors", digest], said

    # upstream's next revision, which the same check refuses
    next_revision()
    crds.patch_namespaced_custom_object(GROUP, VERSION, TEAM, "models", CHECKED, {
        "metadata": {"annotations": {c.REIMPORT: "next-revision"}}})

    def refused() -> dict[str, Any] | None:
        m = model()
        assert m["status"]["artifact"]["digest"] == digest, m["status"]  # never moves
        verdict = condition(m, "Validated").get("status")
        assert m["status"]["phase"] != "Failed" or verdict == "False", m["status"]
        return m if verdict == "False" else None

    bad = f.wait(f"the next revision of {CHECKED} refused", refused)
    candidate = bad["status"]["validation"]["digest"]
    assert candidate != digest and bad["status"]["phase"] == "Failed", bad["status"]
    validated = condition(bad, "Validated")
    assert validated["reason"] == "ValidationFailed", validated
    assert "(exit code 1)" in validated["message"], validated
    assert validated["message"].endswith(f"log tail: {REFUSAL}"), validated
    ready = condition(bad, "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ServingPreviousArtifact"), ready
    jobs = _validation_jobs(f)
    assert sorted(jobs) == sorted([job.metadata.name, bad["status"]["validation"]["jobName"]])
    _validation_pod(f, jobs[bad["status"]["validation"]["jobName"]], candidate, "Failed")

    # the validated digest still serves: a new pod naming CHECKED reads it byte-exact
    core.create_namespaced_pod(TEAM, {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": CHECKED_APP, "labels": {"app": CHECKED_APP},
                     "annotations": {c.ANN_MODELS: CHECKED}},
        "spec": {"automountServiceAccountToken": False, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "reader", "image": f.d.busybox,
                                 "command": ["/bin/sh", "-c", "exec sleep inf"]}]}})
    (reader,) = f.wait(f"a pod naming {CHECKED} Running", lambda: f.running(CHECKED_APP, 1))
    sha, write = _read_in(f.d, reader.metadata.name, MOUNT_CHECKED)
    assert sha == _layer_sha(f.d, good["status"]["artifact"]["reference"]), sha
    assert write == "refused"
    core.delete_namespaced_pod(CHECKED_APP, TEAM, grace_period_seconds=0)
    f.wait(f"the pod naming {CHECKED} gone", lambda: not core.list_namespaced_pod(
        TEAM, label_selector=f"app={CHECKED_APP}").items)


def _observability(f: Flow) -> None:
    """9. The host's Prometheus (deployed.PodPrometheus: Kubernetes pod discovery,
    pod IPs) scrapes both manager replicas and both node plugins; every query of
    the chart's Grafana dashboard returns data from it, and the manager's
    validation counter has step 8b's pass and failure; the shipped alert rules
    are loaded and evaluate."""
    prom, core = f.prom, f.core()
    ns = deployed.NAMESPACE
    want = {(f"{ns}/modelcache-{p.metadata.labels['app.kubernetes.io/component']}",
             p.metadata.name) for p in core.list_namespaced_pod(ns).items
            if p.metadata.labels.get("app.kubernetes.io/component") in ("controller", "node")
            and p.status.phase == "Running" and p.metadata.deletion_timestamp is None}
    assert len(want) == 4, want

    def all_up() -> bool:
        up = {(r["metric"]["job"], r["metric"]["pod"]): r["value"][1] for r in prom.query(
            'up{job=~".+/modelcache-(controller|node)"}')}
        return {k for k, v in up.items() if v == "1"} == want

    f.wait("Prometheus scrapes both manager replicas and both node plugins", all_up, timeout=90)
    nodes = {r["metric"]["node"] for r in prom.query(f'up{{job="{ns}/modelcache-node"}} == 1')}
    assert nodes == set(f.d.cluster.node_names), nodes
    f.wait("the traffic scraped", lambda: prom.query(
        "sum(modelcache_node_pull_bytes_total) > 0 and sum(modelcache_webhook_admissions_total) > 0"
        " and sum(modelcache_publish_finished_total) > 0"
        ' and sum(modelcache_validation_total{result="passed"}) > 0'
        ' and sum(modelcache_validation_total{result="failed"}) > 0'), timeout=60)
    with open(DASHBOARD) as fh:
        dash = json.load(fh)
    targets = [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]
    assert targets
    empty = [(title, expr) for title, expr in targets
             if not prom.query(expr.replace("$__rate_interval", "2m"))]
    assert not empty, f"dashboard queries without data: {empty}"
    with open(RULES) as fh:
        shipped = {r["alert"] for g in yaml.safe_load(fh)["groups"] for r in g["rules"]}

    def rules_ok() -> bool:
        loaded = [r for g in prom.api("rules", type="alert")["groups"] for r in g["rules"]]
        assert {r["name"] for r in loaded} == shipped
        return all(r.get("health") == "ok" for r in loaded)

    f.wait("the alert rules evaluated", rules_ok, timeout=30)


def _drain(f: Flow, digest: str, digest2: str) -> None:
    """10. ``kubectl drain`` node 2: its workload pods are evicted, the keeper
    (a DaemonSet pod) stays. Since step 5 the caches keep nothing idle, so the
    next eviction round on node 2 removes MODEL (no pod mounts it there any
    more) and keeps SECOND (the keeper mounts it), which the keeper still reads
    byte-exact; node 1 keeps MODEL for its readers, which read it byte-exact."""
    core = f.core()
    other, warm = f.d.cluster.node_names
    before = f.inventory(warm)
    assert before.get(digest, {}).get("mounts") and before.get(digest2, {}).get("mounts"), before
    got = f.d.kubectl("drain", warm, "--ignore-daemonsets", "--delete-emptydir-data",
                      "--timeout=180s", check=False, timeout=240)
    assert got.returncode == 0, got.stderr
    left = {p.metadata.name for p in core.list_pod_for_all_namespaces(
        field_selector=f"spec.nodeName={warm}").items
        if not any(o.kind == "DaemonSet" for o in p.metadata.owner_references or [])}
    assert not left, left

    def evicted() -> dict[str, Any] | None:
        inv = f.inventory(warm)
        return inv if digest not in inv else None

    inv = f.wait(f"{warm}'s cache evicts the idle {MODEL}", evicted, timeout=150)
    assert inv.get(digest2, {}).get("mounts"), inv  # mounted: kept
    node_labels = core.read_node(warm).metadata.labels or {}
    assert c.node_label(digest2) in node_labels
    (keeper,) = f.running(KEEPER, 1) or [None]
    assert keeper is not None and keeper.spec.node_name == warm
    sha, _ = _read_in(f.d, keeper.metadata.name, MOUNT2)
    assert sha == f.expected2, sha
    staying = [p for p in f.core().list_namespaced_pod(TEAM).items
               if p.spec.node_name == other and p.status.phase == "Running"]
    assert {p.metadata.labels["app"] for p in staying} == {APP, SHARED_APP}, staying
    for p in staying:
        mount, want = (MOUNT, f.expected) if p.metadata.labels["app"] == APP else \
            (MOUNT_SHARED, f.shared)
        sha, _ = _read_in(f.d, p.metadata.name, mount)
        assert sha == want, (p.metadata.name, sha)
    assert f.inventory(other).get(digest, {}).get("mounts"), "node 1 lost the mounted MODEL"
    f.wait("Prometheus saw the eviction", lambda: f.prom.query(
        f'modelcache_node_evictions_total{{node="{warm}"}} > 0'), timeout=30)


def _uninstall(f: Flow) -> None:
    """11. Uninstall in the documented order (docs/admin-guide.md, "Upgrades and
    uninstall"): the workloads and Models, then ``helm uninstall``, then what the
    manager made itself. After helm uninstall no Job and no Secret of ours is
    left but those the guide names for step 3, and no mount of our driver on
    either node; after step 3 nothing; the CRDs stay (Helm never deletes them)."""
    core, batch, d = f.core(), f.batch(), f.d
    ns = deployed.NAMESPACE
    apps = f.apps()
    for name in (APP, SHARED_APP):
        apps.delete_namespaced_deployment(name, TEAM)
    apps.delete_namespaced_daemon_set(KEEPER, TEAM)
    for name in (MODEL, SECOND, SHARED, CHECKED):
        f.crds().delete_namespaced_custom_object(GROUP, VERSION, TEAM, "models", name)
    f.wait("the Models deleted (finalizers done)", lambda: not f.crds().list_namespaced_custom_object(
        GROUP, VERSION, TEAM, "models")["items"], timeout=180)
    # the materializer Job's finished pod stays with its Job
    f.wait("the workload pods gone", lambda: not [
        p for p in core.list_namespaced_pod(TEAM).items if p.status.phase != "Succeeded"])

    def driver_mounts() -> list[tuple[str, str, str]]:
        return [(n.name, root, mp) for n in d.cluster.nodes for root, mp in deployed.node_mounts(n)
                if "/kubernetes.io~csi/" in mp or not mp.startswith(deployed.KUBELET_ROOT)]

    f.wait("no mount of our driver on either node", lambda: not driver_mounts(), timeout=90)
    deployed.helm(d, "uninstall", "modelcache", "--namespace", ns, "--wait", "--timeout", "180s")
    f.wait("the chart's pods gone", lambda: not core.list_namespaced_pod(ns).items, timeout=180)
    f.wait("no pod volume mounted on either node",
           lambda: not [m for n in d.cluster.nodes for m in deployed.node_mounts(n)], timeout=90)

    def ours() -> dict[str, list[str]]:
        found = {}
        for where in (ns, TEAM):
            found[f"jobs/{where}"] = sorted(j.metadata.name for j in
                                            batch.list_namespaced_job(where).items)
            found[f"secrets/{where}"] = sorted(s.metadata.name for s in
                                               core.list_namespaced_secret(where).items)
        return found

    # left for the guide's step 3: the manager's own Secrets, and the SharedPVC
    # (kept for --shared-pvc-grace after its last user) with the Job it owns
    left = ours()
    assert left == {f"jobs/{ns}": [], f"secrets/{ns}": MANAGER_SECRETS,
                    f"jobs/{TEAM}": [f.materializer], f"secrets/{TEAM}": []}, left
    # the guide's step 3
    d.kubectl("delete", "mutatingwebhookconfiguration", "modelcache")
    d.kubectl("-n", ns, "delete", "secret", *MANAGER_SECRETS)
    # the claim's materializer Job goes with it: its finished pod still names the
    # claim, which kube-controller-manager's PVC protection counts as a user, so
    # the claim alone would stay Terminating and its Job (owned by it) with it
    d.kubectl("delete", "job,pvc", "-A", "-l", f"{c.LABEL_PVC}=true", "--wait=false")

    def gone() -> bool:
        return not any(ours().values()) and not core.list_namespaced_persistent_volume_claim(
            TEAM).items

    nodeenv.wait_for(d.cluster.env, "nothing of ours left", gone, timeout=180, interval=2,
                     describe=lambda: f"{ours()}\n" + d.kubectl(
                         "get", "pvc,jobs,pods", "-n", TEAM, "-o", "wide", check=False).stdout)
    from kubernetes import client

    crds = client.ApiextensionsV1Api(f.api).list_custom_resource_definition().items
    assert {x.spec.group for x in crds} == {GROUP} and len(crds) >= 2


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
    src, src2, src3 = (str(tmp_path / name) for name in ("model", "model2", "model3"))
    modelgen.make_safetensors_model(src, seed=21)
    modelgen.make_safetensors_model(src2, seed=22)
    modelgen.make_safetensors_model(src3, seed=23)
    t0 = time.monotonic()
    hub = PodReachableHub()
    hub.add_repo(REPO, src)
    hub.add_repo(REPO2, src2)
    hub.add_repo(REPO3, src3)
    with deployed.running() as d, hub, deployed.prometheus(d.cluster, RULES) as prom:
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
        # the SharedPVC Model publishes meanwhile; its workload comes in step 8
        crds.create_namespaced_custom_object(GROUP, VERSION, TEAM, "models", {
            "apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
            "metadata": {"name": SHARED, "namespace": TEAM},
            "spec": {"source": {"huggingFace": {"repo": REPO}},
                     "delivery": {"mode": "SharedPVC",
                                  "sharedPVC": {"storageClassName": deployed.RWX_CLASS}}}})

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
        # pods; the running readers keep their mounts, a new replica still mounts.
        # The same upgrade makes the caches keep nothing idle (both watermarks a
        # few bytes): from here every tree not mounted is evicted within a minute
        # (the plugin's eviction round) or before the next pull, so step 10 sees
        # what eviction does to mounted and idle trees
        t5 = time.monotonic()
        before = {p.metadata.uid for p in node_pods.values()}
        new_node = deployed.retag(d, "node", "0.1.0-upgrade")
        deployed.upgrade(d, {"node.image": new_node, "node.highWatermark": TINY,
                             "node.lowWatermark": TINY})

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
            "spec": {"source": {"huggingFace": {"repo": REPO2}}}})

        def second_ready() -> bool:
            for j in batch.list_namespaced_job(deployed.NAMESPACE).items:
                jobs_seen[j.metadata.name] = j
            m = crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", SECOND)
            return (m.get("status") or {}).get("phase") == "Ready"

        nodeenv.wait_for(c2.env, f"Model {SECOND} Ready under the new leader", second_ready,
                         timeout=180, describe=lambda: deployed.describe_pods(d))
        d.timings["failover to next Model Ready"] = time.monotonic() - t6
        assert sorted(n.rsplit("-", 1)[0] for n in jobs_seen) == sorted(
            [f"mc-{TEAM}-{MODEL}", f"mc-{TEAM}-{SECOND}", f"mc-{TEAM}-{SHARED}"]), \
            sorted(jobs_seen)
        assert holder().rsplit("_", 1)[0] == standby
        killed = core.read_namespaced_pod(leader_pod, deployed.NAMESPACE)
        assert killed.status.container_statuses[0].restart_count == 1

        # 7.-11.: cache-aware placement, SharedPVC (8b, validation, runs meanwhile),
        # Prometheus, drain, uninstall
        second = crds.get_namespaced_custom_object(GROUP, VERSION, TEAM, "models", SECOND)
        flow = Flow(d, prom, expected, _layer_sha(d, second["status"]["artifact"]["reference"]))
        t7 = time.monotonic()
        _cache_aware_placement(flow, second["status"]["artifact"]["digest"])
        d.timings["placement"] = time.monotonic() - t7
        _validation_start(flow)
        t8 = time.monotonic()
        _shared_pvc(flow)
        d.timings["SharedPVC"] = time.monotonic() - t8
        t8b = time.monotonic()
        _validation(flow, lambda: hub.add_repo(REPO3, src3, files={
            "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode()}))
        d.timings["validation"] = time.monotonic() - t8b
        t9 = time.monotonic()
        _observability(flow)
        d.timings["Prometheus checks"] = time.monotonic() - t9
        t10 = time.monotonic()
        _drain(flow, status["artifact"]["digest"], second["status"]["artifact"]["digest"])
        d.timings["drain and eviction"] = time.monotonic() - t10
        t11 = time.monotonic()
        _uninstall(flow)
        d.timings["uninstall"] = time.monotonic() - t11
        t_end = time.monotonic()
    teardown = time.monotonic() - t_end
    left = cluster2.leftovers(c2, netns_before)
    sys.stderr.write(f"as deployed: { {k: round(v, 1) for k, v in d.timings.items()} } "
                     f"teardown {teardown:.1f}s total {time.monotonic() - t0:.1f}s\n")
    assert not left, left
