"""A local Kubernetes control plane: etcd + kube-apiserver on loopback.

The embedded demo (``modelcache demo``) and the tests (``tests/kubeenv.py``)
both run on it. The binaries are built by ``hack/install.d/kube.sh`` at the
versions pinned in ``hack/kube/versions.env`` and cached under
``~/.cache/modelcache-tools`` (``$KUBE_APISERVER``, ``$KUBECTL``, ``$ETCD``
override the paths). ``start()`` runs etcd with a data dir of its own,
makes a throwaway CA, the serving cert, an admin client cert
(``system:masters``) and the service-account signing key (``pki.py``), starts
kube-apiserver on 127.0.0.1 with RBAC, waits for ``/readyz`` and writes an
admin kubeconfig. ``stop()`` ends both processes; the caller removes the dir.

Only the API server runs: no controller-manager (so no garbage collection of
owned objects, no namespace finalization, no Job -> Pod, no ``default``
ServiceAccount in new namespaces), no scheduler, no kubelet. Whoever needs
one of those behaviours plays that part and says so (the demo's Job runner
is ``controller/embedded/jobrunner.py``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cli.local.pki import Pki, b64, make_pki, write_kubeconfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERSIONS_FILE = os.path.join(REPO_ROOT, "hack", "kube", "versions.env")
TOOLS = os.path.join(os.path.expanduser("~"), ".cache", "modelcache-tools")
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
START_TIMEOUT = 60.0


class ClusterError(RuntimeError):
    """The local API server could not be found or started; the message names the component."""


# --- binaries ----------------------------------------------------------------


def versions() -> dict[str, str]:
    """``KUBE_VERSION`` and ``ETCD_VERSION`` from hack/kube/versions.env."""
    out: dict[str, str] = {}
    with open(VERSIONS_FILE) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class Binaries:
    etcd: str
    kube_apiserver: str
    kubectl: str


def binaries() -> Binaries:
    v = versions()
    kube_dir = os.path.join(TOOLS, f"kube-{v['KUBE_VERSION']}")
    found = Binaries(
        etcd=os.environ.get("ETCD") or os.path.join(TOOLS, f"etcd-{v['ETCD_VERSION']}", "etcd"),
        kube_apiserver=os.environ.get("KUBE_APISERVER")
        or os.path.join(kube_dir, "kube-apiserver"),
        kubectl=os.environ.get("KUBECTL") or os.path.join(kube_dir, "kubectl"),
    )
    missing = [p for p in (found.etcd, found.kube_apiserver, found.kubectl)
               if not os.access(p, os.X_OK)]
    if missing:
        raise ClusterError(f"not built: {', '.join(missing)} (run hack/install.d/kube.sh)")
    return found


# --- processes -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: str, n: int = 30) -> str:
    """The last ``n`` lines of a log file ("" if there is none), for error messages."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait()


def wait_http(component: str, url: str, proc: subprocess.Popen[bytes], log: str,
              deadline: float, context: ssl.SSLContext | None = None) -> None:
    """Poll ``url`` until it answers 200; a ClusterError naming ``component`` otherwise."""
    last = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{component} exited with status {proc.returncode}; "
                               f"last lines of {log}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            last = str(e)
        time.sleep(0.1)
    raise ClusterError(f"{component} did not become ready in {START_TIMEOUT:.0f} s "
                       f"({url}: {last}); last lines of {log}:\n{tail(log)}")


@dataclass
class LocalCluster:
    """A running etcd + kube-apiserver; ``kubeconfig`` is cluster-admin."""

    dir: str
    server: str
    kubeconfig: str
    pki: Pki
    bins: Binaries
    etcd: subprocess.Popen[bytes]
    apiserver: subprocess.Popen[bytes]
    startup_seconds: float = 0.0
    _clients: list[Any] = field(default_factory=list)

    def api_client(self, kubeconfig: str | None = None) -> ApiClient:
        """A ``kubernetes`` client for ``kubeconfig`` (default: admin); closed by ``stop()``."""
        # the kubernetes package costs ~0.2 s to import; only tests ask for its client
        from kubernetes import config

        api: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig or self.kubeconfig)
        self._clients.append(api)
        return api

    def kubectl(self, *args: str, kubeconfig: str | None = None, check: bool = True,
                input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": kubeconfig or self.kubeconfig}
        return subprocess.run([self.bins.kubectl, *args], env=env, check=check, input=input,
                              capture_output=True, text=True, timeout=timeout)

    def serviceaccount_kubeconfig(self, name: str, namespace: str = "default",
                                  expiration_seconds: int = 3600) -> str:
        """Ensure ServiceAccount ``namespace/name`` exists and return a kubeconfig
        that authenticates with a bound token for it (TokenRequest API), holding
        only what RBAC grants that ServiceAccount."""
        from kubernetes import client  # start-up time, as in api_client
        from kubernetes.client.exceptions import ApiException

        core = client.CoreV1Api(self.api_client())
        try:
            core.create_namespaced_service_account(
                namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name)))
        except ApiException as e:
            if e.status != 409:
                raise
        request = client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(audiences=[SERVICE_ACCOUNT_ISSUER],
                                           expiration_seconds=expiration_seconds))
        status = core.create_namespaced_service_account_token(name, namespace, request).status
        if status is None or not status.token:
            raise ClusterError(f"TokenRequest for {namespace}/{name} returned no token")
        token: str = status.token
        path = os.path.join(self.dir, f"kubeconfig-sa-{namespace}-{name}")
        return write_kubeconfig(path, self.server, self.pki.ca, {"token": token})

    def stop(self) -> None:
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        stop_process(self.apiserver)
        stop_process(self.etcd)


def start(workdir: str | None = None, extra_apiserver_args: Sequence[str] = ()
          ) -> LocalCluster:
    """Start etcd and kube-apiserver; the caller must ``stop()`` and remove ``dir``.

    ``extra_apiserver_args`` are appended to kube-apiserver's flags (a later
    flag wins, so they may override the defaults)."""
    bins = binaries()
    t0 = time.monotonic()
    work = workdir or tempfile.mkdtemp(prefix="modelcache-kube-")
    pki = make_pki(os.path.join(work, "pki"))
    deadline = time.monotonic() + START_TIMEOUT

    client_port, peer_port = free_port(), free_port()
    etcd_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    etcd_log = os.path.join(work, "etcd.log")
    with open(etcd_log, "wb") as log:
        etcd = subprocess.Popen([
            bins.etcd, "--name=local", f"--data-dir={os.path.join(work, 'etcd')}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=local={peer_url}",
            # a throwaway cluster that dies with its data dir needs no durability
            "--unsafe-no-fsync", "--log-level=warn",
        ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    apiserver: subprocess.Popen[bytes] | None = None
    try:
        wait_http("etcd", f"{etcd_url}/health", etcd, etcd_log, deadline)

        port = free_port()
        api_log = os.path.join(work, "kube-apiserver.log")
        with open(api_log, "wb") as log:
            apiserver = subprocess.Popen([
                bins.kube_apiserver,
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--tls-cert-file={pki.path('apiserver.crt')}",
                f"--tls-private-key-file={pki.path('apiserver.key')}",
                f"--client-ca-file={pki.ca}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                f"--service-account-key-file={pki.path('sa.pub')}",
                f"--service-account-signing-key-file={pki.path('sa.key')}",
                "--service-cluster-ip-range=10.96.0.0/24",
                # the "kubernetes" Service cannot point at a loopback address
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--v=1",
                *extra_apiserver_args,
            ], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        server = f"https://127.0.0.1:{port}"
        kubeconfig = write_kubeconfig(os.path.join(work, "kubeconfig"), server, pki.ca, {
            "client-certificate-data": b64(pki.path("admin.crt")),
            "client-key-data": b64(pki.path("admin.key")),
        })
        tls = ssl.create_default_context(cafile=pki.ca)
        tls.load_cert_chain(pki.path("admin.crt"), pki.path("admin.key"))
        wait_http("kube-apiserver", f"{server}/readyz", apiserver, api_log, deadline, tls)
    except BaseException:
        if apiserver is not None:
            stop_process(apiserver)
        stop_process(etcd)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return LocalCluster(dir=work, server=server, kubeconfig=kubeconfig, pki=pki, bins=bins,
                        etcd=etcd, apiserver=apiserver, startup_seconds=time.monotonic() - t0)


@contextlib.contextmanager
def running(extra_apiserver_args: Sequence[str] = ()) -> Iterator[LocalCluster]:
    """A cluster for the duration of the block; everything removed after."""
    env = start(extra_apiserver_args=extra_apiserver_args)
    try:
        yield env
    finally:
        env.stop()
        shutil.rmtree(env.dir, ignore_errors=True)
