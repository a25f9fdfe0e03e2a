"""A real Kubernetes API server for tests: etcd + kube-apiserver on loopback.

The control plane itself lives in ``cli/local/cluster.py`` (the embedded demo
runs on it too); this module keeps the names the tests use and adds the
session fixture. Only the API server runs: no controller-manager, scheduler
or kubelet; tests that need one of those behaviours play that part
themselves and say so (``tests/fake_kubelet.py``).

Tests import the session fixture explicitly: ``kube = kubeenv.kube``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cli.local import cluster as localcluster
from cli.local.cluster import (  # noqa: F401  (re-exported for the tests)
    REPO_ROOT,
    SERVICE_ACCOUNT_ISSUER,
    START_TIMEOUT,
    TOOLS,
    VERSIONS_FILE,
    Binaries,
    Pki,
    binaries,
    free_port,
    make_pki,
    running,
    start,
    versions,
    write_kubeconfig,
)

KubeEnv = localcluster.LocalCluster
KubeEnvError = localcluster.ClusterError


@pytest.fixture(scope="session")
def kube() -> Iterator[KubeEnv]:
    """One API server for the session; tests isolate themselves by namespace."""
    with running() as env:
        yield env
