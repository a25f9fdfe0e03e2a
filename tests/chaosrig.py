"""The chaos test's rig (tests/integration/test_chaos.py): restartable programs, kubelet's
CSI calls, and what /proc says about processes and open files.

- ``Program``: one of the system's programs (the manager, the node plugin) as a
  real subprocess that can be SIGKILLed and started again with the same flags.
- ``SlowHub``: the local Hugging Face Hub (``cli/local/hub.py``) sending every
  body at a bounded rate, so a publish lasts long enough for a kill to land in
  the middle of it. Files are served from memory (``files=``), which is the
  path that writes through ``wfile``.
- ``Kubelet``: NodePublishVolume/NodeUnpublishVolume as kubelet calls them: a
  new connection per call, a deadline per call, retried with back-off. Every
  answer that is not OK is recorded; kubelet retries every error, but one that
  is not in ``RETRYABLE`` is final for the operation, and the test treats it as
  a finding.
- ``publish_workers`` / ``holders``: the publish worker processes (the embedded
  Job runner's children, found by their working directory, so the ones a
  killed manager orphaned are found too) and the live processes holding a file
  open (psutil is not installed: /proc).
- ``system``: the whole system brought up for the test, and taken down after
  (nothing left running or mounted, even when the test failed).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from cli.local import cluster as localcluster
from cli.local import hub as localhub
from csi.stubs import pb, rpc
from kube import client as k
from tests import loopfs
from tests.csi_fixtures import Proxy, unmount_everything_under
from tests.integration.test_controller import install_crds

# what kubelet retries as "operation not finished" (csi_client.go isFinalError)
RETRYABLE = {grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.CANCELLED}


class Program:
    """A program of the system as a subprocess: ``start`` (again), ``kill`` (SIGKILL), ``stop``."""

    def __init__(self, name: str, argv: list[str], log_path: str, cwd: str,
                 ready: Callable[[], bool], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.ready = ready
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== start {self.starts} ====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, env=self.env)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} at start:\n"
                                     f"{self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"{self.name} not ready in {timeout:.0f} s:\n{self.tail()}")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def kill(self, sig: int = signal.SIGKILL, wait: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""


class _Throttled:
    """A handler's ``wfile`` that sends at most ``rate`` bytes a second (per response)."""

    def __init__(self, raw: Any, rate: int) -> None:
        self.raw, self.rate = raw, rate

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        step = max(1, self.rate // 20)
        for i in range(0, len(view), step):
            piece = view[i:i + step]
            self.raw.write(piece)
            if len(view) > step:
                time.sleep(len(piece) / self.rate)
        return len(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class SlowHub(localhub.HubServer):
    """The local Hub, each response body sent at ``rate`` bytes a second."""

    def __init__(self, rate: int) -> None:
        super().__init__()
        self.rate = rate

    def start(self) -> SlowHub:
        super().start()
        server = self
        for httpd in (self.httpd, self.cdn):
            assert httpd is not None
            base = httpd.RequestHandlerClass

            # the hub's handler, with the rate on its output stream
            class Handler(base):  # type: ignore[valid-type,misc]
                def setup(self) -> None:
                    super().setup()
                    self.wfile = _Throttled(self.wfile, server.rate)

            httpd.RequestHandlerClass = Handler
        return self


@dataclass
class Kubelet:
    """kubelet's side of the node plugin's socket: calls retried until OK or ``give_up_at``
    (a monotonic time; the test sets it once the chaos is over)."""

    socket: str
    call_timeout: float = 20.0
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # (call, target, code: details)
    in_flight: int = 0  # calls waiting for an answer now
    give_up_at: float = float("inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _call(self, method: str, request: Any) -> None:
        delay = 0.2
        while True:
            # kubelet dials the driver's socket for every operation
            channel = grpc.insecure_channel(f"unix://{self.socket}")
            with self.lock:
                self.in_flight += 1
            try:
                getattr(rpc.NodeStub(channel), method)(request, timeout=self.call_timeout)
                return
            except grpc.RpcError as e:
                code = e.code()  # type: ignore[attr-defined]
                with self.lock:
                    self.answers.append((method, request.target_path,
                                         f"{code.name}: {(e.details() or '')[:300]}"))  # type: ignore[attr-defined]
                if time.monotonic() > self.give_up_at:
                    raise AssertionError(f"{method} {request.target_path}: still {code.name} "
                                         f"at the deadline: {e.details()}") from None  # type: ignore[attr-defined]
            finally:
                with self.lock:
                    self.in_flight -= 1
                channel.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)  # kubelet's exponential back-off, shortened

    def publish(self, request: Any) -> None:
        self._call("NodePublishVolume", request)

    def unpublish(self, volume_id: str, target: str) -> None:
        self._call("NodeUnpublishVolume",
                   pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target))

    def codes(self) -> dict[str, int]:
        """How many answers of each code other than OK."""
        out: dict[str, int] = {}
        with self.lock:
            for _, _, answer in self.answers:
                code = answer.split(":", 1)[0]
                out[code] = out.get(code, 0) + 1
        return out

    def final_errors(self) -> list[tuple[str, str, str]]:
        """The answers kubelet would take as final (not in RETRYABLE)."""
        with self.lock:
            return [a for a in self.answers
                    if a[2].split(":", 1)[0] not in {c.name for c in RETRYABLE}]


def _cmdline(pid: str) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def publish_workers(jobs_root: str) -> dict[int, str]:
    """pid -> model name (``--name``) of every live publish worker run under ``jobs_root``."""
    root = os.path.realpath(jobs_root) + "/"
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # a zombie: dead, not yet reaped by its (killed) parent
        except OSError:
            continue
        argv = _cmdline(pid)
        if not cwd.startswith(root) or "publish" not in argv:
            continue
        name = argv[argv.index("--name") + 1] if "--name" in argv[:-1] else "?"
        out[int(pid)] = name
    return out


def holders(paths: list[str]) -> dict[str, list[int]]:
    """For each path, the live processes that hold it open."""
    want = {os.path.realpath(p): p for p in paths}
    out: dict[str, list[int]] = {p: [] for p in paths}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in want:
                out[want[target]].append(int(pid))
    return out


# -- the system -------------------------------------------------------------------------


@dataclass
class System:
    """The running system, as the chaos test drives and inspects it."""

    work: str
    ns: str
    client: k.Kube
    registry: Any
    manager: Program
    node: Program
    kubelet: Kubelet
    jobs_root: str
    cache: str
    pods_root: str


def _http_ready(url: str) -> Callable[[], bool]:
    def ready() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False
    return ready


def _probe_ready(socket: str) -> Callable[[], bool]:
    def ready() -> bool:
        channel = grpc.insecure_channel(f"unix://{socket}")
        try:
            return bool(rpc.IdentityStub(channel).Probe(pb.ProbeRequest(), timeout=1)
                        .ready.value)
        except grpc.RpcError:
            return False
        finally:
            channel.close()
    return ready


def _stop_all(manager: Program, node: Program, jobs_root: str) -> None:
    """Nothing of the system left running: the manager, the plugin, every publish worker."""
    manager.kill()  # SIGKILL: a SIGTERM waits out the workers' grace here
    node.kill(signal.SIGTERM)
    for pid in publish_workers(jobs_root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def system(work: str, registry: Any, sources: dict[str, dict[str, bytes]], *, node_id: str,
           system_ns: str, hub_rate: int, pull_rate: int) -> Iterator[System]:
    """Bring the system up under ``work``: a cluster of its own, the CRDs, the node's RBAC
    and Node object, the hub serving ``sources`` (name -> {path: bytes}) as ``chaos/<name>``
    at ``hub_rate``, a proxy at ``pull_rate`` in front of ``registry``, a loop XFS for the
    node cache, then the manager and the plugin; everything stopped and unmounted after."""
    with contextlib.ExitStack() as stack:
        cluster = localcluster.start(os.path.join(work, "kube"))
        stack.callback(cluster.stop)
        install_crds(cluster)
        client = k.Kube.from_config(cluster.kubeconfig)
        stack.callback(client.close)
        ns = "chaos"
        for n in (ns, system_ns):
            with contextlib.suppress(k.Conflict):
                client.create(k.Resource("", "v1", "namespaces", False),
                              {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}})
        manifests = os.path.join(localcluster.REPO_ROOT, "daemonset")
        cluster.kubectl("apply", "-f", os.path.join(manifests, "node-rbac.yaml"))
        node_kubeconfig = cluster.serviceaccount_kubeconfig("modelcache-node", system_ns)
        client.create(k.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": node_id, "labels": {"kubernetes.io/hostname": node_id}}})

        hub = SlowHub(hub_rate).start()
        stack.callback(hub.stop)
        for name, files in sources.items():
            hub.add_repo(f"chaos/{name}", files=files)
        proxy = Proxy(registry.host)
        proxy.rate = pull_rate
        stack.callback(proxy.stop)

        cache_fs = stack.enter_context(loopfs.loop_mount("xfs"))
        cache = os.path.join(cache_fs, "cache")
        pods_root = os.path.join(work, "kubelet", "pods")
        os.makedirs(pods_root)
        stack.callback(unmount_everything_under, work)
        stack.callback(unmount_everything_under, cache_fs)

        jobs_root = os.path.join(work, "jobs")
        port = localcluster.free_port()
        py = [sys.executable, "-m"]
        manager = Program("manager", py + [
            "controller.main", "manager", "--kubeconfig", cluster.kubeconfig,
            "--namespace", system_ns, "--registry", registry.host, "--registry-insecure",
            "--hf-endpoint", hub.url, "--listen", f"127.0.0.1:{port}",
            "--report-url", f"http://127.0.0.1:{port}", "--no-leader-elect",
            "--workers", "4", "--progress-interval", "0.5",
            "--publish-work-size", "1Gi", "--publish-work-storage-class", "local",
            "--embedded-jobs", jobs_root],
            os.path.join(work, "manager.log"), localcluster.REPO_ROOT,
            _http_ready(f"http://127.0.0.1:{port}/readyz"),
            # kept in a Secret in a cluster: a restarted manager accepts its workers' reports
            env={"MODELCACHE_REPORT_KEY": "chaos"})
        socket = os.path.join(work, "node", "csi.sock")
        os.makedirs(os.path.dirname(socket))
        node = Program("node plugin", py + [
            "csi.main", "--endpoint", f"unix://{socket}", "--cache-dir", cache,
            "--node-id", node_id, "--resolver", "kube", "--kubeconfig", node_kubeconfig,
            "--insecure-registry", registry.host, "--insecure-registry", proxy.host,
            "--pull-via", f"{registry.host}={proxy.host}", "--log-format", "text"],
            os.path.join(work, "node", "node.log"), localcluster.REPO_ROOT, _probe_ready(socket))
        stack.callback(_stop_all, manager, node, jobs_root)
        manager.start()
        node.start()
        yield System(work, ns, client, registry, manager, node,
                     Kubelet(socket), jobs_root, cache, pods_root)
