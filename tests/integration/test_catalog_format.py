"""A catalog import honours ``spec.format``, as the other sources do for a declared format.

Cluster A serves one Safetensors model through its catalog; cluster B
(test_catalog_import.py's second API server, registry and in-process
manager) imports it as a ClusterModel declaring GGUF. The listing already
says Safetensors, so the manager refuses before pinning (Failed,
``FormatMismatch``, no Job, nothing in B's registry). The import Job's own
check, for a listing that states no format, is run as the Job runs it
(``catalog_import.import_model``) against the same catalog.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from cli.local import registry as localregistry
from ingest.publish import catalog_import
from ingest.sources.catalog import build_uri
from kube import client as k
from modelpack.errors import FormatError
from modelpack.oci.reference import Reference
from modelpack.oci.registry import RegistryClient
from tests import kubeenv, modelgen
from tests.integration import test_catalog_import as imp
from tests.integration.test_catalog_api import CatalogA, publish_ready
from tests.integration.test_catalog_import import cond, get, make_source, phase, put_secret
from tests.integration.test_controller import wait_for

kube = kubeenv.kube
# fixtures of test_catalog_import.py: cluster A and its catalog, cluster B and its manager
cluster, catalog, importer = imp.cluster, imp.catalog, imp.importer
env_b, registry_b, cluster_b, manager_b = imp.env_b, imp.registry_b, imp.cluster_b, imp.manager_b


@pytest.fixture(scope="module")
def served(cluster: k.Kube, registry: localregistry.LocalRegistry, catalog: CatalogA,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One Safetensors model Ready in A and in its catalog."""
    name = f"fmt-{uuid.uuid4().hex[:5]}"
    root = str(tmp_path_factory.mktemp("fmt"))
    modelgen.make_safetensors_model(root, seed=31)
    digest = publish_ready(cluster, registry, name, root)["artifact"]["digest"]
    catalog.wait_served(name)
    return {"name": name, "digest": digest}


@pytest.fixture(scope="module")
def source(cluster_b: k.Kube, manager_b: Any, catalog: CatalogA,
           importer: dict[str, str], served: dict[str, str]) -> str:
    name = f"fmt-src-{uuid.uuid4().hex[:5]}"
    put_secret(cluster_b, "fmt-token", importer["token"])
    make_source(cluster_b, name, catalog.url, catalog.ca_b64, "fmt-token")

    def listed() -> bool:
        mcs = get(cluster_b, k.MODEL_CATALOG_SOURCES, name) or {}
        return any(m["name"] == served["name"]
                   for m in (mcs.get("status") or {}).get("models") or [])
    wait_for(listed, 60, what="the model listed in B")
    return name


def test_declared_format_the_listing_contradicts_is_refused(
        cluster_b: k.Kube, source: str, served: dict[str, str],
        registry_b: localregistry.LocalRegistry) -> None:
    name = served["name"]
    cluster_b.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"format": "GGUF",
                 "source": {"catalog": {"sourceRef": source, "model": name}}}})
    wait_for(lambda: phase(cluster_b, name) == "Failed", 60, interval=0.3, what="refused")
    cm = get(cluster_b, k.CLUSTER_MODELS, name)
    resolved = cond(cm, "SourceResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "FormatMismatch"), resolved
    assert "GGUF" in resolved["message"] and "Safetensors" in resolved["message"]
    assert cond(cm, "Ready")["reason"] == "FormatMismatch"
    assert not ((cm or {}).get("status") or {}).get("catalog")  # never pinned
    jobs, _ = cluster_b.list(k.JOBS, "modelcache-system")
    assert not [j for j in jobs if name in j["metadata"]["name"]]
    assert RegistryClient(registry_b.host, insecure=True).list_tags(f"cluster/{name}") == []


@pytest.mark.parametrize("declared", ["GGUF", "Raw"])
def test_import_job_refuses_an_artifact_of_another_format(
        catalog: CatalogA, importer: dict[str, str], served: dict[str, str],
        registry_b: localregistry.LocalRegistry, tmp_path: Any, declared: str) -> None:
    """The Job's check, on the artifact's own config: before a blob moves."""
    b = RegistryClient(registry_b.host, insecure=True)
    repo = f"cluster/job-{declared.lower()}-{served['name']}"
    with pytest.raises(FormatError) as e:
        catalog_import.import_model(
            build_uri(catalog.url, served["name"], served["digest"]), b,
            Reference(registry_b.host, repo, tag="gen-1"), token=importer["token"],
            ca_pem=base64.b64decode(catalog.ca_b64), work_dir=str(tmp_path),
            wait=5, expected_format=declared)
    assert e.value.reason == "FormatMismatch"
    assert f"expected format {declared}" in str(e.value) and "Safetensors" in str(e.value)
    assert b.list_tags(repo) == []
    same = catalog_import.import_model(
        build_uri(catalog.url, served["name"], served["digest"]), b,
        Reference(registry_b.host, repo, tag="gen-1"), token=importer["token"],
        ca_pem=base64.b64decode(catalog.ca_b64), work_dir=str(tmp_path), wait=5,
        expected_format="Safetensors")
    assert same.digest == served["digest"]
