"""A real local OCI registry: CNCF distribution (Debian ``docker-registry``).

Started on 127.0.0.1 with a temp root for the demo, the tests and the
benchmarks; optionally with htpasswd basic auth. This is the same
registry the DMCR runs in a cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import yaml

BINARY = "docker-registry"


def distribution_v3() -> str:
    """distribution v3's ``registry``, built by hack/install.d/distribution.sh.

    Not the DMCR (that stays Debian's 2.8): a second pull-through mirror for the
    mirror tests and bench/fanout. On a miss, v3 streams a blob to the client and
    into its store from one upstream fetch; 2.8 fetches it twice."""
    from cli.local import cluster  # the pinned versions and the tools' cache

    v = cluster.versions().get("DISTRIBUTION_VERSION", "")
    path = os.environ.get("DISTRIBUTION_V3") or os.path.join(
        cluster.TOOLS, f"distribution-{v}", "registry")
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"distribution {v} not built: {path} "
                           "(run hack/install.d/distribution.sh)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalRegistry:
    root: str
    port: int
    proc: subprocess.Popen[bytes]
    username: str | None = None
    password: str | None = None
    data_dir: str | None = None  # the storage root, when not ROOT/data

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def storage(self) -> str:
        """Where distribution keeps blobs (for tests that corrupt one)."""
        return os.path.join(self.data_dir or os.path.join(self.root, "data"),
                            "docker", "registry", "v2")

    def blob_path(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return os.path.join(self.storage, "blobs", "sha256", hexd[:2], hexd, "data")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _htpasswd(path: str, user: str, password: str) -> None:
    import bcrypt

    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    with open(path, "w") as f:
        f.write(f"{user}:{hashed}\n")


def start(root: str | None = None, port: int | None = None, *, username: str | None = None,
          password: str | None = None, log_path: str | None = None,
          auth: dict[str, object] | None = None, data_dir: str | None = None,
          readonly: bool = False, tls: tuple[str, str] | None = None,
          storage: dict[str, object] | None = None,
          env: dict[str, str] | None = None,
          proxy: dict[str, object] | None = None,
          binary: str | None = None) -> LocalRegistry:
    """Start the registry; ``username`` turns on htpasswd, ``auth`` is a raw auth section.

    ``data_dir`` shares another registry's storage; ``readonly`` serves it in
    distribution's read-only maintenance mode (pulls only: every write answers
    405), the DMCR's pull endpoint. ``tls`` is (certificate, key) PEM files.
    ``storage`` replaces the whole storage section (the chart's S3 storage, say)
    and ``env`` is added to the registry's environment (its
    ``REGISTRY_STORAGE_S3_*`` overrides). ``proxy`` is distribution's proxy section
    (``{"remoteurl": ...}``): a pull-through cache of that registry. ``binary``
    runs another build of distribution (``distribution_v3()``) on the same config.
    """
    binary = binary or shutil.which(BINARY) or "/usr/bin/docker-registry"
    if not os.path.exists(binary):
        raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
    root = root or tempfile.mkdtemp(prefix="modelcache-registry-")
    port = port or free_port()
    os.makedirs(root, exist_ok=True)
    config: dict[str, object] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": data_dir or os.path.join(root, "data")},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False},
                                    "readonly": {"enabled": readonly}}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": "modelcache-local"},
    }
    if storage is not None:
        config["storage"] = storage
    if tls:
        config["http"]["tls"] = {"certificate": tls[0], "key": tls[1]}  # type: ignore[index]
    if username:
        htpasswd = os.path.join(root, "htpasswd")
        _htpasswd(htpasswd, username, password or "")
        config["auth"] = {"htpasswd": {"realm": "modelcache", "path": htpasswd}}
    elif auth:
        config["auth"] = auth
    if proxy:
        config["proxy"] = proxy
    cfg_path = os.path.join(root, "config.yml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(config, f)
    log = open(log_path or os.path.join(root, "registry.log"), "ab")
    # aws-sdk-go cannot load AWS_CA_BUNDLE into distribution's own transport
    # (a start-up panic); the S3 driver uses the system roots instead
    proc_env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    proc_env.update(env or {})
    proc = subprocess.Popen([binary, "serve", cfg_path], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, env=proc_env)
    log.close()
    reg = LocalRegistry(root, port, proc, username, password, data_dir)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"docker-registry exited with {proc.returncode}; see {root}/registry.log")
        try:
            if tls:  # up when it accepts a connection; the caller verifies the certificate
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return reg
            urllib.request.urlopen(f"http://{reg.host}/v2/", timeout=1)
            return reg
        except urllib.error.HTTPError as e:
            if e.code == 401:
                return reg
        except OSError:
            pass
        time.sleep(0.05)
    reg.stop()
    raise RuntimeError("docker-registry did not answer within 20 s")


@contextlib.contextmanager
def running(**kwargs: object) -> Iterator[LocalRegistry]:
    reg = start(**kwargs)  # type: ignore[arg-type]
    try:
        yield reg
    finally:
        reg.stop()
        shutil.rmtree(reg.root, ignore_errors=True)
