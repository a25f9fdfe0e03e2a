"""STAND-INS for the node DaemonSet's two sidecars, node-driver-registrar and
livenessprobe, run from the node image in tests/e2e/deployed.py only.

Neither can be built here (the module proxy refuses node-driver-registrar,
see fake_node_driver_registrar.py; livenessprobe likewise), and no image can
be pulled. deployed.py packs this file, fake_node_driver_registrar.py and
kubelet's pluginregistration stubs (compiled on the host) as one more layer on
the node image, and the chart's ``node.registrarImage`` /
``node.livenessProbeImage`` name that image; the chart's own args reach it
unchanged (no subcommand: the flags tell which sidecar this is):

- ``registrar --csi-address --kubelet-registration-path --health-port``:
  registers the driver with kubelet through /registration (the fake's
  protocol) and serves ``/healthz`` on the health port (200 until kubelet
  refuses the registration);
- ``livenessprobe --csi-address --health-port --probe-timeout``: ``/healthz``
  answers with the driver's CSI ``Probe``, as the real sidecar does.
"""

from __future__ import annotations

import argparse
import http.server
import logging
import signal
import sys
import threading
from collections.abc import Callable

import grpc

from csi.stubs import pb, rpc

log = logging.getLogger("standin_sidecars")


def _health(port: int, ok: Callable[[], bool]) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            good = self.path == "/healthz" and ok()
            self.send_response(200 if good else 500)
            self.end_headers()
            self.wfile.write(b"ok\n" if good else b"not ok\n")

        def log_message(self, *args: object) -> None:
            return

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _duration(text: str) -> float:
    return float(text.rstrip("s"))


def registrar(argv: list[str]) -> int:
    import fake_node_driver_registrar as fake  # the layer's copy
    import kubelet_pluginregistration_pb2 as protos
    import kubelet_pluginregistration_pb2_grpc as services

    p = argparse.ArgumentParser(prog="registrar (stand-in)")
    p.add_argument("--csi-address", required=True)
    p.add_argument("--kubelet-registration-path", required=True)
    p.add_argument("--health-port", type=int, default=9809)
    args = p.parse_args(argv)
    name = fake.driver_name(args.csi_address, 300)
    failed, stop = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server, sock = fake.serve(protos, services, name, args.kubelet_registration_path,
                              "/registration", failed)
    _health(args.health_port, lambda: not failed.is_set())
    log.info("serving the registration API on %s for %s", sock, name)
    while not stop.is_set() and not failed.is_set():
        stop.wait(0.5)
    server.stop(2).wait()
    return 1 if failed.is_set() else 0


def livenessprobe(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="livenessprobe (stand-in)")
    p.add_argument("--csi-address", required=True)
    p.add_argument("--health-port", type=int, default=9808)
    p.add_argument("--probe-timeout", default="1s")
    args = p.parse_args(argv)
    timeout = _duration(args.probe_timeout)
    channel = grpc.insecure_channel(f"unix://{args.csi_address}")
    identity = rpc.IdentityStub(channel)

    def probe() -> bool:
        try:
            got = identity.Probe(pb.ProbeRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return not got.HasField("ready") or bool(got.ready.value)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _health(args.health_port, probe)
    stop.wait()
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    which = {"registrar": registrar, "livenessprobe": livenessprobe}
    argv = sys.argv[1:]
    if argv and argv[0] in which:
        return which[argv[0]](argv[1:])
    # the chart passes the real sidecars' flags alone (one image, one entrypoint
    # for both): the registration path names the registrar
    if any(a.startswith("--kubelet-registration-path") for a in argv):
        return registrar(argv)
    if any(a.startswith("--csi-address") for a in argv):
        return livenessprobe(argv)
    sys.stderr.write("usage: standin_sidecars.py [registrar|livenessprobe] ARGS\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
