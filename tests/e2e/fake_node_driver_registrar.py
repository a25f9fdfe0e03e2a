"""A FAKE node-driver-registrar: registers the NodeCache CSI socket with the real kubelet, in place of
node-driver-registrar.

Why not the real one: node-driver-registrar's go.mod declares
``module github.com/kubernetes-csi/node-driver-registrar`` (no ``/v2``)
while every release tag is ``v2.x``, so no tag is a valid Go module version,
and the Go module proxy this project may use answers
``403 This module version is not available`` for it (tags, commit hashes and
``@latest`` alike), so it cannot be built here from Go modules.

What this does is what node-driver-registrar does on a node, over the same
wire protocol, so kubelet's side (the plugin watcher, the CSI plugin
handler, the CSINode update) runs unchanged:
1. ask the CSI socket ``GetPluginInfo`` for the driver name;
2. serve kubelet's plugin-registration API (``pluginregistration.Registration``:
   ``GetInfo`` -> ``PluginInfo{type: CSIPlugin, name, endpoint, supported_versions}``,
   ``NotifyRegistrationStatus``) on ``<registration dir>/<driver>-reg.sock``,
   where kubelet's plugin watcher finds it;
3. exit non-zero when kubelet reports the registration failed (as upstream
   does, so it is restarted), remove the socket on SIGTERM.

The service definition is kubelet's own ``api.proto`` from the
``k8s.io/kubelet`` module in the Go module cache (the same module the kubelet
binary is built from, downloaded by ``hack/install.d/node-e2e.sh``), compiled
at start by grpcio-tools, so the messages cannot drift from kubelet's.
Not implemented: the ``--health-port`` /healthz endpoint (nothing here probes it).

Run: ``python -m tests.e2e.fake_node_driver_registrar --csi-address PATH
--kubelet-registration-path PATH --plugin-registration-dir DIR``.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from types import ModuleType
from typing import Any

import grpc

from csi.stubs import pb, rpc

log = logging.getLogger("fake_node_driver_registrar")
CSI_VERSIONS = ["1.0.0"]  # what node-driver-registrar advertises for CSI v1 drivers


class RegistrarError(RuntimeError):
    """The registration API or the CSI driver could not be reached."""


def _gomodcache() -> str:
    try:
        out = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.join(os.path.expanduser("~"), "go", "pkg", "mod")


def find_proto(kube_version: str) -> str:
    """kubelet's pluginregistration ``api.proto`` for ``kube_version`` (v1.X.Y)."""
    staging = "v0." + kube_version.removeprefix("v1.")
    pattern = os.path.join(_gomodcache(), "k8s.io", f"kubelet@{staging}", "pkg", "apis",
                           "pluginregistration", "v1", "api.proto")
    found = glob.glob(pattern)
    if not found:
        raise RegistrarError(f"{pattern} not found (run MODELCACHE_NODE_E2E=1 "
                             "hack/install.d/node-e2e.sh)")
    return found[0]


def load_protocol(proto: str) -> tuple[ModuleType, ModuleType]:
    """Compile ``proto`` into (messages, services) modules."""
    # a distinct file name keeps the generated module names (…_pb2) from
    # clashing with any other "api.proto" on sys.path
    tmp = tempfile.mkdtemp(prefix="pluginregistration-")
    try:
        shutil.copy(proto, os.path.join(tmp, "kubelet_pluginregistration.proto"))
        sys.path.insert(0, tmp)
        try:
            protos, services = grpc.protos_and_services(  # type: ignore[attr-defined]
                "kubelet_pluginregistration.proto")
        finally:
            sys.path.remove(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return protos, services


def driver_name(csi_address: str, timeout: float) -> str:
    """``GetPluginInfo`` on the CSI socket, retried until the driver answers."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    with grpc.insecure_channel(f"unix://{csi_address}") as channel:
        identity = rpc.IdentityStub(channel)
        while time.monotonic() < deadline:
            try:
                name = str(identity.GetPluginInfo(pb.GetPluginInfoRequest(), timeout=5).name)
                if name:
                    return name
            except grpc.RpcError as e:
                last = e
            time.sleep(0.5)
    raise RegistrarError(f"no GetPluginInfo answer from {csi_address} in {timeout}s: {last}")


def serve(protos: ModuleType, services: ModuleType, name: str, endpoint: str,
          registration_dir: str, failed: threading.Event) -> tuple[grpc.Server, str]:
    """Serve the registration API for ``name``; returns the server and its socket."""

    class Registration(services.RegistrationServicer):  # type: ignore[name-defined,misc]
        def GetInfo(self, request: Any, context: Any) -> Any:
            return protos.PluginInfo(type="CSIPlugin", name=name, endpoint=endpoint,
                                     supported_versions=CSI_VERSIONS)

        def NotifyRegistrationStatus(self, request: Any, context: Any) -> Any:
            if request.plugin_registered:
                log.info("registered with kubelet", extra={"driver": name})
            else:
                log.error("kubelet refused the registration",
                          extra={"driver": name, "error": request.error[:500]})
                failed.set()
            return protos.RegistrationStatusResponse()

    os.makedirs(registration_dir, exist_ok=True)
    sock = os.path.join(registration_dir, f"{name}-reg.sock")
    if os.path.exists(sock):
        os.unlink(sock)  # a previous run's stale socket
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    services.add_RegistrationServicer_to_server(Registration(), server)
    server.add_insecure_port(f"unix://{sock}")
    server.start()
    return server, sock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fake_node_driver_registrar", description=__doc__.split("\n")[0])
    p.add_argument("--csi-address", required=True, help="the CSI driver's socket (a path)")
    p.add_argument("--kubelet-registration-path", required=True,
                   help="the CSI socket's path as kubelet sees it")
    p.add_argument("--plugin-registration-dir", required=True,
                   help="kubelet's plugins_registry directory")
    p.add_argument("--kube-version", required=True, help="v1.X.Y: selects kubelet's api.proto")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the CSI driver to answer")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    protos, services = load_protocol(find_proto(args.kube_version))
    name = driver_name(args.csi_address, args.timeout)
    failed = threading.Event()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    server, sock = serve(protos, services, name, args.kubelet_registration_path,
                         args.plugin_registration_dir, failed)
    log.info("serving the registration API", extra={"driver": name, "socket": sock})
    while not stop.is_set() and not failed.is_set():
        stop.wait(0.5)
    server.stop(2).wait()
    if os.path.exists(sock):
        os.unlink(sock)  # kubelet's watcher then deregisters the driver
    return 1 if failed.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())
