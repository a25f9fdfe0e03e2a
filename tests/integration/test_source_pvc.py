"""``source.pvc`` end to end: a real API server, the upload gateway in-process, a real registry.

The manager (a subprocess, as in a pod) opens an upload session and runs
the PVC reader Job in the Model's namespace; the FAKE kubelet
(tests/fake_kubelet.py) runs that Job's real command,
``modelcache-controller pvc-upload``, as a local process with the claim
mapped to ``claim_dir`` (filled here from tests/modelgen.py). The gateway
verifies and publishes; the manager writes Ready from the session's result.
Acceptance: Ready with the registry's digest and the model's metadata, the
artifact pulls back byte-identical, the reader Job ran in the Model's
namespace with no push credential, and its token Secret is gone after; a
missing claim is Pending ``PVCNotFound`` until it appears; a missing path
and a symlink out of the claim are Failed with their reason; a restarted
manager finds its reader Job and session again.
"""

from __future__ import annotations

import os
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from controller.models import publishjob as jobs
from controller.models import pvcsource
from jobs import pvc_reader
from kube import client as k
from modelpack.oci.reference import Reference
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.integration.test_controller import (
    REPO_ROOT,
    SYSTEM_NS,
    ManagerProcess,
    cond,
    ensure_namespace,
    events_of,
    get_model,
    jobs_of,
    phase_is,
    wait_for,
)
from tests.integration.test_controller import cluster as cluster
from tests.integration.test_controller_upload import ADMIN, get_secret
from tests.integration.test_controller_upload import gateway as gateway
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube


@pytest.fixture(scope="module")
def ns(cluster: k.Kube) -> str:
    name = f"pvc-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, name)
    return name


@pytest.fixture(scope="module")
def kubelet(cluster: k.Kube, ns: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[FakeKubelet]:
    """The kubelet of the Model's namespace: only reader Jobs run there."""
    with FakeKubelet(cluster, ns, work_root=str(tmp_path_factory.mktemp("kubelet"))) as fake:
        yield fake


@pytest.fixture(scope="module")
def manager(kube: kubeenv.KubeEnv, cluster: k.Kube, gateway: Any, registry: Any,
            kubelet: FakeKubelet, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ManagerProcess]:
    m = start(gateway_manager(kube, registry, gateway,
                              str(tmp_path_factory.mktemp("manager") / "manager.log")))
    yield m
    m.stop()


def gateway_manager(kube: kubeenv.KubeEnv, registry: Any, gateway: Any, log_path: str,
                    *extra: str) -> ManagerProcess:
    return ManagerProcess(kube, registry.host, "http://127.0.0.1:9", log_path, extra=[
        "--upload-gateway-url", gateway.public_url, "--upload-poll-interval", "0.3", *extra])


def start(m: ManagerProcess) -> ManagerProcess:
    """Start ``m`` with the gateway's admin token in the environment it inherits."""
    os.environ["MODELCACHE_UPLOAD_ADMIN_TOKEN"] = ADMIN
    try:
        return m.start()
    finally:
        del os.environ["MODELCACHE_UPLOAD_ADMIN_TOKEN"]


def make_claim(client: k.Kube, ns: str, name: str) -> None:
    client.create(k.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                           "metadata": {"name": name},
                           "spec": {"accessModes": ["ReadWriteOnce"],
                                    "resources": {"requests": {"storage": "1Gi"}}}}, ns)


def pvc_model(name: str, ns: str, claim: str, path: str | None) -> dict[str, Any]:
    src: dict[str, Any] = {"claimName": claim}
    if path is not None:
        src["path"] = path
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": ns}, "spec": {"source": {"pvc": src}}}


def readers_of(client: k.Kube, ns: str, uid: str) -> list[dict[str, Any]]:
    items, _ = client.list(k.JOBS, ns, label_selector=f"modelcache.io/uid={uid}")
    return items


def settled(client: k.Kube, ns: str, name: str, *phases: str) -> dict[str, Any]:
    m: dict[str, Any] = wait_for(phase_is(client, ns, name, *phases), 90, what="/".join(phases))
    return m


def reader_exits(kubelet: FakeKubelet, job: dict[str, Any]) -> list[int]:
    """Exit codes of the reader's runs; the model may be Ready a moment before the
    reader process (which waits for the same result) has exited, and the controller
    then deletes the reader Job: a run killed for that counts as done (0), as
    kubelet killing a deleted Job's pod would."""
    def runs() -> list[int]:
        return [0 if r.get("deleted") else r["exitCode"]
                for r in kubelet.runs if r["job"] == job["metadata"]["name"]]
    wait_for(runs, 30, what="the reader's exit")
    return runs()


def metric(manager: ManagerProcess, line_prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{manager.port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(line_prefix))


# --- acceptance --------------------------------------------------------------------------


def test_pvc_model_becomes_ready_and_pulls_back_identical(cluster, ns, kubelet, manager, registry,
                                                          client, small_model, tmp_path):
    make_claim(cluster, ns, "weights")
    shutil.copytree(small_model, os.path.join(kubelet.claim_dir("weights"), "llama"))
    kubelet.hold()  # look at the reader while it "runs"
    try:
        cluster.create(k.MODELS, pvc_model("local", ns, "weights", "llama/"), ns)

        def reader() -> Any:
            m = get_model(cluster, ns, "local")
            return m and readers_of(cluster, ns, m["metadata"]["uid"])
        job = wait_for(reader, 30, what="the reader Job")[0]
        m = wait_for(phase_is(cluster, ns, "local", "Publishing"), 30, what="Publishing")
        assert cond(m, "Ready")["status"] == "False"
        # the reader runs in the Model's namespace with the claim read-only and one token
        assert job["metadata"]["namespace"] == ns
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "pvc-reader"
        assert job["metadata"]["ownerReferences"][0]["uid"] == m["metadata"]["uid"]
        pod = job["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert "serviceAccountName" not in pod or pod["serviceAccountName"] == "default"
        assert pod["volumes"] == [{"name": "source", "persistentVolumeClaim": {
            "claimName": "weights", "readOnly": True}}, {"name": "secrets", "secret": {
                "secretName": "local-upload-token", "defaultMode": 0o440}}]
        (container,) = pod["containers"]
        assert all(vm.get("readOnly") for vm in container["volumeMounts"])
        env = {e["name"]: e for e in container["env"]}
        assert not [n for n in env if "REGISTRY" in n or n.startswith("AWS_") or n == "HF_TOKEN"]
        assert not [e for e in env.values() if "valueFrom" in e]  # files, not env values
        assert env["MODELCACHE_UPLOAD_TOKEN_FILE"]["value"].endswith("/token")
        assert "--to" not in container["command"] and "publish" not in container["command"]
        secret = cluster.get(k.SECRETS, "local-upload-token", ns)
        assert set(secret["data"]) <= {"token", "MODELCACHE_REPORT_TOKEN"}
        assert not jobs_of(cluster, m["metadata"]["uid"])  # nothing in the controller's ns
    finally:
        kubelet.release()

    m = settled(cluster, ns, "local", "Ready", "Failed")
    st = m["status"]
    assert st["phase"] == "Ready", (st, manager.logs())
    assert st["artifact"]["reference"] == \
        f"{registry.host}/models/{ns}/local:gen-1@{st['artifact']['digest']}"
    assert st["artifact"]["digest"].startswith("sha256:")
    _, tagged, _ = client.get_manifest(Reference(registry.host, f"models/{ns}/local", "gen-1"))
    assert tagged == st["artifact"]["digest"]
    assert st["resolved"]["format"] == "Safetensors"
    assert st["resolved"]["family"] == "llama"
    assert st["resolved"]["parameterCount"] > 0
    assert st["progress"]["percent"] == 100
    assert st["source"]["resolvedRevision"].startswith("sha256:")
    assert st["publish"]["jobName"] == job["metadata"]["name"]
    for t in ("SourceResolved", "Published", "Ready"):
        assert cond(m, t)["status"] == "True", cond(m, t)
    assert reader_exits(kubelet, job) == [0]
    # the reader's upload progress reached the manager's report endpoint
    assert metric(manager, 'modelcache_progress_reports_total{result="accepted"}') >= 1
    # done: no token left in the user's namespace, no reader either
    wait_for(lambda: get_secret(cluster, ns, "local-upload-token") is None, 10,
             what="token Secret deleted")
    wait_for(lambda: not readers_of(cluster, ns, m["metadata"]["uid"]), 10,
             what="reader Job deleted")
    dest = str(tmp_path / "pulled")
    pull_back(client, f"{registry.host}/models/{ns}/local@{st['artifact']['digest']}", dest)
    same_tree(small_model, dest)

    cluster.delete(k.MODELS, "local", ns)
    wait_for(lambda: get_model(cluster, ns, "local") is None, 30, what="finalizer released")
    assert client.list_tags(f"models/{ns}/local") == []


def test_missing_claim_is_pending_until_it_appears(cluster, ns, kubelet, manager, small_model):
    cluster.create(k.MODELS, pvc_model("later", ns, "later-weights", None), ns)
    m = wait_for(phase_is(cluster, ns, "later", "Pending", "Failed", "Ready"), 30,
                 what="Pending")
    assert m["status"]["phase"] == "Pending", m["status"]
    c = cond(m, "Ready")
    assert c["reason"] == "PVCNotFound" and "later-weights" in c["message"], c
    assert cond(m, "SourceResolved")["reason"] == "PVCNotFound"
    wait_for(lambda: any(e["reason"] == "PVCNotFound" and e["type"] == "Warning"
                         for e in events_of(cluster, ns, m["metadata"]["uid"])), 10,
             what="the Warning event")
    assert not readers_of(cluster, ns, m["metadata"]["uid"])
    assert get_secret(cluster, ns, "later-upload-token") is None  # no session yet

    shutil.copytree(small_model, kubelet.claim_dir("later-weights"))  # path unset: the root
    make_claim(cluster, ns, "later-weights")
    m = settled(cluster, ns, "later", "Ready", "Failed")
    assert m["status"]["phase"] == "Ready", (m["status"], manager.logs())


def test_missing_path_is_failed_with_reason(cluster, ns, kubelet, manager, small_model):
    make_claim(cluster, ns, "nopath")
    shutil.copytree(small_model, os.path.join(kubelet.claim_dir("nopath"), "llama"))
    cluster.create(k.MODELS, pvc_model("nopath", ns, "nopath", "mistral/"), ns)
    m = settled(cluster, ns, "nopath", "Failed", "Ready")
    assert m["status"]["phase"] == "Failed", m["status"]
    c = cond(m, "Ready")
    assert c["reason"] == "PathNotFound" and "mistral" in c["message"], c
    assert cond(m, "Published")["reason"] == "PathNotFound"
    wait_for(lambda: get_secret(cluster, ns, "nopath-upload-token") is None, 10,
             what="token Secret deleted")
    wait_for(lambda: not readers_of(cluster, ns, m["metadata"]["uid"]), 10,
             what="reader Job deleted")


@pytest.mark.parametrize("hostile", ["file-link", "path-link"])
def test_symlink_out_of_the_claim_is_refused(cluster, ns, kubelet, manager, small_model,
                                             tmp_path, hostile):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not the model's\n")
    claim = f"hostile-{hostile}"
    make_claim(cluster, ns, claim)
    tree = os.path.join(kubelet.claim_dir(claim), "llama")
    shutil.copytree(small_model, tree)
    if hostile == "file-link":  # a file of the model that is a link out
        os.symlink(str(outside / "secret.txt"), os.path.join(tree, "notes.txt"))
        path = "llama"
    else:  # the path itself leads out
        os.symlink(str(outside), os.path.join(kubelet.claim_dir(claim), "elsewhere"))
        path = "elsewhere/"
    name = f"evil-{hostile}"
    cluster.create(k.MODELS, pvc_model(name, ns, claim, path), ns)
    m = settled(cluster, ns, name, "Failed", "Ready")
    assert m["status"]["phase"] == "Failed", m["status"]
    c = cond(m, "Ready")
    assert c["reason"] == "UnsafePath" and "symlink" in c["message"], c
    wait_for(lambda: get_secret(cluster, ns, f"{name}-upload-token") is None, 10,
             what="token Secret deleted")


def test_restarted_manager_finds_its_reader_and_session(cluster, ns, kubelet, manager, gateway,
                                                        small_model):
    make_claim(cluster, ns, "kept")
    shutil.copytree(small_model, kubelet.claim_dir("kept"))
    kubelet.hold()
    try:
        cluster.create(k.MODELS, pvc_model("kept", ns, "kept", ""), ns)
        m = wait_for(phase_is(cluster, ns, "kept", "Publishing"), 30, what="Publishing")
        (job,) = readers_of(cluster, ns, m["metadata"]["uid"])
        sessions = len(gateway.sessions.sessions)
        manager.kill()
        start(manager)
    finally:
        kubelet.release()
    m = settled(cluster, ns, "kept", "Ready", "Failed")
    assert m["status"]["phase"] == "Ready", (m["status"], manager.logs())
    assert len(gateway.sessions.sessions) == sessions  # the same session, found again
    assert reader_exits(kubelet, job) == [0]  # one reader, run once
    assert m["status"]["publish"]["jobName"] == job["metadata"]["name"]


def test_manager_needs_nothing_beyond_the_manifest_rbac(kube, cluster, ns, kubelet, manager,
                                                        gateway, registry, small_model,
                                                        tmp_path):
    manager.stop()  # one leader at a time: this one holds only daemonset/controller-rbac.yaml
    kube.kubectl("apply", "-f", os.path.join(REPO_ROOT, "daemonset", "controller-rbac.yaml"))
    sa_config = kube.serviceaccount_kubeconfig("modelcache-controller", SYSTEM_NS)
    rbac = start(gateway_manager(kube, registry, gateway, str(tmp_path / "rbac-manager.log"),
                                 "--kubeconfig", sa_config))  # the later --kubeconfig wins
    try:
        cluster.create(k.MODELS, pvc_model("rbac", ns, "rbac-weights", "m"), ns)
        m = wait_for(phase_is(cluster, ns, "rbac", "Pending"), 30, what="Pending")
        assert cond(m, "Ready")["reason"] == "PVCNotFound"  # the claim was looked up
        shutil.copytree(small_model, os.path.join(kubelet.claim_dir("rbac-weights"), "m"))
        make_claim(cluster, ns, "rbac-weights")
        m = settled(cluster, ns, "rbac", "Ready", "Failed")
        assert m["status"]["phase"] == "Ready", (m["status"], rbac.logs())
        wait_for(lambda: get_secret(cluster, ns, "rbac-upload-token") is None, 10,
                 what="token Secret deleted")
        cluster.delete(k.MODELS, "rbac", ns)
        wait_for(lambda: get_model(cluster, ns, "rbac") is None, 30, what="finalizer released")
    finally:
        rbac.stop()
    with open(rbac.log_path, errors="replace") as f:
        logs = f.read()
    assert " 403 " not in logs and "Forbidden" not in logs, logs


# --- the reader Job and the reader, without a cluster --------------------------------------


def test_reader_job_never_carries_the_push_credential():
    settings = jobs.Settings(namespace=SYSTEM_NS, registry="dmcr:5000",
                             registry_secret="dmcr-push", report_url="http://mgr:8080",
                             report_key=b"k", service_account="modelcache-publish",
                             extra_env={"HTTPS_PROXY": "http://proxy:3128"})
    obj = {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
           "metadata": {"name": "m", "namespace": "team-a", "uid": "u-1", "generation": 1},
           "spec": {"source": {"pvc": {"claimName": "w", "path": "x/"}},
                    "publish": {"nodeSelector": {"disk": "ssd"}}}}
    job = pvcsource.build_job(obj, "abc", "http://gw/v1/uploads/s1", settings)
    assert job["metadata"]["namespace"] == "team-a"
    pod = job["spec"]["template"]["spec"]
    text = repr(job)
    assert "dmcr-push" not in text and "modelcache-publish" not in text
    assert "serviceAccountName" not in pod and pod["automountServiceAccountToken"] is False
    assert pod["nodeSelector"] == {"disk": "ssd"}  # spec.publish placement applies
    env = {e["name"] for e in pod["containers"][0]["env"]}
    assert env == {"MODELCACHE_UPLOAD_TOKEN_FILE", "MODELCACHE_REPORT_URL",
                   "MODELCACHE_REPORT_TOKEN_FILE"}


@pytest.mark.parametrize("path,reason", [
    ("../etc", "UnsafePath"), ("a/../../b", "UnsafePath"), ("missing", "PathNotFound"),
    ("out", "UnsafePath"), ("dev", "NotADirectory")])
def test_reader_refuses_paths_out_of_the_claim(tmp_path, path, reason):
    mount = tmp_path / "claim"
    mount.mkdir()
    os.symlink("/etc", str(mount / "out"))
    os.mkfifo(str(mount / "dev"))
    with pytest.raises(pvc_reader.ReaderError) as e:
        pvc_reader.source_dir(str(mount), path)
    assert e.value.reason == reason and not e.value.retryable
