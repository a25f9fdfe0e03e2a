"""A two-node Kubernetes cluster on this one machine, with a routable pod
network and Services, for tests/e2e.

Sits beside ``nodeenv.py`` (the one-node e2e, whose pieces it reuses: the
containerd config, the control plane, process handling, teardown helpers)
and under ``test_two_nodes.py`` and the later chart tests. Each node is a
real kubelet with its own containerd (config, root, state, socket), kubelet
root dir, cgroup parent (``cgroupRoot``) and network namespace:

    host netns                      node netns mc2-<id>-n<i>
    bridge mc2b-<id> 10.244.100.254 --veth-- eth0 10.244.100.<i>
                                              cni0 10.244.<i>.1 (CNI bridge)
                                              pods 10.244.<i>.0/24 (host-local)

- containerd, kubelet and kube-proxy of node i run in its netns (``nsenter
  --net``: only the network namespace; the mount namespace stays shared, so
  kubelet's volume mounts are seen by containerd and by the host's teardown,
  where ``ip netns exec`` would give each process a private one);
- each netns routes the other node's pod CIDR via that node's IP across the
  host bridge and forwards (``ip_forward`` is per netns; the host's stays as
  it is, it only switches frames); the host routes both pod CIDRs to the
  nodes, so the test process reaches pods too;
- kube-proxy (iptables mode, its rules in the node's netns) per node, so
  ClusterIP Services work from pods on both nodes;
- the API server binds 0.0.0.0 (``--bind-address``) so the nodes reach it
  on the bridge address; its certificate names 127.0.0.1 and localhost, so
  the nodes' kubeconfig says ``tls-server-name: localhost``;
- plain-HTTP registries on host loopback (``cli/local/registry.py`` binds
  127.0.0.1 only) are forwarded to the same port on the bridge address by a
  small TCP relay in this process, and each containerd's ``hosts.toml`` maps
  the loopback name to it: image references stay ``127.0.0.1:<port>/...``
  for the host's pushes and the nodes' pulls alike;
- kubelet serves on its node IP, reachable from the API server, so
  ``kubectl logs``/``exec`` work;
- with ``private_paths`` (the chart as deployed, tests/e2e/deployed.py),
  each node also gets a mount namespace of its own, held by a ``sleep``
  started with ``unshare --mount --propagation slave``: there the node's own
  directories are bind-mounted at those host paths (``/var/lib/kubelet``,
  the cache dir), made ``rshared`` so a container's ``Bidirectional`` mount
  reaches kubelet and back, and ``/run/netns`` is a tmpfs of the node's (the
  pods' netns files); containerd, kubelet and kube-proxy enter it with
  ``nsenter --mount``. Slave propagation: the host's mounts reach the node,
  the node's never reach the host, and they all go with the namespace when
  its last process exits.

Shortcuts, beyond nodeenv's (admin identity for Kubernetes components,
cgroup v1, oom_score_adj clamp; unlike nodeenv, ``cgroupsPerQOS`` is on,
under each node's own ``cgroupRoot``):
- kubelet's API allows anonymous requests (AlwaysAllow): the API server
  holds no kubelet client certificate (kubeenv makes the PKI), and the node
  IPs are reachable only from this host;
- pod CIDRs are fixed in each node's CNI config, not allocated by the
  controller-manager (``Node.spec.podCIDR`` stays empty; kube-proxy is told
  the cluster CIDR instead);
- no cluster DNS (no CoreDNS build here): pods reach Services by ClusterIP;
- the addresses are fixed (10.244.0.0/16, 10.96.0.0/24), so two of these
  clusters cannot run at once on one machine (``running`` says so).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from cli.local.cluster import stop_process
from cli.local.pki import write_kubeconfig
from tests import kubeenv
from tests.e2e import nodeenv

HOST_IP = "10.244.100.254"  # the host's address on the node bridge
NODE_NET = 24
CLUSTER_CIDR = "10.244.0.0/16"
NODE_COUNT = 2


def node_ip(i: int) -> str:
    return f"10.244.100.{i}"


def pod_cidr(i: int) -> str:
    return f"10.244.{i}.0/24"


class ClusterError(RuntimeError):
    """The two-node cluster could not be set up."""


@dataclass
class Node:
    """One node: ``env`` is its nodeenv.NodeEnv (dir, processes, sockets)."""

    index: int
    env: nodeenv.NodeEnv
    netns: str
    cgroup: str  # kubelet's cgroupRoot, one dir per v1 hierarchy
    mount_holder: int = 0  # pid holding the node's mount namespace; 0: the host's

    @property
    def name(self) -> str:
        return self.env.node_name

    @property
    def ip(self) -> str:
        return node_ip(self.index)


@dataclass
class Cluster2:
    """The running cluster; ``kube`` is the API server (admin kubeconfig on
    127.0.0.1, for the host), ``env`` holds every process (control plane and
    nodes) for ``nodeenv.wait_for``."""

    dir: str
    id: str
    kube: Any  # kubeenv.KubeEnv
    env: nodeenv.NodeEnv
    bridge: str
    nodes: list[Node] = field(default_factory=list)
    private_paths: tuple[str, ...] = ()
    cluster_dns: str = ""
    relays: list[socketserver.ThreadingTCPServer] = field(default_factory=list)

    @property
    def kubeconfig(self) -> str:
        return str(self.kube.kubeconfig)

    @property
    def node_names(self) -> list[str]:
        return [n.name for n in self.nodes]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def logs(self, n: int = 25) -> str:
        return self.env.logs(n)


# --- host side: commands, network, relay --------------------------------------


def _run(*argv: str, netns: str | None = None) -> None:
    cmd = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv] if netns else list(argv)
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if got.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)}: exit {got.returncode}: {got.stderr.strip()}")


def _netns_names() -> set[str]:
    return set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()


def _network_up(c: Cluster2) -> None:
    _run("ip", "link", "add", c.bridge, "type", "bridge")
    _run("ip", "addr", "add", f"{HOST_IP}/{NODE_NET}", "dev", c.bridge)
    _run("ip", "link", "set", c.bridge, "up")
    for n in c.nodes:
        host_end = f"mc2v-{c.id}-{n.index}"
        _run("ip", "netns", "add", n.netns)
        _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0",
             "netns", n.netns)
        _run("ip", "link", "set", host_end, "master", c.bridge, "up")
        _run("ip", "addr", "add", f"{n.ip}/{NODE_NET}", "dev", "eth0", netns=n.netns)
        _run("ip", "link", "set", "lo", "up", netns=n.netns)
        _run("ip", "link", "set", "eth0", "up", netns=n.netns)
        # kubelet and kube-proxy want a default route to pick an interface;
        # the host does not forward, so it leads nowhere beyond the bridge
        _run("ip", "route", "add", "default", "via", HOST_IP, netns=n.netns)
        for other in c.nodes:
            if other is not n:
                _run("ip", "route", "add", pod_cidr(other.index), "via", other.ip,
                     netns=n.netns)
        _run("sysctl", "-qw", "net.ipv4.ip_forward=1", netns=n.netns)
        # Service traffic between two pods on one node's bridge passes iptables
        _run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1", netns=n.netns)
        _run("ip", "route", "add", pod_cidr(n.index), "via", n.ip)


def _network_down(c: Cluster2) -> None:
    for n in c.nodes:
        if n.netns in _netns_names():
            # deleting the netns destroys eth0 and with it the host end
            subprocess.run(["ip", "netns", "del", n.netns], capture_output=True, timeout=30)
    # the host routes to the pod CIDRs go with the bridge
    subprocess.run(["ip", "link", "del", c.bridge], capture_output=True, timeout=30)


class _Relay(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    target: tuple[str, int]


class _RelayHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        assert isinstance(self.server, _Relay)
        with contextlib.suppress(OSError), \
                socket.create_connection(self.server.target, timeout=10) as up:
            up.settimeout(None)
            t = threading.Thread(target=_pump, args=(up, self.request), daemon=True)
            t.start()
            _pump(self.request, up)
            t.join(60)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 20):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def expose(c: Cluster2, host_port: str) -> str:
    """Relay ``127.0.0.1:<port>`` (a host loopback server, e.g. a registry)
    to ``<bridge address>:<port>``, reachable from the nodes; returns that."""
    port = int(host_port.rsplit(":", 1)[1])
    relay = _Relay((HOST_IP, port), _RelayHandler)
    relay.target = ("127.0.0.1", port)
    threading.Thread(target=relay.serve_forever, daemon=True).start()
    c.relays.append(relay)
    return f"{HOST_IP}:{port}"


def registry_mirror(hosts_dir: str, registry: str, via: str) -> None:
    """``hosts.toml``: containerd pulls ``registry`` (its name in image
    references) over plain HTTP from ``via``."""
    d = os.path.join(hosts_dir, registry)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "hosts.toml"), "w") as f:
        f.write(f'server = "http://{via}"\n\n'
                f'[host."http://{via}"]\n'
                '  capabilities = ["pull", "resolve"]\n')


# --- nodes ------------------------------------------------------------------------


def _pod_network(conf_dir: str, n: Node) -> None:
    os.makedirs(conf_dir, exist_ok=True)
    conf = {"cniVersion": "0.4.0", "name": "mc2-pods", "plugins": [{
        "type": "bridge", "bridge": "cni0", "isGateway": True, "hairpinMode": True,
        # pod IPs stay visible across nodes: no masquerade
        "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": pod_cidr(n.index)}]],
                 "routes": [{"dst": "0.0.0.0/0"}],
                 # leases under the node's dir, not /var/lib/cni
                 "dataDir": os.path.join(n.env.dir, "cni-ipam")},
    }]}
    with open(os.path.join(conf_dir, "10-pods.conflist"), "w") as f:
        json.dump(conf, f)


def _node_kubeconfig(c: Cluster2) -> str:
    """Admin credentials, the API server at the bridge address."""
    with open(c.kube.kubeconfig) as f:
        conf = yaml.safe_load(f)
    port = c.kube.server.rsplit(":", 1)[1]
    path = write_kubeconfig(os.path.join(c.dir, "kubeconfig-nodes"), f"https://{HOST_IP}:{port}",
                            c.kube.pki.ca, conf["users"][0]["user"])
    with open(path) as f:
        conf = json.load(f)
    conf["clusters"][0]["cluster"]["tls-server-name"] = "localhost"
    with open(path, "w") as f:
        json.dump(conf, f)
    return path


def _in_netns(n: Node, argv: Sequence[str]) -> list[str]:
    mnt = [f"--mount=/proc/{n.mount_holder}/ns/mnt"] if n.mount_holder else []
    return ["nsenter", f"--net=/run/netns/{n.netns}", *mnt, "--", *argv]


def private_dir(n: Node, path: str) -> str:
    """Node ``n``'s own directory that its mount namespace shows at ``path``."""
    return os.path.join(n.env.dir, "private", path.strip("/").replace("/", "_"))


def _mount_namespace(c: Cluster2, n: Node) -> None:
    """The node's mount namespace (module docstring), held by a ``sleep``."""
    script = ["set -e", "mount -t tmpfs -o mode=755 netns /run/netns"]
    for path in c.private_paths:
        src = private_dir(n, path)
        os.makedirs(src, exist_ok=True)
        os.makedirs(path, exist_ok=True)
        script += [f"mount --bind '{src}' '{path}'", f"mount --make-rshared '{path}'"]
    ready = os.path.join(n.env.dir, "mountns.ready")
    script += [f"touch '{ready}'", "exec sleep infinity"]
    os.makedirs("/run/netns", exist_ok=True)
    p = nodeenv._spawn(n.env, "mountns", ["unshare", "--mount", "--propagation", "slave", "--",
                                          "sh", "-c", "\n".join(script)])
    p.name = f"{n.name}/mountns"
    c.env.procs.append(p)
    nodeenv.wait_for(c.env, f"{n.name} mount namespace", lambda: os.path.exists(ready), timeout=30)
    n.mount_holder = p.proc.pid


def _spawn(c: Cluster2, n: Node, name: str, argv: Sequence[str]) -> None:
    p = nodeenv._spawn(n.env, name, _in_netns(n, argv))
    p.name = f"{n.name}/{name}"
    c.env.procs.append(p)


def _start_node(c: Cluster2, n: Node, *, sandbox_image: str, registries: Sequence[str],
                kubeconfig: str) -> None:
    bins = nodeenv.node_binaries()
    env = n.env
    ctd = os.path.join(env.dir, "containerd")
    hosts_dir = os.path.join(ctd, "certs.d")
    cni_dir = os.path.join(env.dir, "cni")
    os.makedirs(ctd, exist_ok=True)
    for r in registries:
        registry_mirror(hosts_dir, r, f"{HOST_IP}:{r.rsplit(':', 1)[1]}")
    _pod_network(cni_dir, n)
    conf = os.path.join(ctd, "config.toml")
    with open(conf, "w") as f:
        f.write(nodeenv.containerd_config(ctd, sandbox_image, cni_dir, hosts_dir))
    if c.private_paths:
        _mount_namespace(c, n)
    _spawn(c, n, "containerd", [bins.containerd, "--config", conf, "--log-level", "info"])
    nodeenv.wait_for(c.env, f"{n.name} containerd socket", lambda: subprocess.run(
        [bins.ctr, "--address", env.containerd_socket, "version"], capture_output=True,
        timeout=10).returncode == 0, timeout=60)

    config = nodeenv.kubelet_config(env, port=10250, healthz_port=10248)
    config.update({
        "address": n.ip,
        # the API server (no kubelet client certificate) proxies logs/exec
        "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
        "authorization": {"mode": "AlwaysAllow"},
        # pods' cgroups under the node's own root: kubelet's kubepods/ QoS tree
        # (nodeenv turns it off: without a root of its own it would sit at the
        # machine's top level)
        "cgroupsPerQOS": True,
        "cgroupRoot": "/" + n.cgroup,
    })
    if c.cluster_dns:
        config.update({"clusterDNS": [c.cluster_dns], "clusterDomain": "cluster.local"})
    _make_cgroup_root(n.cgroup)
    kconf = os.path.join(env.dir, "kubelet-config.yaml")
    with open(kconf, "w") as f:
        yaml.safe_dump(config, f)
    _spawn(c, n, "kubelet", [
        bins.kubelet, f"--config={kconf}", f"--kubeconfig={kubeconfig}",
        f"--root-dir={env.kubelet_root}", f"--cert-dir={os.path.join(env.dir, 'kubelet-pki')}",
        f"--hostname-override={n.name}", f"--node-ip={n.ip}", "--v=2",
    ])
    _spawn(c, n, "kube-proxy", [
        kube_proxy(), f"--kubeconfig={kubeconfig}", f"--hostname-override={n.name}",
        "--proxy-mode=iptables", f"--cluster-cidr={CLUSTER_CIDR}",
        f"--bind-address={n.ip}", f"--healthz-bind-address={n.ip}:10256",
        "--metrics-bind-address=127.0.0.1:10249",
        # the conntrack table is the host's kernel's: leave its sysctls alone
        "--conntrack-max-per-core=0", "--conntrack-tcp-timeout-established=0",
        "--conntrack-tcp-timeout-close-wait=0", "--v=1",
    ])


def _make_cgroup_root(name: str) -> None:
    """``/<name>`` in every v1 hierarchy (kubelet wants its cgroupRoot to exist);
    a new cpuset starts empty, so it gets its parent's CPUs and memory nodes."""
    for top in glob.glob(os.path.join(nodeenv.CGROUP_ROOT, "*")):
        if not os.path.isfile(os.path.join(top, "cgroup.procs")):
            continue
        d = os.path.join(top, name)
        os.makedirs(d, exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if os.path.exists(os.path.join(top, knob)):
                with open(os.path.join(top, knob)) as src, open(os.path.join(d, knob), "w") as dst:
                    dst.write(src.read())


def kube_proxy() -> str:
    path = os.path.join(kubeenv.TOOLS, f"kube-{kubeenv.versions()['KUBE_VERSION']}", "kube-proxy")
    if not os.access(path, os.X_OK):
        raise ClusterError(f"not installed: {path} (run MODELCACHE_NODE_E2E=1 "
                           "hack/install.d/node-e2e.sh)")
    return path


def _proxy_healthy(n: Node) -> bool:
    with urllib.request.urlopen(f"http://{n.ip}:10256/healthz", timeout=2) as r:
        return r.status == 200


# --- teardown and what it must leave behind -----------------------------------------


def _stop(c: Cluster2) -> None:
    for relay in c.relays:
        relay.shutdown()
        relay.server_close()
    by_name = {p.name: p for p in c.env.procs}
    order = [f"{n.name}/{what}" for what in ("kubelet", "kube-proxy") for n in c.nodes]
    for name in [*order, "kube-scheduler", "kube-controller-manager"]:
        if name in by_name:
            stop_process(by_name[name].proc, timeout=20)
    for n in c.nodes:
        ctd = by_name.get(f"{n.name}/containerd")
        if ctd and ctd.proc.poll() is None:
            sandbox_netns = _task_netns(n)
            nodeenv._cleanup_containers(n.env)
            stop_process(ctd.proc, timeout=20)
            # pods kubelet did not stop leave their netns (/run/netns/cni-*) behind
            for name in sandbox_netns:
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
        holder = by_name.get(f"{n.name}/mountns")
        if holder:  # the node's mounts (and its pods' netns) go with the namespace
            stop_process(holder.proc, timeout=20)
    nodeenv._unmount_under(c.dir)
    for n in c.nodes:
        nodeenv._remove_log_links(n.env.dir)
    _network_down(c)
    # runc leaves the (empty) parents of the pods' cgroups: the node's cgroupRoot
    for n in c.nodes:
        for top in glob.glob(os.path.join(nodeenv.CGROUP_ROOT, "*", n.cgroup)):
            for path, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):
                    os.rmdir(path)


def _task_netns(n: Node) -> list[str]:
    """The /run/netns entries the node's running containers are in (by inode)."""
    by_inode = {os.stat(f"/run/netns/{name}").st_ino: name for name in _netns_names()
                if name.startswith("cni-")}
    base = [nodeenv.node_binaries().ctr, "--address", n.env.containerd_socket,
            "--namespace", "k8s.io"]
    found = []
    with contextlib.suppress(subprocess.SubprocessError, OSError):
        rows = subprocess.run([*base, "tasks", "ls"], capture_output=True, text=True,
                              timeout=30).stdout.splitlines()[1:]
        for row in rows:
            with contextlib.suppress(OSError, IndexError, ValueError):
                ino = os.stat(f"/proc/{int(row.split()[1])}/ns/net").st_ino
                if ino in by_inode:
                    found.append(by_inode.pop(ino))
    return found


def leftovers(c: Cluster2, netns_before: set[str]) -> list[str]:
    """What teardown left behind: processes, mounts, netns, links, cgroups."""
    found: list[str] = []
    for p in c.env.procs:
        if p.proc.poll() is None:
            found.append(f"process {p.name} pid {p.proc.pid}")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            if c.dir + "/" in cmd:
                found.append(f"process {pid}: {cmd[:120]}")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            if mp.startswith(c.dir + "/") or "/run/netns/" in mp and \
                    os.path.basename(mp) not in netns_before:
                found.append(f"mount {mp}")
    found += [f"netns {ns}" for ns in sorted(_netns_names() - netns_before)]
    if os.path.exists(f"/sys/class/net/{c.bridge}"):
        found.append(f"link {c.bridge}")
    for n in c.nodes:
        found += [f"cgroup {p}" for p in glob.glob(os.path.join(nodeenv.CGROUP_ROOT, "*", n.cgroup))]
    if os.path.exists(c.dir):
        found.append(f"dir {c.dir}")
    return found


# --- the context manager -----------------------------------------------------------


@contextlib.contextmanager
def running(*, sandbox_image: str, registries: Sequence[str] = (),
            keep_dir: bool = False, private_paths: Sequence[str] = (),
            cluster_dns: str = "", extra_apiserver_args: Sequence[str] = ()
            ) -> Iterator[Cluster2]:
    """API server, controller-manager and scheduler on the host; two nodes,
    each containerd + kubelet + kube-proxy in its own netns.

    ``registries``: host:port (127.0.0.1) of plain-HTTP registries that both
    nodes' containerd pull from (relayed, see the module docstring);
    ``sandbox_image`` must live in one of them. ``private_paths``: host
    paths each node sees as a directory of its own (module docstring);
    ``/var/lib/kubelet`` among them is then kubelet's root dir.
    ``cluster_dns``: the kubelets' clusterDNS (a resolver the caller runs).
    """
    if os.geteuid() != 0:
        raise ClusterError("the two-node e2e needs root (netns, containerd, runc, mounts)")
    with open("/proc/net/route") as f:
        if any(line.split()[1] == "0064F40A" for line in f.readlines()[1:]):  # 10.244.100.0
            raise ClusterError("10.244.100.0/24 is already routed here: another two-node "
                               "cluster running?")
    work = tempfile.mkdtemp(prefix="mc2-", dir="/tmp")  # short: unix socket paths
    cid = secrets.token_hex(2)
    with kubeenv.running(extra_apiserver_args=[
            # the nodes' names resolve nowhere: logs/exec go to their IPs
            "--bind-address=0.0.0.0", "--kubelet-preferred-address-types=InternalIP",
            *extra_apiserver_args]) as kube:
        c = Cluster2(dir=work, id=cid, kube=kube, bridge=f"mc2b-{cid}",
                     private_paths=tuple(private_paths), cluster_dns=cluster_dns,
                     env=nodeenv.NodeEnv(
            dir=work, kube=kube, node_name="", kubelet_root="", containerd_socket="",
            plugin_socket="", cache_dir=""))
        for i in range(1, NODE_COUNT + 1):
            d = os.path.join(work, f"n{i}")
            kubelet_root = "/var/lib/kubelet" if "/var/lib/kubelet" in private_paths \
                else os.path.join(d, "kubelet")
            c.nodes.append(Node(index=i, netns=f"mc2-{cid}-n{i}", cgroup=f"mc2-{cid}-n{i}",
                                env=nodeenv.NodeEnv(
                dir=d, kube=kube, node_name=f"mc2-node-{i}", kubelet_root=kubelet_root,
                containerd_socket=os.path.join(d, "containerd", "containerd.sock"),
                plugin_socket=os.path.join(kubelet_root, "plugins", nodeenv.DRIVER, "csi.sock"),
                cache_dir=os.path.join(d, "cache"))))
        try:
            _start(c, sandbox_image=sandbox_image, registries=registries)
            yield c
        finally:
            with contextlib.suppress(Exception):
                _stop(c)
            if keep_dir or os.environ.get("MODELCACHE_E2E_KEEP"):
                sys.stderr.write(f"cluster2: kept {work}\n")
            else:
                shutil.rmtree(work, ignore_errors=True)


def _wait_ready(c: Cluster2, core: Any, n: Node) -> None:
    nodeenv.wait_for(c.env, f"node {n.name} Ready", lambda: nodeenv._node_ready(core, n.name))


def _start(c: Cluster2, *, sandbox_image: str, registries: Sequence[str]) -> None:
    from kubernetes import client

    core = client.CoreV1Api(c.kube.api_client())
    _network_up(c)
    for r in registries:
        expose(c, r)
    nodeenv.start_control_plane(c.env, c.kube, nodeenv.node_binaries())
    kubeconfig = _node_kubeconfig(c)
    for n in c.nodes:
        _start_node(c, n, sandbox_image=sandbox_image, registries=registries,
                    kubeconfig=kubeconfig)
        if "/var/lib/kubelet" not in c.private_paths:
            # kubelet's device-plugin socket is a fixed path, /var/lib/kubelet/device-plugins/
            # kubelet.sock, whatever --root-dir says: each kubelet empties that directory and
            # then listens there. Two started together in one mount namespace race (one gets
            # EADDRINUSE and exits). One after the other, the later takes the path over and
            # the earlier keeps serving on the socket it holds (no device plugins here).
            _wait_ready(c, core, n)
    for n in c.nodes:
        _wait_ready(c, core, n)
        nodeenv.wait_for(c.env, f"{n.name} kube-proxy healthy", lambda n=n: _proxy_healthy(n),
                         timeout=60)
    # pods need the namespace's ServiceAccount, which the controller-manager makes
    nodeenv.wait_for(c.env, "default ServiceAccount",
                     lambda: core.read_namespaced_service_account("default", "default"),
                     timeout=60)


def _main() -> None:
    """Bring the cluster up by hand: python -m tests.e2e.cluster2."""
    import signal

    from cli.local import registry as localregistry
    from modelpack.oci.registry import RegistryClient
    from tests.e2e import images

    with localregistry.running() as reg:
        imgs = images.push_images(RegistryClient(reg.host, insecure=True))
        t0 = time.monotonic()
        with running(sandbox_image=imgs.pause, registries=[reg.host], keep_dir=True) as c:
            print(f"up in {time.monotonic() - t0:.1f}s  KUBECONFIG={c.kubeconfig}  "
                  f"nodes={c.node_names}  busybox={imgs.busybox}  dir={c.dir}", flush=True)
            # blocked first, or the default action kills us before teardown
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    _main()
