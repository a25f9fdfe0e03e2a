"""The controller manager against a real API server, the HF test hub and a real registry.

``modelcache-controller manager`` runs as a subprocess (as in a pod); the
FAKE kubelet (tests/fake_kubelet.py) runs each publish Job's real command,
``modelcache-controller publish``, as a local process. Acceptance: a Model
becomes Ready with digest, size, progress 100 % and resolved metadata, and
its artifact pulls back byte-identical; a failing source is Failed with a
reason and an event; delete removes the artifact and releases the
finalizer; a Secret change and ``modelcache.io/reimport`` re-publish, an
unchanged spec does not.
"""

from __future__ import annotations

import base64
import glob
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kube import client as k
from tests import kubeenv
from tests.fake_kubelet import FakeKubelet
from tests.servers.helpers import pull_back, same_tree

pytest_plugins = ["tests.servers.fixtures"]
kube = kubeenv.kube

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEM_NS = "modelcache-system"
HUB_TOKEN = "hf_test_token"  # what tests.servers.fixtures' hub accepts


def wait_for(fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.1,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


# --- cluster set-up --------------------------------------------------------------

FALLBACK_CRDS = """# used only while crds/ is empty: the schema is the CRD author's, not the controller's
"""


def _fallback_crd(plural: str, kind: str, scope: str) -> dict[str, Any]:
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": f"{plural}.modelcache.io"},
            "spec": {"group": "modelcache.io", "scope": scope,
                     "names": {"plural": plural, "singular": kind.lower(), "kind": kind},
                     "versions": [{"name": "v1alpha1", "served": True, "storage": True,
                                   "subresources": {"status": {}},
                                   "schema": {"openAPIV3Schema": {
                                       "type": "object",
                                       "x-kubernetes-preserve-unknown-fields": True}}}]}}


def install_crds(env: kubeenv.KubeEnv) -> None:
    client = k.Kube.from_config(env.kubeconfig)
    files = sorted(glob.glob(os.path.join(REPO_ROOT, "crds", "modelcache.io_*.yaml")))
    crd_res = k.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions", False)
    if files:
        env.kubectl("apply", "--server-side", "--force-conflicts", *sum(
            (["-f", f] for f in files), []))
    else:
        for plural, kind, scope in (("models", "Model", "Namespaced"),
                                    ("clustermodels", "ClusterModel", "Cluster")):
            try:
                client.create(crd_res, _fallback_crd(plural, kind, scope))
            except k.Conflict:
                pass
    for plural in ("models", "clustermodels"):
        def established(plural: str = plural) -> bool:
            crd = client.get(crd_res, f"{plural}.modelcache.io")
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in (crd.get("status") or {}).get("conditions") or [])
        wait_for(established, 30, what=f"CRD {plural} Established")
    client.close()


def ensure_namespace(client: k.Kube, name: str) -> None:
    try:
        client.create(k.Resource("", "v1", "namespaces", False),
                      {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    except k.Conflict:
        pass


class ManagerProcess:
    """``modelcache-controller manager`` as a subprocess; ``kill`` is SIGKILL (a crash)."""

    def __init__(self, env: kubeenv.KubeEnv, registry: str, hf_endpoint: str, log_path: str,
                 extra: list[str] | None = None, allow_private_sources: bool = True) -> None:
        self.port = kubeenv.free_port()
        # the tests' sources are loopback servers: the publish Jobs' deny list is opted out
        private = ["--allow-private-sources"] if allow_private_sources else []
        self.log_path = log_path
        self.args = [sys.executable, "-m", "controller.main", "manager",
                     "--kubeconfig", env.kubeconfig, "--namespace", SYSTEM_NS,
                     "--registry", registry, "--registry-insecure",
                     "--hf-endpoint", hf_endpoint, "--listen", f"127.0.0.1:{self.port}",
                     "--report-url", f"http://127.0.0.1:{self.port}",
                     "--lease-duration", "2", "--lease-renew", "0.5", "--workers", "4",
                     "--secret-recheck-interval", "1", *private, *(extra or [])]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagerProcess:
        import urllib.request

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO_ROOT, stdout=log, stderr=log,
                                         env={**os.environ, "MODELCACHE_REPORT_KEY": "k"})

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"manager exited {self.proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=1):
                    return True
            except OSError:
                return False
        wait_for(ready, 30, what="manager /readyz")
        return self

    def logs(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def cluster(kube: kubeenv.KubeEnv) -> Iterator[k.Kube]:
    install_crds(kube)
    client = k.Kube.from_config(kube.kubeconfig)
    ensure_namespace(client, SYSTEM_NS)
    yield client
    client.close()


@pytest.fixture(scope="module")
def namespace(cluster: k.Kube) -> str:
    ns = f"ctl-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    return ns


@pytest.fixture(scope="module")
def kubelet(cluster: k.Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubelet]:
    with FakeKubelet(cluster, SYSTEM_NS,
                     work_root=str(tmp_path_factory.mktemp("kubelet"))) as fake:
        yield fake


@pytest.fixture(scope="module")
def manager(kube: kubeenv.KubeEnv, cluster: k.Kube, kubelet: FakeKubelet, registry: Any,
            hub_server: Any, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[ManagerProcess]:
    m = ManagerProcess(kube, registry.host, hub_server.url,
                       str(tmp_path_factory.mktemp("manager") / "manager.log")).start()
    yield m
    m.stop()


# --- helpers -------------------------------------------------------------------------


def hf_model(name: str, namespace: str, repo: str, **source: Any) -> dict[str, Any]:
    return {"apiVersion": "modelcache.io/v1alpha1", "kind": "Model",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"source": {"huggingFace": {"repo": repo, **source}}}}


def get_model(client: k.Kube, ns: str, name: str) -> dict[str, Any] | None:
    try:
        return client.get(k.MODELS, name, ns)
    except k.NotFound:
        return None


def phase_is(client: k.Kube, ns: str, name: str, *phases: str) -> Callable[[], Any]:
    def check() -> Any:
        m = get_model(client, ns, name)
        if m and (m.get("status") or {}).get("phase") in phases:
            return m
        return None
    return check


def jobs_of(client: k.Kube, uid: str) -> list[dict[str, Any]]:
    items, _ = client.list(k.JOBS, SYSTEM_NS, label_selector=f"modelcache.io/uid={uid}")
    return items


def events_of(client: k.Kube, ns: str, uid: str) -> list[dict[str, Any]]:
    items, _ = client.list(k.EVENTS, ns, field_selector=f"involvedObject.uid={uid}")
    return items


def cond(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    raise AssertionError(f"no condition {type_} in {obj.get('status')}")


# --- acceptance ------------------------------------------------------------------------


def test_model_becomes_ready_and_pulls_back_identical(cluster, namespace, manager, hub,
                                                      registry, client, small_model, tmp_path):
    repo = hub.add_repo("acme/ready", small_model)
    cluster.create(k.MODELS, hf_model("ready", namespace, "acme/ready"), namespace)
    m = wait_for(phase_is(cluster, namespace, "ready", "Ready", "Failed"), 90,
                 what="Ready")
    st = m["status"]
    assert st["phase"] == "Ready", (st, manager.logs())
    assert st["observedGeneration"] == m["metadata"]["generation"]
    assert st["artifact"]["digest"].startswith("sha256:")
    assert st["artifact"]["sizeBytes"] > 0
    assert st["progress"]["percent"] == 100
    assert st["progress"]["bytesDone"] == st["progress"]["bytesTotal"] > 0
    assert st["source"]["resolvedRevision"] == repo.sha
    assert st["resolved"]["format"] == "Safetensors"
    assert st["resolved"]["family"] == "llama"
    assert st["resolved"]["parameterCount"] > 0
    for t in ("SourceResolved", "Published", "Ready"):
        assert cond(m, t)["status"] == "True", cond(m, t)
    assert "modelcache.io/artifact" in m["metadata"]["finalizers"]
    assert len(jobs_of(cluster, m["metadata"]["uid"])) == 1
    reasons = wait_for(lambda: {e["reason"] for e in events_of(
        cluster, namespace, m["metadata"]["uid"])} >= {"PublishStarted", "Published"} and {
        e["reason"] for e in events_of(cluster, namespace, m["metadata"]["uid"])}, 10,
        what="events")
    assert "Published" in reasons
    dest = str(tmp_path / "pulled")
    pull_back(client, f"{registry.host}/models/{namespace}/ready@{st['artifact']['digest']}",
              dest)
    same_tree(small_model, dest)


def test_failing_source_is_failed_with_reason_and_event(cluster, namespace, manager, hub,
                                                        small_model):
    hub.add_repo("acme/corrupt", small_model)
    hub.knobs.corrupt.add("model.safetensors")
    cluster.create(k.MODELS, hf_model("corrupt", namespace, "acme/corrupt"), namespace)
    m = wait_for(phase_is(cluster, namespace, "corrupt", "Failed", "Ready"), 90, what="Failed")
    assert m["status"]["phase"] == "Failed"
    c = cond(m, "Ready")
    assert c["status"] == "False" and c["reason"] == "ChecksumMismatch", c
    assert cond(m, "Published")["reason"] == "ChecksumMismatch"
    ev = wait_for(lambda: [e for e in events_of(cluster, namespace, m["metadata"]["uid"])
                           if e["reason"] == "ChecksumMismatch"], 10, what="the event")
    assert ev[0]["type"] == "Warning"
    # terminal: one Job, not retried by the controller
    time.sleep(1.0)
    assert len(jobs_of(cluster, m["metadata"]["uid"])) == 1


def test_missing_repo_is_failed(cluster, namespace, manager, hub):
    cluster.create(k.MODELS, hf_model("nope", namespace, "acme/does-not-exist"), namespace)
    m = wait_for(phase_is(cluster, namespace, "nope", "Failed", "Ready"), 90, what="Failed")
    assert m["status"]["phase"] == "Failed"
    assert cond(m, "Ready")["reason"] in ("RepoNotFound", "NotFound", "SourceNotFound"), \
        cond(m, "Ready")


def test_delete_removes_artifact_and_releases_finalizer(cluster, namespace, manager, hub,
                                                        registry, client, small_model):
    hub.add_repo("acme/gone", small_model)
    cluster.create(k.MODELS, hf_model("gone", namespace, "acme/gone"), namespace)
    m = wait_for(phase_is(cluster, namespace, "gone", "Ready", "Failed"), 90, what="Ready")
    assert m["status"]["phase"] == "Ready"
    repo = f"models/{namespace}/gone"
    assert client.list_tags(repo) == ["gen-1"]
    cluster.delete(k.MODELS, "gone", namespace)
    wait_for(lambda: get_model(cluster, namespace, "gone") is None, 30, what="finalizer released")
    assert client.list_tags(repo) == []
    from modelpack.errors import NotFoundError
    from modelpack.oci.reference import Reference

    with pytest.raises(NotFoundError):
        client.get_manifest(Reference(registry.host, repo, None, m["status"]["artifact"]["digest"]))


def test_reimport_republishes_and_unchanged_spec_does_not(cluster, namespace, manager, hub,
                                                          small_model):
    hub.add_repo("acme/again", small_model)
    cluster.create(k.MODELS, hf_model("again", namespace, "acme/again"), namespace)
    m = wait_for(phase_is(cluster, namespace, "again", "Ready", "Failed"), 90, what="Ready")
    uid = m["metadata"]["uid"]
    assert len(jobs_of(cluster, uid)) == 1
    first_key = m["status"]["publish"]["key"]

    # unchanged spec: a label and an unrelated annotation, and the same spec again
    cluster.patch(k.MODELS, "again", {"metadata": {"labels": {"team": "a"},
                                                   "annotations": {"note": "x"}}}, namespace)
    cluster.patch(k.MODELS, "again", {"spec": m["spec"]}, namespace)
    time.sleep(1.5)
    assert len(jobs_of(cluster, uid)) == 1
    assert get_model(cluster, namespace, "again")["status"]["publish"]["key"] == first_key

    cluster.patch(k.MODELS, "again", {"metadata": {"annotations": {
        "modelcache.io/reimport": "1"}}}, namespace)

    def republished() -> Any:
        cur = get_model(cluster, namespace, "again")
        st = cur.get("status") or {}
        return cur if st.get("phase") == "Ready" and st["publish"]["key"] != first_key else None
    m2 = wait_for(republished, 90, what="re-published")
    assert len(jobs_of(cluster, uid)) == 2
    assert m2["status"]["artifact"]["digest"] == m["status"]["artifact"]["digest"]


def test_secret_change_republishes(cluster, namespace, manager, hub, small_model):
    hub.add_repo("acme/private", small_model, private=True)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"},
              "data": {"token": base64.b64encode(b"hf_wrong").decode()}}
    cluster.create(k.SECRETS, secret, namespace)
    cluster.create(k.MODELS, hf_model("private", namespace, "acme/private",
                                      authSecretRef={"name": "hf-token", "key": "token"}),
                   namespace)
    m = wait_for(phase_is(cluster, namespace, "private", "Failed", "Ready"), 90,
                 what="Failed with a wrong token")
    assert m["status"]["phase"] == "Failed", m["status"]
    uid = m["metadata"]["uid"]
    assert len(jobs_of(cluster, uid)) == 1

    cluster.patch(k.SECRETS, "hf-token", {"data": {
        "token": base64.b64encode(HUB_TOKEN.encode()).decode()}}, namespace)
    m2 = wait_for(phase_is(cluster, namespace, "private", "Ready"), 90, what="Ready after fix")
    assert m2["status"]["artifact"]["digest"].startswith("sha256:")
    assert len(jobs_of(cluster, uid)) == 2
    # the per-Job copy of the token is gone once the Job is done
    wait_for(lambda: not [s for s in cluster.list(k.SECRETS, SYSTEM_NS, label_selector=(
        f"modelcache.io/uid={uid}"))[0]], 10, what="copied secrets removed")


def test_missing_secret_is_pending_until_created(cluster, namespace, manager, hub, small_model):
    hub.add_repo("acme/later", small_model, private=True)
    cluster.create(k.MODELS, hf_model("later", namespace, "acme/later",
                                      authSecretRef={"name": "later-token"}), namespace)
    m = wait_for(phase_is(cluster, namespace, "later", "Pending"), 30, what="Pending")
    assert cond(m, "SourceResolved")["reason"] == "SecretNotFound"
    assert not jobs_of(cluster, m["metadata"]["uid"])
    cluster.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                               "metadata": {"name": "later-token"},
                               "data": {"token": base64.b64encode(HUB_TOKEN.encode()).decode()}},
                   namespace)
    wait_for(phase_is(cluster, namespace, "later", "Ready"), 90, what="Ready")


def _secrets_holding(client: k.Kube, value: str) -> set[tuple[str, str, str]]:
    """(namespace, name, uid) of every Secret in the cluster whose data holds ``value``."""
    items, _ = client.list(k.SECRETS)
    return {(s["metadata"]["namespace"], s["metadata"]["name"], s["metadata"]["uid"])
            for s in items if any(value in base64.b64decode(str(v)).decode(errors="replace")
                                  for v in (s.get("data") or {}).values())}


def _borrow(manager: ManagerProcess, job: str, token: str) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{manager.port}/credentials/{job}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def test_tenant_secret_is_never_copied(cluster, manager, hub, small_model):
    """The attack: read every Secret in the cluster (as admin) while a Model's publish Job
    runs, looking for the tenant's token outside the tenant's namespace; then ask the
    manager for the credential with a forged token, another Job's token, and after the
    Job has finished."""
    import hashlib
    import hmac
    import threading

    ns = f"tenant-{uuid.uuid4().hex[:6]}"
    ensure_namespace(cluster, ns)
    hub.add_repo("acme/lent", small_model, private=True)
    before = _secrets_holding(cluster, HUB_TOKEN)  # other tests' Secrets, made before
    cluster.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                               "metadata": {"name": "hf-token"},
                               "data": {"token": base64.b64encode(HUB_TOKEN.encode()).decode()}},
                   ns)
    leaks: set[tuple[str, str, str]] = set()
    polls = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            leaks.update(s for s in _secrets_holding(cluster, HUB_TOKEN) - before
                         if s[0] != ns)
            polls[0] += 1
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        cluster.create(k.MODELS, hf_model("lent", ns, "acme/lent",
                                          authSecretRef={"name": "hf-token"}), ns)
        m = wait_for(phase_is(cluster, ns, "lent", "Ready", "Failed"), 90, what="Ready")
    finally:
        done.set()
        watcher.join(5)
    assert m["status"]["phase"] == "Ready", m["status"]  # the private repo needed the token
    assert polls[0] > 0 and leaks == set(), leaks
    job = m["status"]["publish"]["jobName"]
    (obj,) = jobs_of(cluster, m["metadata"]["uid"])
    assert "secretKeyRef" not in str(obj) and HUB_TOKEN not in str(obj)

    def token(name: str) -> str:
        return hmac.new(b"k", name.encode(), hashlib.sha256).hexdigest()

    assert _borrow(manager, job, "0" * 64) == 403  # forged
    assert _borrow(manager, job, token("mc-other-job")) == 403  # another Job's
    assert _borrow(manager, job, token(job)) == 410  # the Job has finished
    assert _borrow(manager, "mc-no-such-job", token("mc-no-such-job")) == 404


def test_cluster_model_publishes_to_cluster_repository(cluster, manager, hub, client,
                                                       small_model):
    hub.add_repo("acme/shared", small_model)
    name = f"shared-{uuid.uuid4().hex[:4]}"
    cluster.create(k.CLUSTER_MODELS, {
        "apiVersion": "modelcache.io/v1alpha1", "kind": "ClusterModel",
        "metadata": {"name": name},
        "spec": {"source": {"huggingFace": {"repo": "acme/shared"}}}})

    def ready() -> Any:
        m = cluster.get(k.CLUSTER_MODELS, name)
        return m if (m.get("status") or {}).get("phase") in ("Ready", "Failed") else None
    m = wait_for(ready, 90, what="ClusterModel Ready")
    assert m["status"]["phase"] == "Ready", m["status"]
    assert client.list_tags(f"cluster/{name}") == ["gen-1"]
    cluster.delete(k.CLUSTER_MODELS, name)

    def gone() -> bool:
        try:
            cluster.get(k.CLUSTER_MODELS, name)
            return False
        except k.NotFound:
            return True
    wait_for(gone, 30, what="ClusterModel deleted")
    assert client.list_tags(f"cluster/{name}") == []


def test_health_and_metrics(manager):
    import urllib.request

    base = f"http://127.0.0.1:{manager.port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=2) as r:
        assert r.status == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=2) as r:
        text = r.read().decode()
    assert "modelcache_reconcile_total" in text
    assert "modelcache_leader 1.0" in text
