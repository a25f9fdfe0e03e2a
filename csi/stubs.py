"""The gRPC stubs of ``proto/csi.proto``, generated on first import.

The generated modules are build output, not source: they live in
``csi/gen/`` (gitignored) and are (re)built with grpcio-tools whenever they
are missing or were built from a different ``csi.proto`` or a different
grpcio-tools. A stamp file records the hash of both. Generation runs under
a file lock, in a temp directory renamed into place, so concurrent
processes (the plugin and its tests) never see a half-written package.
An installed image ships ``csi/gen`` prebuilt (Dockerfile.node runs
``python -m csi.stubs``) and needs neither the proto nor grpcio-tools.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))
GEN = os.path.join(HERE, "gen")
STAMP = os.path.join(GEN, "STAMP")
PROTO = os.path.join(os.path.dirname(HERE), "proto", "csi.proto")


def _tools_version() -> str:
    try:
        from importlib.metadata import version

        return version("grpcio-tools")
    except Exception:  # no grpcio-tools: only a prebuilt csi/gen can be used
        return "none"


def expected_stamp(proto: str = PROTO) -> str:
    """What STAMP must say for stubs built from ``proto`` with this grpcio-tools."""
    with open(proto, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return f"csi.proto sha256:{digest} grpcio-tools {_tools_version()}\n"


def current_stamp() -> str | None:
    try:
        with open(STAMP) as f:
            return f.read()
    except FileNotFoundError:
        return None


def is_fresh() -> bool:
    if not os.path.exists(PROTO):
        return current_stamp() is not None  # an installed image: prebuilt stubs only
    return current_stamp() == expected_stamp()


def generate() -> None:
    """Run protoc (grpcio-tools) on proto/csi.proto into csi/gen, atomically."""
    from grpc_tools import protoc  # build-time dependency only

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    work = tempfile.mkdtemp(prefix=".gen-", dir=HERE)
    try:
        # Laid out as csi/gen/csi.proto so the generated grpc module imports
        # ``csi.gen.csi_pb2`` (a package path) rather than a top-level csi_pb2.
        src_dir = os.path.join(work, "src", "csi", "gen")
        os.makedirs(src_dir)
        shutil.copyfile(PROTO, os.path.join(src_dir, "csi.proto"))
        out = os.path.join(work, "out")
        os.makedirs(out)
        cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{os.path.join(work, 'src')}",
               f"-I{include}", f"--python_out={out}", f"--grpc_python_out={out}",
               os.path.join(src_dir, "csi.proto")]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"protoc failed on {PROTO}: {res.stderr.strip()}")
        pkg = os.path.join(out, "csi", "gen")
        with open(os.path.join(pkg, "__init__.py"), "w") as f:
            f.write('"""Generated from proto/csi.proto by csi/stubs.py; do not edit."""\n')
        with open(os.path.join(pkg, "STAMP"), "w") as f:
            f.write(expected_stamp())
        old = os.path.join(work, "old")
        if os.path.exists(GEN):
            os.rename(GEN, old)
        os.rename(pkg, GEN)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure() -> None:
    """Generate the stubs unless fresh ones are already there."""
    if is_fresh():
        return
    lock_path = os.path.join(tempfile.gettempdir(),
                             "modelcache-csi-gen-" + hashlib.sha256(HERE.encode()).hexdigest()[:16])
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_fresh():
            generate()
            importlib.invalidate_caches()


def load() -> tuple[ModuleType, ModuleType]:
    ensure()
    pb = importlib.import_module("csi.gen.csi_pb2")
    rpc = importlib.import_module("csi.gen.csi_pb2_grpc")
    return pb, rpc


pb, rpc = load()

if __name__ == "__main__":
    ensure()
