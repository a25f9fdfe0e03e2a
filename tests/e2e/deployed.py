"""The shipped chart as deployed: tests/e2e/cluster2.py's two real nodes,
every modelcache component a pod from the images hack/images.sh builds, the
chart installed with ``helm install``. Used by ``test_as_deployed.py``.

Sits on cluster2 and adds what a real cluster has and cluster2 does not:
- images reach the nodes through the local registry cluster2 relays: the
  three archives under build/images/ copied with ``skopeo copy
  oci-archive:... docker://...`` (modelcache-controller, modelcache-node, and
  modelcache-dmcr from Dockerfile.dmcr, Debian's docker-registry in place of
  registry:2, which cannot be pulled here);
- the DaemonSet's node-driver-registrar and livenessprobe sidecars are
  STAND-INS (tests/e2e/standin_sidecars.py): the node image plus one layer
  with that script, named ``modelcache-node:<tag>-standin-sidecars``;
- cluster DNS: CoreDNS (built by hack/install.d/node-e2e.sh, kubernetes
  plugin only) as a host process on the node bridge address, the kubelets'
  clusterDNS;
- each node's kubelet dir and cache dir are its own (cluster2's
  ``private_paths``: the chart's /var/lib/kubelet and /var/lib/modelcache,
  rshared in each node's mount namespace);
- the webhook: the API server runs on the host, outside the pod network and
  without kube-proxy; ``--enable-aggregator-routing=true`` makes it call
  webhook Services at an endpoint's pod IP, which the host routes;
- DMCR's claim binds a hostPath PersistentVolume made here on node 1 (no
  provisioner in this cluster; a real one has a default StorageClass).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cli.local import registry as localregistry
from modelpack.oci.registry import RegistryClient
from tests import kubeenv
from tests.e2e import cluster2, images, nodeenv

ROOT = kubeenv.REPO_ROOT
IMAGES = os.path.join(ROOT, "build", "images")
NAMESPACE = "modelcache-system"
KUBELET_ROOT = "/var/lib/kubelet"
CACHE_DIR = "/var/lib/modelcache"
COREDNS_VERSION = "v1.15.0"
COMPONENT = "app.kubernetes.io/component"


class DeployError(RuntimeError):
    """The deployed cluster could not be set up."""


@dataclass
class Deployed:
    cluster: cluster2.Cluster2
    registry: str          # host:port (127.0.0.1), as image references name it
    busybox: str
    images: dict[str, str]  # chart value -> image reference
    timings: dict[str, float]

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> Any:
        return self.cluster.kube.kubectl(*args, check=check, timeout=timeout)


def tool(name: str) -> str:
    path = {
        "helm": os.path.join(kubeenv.TOOLS, "helm-v3.19.5", "helm"),
        "coredns": os.path.join(kubeenv.TOOLS, f"coredns-{COREDNS_VERSION}", "coredns"),
    }[name]
    if not os.access(path, os.X_OK):
        raise DeployError(f"not installed: {path} (MODELCACHE_NODE_E2E=1 hack/install.sh)")
    return path


# --- images ------------------------------------------------------------------------------


def build_images() -> None:
    """hack/images.sh: cached by content (seconds when nothing changed), so the
    images always carry the tree the chart ships with."""
    got = subprocess.run(["bash", os.path.join(ROOT, "hack", "images.sh")],
                         capture_output=True, text=True, timeout=1800)
    if got.returncode != 0:
        raise DeployError(f"hack/images.sh: exit {got.returncode}\n{got.stderr[-4000:]}")


def push_archives(registry: str, tag: str) -> dict[str, str]:
    refs = {}
    for name in ("controller", "node", "dmcr"):
        archive = os.path.join(IMAGES, f"modelcache-{name}.oci.tar")
        if not os.path.exists(archive):
            raise DeployError(f"{archive} missing (run hack/images.sh)")
        ref = f"{registry}/modelcache/modelcache-{name}:{tag}"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci-archive:{archive}", f"docker://{ref}"],
                       check=True, capture_output=True, timeout=300)
        refs[name] = ref
    return refs


def _pluginregistration_stubs(out: str) -> None:
    """kubelet's pluginregistration api.proto, compiled here (the image has no grpcio-tools)."""
    from grpc_tools import protoc

    from tests.e2e import fake_node_driver_registrar as fake

    proto = fake.find_proto(kubeenv.versions()["KUBE_VERSION"])
    with tempfile.TemporaryDirectory() as tmp:
        with open(proto, "rb") as src, \
                open(os.path.join(tmp, "kubelet_pluginregistration.proto"), "wb") as dst:
            dst.write(src.read())
        if protoc.main(["protoc", f"-I{tmp}", f"--python_out={out}", f"--grpc_python_out={out}",
                        "kubelet_pluginregistration.proto"]) != 0:
            raise DeployError(f"protoc failed on {proto}")


def push_standin_sidecars(client: RegistryClient, tag: str) -> str:
    """The node image plus one layer (/standin): the registrar and livenessprobe stand-ins."""
    import gzip
    import io

    archive = os.path.join(IMAGES, "modelcache-node.oci.tar")
    with tarfile.open(archive) as tar:
        def blob(digest: str) -> bytes:
            f = tar.extractfile("blobs/" + digest.replace(":", "/"))
            assert f is not None
            return f.read()

        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        manifest = json.loads(blob(index["manifests"][0]["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
    with tempfile.TemporaryDirectory() as tmp:
        _pluginregistration_stubs(tmp)
        here = os.path.dirname(os.path.abspath(__file__))
        files = {f: os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".py")}
        for f in ("standin_sidecars.py", "fake_node_driver_registrar.py"):
            files[f] = os.path.join(here, f)
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as layer:
            d = tarfile.TarInfo("standin/")
            d.type, d.mode = tarfile.DIRTYPE, 0o755
            layer.addfile(d)
            for name, path in sorted(files.items()):
                with open(path, "rb") as src:
                    data = src.read()
                info = tarfile.TarInfo(f"standin/{name}")
                info.size, info.mode = len(data), 0o644
                layer.addfile(info, io.BytesIO(data))
    plain = raw.getvalue()
    packed = gzip.compress(plain, mtime=0)
    repo = "modelcache/modelcache-node"
    layer_digest = client.upload_bytes(repo, packed)
    config["rootfs"]["diff_ids"].append("sha256:" + __import__("hashlib").sha256(plain).hexdigest())
    conf = config["config"]
    conf["Entrypoint"] = ["/opt/modelcache/bin/python", "/standin/standin_sidecars.py"]
    conf["Cmd"] = None
    conf["Env"] = [*conf.get("Env", []), "PYTHONPATH=/standin"]
    raw_config = json.dumps(config).encode()
    config_digest = client.upload_bytes(repo, raw_config)
    manifest["config"] = {**manifest["config"], "digest": config_digest, "size": len(raw_config)}
    manifest["layers"].append({"mediaType": images.OCI_LAYER_GZIP, "digest": layer_digest,
                               "size": len(packed)})
    ref = f"{tag}-standin-sidecars"
    client.put_manifest(repo, ref, json.dumps(manifest).encode(), images.OCI_MANIFEST)
    return f"{client.host}/{repo}:{ref}"


# --- cluster DNS ---------------------------------------------------------------------------


def dns_query(server: str, name: str, timeout: float = 2) -> list[str]:
    """The A records ``server`` answers for ``name`` (one UDP query)."""
    qid = random.randrange(1 << 16)
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    q += struct.pack(">HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, 53))
        resp = s.recv(4096)
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", resp[:12])
    pos = len(q)
    found = []
    for _ in range(an):
        pos += 2 if resp[pos] & 0xC0 == 0xC0 else resp.index(b"\0", pos) + 1 - pos
        rtype, _, _, rdlen = struct.unpack(">HHIH", resp[pos:pos + 10])
        pos += 10
        if rtype == 1:
            found.append(socket.inet_ntoa(resp[pos:pos + rdlen]))
        pos += rdlen
    return found


def start_coredns(c: cluster2.Cluster2) -> nodeenv.Process:
    corefile = os.path.join(c.dir, "Corefile")
    with open(corefile, "w") as f:
        f.write(f""".:53 {{
    bind {cluster2.HOST_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {c.kubeconfig}
    }}
}}
""")
    p = nodeenv._spawn(c.env, "coredns", [tool("coredns"), "-conf", corefile])
    p.name = "coredns"
    try:
        nodeenv.wait_for(c.env, "CoreDNS answers", lambda: dns_query(
            cluster2.HOST_IP, "kubernetes.default.svc.cluster.local"), timeout=60)
    except BaseException:
        nodeenv.stop_process(p.proc, timeout=10)
        raise
    return p


# --- the chart -------------------------------------------------------------------------------


def kubernetes_endpoints(c: cluster2.Cluster2) -> None:
    """The "kubernetes" Service's endpoint: the API server on the bridge address
    (cli/local/cluster.py runs it with no endpoint reconciler: it advertises
    127.0.0.1), so in-cluster clients reach it through kube-proxy."""
    from kubernetes import client

    port = int(c.kube.server.rsplit(":", 1)[1])
    client.DiscoveryV1Api(c.kube.api_client()).create_namespaced_endpoint_slice("default", {
        "metadata": {"name": "kubernetes", "labels": {
            "kubernetes.io/service-name": "kubernetes",
            "endpointslice.kubernetes.io/managed-by": "modelcache-e2e"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [cluster2.HOST_IP], "conditions": {"ready": True}}],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})


def dmcr_volume(c: cluster2.Cluster2) -> None:
    """A hostPath PV on node 1 for the chart's dmcr-data claim (no provisioner here)."""
    from kubernetes import client

    n1 = c.nodes[0]
    path = os.path.join(n1.env.dir, "dmcr-data")
    os.makedirs(path, exist_ok=True)
    os.chown(path, 65532, 65532)
    client.CoreV1Api(c.kube.api_client()).create_persistent_volume({
        "metadata": {"name": "dmcr-data"},
        "spec": {"capacity": {"storage": "200Gi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "", "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": path, "type": "Directory"},
                 "claimRef": {"namespace": NAMESPACE, "name": "dmcr-data"},
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In",
                      "values": [n1.name]}]}]}}}})


def helm(d: Deployed, *args: str, timeout: float = 300) -> str:
    got = subprocess.run([tool("helm"), "--kubeconfig", d.cluster.kubeconfig, *args],
                         capture_output=True, text=True, timeout=timeout)
    if got.returncode != 0:
        raise DeployError(f"helm {' '.join(args[:2])}: exit {got.returncode}\n{got.stderr}")
    return got.stdout


def install(d: Deployed, hf_endpoint: str) -> None:
    sets = {
        "controller.image": d.images["controller"],
        "controller.hfEndpoint": hf_endpoint,
        "node.image": d.images["node"],
        "node.registrarImage": d.images["standin"],
        "node.livenessProbeImage": d.images["standin"],
        "node.kubeletRoot": KUBELET_ROOT,
        "node.cacheDir": CACHE_DIR,
        "dmcr.image": d.images["dmcr"],
    }
    args = [a for k, v in sets.items() for a in ("--set-string", f"{k}={v}")]
    helm(d, "install", "modelcache", os.path.join(ROOT, "charts", "modelcache"),
         "--namespace", NAMESPACE, "--create-namespace", *args)


def retag(d: Deployed, name: str, tag: str) -> str:
    """The same archive pushed under another tag (an upgrade's new image reference)."""
    archive = os.path.join(IMAGES, f"modelcache-{name}.oci.tar")
    ref = f"{d.registry}/modelcache/modelcache-{name}:{tag}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                    f"oci-archive:{archive}", f"docker://{ref}"],
                   check=True, capture_output=True, timeout=300)
    return ref


def upgrade(d: Deployed, sets: dict[str, str]) -> None:
    """``helm upgrade --reuse-values`` with ``sets`` on top."""
    args = [a for k, v in sets.items() for a in ("--set-string", f"{k}={v}")]
    helm(d, "upgrade", "modelcache", os.path.join(ROOT, "charts", "modelcache"),
         "--namespace", NAMESPACE, "--reuse-values", *args)


def ready_workloads(d: Deployed) -> dict[str, str]:
    """What is not Ready yet (name -> why); empty once every workload is."""
    from kubernetes import client

    apps = client.AppsV1Api(d.cluster.kube.api_client())
    waiting = {}
    for dep in apps.list_namespaced_deployment(NAMESPACE).items:
        want, have = dep.spec.replicas or 0, dep.status.ready_replicas or 0
        if have < want:
            waiting[f"deployment/{dep.metadata.name}"] = f"{have}/{want} ready"
    dss = apps.list_namespaced_daemon_set(NAMESPACE).items
    if not dss:
        waiting["daemonset"] = "none yet"
    for ds in dss:
        want, have = ds.status.desired_number_scheduled or 0, ds.status.number_ready or 0
        updated = ds.status.updated_number_scheduled or 0
        if want != len(d.cluster.nodes) or have < want or updated < want or \
                (ds.status.observed_generation or 0) < (ds.metadata.generation or 0):
            waiting[f"daemonset/{ds.metadata.name}"] = f"{have}/{want} ready, {updated} updated"
    return waiting


def describe_pods(d: Deployed) -> str:
    got = d.kubectl("get", "pods", "-A", "-o", "wide", check=False)
    ev = d.kubectl("get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False)
    return f"{got.stdout}\n{ev.stdout[-6000:]}"


# --- Prometheus, as a real cluster's would find the pods ----------------------------------


class PodPrometheus:
    """Debian's ``prometheus`` as a host process (hack/install.d/prometheus.sh),
    scraping the release namespace's pods annotated ``prometheus.io/scrape:
    "true"`` at ``<pod IP>:<prometheus.io/port>`` directly (the host routes both
    nodes' pod CIDRs), as a cluster's Prometheus with pod discovery does.
    Debian builds Prometheus without Kubernetes service discovery, so a thread
    here stands in for it: every second it lists those pods through the API
    server and rewrites a ``file_sd_configs`` targets file, which Prometheus
    re-reads on change. Each target's ``job`` is ``<namespace>/modelcache-<component>``,
    the name the chart's PodMonitors give and the shipped alert rules (loaded
    here) read; ``node`` and ``pod`` say where it runs. Scrapes every 2 s."""

    def __init__(self, c: cluster2.Cluster2, rules: str) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise DeployError("prometheus not installed (hack/install.d/prometheus.sh)")
        work = os.path.join(c.dir, "prometheus")
        os.makedirs(work, exist_ok=True)
        self.cluster = c
        self.targets = os.path.join(work, "pods.json")
        self._write_targets([])
        self.port = kubeenv.free_port()
        cfg = {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
               "rule_files": [rules],
               "scrape_configs": [{"job_name": "pods", "file_sd_configs": [
                   {"files": [self.targets], "refresh_interval": "2s"}]}]}
        path = os.path.join(work, "prometheus.yml")
        with open(path, "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        self.process = nodeenv._spawn(c.env, "prometheus", [
            binary, f"--config.file={path}", f"--storage.tsdb.path={work}/tsdb",
            f"--web.listen-address=127.0.0.1:{self.port}"])
        self.process.name = "prometheus"
        c.env.procs.append(self.process)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._discover, daemon=True)
        self._thread.start()
        try:
            nodeenv.wait_for(c.env, "prometheus ready", lambda: self.api("status/runtimeinfo"),
                             timeout=60)
        except BaseException:
            self.stop()
            raise

    def _write_targets(self, groups: list[dict[str, Any]]) -> None:
        with open(self.targets + ".tmp", "w") as f:
            json.dump(groups, f)
        os.replace(self.targets + ".tmp", self.targets)

    def _discover(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.cluster.kube.api_client())
        last: list[dict[str, Any]] = []
        while not self._stop.wait(1):
            try:
                pods = core.list_namespaced_pod(NAMESPACE).items
            except Exception:  # the API server busy: the last targets stay
                continue
            groups = [{"targets": [f"{p.status.pod_ip}:{ann['prometheus.io/port']}"],
                       "labels": {"job": f"{NAMESPACE}/modelcache-"
                                         f"{(p.metadata.labels or {}).get(COMPONENT, '')}",
                                  "node": p.spec.node_name, "pod": p.metadata.name}}
                      for p in pods
                      for ann in [p.metadata.annotations or {}]
                      if ann.get("prometheus.io/scrape") == "true" and p.status.pod_ip
                      and p.status.phase == "Running" and not p.metadata.deletion_timestamp]
            if groups != last:
                self._write_targets(groups)
                last = groups

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as r:
            doc = json.load(r)
        if doc.get("status") != "success":
            raise DeployError(f"prometheus {path}: {doc}")
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        nodeenv.stop_process(self.process.proc, timeout=15)


@contextlib.contextmanager
def prometheus(c: cluster2.Cluster2, rules: str) -> Iterator[PodPrometheus]:
    prom = PodPrometheus(c, rules)
    try:
        yield prom
    finally:
        prom.stop()


# --- a ReadWriteMany volume both nodes reach (stand-in) ---------------------------------

RWX_CLASS = "e2e-rwx"


def rwx_volume(c: cluster2.Cluster2) -> str:
    """A STAND-IN for an NFS/CephFS volume: a StorageClass with no provisioner
    and one static ReadWriteMany PersistentVolume of hostPath on a directory of
    the host (under the cluster's dir, outside every node's private paths), which
    both nodes' mount namespaces see, as they would an NFS export each node
    mounts. This kernel has no NFS client (``nfs`` is not in /proc/filesystems),
    so a real NFS server could not be mounted here. Returns the directory."""
    from kubernetes import client

    path = os.path.join(c.dir, "rwx-share")
    os.makedirs(path, exist_ok=True)
    os.chown(path, 65532, 65532)  # the materializer's user; hostPath ignores fsGroup
    api = c.kube.api_client()
    client.StorageV1Api(api).create_storage_class({
        "metadata": {"name": RWX_CLASS}, "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"})
    client.CoreV1Api(api).create_persistent_volume({
        "metadata": {"name": "e2e-rwx-share"},
        "spec": {"capacity": {"storage": "20Gi"}, "accessModes": ["ReadWriteMany"],
                 "storageClassName": RWX_CLASS, "persistentVolumeReclaimPolicy": "Retain",
                 "hostPath": {"path": path, "type": "Directory"}}})
    return path


# --- what a node holds -------------------------------------------------------------------


def node_mounts(n: cluster2.Node) -> list[tuple[str, str]]:
    """(root, mount point) of every mount in node ``n``'s mount namespace
    under its kubelet pods dir or from inside its cache dir: pods' volumes and
    the cache's bind mounts (not the node's own cache dir, cluster2's bind)."""
    with open(f"/proc/{n.mount_holder}/mountinfo") as f:
        rows = [line.split() for line in f]
    pods = KUBELET_ROOT + "/pods/"
    cache = cluster2.private_dir(n, CACHE_DIR) + "/"
    return [(r[3], r[4]) for r in rows if r[4] != CACHE_DIR and (
        r[4].startswith(pods) or r[3].startswith(cache) or r[3].startswith(CACHE_DIR + "/"))]


# --- the context manager -------------------------------------------------------------------


@contextlib.contextmanager
def running(tag: str = "0.1.0") -> Iterator[Deployed]:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    build_images()
    timings["build images"] = time.monotonic() - t0
    t0 = time.monotonic()
    with localregistry.running() as reg:
        client = RegistryClient(reg.host, insecure=True)
        imgs = images.push_images(client)
        refs = push_archives(reg.host, tag)
        refs["standin"] = push_standin_sidecars(client, tag)
        timings["push images"] = time.monotonic() - t0
        t1 = time.monotonic()
        with cluster2.running(
                sandbox_image=imgs.pause, registries=[reg.host],
                private_paths=[KUBELET_ROOT, CACHE_DIR], cluster_dns=cluster2.HOST_IP,
                extra_apiserver_args=["--enable-aggregator-routing=true"]) as c:
            timings["cluster up"] = time.monotonic() - t1
            kubernetes_endpoints(c)
            # cluster2 stops only its own processes; a CoreDNS left running would
            # share port 53 (SO_REUSEPORT) with the next run's and answer half its
            # queries from a dead cluster
            dns = start_coredns(c)
            try:
                dmcr_volume(c)
                yield Deployed(cluster=c, registry=reg.host, busybox=imgs.busybox, images=refs,
                               timings=timings)
            finally:
                nodeenv.stop_process(dns.proc, timeout=10)
