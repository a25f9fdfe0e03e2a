"""A real S3-compatible server on loopback: versitygw serving a POSIX directory.

Built by ``hack/install.d/versitygw.sh`` from the Go module proxy and cached
under ``~/.cache/modelcache-tools/versitygw-<version>``. Started per test
session on a free port with a temp root; buckets are directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

VERSION = os.environ.get("VERSITYGW_VERSION", "v1.8.0")
ACCESS_KEY = "modelcache-test"
SECRET_KEY = "modelcache-test-secret-key"


def binary() -> str | None:
    path = os.path.expanduser(f"~/.cache/modelcache-tools/versitygw-{VERSION}/bin/versitygw")
    if os.path.exists(path):
        return path
    return shutil.which("versitygw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3Server:
    root: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):  # type: ignore[no-untyped-def]
        import boto3
        import botocore.config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            config=botocore.config.Config(s3={"addressing_style": "path"}))


@contextlib.contextmanager
def running() -> Iterator[S3Server]:
    exe = binary()
    if exe is None:
        raise RuntimeError("versitygw is not built: run hack/install.d/versitygw.sh")
    root = tempfile.mkdtemp(prefix="modelcache-s3-")
    data = os.path.join(root, "data")
    os.makedirs(data)
    port = _free_port()
    log = open(os.path.join(root, "versitygw.log"), "ab")
    proc = subprocess.Popen(
        [exe, "--access", ACCESS_KEY, "--secret", SECRET_KEY, "--port", f"127.0.0.1:{port}",
         "--quiet", "posix", data],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    log.close()
    server = S3Server(root, port, proc)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"versitygw exited with {proc.returncode}; see {root}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("versitygw did not listen within 20 s") from None
                time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
