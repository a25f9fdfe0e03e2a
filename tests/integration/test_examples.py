"""examples/ applied with the real kubectl to the real kube-apiserver.

The models, the demo's ``model.yaml`` and the cluster objects are created for
real (so every CEL rule runs on them); the workloads go through
``--dry-run=server`` (admission and schema, nothing stored). Also checked
without a server: every YAML file under examples/ is one of those applied,
every source kind has an example, and every annotation names a model some
example defines.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
import yaml

from cli import demo
from tests import kubeenv
from tests.integration.test_crds import install_crds

kube = kubeenv.kube

EXAMPLES = os.path.join(kubeenv.REPO_ROOT, "examples")
FOLDERS = ("models", "cluster", "workloads")  # applied below, each as a whole
DEMO_MODEL = os.path.join(EXAMPLES, "model.yaml")  # what `modelcache demo` applies
MODEL_ANN, CLUSTER_ANN = "modelcache.io/models", "modelcache.io/cluster-models"


def docs(sub: str) -> list[dict[str, Any]]:
    out = []
    folder = os.path.join(EXAMPLES, sub)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name)) as f:
                out += [d for d in yaml.safe_load_all(f) if d]
    return out


@pytest.fixture(scope="module")
def ns(kube: kubeenv.KubeEnv) -> str:
    install_crds(kube)
    name = f"team-a-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    return name


def test_models_apply(kube: kubeenv.KubeEnv, ns: str) -> None:
    out = kube.kubectl("apply", "-n", ns, "-f", os.path.join(EXAMPLES, "models")).stdout
    want = {f"model.modelcache.io/{d['metadata']['name']} created"
            for d in docs("models") if d["kind"] == "Model"}
    assert want <= set(out.splitlines()), out

    table = kube.kubectl("get", "models", "-n", ns).stdout.splitlines()
    assert table[0].split() == ["NAME", "PHASE", "PROGRESS", "FORMAT", "SIZE", "AGE"]
    assert sorted(line.split()[0] for line in table[1:]) == sorted(
        d["metadata"]["name"] for d in docs("models") if d["kind"] == "Model")


def test_demo_model_applies(kube: kubeenv.KubeEnv, ns: str) -> None:
    out = kube.kubectl("apply", "-n", ns, "-f", DEMO_MODEL).stdout
    assert out.strip() == "model.modelcache.io/all-minilm-l6-v2 created"
    got = kube.kubectl("get", "model", "all-minilm-l6-v2", "-n", ns,
                       "-o", "jsonpath={.spec.source.huggingFace.repo}").stdout
    # the demo's local hub serves exactly this repository
    assert got == demo.DEMO_REPO


def test_every_example_file_is_applied() -> None:
    found = set()
    for dirpath, _, names in os.walk(EXAMPLES):
        found |= {os.path.relpath(os.path.join(dirpath, n), EXAMPLES)
                  for n in names if n.endswith((".yaml", ".yml", ".json"))}
    covered = {os.path.relpath(DEMO_MODEL, EXAMPLES)} | {
        os.path.join(sub, n) for sub in FOLDERS
        for n in os.listdir(os.path.join(EXAMPLES, sub)) if n.endswith(".yaml")}
    assert found == covered


def test_cluster_objects_apply(kube: kubeenv.KubeEnv, ns: str) -> None:
    kube.kubectl("apply", "-f", os.path.join(EXAMPLES, "cluster"))
    names = kube.kubectl("get", "clustermodels,modelcatalogsources", "-o", "name").stdout.split()
    for d in docs("cluster"):
        assert f"{d['kind'].lower()}.modelcache.io/{d['metadata']['name']}" in names


def test_workloads_dry_run(kube: kubeenv.KubeEnv, ns: str) -> None:
    out = kube.kubectl("apply", "-n", ns, "--dry-run=server",
                       "-f", os.path.join(EXAMPLES, "workloads")).stdout
    for d in docs("workloads"):
        kind = d["kind"].lower()
        group = {"deployment": "apps", "statefulset": "apps",
                 "model": "modelcache.io"}.get(kind)
        ref = f"{kind}.{group}/{d['metadata']['name']}" if group else \
            f"{kind}/{d['metadata']['name']}"
        assert f"{ref} created (server dry run)" in out, out


def test_every_source_kind_has_an_example() -> None:
    kinds = {next(iter(d["spec"]["source"]))
             for d in docs("models") + docs("cluster") + docs("workloads")
             if d["kind"] in ("Model", "ClusterModel")}
    assert kinds >= {"huggingFace", "ollama", "http", "s3", "pvc", "upload", "catalog"}
    assert {d["kind"] for d in docs("cluster")} >= {"ClusterModel", "ModelCatalogSource"}


def test_workload_annotations_name_example_models() -> None:
    models = {d["metadata"]["name"] for d in docs("models") + docs("workloads")
              if d["kind"] == "Model"}
    cluster = {d["metadata"]["name"] for d in docs("cluster") if d["kind"] == "ClusterModel"}
    runtimes = set()
    for d in docs("workloads"):
        ann = (d.get("metadata") or {}).get("annotations") or {}
        if d["kind"] not in ("Deployment", "StatefulSet") or not (
                MODEL_ANN in ann or CLUSTER_ANN in ann):
            continue
        runtimes.add(d["metadata"]["name"])
        for name in filter(None, ann.get(MODEL_ANN, "").split(",")):
            assert name.strip() in models, (d["metadata"]["name"], name)
        for name in filter(None, ann.get(CLUSTER_ANN, "").split(",")):
            assert name.strip() in cluster, (d["metadata"]["name"], name)
        assert ann.get("modelcache.io/delivery", "NodeCache") in ("NodeCache", "SharedPVC")
    assert runtimes == {"vllm-qwen", "triton", "torchserve", "dllama-root"}
