"""The whole system on a real node: a Model and a Deployment that asks for it by
annotation -> our admission webhook -> controller-manager -> our gate lifter ->
scheduler -> kubelet -> CSI NodePublishVolume (our plugin, resolving the Model
in the API server, pulling from the real registry) -> containerd/runc -> a
container reading the model.

Needs root and ``MODELCACHE_NODE_E2E=1 hack/install.d/node-e2e.sh``; run with
``hack/e2e.sh`` (tests/e2e/nodeenv.py lists every component and shortcut).

How the Model gets Ready: the way ``modelcache import`` does it. The
ModelPack is pushed to the repository the controller uses for the Model
(``pack_to_registry``), and the Model carries ``modelcache.io/imported-digest``;
the manager adopts it (controller/models/adopt.py: reads and checks the
manifest in the registry, writes Ready with the artifact and the resolved
metadata) and makes no publish Job. A real publish Job is not run here: its
pod would need the controller image (Python and the package, ~1.2 GB here,
and no Docker engine to build it) and a pod network to reach the registry
(this node has none; test pods use hostNetwork, Job pods the manager makes do
not). Publish Jobs are covered by tests/integration/test_controller*.py
(fake_kubelet.py runs their containers as processes).

The node plugin fetches through a counting proxy (``tests/csi_fixtures.Proxy``,
``--pull-via``), so "the second pod reuses the cache" is checked as "no
blob was fetched again".
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from api import names as c
from modelpack.oci import reference
from modelpack.oci.manifest import ModelPack
from modelpack.pack import pack_to_registry
from tests import modelgen
from tests.csi_fixtures import Proxy
from tests.e2e import images, nodeenv

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(1800)]

NAMESPACE = "e2e-team"
MODEL = "tiny"
APP = "model-reader"
MOUNT = f"{c.MOUNT_ROOT}/{MODEL}"
POD_TIMEOUT = 300.0  # image pull + model pull + container start on a busy machine
GROUP, VERSION = "modelcache.io", "v1alpha1"

# What the container does: show the env the webhook injected, hash every model
# file, try to write, show the mount's options, then stay up (a Deployment
# restarts containers that exit).
READER_SCRIPT = f"""\
printf 'ENV {c.ENV_DIR} %s\\n' "${c.ENV_DIR}"
printf 'ENV {c.ENV_MODELS} %s\\n' "${c.ENV_MODELS}"
cd {MOUNT} || {{ echo "NO MOUNT"; exit 1; }}
for f in $(find . -type f | sort); do echo "SHA $(sha256sum "$f")"; done
if touch ./.write-probe 2>/dev/null; then echo "WRITE allowed"; else echo "WRITE refused"; fi
echo "MOUNT $(grep " {MOUNT} " /proc/mounts)"
echo DONE
exec sleep inf
"""


@dataclass
class Setup:
    env: nodeenv.NodeEnv
    images: images.Images
    pack: ModelPack
    registry: str
    proxy: Proxy


@pytest.fixture(scope="module")
def setup(registry: Any, client: Any, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[Setup]:
    imgs = images.push_images(client)
    src = str(tmp_path_factory.mktemp("model"))
    modelgen.make_safetensors_model(src, seed=8)
    # into the repository the controller uses for Model e2e-team/tiny
    # (api.model.repository), then tagged as `modelcache import` tags it (the
    # manager and the node use the digest; the tag keeps the manifest listed)
    repo = f"models/{NAMESPACE}/{MODEL}"
    pack = pack_to_registry(src, client, reference.parse(f"{registry.host}/{repo}:v1")).pack
    client.put_manifest(repo, c.imported_tag(pack.digest), pack.manifest_bytes)
    # the node plugin pulls through the proxy (it counts blob GETs);
    # the manager and containerd talk to the registry directly
    proxy = Proxy(registry.host)
    try:
        with nodeenv.running(sandbox_image=imgs.pause, registries=[registry.host],
                             model_registry=registry.host, node_pull_via=proxy.host) as env:
            _ensure_namespace(env)
            try:
                yield Setup(env, imgs, pack, registry.host, proxy)
            finally:
                nodeenv.delete_and_wait_pods(env, NAMESPACE)
    finally:
        proxy.stop()


def _ensure_namespace(env: nodeenv.NodeEnv) -> None:
    from kubernetes import client

    core = client.CoreV1Api(env.kube.api_client())
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=NAMESPACE)))
    # the ServiceAccount admission plugin rejects pods until the
    # controller-manager has made the namespace's "default" ServiceAccount
    nodeenv.wait_for(env, "ServiceAccount default", lambda: core.read_namespaced_service_account(
        "default", NAMESPACE), timeout=120)


def model(digest: str) -> dict[str, Any]:
    """An imported Model: the source is never contacted (adopt.py), but the CRD wants one."""
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Model",
            "metadata": {"name": MODEL, "namespace": NAMESPACE,
                         "annotations": {c.IMPORTED: digest}},
            "spec": {"source": {"huggingFace": {"repo": f"e2e/{MODEL}"}}}}


def deployment(image: str, replicas: int) -> dict[str, Any]:
    """The workload as a user writes it: the model annotation and nothing else of ours
    (no volume, no mount, no env, no gate: the webhook adds them)."""
    labels = {"app": APP}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": APP, "namespace": NAMESPACE,
                     "annotations": {c.ANN_MODELS: MODEL}},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "hostNetwork": True,  # no CNI on the test node (nodeenv.py)
                    "automountServiceAccountToken": False,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "reader",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["/bin/sh", "-c", READER_SCRIPT],
                    }],
                },
            },
        },
    }


@dataclass(frozen=True)
class Report:
    pod: str
    node: str
    sha: dict[str, str]  # path (./x) -> hex
    write: str
    mount: str
    env: dict[str, str]  # what the container saw of the injected env


def _parse(pod: Any, log: str) -> Report:
    sha = {}
    for m in re.finditer(r"^SHA ([0-9a-f]{64})  (\S+)$", log, re.M):
        sha[m.group(2)] = m.group(1)
    env = {m.group(1): m.group(2) for m in re.finditer(r"^ENV (\S+) (.*)$", log, re.M)}
    write = re.search(r"^WRITE (\w+)$", log, re.M)
    mount = re.search(r"^MOUNT (.*)$", log, re.M)
    return Report(pod.metadata.name, pod.spec.node_name, sha,
                  write.group(1) if write else "", mount.group(1) if mount else "", env)


def _describe(setup: Setup) -> str:
    from kubernetes import client

    core = client.CoreV1Api(setup.env.kube.api_client())
    pods = core.list_namespaced_pod(NAMESPACE).items
    events = core.list_namespaced_event(NAMESPACE).items
    return "\n".join(
        [f"pod {p.metadata.name}: {p.status.phase} gates={p.spec.scheduling_gates} "
         f"{p.status.container_statuses}" for p in pods]
        + [f"event {e.involved_object.name}: {e.reason}: {e.message}" for e in events])


def _reports(setup: Setup, count: int) -> list[Report]:
    """Wait until ``count`` pods of the app ran the script; their reports."""
    from kubernetes import client

    core = client.CoreV1Api(setup.env.kube.api_client())

    def done() -> list[Report] | None:
        pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"app={APP}").items
        finished = []
        for pod in pods:
            if pod.status.phase != "Running" or pod.metadata.deletion_timestamp:
                continue
            log = nodeenv.container_log(setup.env, pod, "reader")
            if "NO MOUNT" in log:
                raise AssertionError(f"{pod.metadata.name}: model not mounted:\n{log}")
            if "\nDONE" in log:
                finished.append(_parse(pod, log))
        return finished if len(finished) >= count else None

    got: list[Report] = nodeenv.wait_for(setup.env, f"{count} pod(s) ran the reader", done,
                                         timeout=POD_TIMEOUT, interval=1,
                                         describe=lambda: _describe(setup))
    return got


def _pods_as_created(setup: Setup, since: str) -> dict[str, dict[str, Any]]:
    """Every pod of the namespace as the API server stored it at creation: the ADDED
    events of a watch replayed from resourceVersion ``since`` (taken before the
    Deployment existed), so a gate lifted a moment later is still seen."""
    from kubernetes import client, watch

    api = setup.env.kube.api_client()
    core = client.CoreV1Api(api)
    first: dict[str, dict[str, Any]] = {}
    for ev in watch.Watch().stream(core.list_namespaced_pod, NAMESPACE, resource_version=since,
                                   timeout_seconds=1):
        if ev["type"] == "ADDED":
            first.setdefault(ev["object"].metadata.name,
                             api.sanitize_for_serialization(ev["object"]))
    return first


def _pod(setup: Setup, name: str) -> dict[str, Any]:
    from kubernetes import client

    api = setup.env.kube.api_client()
    got: dict[str, Any] = api.sanitize_for_serialization(
        client.CoreV1Api(api).read_namespaced_pod(name, NAMESPACE))
    return got


def _preferred_labels(pod: dict[str, Any]) -> list[tuple[str, int]]:
    terms = (((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {})
             .get("preferredDuringSchedulingIgnoredDuringExecution") or [])
    return [(e["key"], t["weight"]) for t in terms
            for e in t["preference"].get("matchExpressions") or [] if e["operator"] == "Exists"]


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _layer_blob_gets(setup: Setup) -> dict[str, int]:
    return {layer.path: setup.proxy.blob_gets[layer.digest] for layer in setup.pack.layers}


def _assert_reader(report: Report, setup: Setup, injected_models: str) -> None:
    """What every reader pod must have seen: the model byte-exact, read-only, the env."""
    assert report.node == setup.env.node_name
    # every file, byte-exact: sha256 inside the container == the layer digest
    expected = {f"./{layer.path}": layer.digest.removeprefix("sha256:")
                for layer in setup.pack.layers}
    assert report.sha == expected
    assert any(p.endswith(".safetensors") for p in report.sha)
    # read-only inside the container: the write failed, the mount says ro
    assert report.write == "refused"
    assert report.mount, "the model directory is not a mount point in the container"
    assert "ro" in report.mount.split()[3].split(","), report.mount
    # the env the webhook injected, exactly as the container sees it
    assert report.env == {c.ENV_DIR: c.MOUNT_ROOT, c.ENV_MODELS: injected_models}


def test_annotated_deployment_gets_the_model_through_the_whole_system(setup: Setup) -> None:
    from kubernetes import client

    api = setup.env.kube.api_client()
    apps = client.AppsV1Api(api)
    core = client.CoreV1Api(api)
    crds = client.CustomObjectsApi(api)
    digest = setup.pack.digest
    label = c.node_label(digest)

    # 1. the Model: the manager adopts the pushed artifact and reports it Ready
    t0 = time.monotonic()
    crds.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "models", model(digest))

    def ready() -> dict[str, Any] | None:
        m = crds.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, "models", MODEL)
        return m if (m.get("status") or {}).get("phase") == "Ready" else None

    status = nodeenv.wait_for(setup.env, f"Model {MODEL} Ready", ready, timeout=60)["status"]
    ready_seconds = time.monotonic() - t0
    assert status["artifact"]["digest"] == digest
    assert status["artifact"]["reference"] == (
        f"{setup.registry}/models/{NAMESPACE}/{MODEL}:{c.imported_tag(digest)}@{digest}")
    assert status["resolved"]["format"] == "Safetensors"
    assert any(x["type"] == "Ready" and x["status"] == "True" for x in status["conditions"])

    # 2. the Deployment, annotation only: the webhook injected its pod template
    since = core.list_namespaced_pod(NAMESPACE).metadata.resource_version
    t1 = time.monotonic()
    apps.create_namespaced_deployment(NAMESPACE, deployment(setup.images.busybox, 1))
    stored = api.sanitize_for_serialization(apps.read_namespaced_deployment(APP, NAMESPACE))
    tpl = stored["spec"]["template"]
    volume = f"{c.VOLUME_PREFIX}m-{MODEL}"
    assert tpl["spec"]["volumes"] == [{"name": volume, "csi": {
        "driver": nodeenv.DRIVER, "readOnly": True,
        "volumeAttributes": {c.ATTR_MODEL: MODEL, c.ATTR_DIGEST: digest}}}]
    (ctr,) = tpl["spec"]["containers"]
    assert ctr["volumeMounts"] == [{"name": volume, "mountPath": MOUNT, "readOnly": True}]
    env = {e["name"]: e["value"] for e in ctr["env"]}
    assert set(env) == {c.ENV_DIR, c.ENV_MODELS}
    assert env[c.ENV_DIR] == c.MOUNT_ROOT
    assert json.loads(env[c.ENV_MODELS]) == [{
        "name": MODEL, "path": MOUNT, "digest": digest,
        "family": status["resolved"].get("family", ""), "format": "Safetensors"}]
    assert tpl["spec"]["schedulingGates"] == [{"name": c.GATE}]
    assert tpl["metadata"]["labels"][c.LABEL_GATED] == "true"
    assert c.ANN_INJECTED in tpl["metadata"]["annotations"]
    assert c.ANN_INJECTED in stored["metadata"]["annotations"]
    assert "affinity" not in tpl["spec"]  # no node caches the model yet
    metrics = setup.env.manager_metrics()
    assert _metric(metrics, 'modelcache_webhook_admissions_total{kind="Deployment",'
                            'operation="CREATE",result="mutated"}') == 1

    # 3. the first pod: created gated, lifted by the manager's lifter (the model is
    # Ready), scheduled, running, and reading the model
    (first,) = _reports(setup, 1)
    first_seconds = time.monotonic() - t1
    _assert_reader(first, setup, env[c.ENV_MODELS])
    created = _pods_as_created(setup, since)[first.pod]
    assert created["spec"]["schedulingGates"] == [{"name": c.GATE}]
    assert created["metadata"]["labels"][c.LABEL_GATED] == "true"
    assert not created["spec"].get("nodeName")
    now = _pod(setup, first.pod)
    assert not now["spec"].get("schedulingGates")
    assert now["metadata"]["labels"][c.LABEL_GATED] == "false"  # the lifter's mark
    assert _preferred_labels(now) == []  # no node held the model when it was lifted
    # the node pulled each layer exactly once
    fetched = _layer_blob_gets(setup)
    assert fetched == {layer.path: 1 for layer in setup.pack.layers}
    blob_gets_before = sum(setup.proxy.blob_gets.values())

    # 4. the node plugin labels its Node: this node's cache holds the model; and
    # the manager has seen it: a workload admitted now (a server-side dry run of
    # the same Deployment) gets the preferred term in its template at once
    nodeenv.wait_for(setup.env, f"node label {label}", lambda: (core.read_node(
        setup.env.node_name).metadata.labels or {}).get(label) == "true", timeout=60)

    def admitted_with_affinity() -> bool:
        body = deployment(setup.images.busybox, 1)
        body["metadata"]["name"] = f"{APP}-dry-run"
        got = api.sanitize_for_serialization(
            apps.create_namespaced_deployment(NAMESPACE, body, dry_run="All"))
        return _preferred_labels(got["spec"]["template"]) == [(label, 50)]

    nodeenv.wait_for(setup.env, "the webhook preferring the node that caches the model",
                     admitted_with_affinity, timeout=60)

    # 5. a second replica (from the template admitted before, without the term):
    # gated, lifted with a preferred affinity toward the nodes that cache the
    # model, which the lifter merges in; it reuses the cache (no new blob GET)
    t2 = time.monotonic()
    apps.patch_namespaced_deployment_scale(APP, NAMESPACE, {"spec": {"replicas": 2}})
    reports = _reports(setup, 2)
    second = next(r for r in reports if r.pod != first.pod)
    second_seconds = time.monotonic() - t2
    _assert_reader(second, setup, env[c.ENV_MODELS])
    created = _pods_as_created(setup, since)[second.pod]
    assert created["spec"]["schedulingGates"] == [{"name": c.GATE}]
    assert _preferred_labels(created) == []
    now = _pod(setup, second.pod)
    assert not now["spec"].get("schedulingGates")
    assert _preferred_labels(now) == [(label, 50)]
    assert sum(setup.proxy.blob_gets.values()) == blob_gets_before, setup.proxy.blob_gets
    assert _layer_blob_gets(setup) == fetched

    # the manager's lifter counted both pods
    assert _metric(setup.env.manager_metrics(),
                   "modelcache_scheduling_gates_lifted_total") == 2

    # 6. deleting the workload unpublishes: kubelet called NodeUnpublishVolume
    # and no bind mount is left under kubelet's pods dir
    nodeenv.delete_and_wait_pods(setup.env, NAMESPACE)
    pods_dir = os.path.join(setup.env.kubelet_root, "pods")
    with open("/proc/self/mountinfo") as f:
        left = [line.split()[4] for line in f if line.split()[4].startswith(pods_dir + "/")]
    assert left == []
    print(f"e2e: Model Ready in {ready_seconds:.1f}s, first pod read the model "
          f"{first_seconds:.1f}s after the Deployment, second {second_seconds:.1f}s after scale")
