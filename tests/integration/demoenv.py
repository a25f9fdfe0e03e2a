"""The demo's system kept running for a test module, and kubectl as a user runs it.

Where it sits: shared by test_examples.py and test_docs_commands.py. Brings up
``cli/local/system.LocalSystem`` (etcd + kube-apiserver, the CRDs, the DMCR,
the local Hugging Face hub serving all-MiniLM-L6-v2, the upload gateway, the
controller manager with its admission webhook registered) with the Job
runner taking the Jobs of ``namespace`` (so PVC sources work there). No node
plugin: nothing here mounts, so no root is needed.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any

from cli import demo
from cli.local import cluster as localcluster
from cli.local.system import LocalSystem


@contextmanager
def running(work: str, namespace: str, hub_dir: str) -> Iterator[LocalSystem]:
    """The system, up, until the block ends; its step lines go to ``work``/demo.out."""
    s = LocalSystem(work, namespace)
    try:
        with open(os.path.join(os.path.dirname(work), "demo.out"), "w") as out, \
                redirect_stdout(out):
            s.start_cluster(1)
            s.install_api(2)
            s.start_registry(3)
            s.start_hub(4, demo.DEMO_REPO, hub_dir)
            s.start_gateway(5)
            s.start_manager(6)
        yield s
    finally:
        s.down()


def kubectl(s: LocalSystem, *args: str, input: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """kubectl with the demo's kubeconfig in KUBECONFIG, as the demo tells a user."""
    assert s.cluster is not None
    res = subprocess.run([localcluster.binaries().kubectl, *args], input=input, text=True,
                         capture_output=True, timeout=60,
                         env={**os.environ, "KUBECONFIG": s.cluster.kubeconfig})
    if check:
        assert res.returncode == 0, f"kubectl {' '.join(args)}: {res.stderr}"
    return res


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.3)
    raise AssertionError(f"{what} not within {timeout} s")
