"""Helpers for the NodeCache (csi/) tests: the real plugin process, a counting
proxy in front of the real registry, loop-mounted filesystems, gRPC clients.

- ``Proxy``: a small HTTP reverse proxy on loopback in front of the real
  docker-registry. It counts requests (to prove one fetch per blob), can
  throttle responses (to make a pull last long enough to kill or time out)
  and can be stopped and restarted on the same port (registry down).
- ``PluginProcess``: ``python -m csi.main`` as a real subprocess on a temp
  unix socket, so kill -9 is real; a gRPC channel to it.
- ``loop_fs``: a sparse file, mkfs, losetup, mount; torn down after.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc

from csi.stubs import pb, rpc
from tests import loopfs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOB_RE = re.compile(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$")
NS = "csi.storage.k8s.io/pod.namespace"


class Proxy:
    """A counting, throttleable HTTP proxy to ``upstream`` (host:port)."""

    def __init__(self, upstream: str, port: int = 0) -> None:
        self.upstream = upstream
        self.rate: float | None = None  # bytes per second per response, None = full speed
        self.blob_gets: Counter[str] = Counter()  # digest -> GETs (with or without Range)
        self.range_gets: Counter[str] = Counter()
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = port
        self.start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reset(self) -> None:
        with self._lock:
            self.blob_gets.clear()
            self.range_gets.clear()
            self.requests.clear()

    def start(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                with proxy._lock:
                    proxy.requests.append((self.command, self.path))
                    m = BLOB_RE.match(self.path.split("?")[0])
                    if m and self.command == "GET":
                        proxy.blob_gets[m.group(2)] += 1
                        if self.headers.get("Range"):
                            proxy.range_gets[m.group(2)] += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection", "content-length")}
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    self.send_response(resp.status)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(k, v)
                    if resp.getheader("Content-Length") is None:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    if self.command == "HEAD":
                        return
                    chunk = 256 << 10
                    while True:
                        data = resp.read(chunk)
                        if not data:
                            break
                        self.wfile.write(data)
                        rate = proxy.rate
                        if rate:
                            time.sleep(len(data) / rate)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                finally:
                    conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class PluginProcess:
    """The real ``modelcache-node`` in a subprocess, on a unix socket."""

    def __init__(self, workdir: str, cache_dir: str, models_file: str,
                 insecure: list[str], extra: list[str] | None = None,
                 node_id: str = "test-node") -> None:
        self.workdir = workdir
        self.socket = os.path.join(workdir, "csi.sock")
        self.cache_dir = cache_dir
        self.models_file = models_file
        self.insecure = insecure
        self.extra = extra or []
        self.node_id = node_id
        self.log_path = os.path.join(workdir, "plugin.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.channel: grpc.Channel | None = None

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "csi.main", "--endpoint", self.endpoint,
                "--cache-dir", self.cache_dir, "--node-id", self.node_id,
                "--models-file", self.models_file, "--log-level", "info"]
        for host in self.insecure:
            args += ["--insecure-registry", host]
        return args + self.extra

    def start(self, wait_ready: bool = True) -> PluginProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=REPO_ROOT, stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        self.channel = grpc.insecure_channel(self.endpoint)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        ident = self.identity()
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if ident.Probe(pb.ProbeRequest(), timeout=1).ready.value:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"plugin not ready in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except FileNotFoundError:
            return ""

    def node(self) -> Any:
        return rpc.NodeStub(self.channel)

    def identity(self) -> Any:
        return rpc.IdentityStub(self.channel)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def volume_capability() -> Any:
    cap = pb.VolumeCapability(
        access_mode=pb.VolumeCapability.AccessMode(
            mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY))
    cap.mount.SetInParent()
    return cap


def publish_request(volume_id: str, target: str, *, model: str | None = None,
                    cluster_model: str | None = None, namespace: str = "team-a",
                    extra: dict[str, str] | None = None) -> Any:
    ctx = {NS: namespace, "csi.storage.k8s.io/ephemeral": "true",
           "csi.storage.k8s.io/pod.name": "p", "csi.storage.k8s.io/pod.uid": volume_id}
    if model:
        ctx["model"] = model
    if cluster_model:
        ctx["clusterModel"] = cluster_model
    ctx.update(extra or {})
    return pb.NodePublishVolumeRequest(volume_id=volume_id, target_path=target,
                                       volume_capability=volume_capability(), readonly=True,
                                       volume_context=ctx)


def unpublish_request(volume_id: str, target: str) -> Any:
    return pb.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=target)


def write_models_file(path: str, models: dict[str, Any],
                      cluster: dict[str, Any] | None = None) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"models": models, "clusterModels": cluster or {}}, f)
    os.replace(tmp, path)


def visible_files(models_dir: str) -> list[str]:
    """Every file under a tree a pod could be shown (hidden temp dirs excluded)."""
    out = []
    for name in os.listdir(models_dir):
        if name.startswith("."):
            continue
        for dirpath, _, files in os.walk(os.path.join(models_dir, name)):
            out += [os.path.join(dirpath, f) for f in files]
    return out


def loop_fs(fstype: str, size_mb: int) -> contextlib.AbstractContextManager[str]:
    """A fresh filesystem on a loop device (tests/loopfs.py), mounted on a temp dir."""
    return loopfs.loop_mount(fstype, size_mb << 20)


def unmount_everything_under(path: str) -> None:
    """Teardown safety net: lazily unmount whatever a failed test left below ``path``."""
    from csi import mounts

    real = os.path.realpath(path)
    for m in sorted(mounts.read_mounts(), key=lambda m: -len(m.mount_point)):
        if m.mount_point.startswith(real + "/"):
            subprocess.run(["umount", "-l", m.mount_point], check=False, capture_output=True)
