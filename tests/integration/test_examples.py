"""examples/ applied with the real kubectl to the demo's system, its webhook live.

The demo's system (tests/integration/demoenv.py: kube-apiserver, DMCR, local
hub, upload gateway, controller manager with its admission webhook
registered) runs for the module. Every file under examples/ is applied as
examples/README.md says, in namespace ``team-a``: the Models whose source
is served locally reach Ready (``model.yaml`` from the local hub, the upload
through ``modelcache upload``, the PVC from the claim's directory); those
that need an outside service (S3, Ollama, models.example.com,
huggingface.co repositories the hub does not serve, another cluster's
catalog) say so in their first comment line and end in a stated status that
is not Ready; then every NodeCache workload is accepted and stored mutated by
the webhook (gated), and TorchServe's SharedPVC one is refused while its model
is not Ready (test_example_layouts.py publishes the runtime examples' models
from loopback to Ready and sees it admitted). Also
checked without a server: every YAML file under examples/ is one of those
applied, every source kind has an example, and every annotation names a
model some example defines.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from api import names as contract
from cli.local import cluster as localcluster
from cli.local.system import LocalSystem
from kube import client as kube
from tests import kubeenv
from tests.integration import demoenv

EXAMPLES = os.path.join(kubeenv.REPO_ROOT, "examples")
FOLDERS = ("models", "cluster", "workloads")  # applied below, each as a whole
DEMO_MODEL = os.path.join(EXAMPLES, "model.yaml")  # what `modelcache demo` applies
MODEL_ANN, CLUSTER_ANN = "modelcache.io/models", "modelcache.io/cluster-models"
NS = "team-a"  # examples/README.md's namespace
OUTSIDE = "# Needs "  # the first comment line of an example that needs an outside service
# served here: (kind, name) -> Ready
LOCAL = {("Model", "all-minilm-l6-v2"), ("Model", "my-finetune"), ("Model", "legacy-llama")}


def docs(sub: str) -> list[dict[str, Any]]:
    out = []
    folder = os.path.join(EXAMPLES, sub)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name)) as f:
                out += [d for d in yaml.safe_load_all(f) if d]
    return out


def outside_files() -> set[str]:
    out = set()
    for sub in FOLDERS:
        for name in os.listdir(os.path.join(EXAMPLES, sub)):
            with open(os.path.join(EXAMPLES, sub, name)) as f:
                if f.readline().startswith(OUTSIDE):
                    out.add(os.path.join(sub, name))
    return out


@pytest.fixture(scope="module")
def system(tmp_path_factory: pytest.TempPathFactory, minilm_dir: str) -> Iterator[LocalSystem]:
    with demoenv.running(str(tmp_path_factory.mktemp("examples") / "demo"), NS,
                         minilm_dir) as s:
        yield s


def _status(s: LocalSystem, kind: str, name: str) -> dict[str, Any]:
    res = kube.MODELS if kind == "Model" else kube.CLUSTER_MODELS
    obj = s.client.get(res, name, NS if kind == "Model" else None)
    return obj.get("status") or {}  # type: ignore[no-any-return]


def test_models_apply_and_local_ones_reach_ready(system: LocalSystem, small_model: str) -> None:
    out = demoenv.kubectl(system, "apply", "-n", NS, "-f", os.path.join(EXAMPLES, "models"),
                          "-f", DEMO_MODEL).stdout
    want = {f"model.modelcache.io/{d['metadata']['name']} created"
            for d in docs("models") if d["kind"] == "Model"}
    assert want | {"model.modelcache.io/all-minilm-l6-v2 created"} <= set(out.splitlines()), out
    out = demoenv.kubectl(system, "apply", "-f", os.path.join(EXAMPLES, "cluster")).stdout
    for d in docs("cluster"):
        assert f"{d['kind'].lower()}.modelcache.io/{d['metadata']['name']} created" in out, out

    # the PVC's weights: the claim is a directory of the embedded Job runner
    shutil.copytree(small_model, os.path.join(system.claim_dir("legacy-weights"), "llama-2-7b"))
    # the upload, as upload.yaml's comment says (the session found through the kubeconfig)
    assert system.cluster is not None
    demoenv.wait_for("my-finetune's upload session",
                     lambda: _status(system, "Model", "my-finetune").get("upload"))
    res = subprocess.run([sys.executable, "-m", "cli.main", "upload", "my-finetune",
                          small_model, "-n", NS, "--no-progress"],
                         cwd=localcluster.REPO_ROOT, capture_output=True, text=True,
                         timeout=180, stdin=subprocess.DEVNULL,
                         env={**os.environ, "KUBECONFIG": system.cluster.kubeconfig})
    assert res.returncode == 0, res.stdout + res.stderr

    for kind, name in sorted(LOCAL):
        def ready(kind: str = kind, name: str = name) -> bool:
            st = _status(system, kind, name)
            assert st.get("phase") != "Failed", (name, st)
            return st.get("phase") == "Ready"
        demoenv.wait_for(f"{kind} {name} Ready", ready, 120)
        assert _status(system, kind, name)["artifact"]["digest"].startswith("sha256:")


# what each model that needs an outside service shows in the demo: (phase, Ready reason)
FAILED_UNAVAILABLE = {("Failed", "SourceUnavailable")}
OUTSIDE_STATUS: dict[tuple[str, str], set[tuple[str, str]]] = {
    ("Model", "tinyllama-gguf"): FAILED_UNAVAILABLE,          # models.example.com
    ("Model", "dllama-llama3-8b-q40"): FAILED_UNAVAILABLE,    # models.example.com
    ("Model", "minilm-onnx"): FAILED_UNAVAILABLE,             # models.example.com
    ("Model", "mnist-mar"): FAILED_UNAVAILABLE,               # models.example.com
    ("Model", "llama-3-2-1b"): FAILED_UNAVAILABLE,            # registry.ollama.ai
    ("Model", "qwen-0-5b"): {("Failed", "RepoNotFound")},     # the local hub lacks it
    # the S3 client retries an endpoint it cannot reach before it gives up
    ("Model", "embedder"): {("Publishing", "Publishing")} | FAILED_UNAVAILABLE,
    ("ClusterModel", "embedder"): FAILED_UNAVAILABLE,         # registry.ollama.ai
    ("ClusterModel", "llama-3-8b"): {("Pending", "SecretNotFound")},  # its token, not lent
    ("ClusterModel", "mistral-7b"): {("Pending", "CatalogSourceNotReady")},
}


def test_workloads_admitted_and_mutated(system: LocalSystem) -> None:
    res = demoenv.kubectl(system, "apply", "-n", NS,
                          "-f", os.path.join(EXAMPLES, "workloads"), check=False)
    refused = {(d["kind"], d["metadata"]["name"]) for d in docs("workloads")
               if (d["metadata"].get("annotations") or {}).get("modelcache.io/delivery")
               == "SharedPVC"}
    assert refused == {("StatefulSet", "torchserve")}
    # its model (models.example.com) is not Ready: SharedPVC has no digest to name
    assert res.returncode != 0 and "workloads/torchserve.yaml" in res.stderr, res.stderr
    assert "mnist-mar is not Ready yet" in res.stderr and "SharedPVC" in res.stderr, res.stderr
    for d in docs("workloads"):
        kind = d["kind"].lower()
        group = {"deployment": "apps", "statefulset": "apps",
                 "model": "modelcache.io"}.get(kind)
        ref = f"{kind}.{group}/{d['metadata']['name']}" if group else \
            f"{kind}/{d['metadata']['name']}"
        assert (f"{ref} created" in res.stdout) != ((d["kind"], d["metadata"]["name"])
                                                    in refused), ref
    for d in docs("workloads"):
        ann = d["metadata"].get("annotations") or {}
        if MODEL_ANN not in ann and CLUSTER_ANN not in ann or \
                (d["kind"], d["metadata"]["name"]) in refused:
            continue
        stored = json.loads(demoenv.kubectl(system, "get", "-n", NS, d["kind"],
                                            d["metadata"]["name"], "-o", "json").stdout)
        spec = stored["spec"]["template"]["spec"]
        assert {"name": contract.GATE} in spec["schedulingGates"], d["metadata"]["name"]
        names = [n.strip() for a in (MODEL_ANN, CLUSTER_ANN)
                 for n in ann.get(a, "").split(",") if n.strip()]
        mounts = {m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
        assert {f"{contract.MOUNT_ROOT}/{n}" for n in names} <= mounts


def test_outside_examples_say_so_and_end_not_ready(system: LocalSystem) -> None:
    """Every Model of a file marked as needing an outside service is accepted and ends
    in a stated phase and reason; every other one is served here."""
    marked = outside_files()
    assert marked == {"models/s3.yaml", "models/http.yaml", "models/ollama.yaml",
                      "models/huggingface.yaml", "cluster/catalog-source.yaml",
                      "cluster/cluster-model-catalog.yaml", "cluster/cluster-model.yaml",
                      "workloads/distributed-llama.yaml", "workloads/vllm.yaml",
                      "workloads/triton.yaml", "workloads/torchserve.yaml"}
    for sub in FOLDERS:
        for name in sorted(os.listdir(os.path.join(EXAMPLES, sub))):
            with open(os.path.join(EXAMPLES, sub, name)) as f:
                objs = [d for d in yaml.safe_load_all(f) if d]
            for d in objs:
                if d["kind"] not in ("Model", "ClusterModel"):
                    continue
                key = (d["kind"], d["metadata"]["name"])
                assert (key in LOCAL) != (os.path.join(sub, name) in marked), key
                assert (key in LOCAL) != (key in OUTSIDE_STATUS), key
    for (kind, name), want in OUTSIDE_STATUS.items():
        def settled(kind: str = kind, name: str = name,
                    want: set[tuple[str, str]] = want) -> tuple[str, str] | None:
            st = _status(system, kind, name)
            ready = [c for c in st.get("conditions") or [] if c["type"] == "Ready"]
            got = (st.get("phase", ""), ready[0].get("reason", "") if ready else "")
            return got if got in want else None
        try:
            demoenv.wait_for(f"{kind} {name} {want}", settled, 90)
        except AssertionError:
            raise AssertionError((kind, name, _status(system, kind, name))) from None


def test_every_example_file_is_applied() -> None:
    found = set()
    for dirpath, _, names in os.walk(EXAMPLES):
        found |= {os.path.relpath(os.path.join(dirpath, n), EXAMPLES)
                  for n in names if n.endswith((".yaml", ".yml", ".json"))}
    covered = {os.path.relpath(DEMO_MODEL, EXAMPLES)} | {
        os.path.join(sub, n) for sub in FOLDERS
        for n in os.listdir(os.path.join(EXAMPLES, sub)) if n.endswith(".yaml")}
    assert found == covered


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

